"""The token sampler (exact distribution, never a token of probability 0, reproducible from a seed) and the
shared prefill of rows asking the same prompt."""

import pytest
import torch

from chatrlhf.errors import UserError
from chatrlhf.generation import sample_tokens


def _draws(probs: list[float], n: int, seed: int) -> torch.Tensor:
    rows = torch.tensor(probs).repeat(n, 1)
    return sample_tokens(rows, torch.Generator().manual_seed(seed))


def test_frequencies_match_the_probabilities():
    probs = [0.5, 0.0, 0.3, 0.15, 0.05]
    n = 40_000
    counts = torch.bincount(_draws(probs, n, 0), minlength=len(probs)).double() / n
    for k, p in enumerate(probs):
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(counts[k].item() - p) <= 5 * sigma + 1e-12, (k, counts[k].item(), p)
    assert counts[1] == 0


def test_zero_probability_tokens_at_either_end_are_never_drawn():
    assert set(_draws([0.0, 0.0, 1.0, 0.0], 5000, 1).tolist()) == {2}
    assert set(_draws([0.0, 0.7, 0.3, 0.0, 0.0], 5000, 2).tolist()) == {1, 2}


def test_unnormalised_rows_and_a_large_vocabulary():
    # rows that do not sum to 1 (rounding in softmax) are sampled in proportion; the vocabulary of the
    # default model
    probs = torch.zeros(4, 49152)
    probs[:, 17] = 2.0
    probs[:, 49151] = 2.0
    drawn = sample_tokens(probs.repeat(500, 1), torch.Generator().manual_seed(3))
    assert set(drawn.tolist()) == {17, 49151}
    assert 0.45 < (drawn == 17).double().mean().item() < 0.55


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_a_row_without_a_distribution_stops_with_a_clear_error(bad):
    # softmax of NaN or infinite logits gives NaN rows; the inverse CDF would return an index past the
    # vocabulary, which fails later and far away (an embedding lookup)
    probs = torch.full((3, 5), 0.2)
    probs[1] = bad
    with pytest.raises(UserError, match=r"1 of 3 rows .*rows \[1\].*NaN or infinite.*lower lr"):
        sample_tokens(probs, torch.Generator().manual_seed(0))


def test_the_same_seed_draws_the_same_tokens():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(4))
    probs = logits.softmax(-1)
    a = sample_tokens(probs, torch.Generator().manual_seed(5))
    b = sample_tokens(probs, torch.Generator().manual_seed(5))
    c = sample_tokens(probs, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------------------------------
# one prefill per distinct prompt


def test_distinct_rows_lists_each_prompt_once_in_first_seen_order():
    from chatrlhf.generation import distinct_rows

    rows, inverse = distinct_rows([[5, 6], [7], [5, 6], [7], [8, 9, 1], [5, 6]])
    assert rows == [0, 1, 4]
    assert inverse == [0, 1, 0, 1, 2, 0]
    assert distinct_rows([]) == ([], [])


def test_rows_with_the_same_prompt_share_one_prefill_and_sample_as_before(tiny_model, tokenizer):
    from chatrlhf.configs import SamplingConfig
    from chatrlhf.generation import generate
    from chatrlhf.models import load_causal_lm

    model = load_causal_lm(tiny_model, tokenizer, torch.device("cpu"))
    a = tokenizer("Tell me about bees.")["input_ids"]
    b = tokenizer("Rain, in lowercase, at most fifteen words please.")["input_ids"]
    prompts = [a, b, a, a, b, a]  # two distinct prompts of different lengths, so with left padding
    prefill_rows = []

    def count(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefill_rows.append(kwargs["input_ids"].shape[0])

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    try:
        shared = generate(model, prompts, sampling, eos, pad, torch.Generator().manual_seed(7))
        alone = generate(
            model, prompts, sampling, eos, pad, torch.Generator().manual_seed(7), share_prefill=False
        )
    finally:
        handle.remove()
    assert prefill_rows == [2, 6]
    assert torch.equal(shared.response_ids, alone.response_ids)
    assert torch.equal(shared.response_mask, alone.response_mask)
    assert torch.equal(shared.prompt_ids, alone.prompt_ids)
    torch.testing.assert_close(shared.logprobs, alone.logprobs, rtol=1e-5, atol=1e-5)
    # the rows of one prompt drew different answers: the copied caches are not shared storage
    assert len({tuple(r) for r in shared.response_ids[[0, 2, 3, 5]].tolist()}) > 1


def test_kept_trunk_equals_a_full_forward_of_the_sequences_at_every_real_token(tokenizer, tmp_path):
    """`keep_trunk`: the hidden states entering a layer, recorded while decoding, are those a full forward
    of prompt + answer computes, at every prompt and answer token, the last one included (the reward
    model reads it), also for rows that stopped early and left the batch; the tokens are unchanged."""
    from conftest import make_tiny_model

    from chatrlhf.configs import SamplingConfig
    from chatrlhf.forward import trunk_hidden
    from chatrlhf.generation import generate
    from chatrlhf.models import load_causal_lm

    model = load_causal_lm(make_tiny_model(tmp_path, tokenizer, layers=3), tokenizer, torch.device("cpu"))
    a = tokenizer("Tell me about bees.")["input_ids"]
    b = tokenizer("Rain, in lowercase, at most fifteen words please.")["input_ids"]
    prompts = [a, b, a, b, a]
    stop_at = torch.tensor([2, 5, 9, 9, 3])  # rows stop after these many tokens; the rest run to the end

    def stops(counter):
        def on_step(token, alive):
            counter[0] += 1
            return (stop_at == counter[0]) & alive

        return on_step

    sampling = SamplingConfig(max_new_tokens=9, temperature=1.0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    gens = [
        generate(
            model, prompts, sampling, eos, pad, torch.Generator().manual_seed(3), stops([0]), keep_trunk=k
        )
        for k in (2, 0)
    ]
    kept, plain = gens
    assert plain.trunk is None and torch.equal(kept.response_ids, plain.response_ids)
    assert kept.response_mask.sum(1).tolist() == [2, 5, 9, 9, 3]
    full = trunk_hidden(model, kept.sequences, kept.attention_mask, 2).hidden
    real = kept.attention_mask.bool()
    assert kept.trunk.shape == full.shape
    torch.testing.assert_close(kept.trunk[real], full[real], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep_trunk 3"):
        generate(model, [a], sampling, eos, pad, keep_trunk=3)


def test_rows_sharing_a_prompt_run_it_once_in_training_forwards_with_the_same_numbers(
    tokenizer, tmp_path, monkeypatch
):
    """Response logits (with LoRA above a trunk and without), values and reward scores of rows that share
    prompts: the prompt runs once per distinct prompt, its KV cache copied to the rows; outputs and the
    gradients of the trainable weights equal a forward of every row in full."""
    from conftest import make_tiny_model
    from transformers import AutoModelForSequenceClassification

    from chatrlhf.configs import LoraConfig, SamplingConfig
    from chatrlhf.forward import response_logits, sequence_scores, sharing, token_values, trunk_hidden
    from chatrlhf.generation import generate
    from chatrlhf.models import apply_lora, load_causal_lm

    path = make_tiny_model(tmp_path, tokenizer, layers=3)
    model = apply_lora(
        load_causal_lm(path, tokenizer, torch.device("cpu")),
        LoraConfig(rank=4, targets=["q_proj", "v_proj"], layers=1),
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    scorer = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    a = tokenizer("Tell me about bees.")["input_ids"]
    b = tokenizer("Rain, in lowercase, at most fifteen words please.")["input_ids"]
    counter = [0]

    def stop_some(token, alive):
        counter[0] += 1
        return (torch.tensor([3, 0, 0, 5, 0, 0]) == counter[0]) & alive

    gen = generate(
        model, [a, b, a, a, b, a], SamplingConfig(8, temperature=1.0), tokenizer.eos_token_id,
        tokenizer.pad_token_id, torch.Generator().manual_seed(5), stop_some,
    )  # fmt: skip
    seq, att, width = gen.sequences, gen.attention_mask, gen.prompt_width
    last = width + gen.response_mask.sum(1) - 1
    real = gen.response_mask.bool()
    trunk = trunk_hidden(model, seq, att, 2)
    shared = []
    real_shared = sharing._shared_prompt_decode

    def counting(*args):
        shared.append(len(args[3]))
        return real_shared(*args)

    def outputs(rows: torch.Tensor) -> dict:
        """Every output for the batch `rows`; the LoRA weights' gradient of the log-partition summed over
        the answer tokens."""
        model.zero_grad()
        got = {
            "full": response_logits(model, seq[rows], att[rows], width, 1.0),
            "trunk": response_logits(model, seq[rows], att[rows], width, 1.0, trunk.rows(rows)),
        }
        (got["full"] + got["trunk"])[real[rows]].logsumexp(-1).sum().backward()
        got["grads"] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            got["values"] = token_values(scorer, seq[rows], att[rows], width)
            got["scores"] = sequence_scores(scorer, seq[rows], att[rows], last[rows], prompt_width=width)
        return got

    monkeypatch.setattr(sharing, "_shared_prompt_decode", counting)
    together = outputs(torch.arange(len(seq)))
    assert shared == [2, 2, 2, 2]  # logits with and without the trunk, values, scores: 2 distinct prompts
    alone = [outputs(torch.tensor([r])) for r in range(len(seq))]  # a row alone has nothing to share
    assert shared == [2, 2, 2, 2]
    for name in ("full", "trunk", "values"):
        torch.testing.assert_close(
            together[name][real], torch.cat([a[name] for a in alone])[real], rtol=1e-4, atol=1e-5
        )
    torch.testing.assert_close(
        together["scores"], torch.cat([a["scores"] for a in alone]), rtol=1e-4, atol=1e-5
    )
    for i, grad in enumerate(together["grads"]):
        torch.testing.assert_close(grad, sum(a["grads"][i] for a in alone), rtol=1e-4, atol=1e-6)


def _continuous_model(tokenizer, prompts):
    """A tiny llama whose greedy answers to `prompts` end at different lengths: EOS takes the place of a
    token its answers choose now and then."""
    from collections import Counter

    from transformers import LlamaConfig, LlamaForCausalLM

    from chatrlhf.configs import SamplingConfig
    from chatrlhf.generation import generate

    torch.manual_seed(11)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        answers = generate(model, prompts, SamplingConfig(max_new_tokens=24), eos, pad).token_lists(eos)
        counts = Counter(t for a in answers for t in set(a))
        # a token some answers choose and others do not: those answers end there, at different steps
        token = min(counts, key=lambda t: abs(counts[t] - len(prompts) / 2))
        model.lm_head.weight[eos] = model.lm_head.weight[token] * 1.05
    return model


PROMPT_LENGTHS = [3, 17, 5, 40, 8, 2, 25, 11, 6]


@pytest.mark.parametrize("slots", [1, 3, 16])
def test_continuous_batching_answers_each_prompt_as_alone(tokenizer, slots):
    from chatrlhf.configs import SamplingConfig
    from chatrlhf.generation import generate, generate_each

    rng = torch.Generator().manual_seed(5)
    prompts = [torch.randint(300, 2000, (n,), generator=rng).tolist() for n in PROMPT_LENGTHS]
    model = _continuous_model(tokenizer, prompts)
    sampling = SamplingConfig(max_new_tokens=24, min_new_tokens=2)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    each = generate_each(model, prompts, sampling, eos, pad, slots=slots)
    alone = [generate(model, [p], sampling, eos, pad) for p in prompts]
    for cont, gen in zip(each, alone):
        assert cont.ids == gen.token_lists(eos)[0]
        assert cont.finished == bool(gen.finished[0])
    lengths = {len(c.ids) for c in each}
    assert len(lengths) > 2 and max(lengths) == 24 and min(lengths) >= 2  # rows did end at different times
    assert any(c.finished for c in each) and not all(c.finished for c in each)


def test_continuous_batching_reports_each_answer_as_it_ends(tokenizer):
    from chatrlhf.configs import SamplingConfig
    from chatrlhf.generation import generate_each

    prompts = [[400 + i, 500 + i, 600] for i in range(7)]
    model = _continuous_model(tokenizer, prompts)
    heard = []
    each = generate_each(model, prompts, SamplingConfig(max_new_tokens=10), tokenizer.eos_token_id,
                         tokenizer.pad_token_id, slots=2, on_done=lambda i, c: heard.append((i, c)))  # fmt: skip
    assert sorted(i for i, _ in heard) == list(range(7))
    assert all(each[i] is c for i, c in heard)


def _lora_model(tokenizer, folder, layers: int = 3):
    """A tiny llama with LoRA on q, v and the MLP's gate in its top two layers, the adapters moved off zero."""
    from conftest import make_tiny_model

    from chatrlhf.configs import LoraConfig
    from chatrlhf.models import apply_lora, load_causal_lm

    path = make_tiny_model(folder, tokenizer, layers=layers)
    lora = LoraConfig(rank=4, targets=["q_proj", "v_proj", "gate_proj"], layers=2)
    model = apply_lora(load_causal_lm(path, tokenizer, torch.device("cpu")), lora)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lean_decoding_step_gives_the_forward_steps_tokens_trunk_and_log_probs(
    tokenizer, tmp_path, dtype
):
    """The lean step (fused weights, few operators) against decoding through the model's forward, with LoRA
    adapters in the top layers and a kept trunk: in fp32 the same tokens and numbers to float rounding; under
    bf16 autocast (the weights held as bf16 copies) the same greedy tokens and log-probs within bf16's
    rounding. Sampling reads the same generator, so the sampled answers match too."""
    import chatrlhf.generation as generation
    from chatrlhf.configs import SamplingConfig
    from chatrlhf.decode_step import ForwardStep, LeanStep, stepper

    model = _lora_model(tokenizer, tmp_path)
    assert isinstance(stepper(model, "cache"), LeanStep)
    a = tokenizer("Tell me about bees.")["input_ids"]
    b = tokenizer("Rain, in lowercase, at most fifteen words please.")["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    runs = {}
    for name, make in (("lean", stepper), ("forward", lambda m, k, t=0: ForwardStep(m, k))):
        generation.stepper = make
        try:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                runs[name] = [
                    generation.generate(
                        model,
                        [a, b, a, b],
                        SamplingConfig(10, temperature=t),
                        eos,
                        pad,
                        torch.Generator().manual_seed(1),
                        keep_trunk=1,
                    )  # fmt: skip
                    for t in (0.0, 1.0)
                ]
        finally:
            generation.stepper = stepper
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}
    for lean, forward in zip(runs["lean"], runs["forward"]):
        assert torch.equal(lean.response_ids, forward.response_ids)
        torch.testing.assert_close(lean.logprobs, forward.logprobs, **tol)
        torch.testing.assert_close(lean.trunk, forward.trunk, **tol)


def test_the_lean_step_follows_weight_changes_and_leaves_other_models_to_their_forward(tokenizer, tmp_path):
    """Frozen weights are fused once and used again; after a fused AdamW step (which leaves `_version` as it
    was) the lean step decodes with the new weights, as the forward does; adapters switched off are left
    out; a model with adapters of another kind, or of a family the step does not know, decodes through its
    own forward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import chatrlhf.generation as generation
    from chatrlhf.configs import SamplingConfig
    from chatrlhf.decode_step import ForwardStep, stepper
    from chatrlhf.models import load_causal_lm

    model = _lora_model(tokenizer, tmp_path)
    first, again = stepper(model, "cache"), stepper(model, "cache")
    assert first.weights.layers[0].qkv.weight is again.weights.layers[0].qkv.weight  # frozen: kept
    prompts = [tokenizer("Tell me about bees.")["input_ids"]]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def greedy(make) -> list[int]:
        generation.stepper = make
        try:
            return generation.generate(model, prompts, SamplingConfig(12), eos, pad).response_ids[0].tolist()
        finally:
            generation.stepper = stepper

    before = greedy(stepper)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.5, fused=True)
    sum(p.square().sum() for p in trainable).backward()
    optimizer.step()
    after = greedy(stepper)
    assert after != before and after == greedy(lambda m, k, t=0: ForwardStep(m, k))
    with model.disable_adapter():
        assert all(layer.qkv.lora is None for layer in stepper(model, "cache").weights.layers)
    assert any(layer.qkv.lora is not None for layer in stepper(model, "cache").weights.layers)

    from conftest import make_tiny_model
    from peft import LoHaConfig, get_peft_model

    loha = get_peft_model(
        load_causal_lm(make_tiny_model(tmp_path / "loha", tokenizer), tokenizer, torch.device("cpu")),
        LoHaConfig(r=2, target_modules=["q_proj"]),
    )
    assert isinstance(stepper(loha, "cache"), ForwardStep)  # an adapter the lean step does not compute

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4)).eval()
    assert isinstance(stepper(gpt2, "past_key_values"), ForwardStep)
    gen = generation.generate(gpt2, prompts, SamplingConfig(5, min_new_tokens=5), eos, 0)
    assert gen.response_mask.sum() == 5

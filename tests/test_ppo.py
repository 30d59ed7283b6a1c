"""PPO end to end on tiny models: log-probs under padding, learning a rule reward, resume, PPO-ptx, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import chatrlhf, make_tiny_model, write_jsonl
from transformers import AutoModelForCausalLM

from chatrlhf.configs import PPOConfig, PromptData, RankingData
from chatrlhf.experience import make_experience, rollout, score_rollouts
from chatrlhf.forward import gather_logprobs, response_logits
from chatrlhf.generation import SamplingConfig, generate
from chatrlhf.models import load_causal_lm, load_reward_model
from chatrlhf.ppo import minibatch_loss, train
from chatrlhf.runs import read_metrics

PROMPTS = [
    {"prompt": p}
    for p in [
        "Hi",
        "Tell me a story about a cat.",
        "Why is the sky blue? Explain.",
        "Count to 3.",
        "Name a fruit",
        "What is 2+2?",
        "Say hello",
        "Good morning!",
    ]
]


def low_half_reward(vocab: int):
    """Rule reward: the share of answer tokens from the lower half of the vocabulary."""
    return lambda prompts, texts, ids: [sum(t < vocab // 2 for t in r) / max(len(r), 1) for r in ids]


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def ppo_config(tiny_model, prompts_file, out, **kw) -> PPOConfig:
    base = dict(
        model=tiny_model,
        value_model=tiny_model,
        data=PromptData(train=prompts_file),
        output_dir=str(out),
        batch_size=8,
        lr=3e-3,
        ppo_epochs=2,
        minibatches=2,
        save_every=0,
        sample_every=5,
        dtype="fp32",
    )
    sampling = {k: kw.pop(k) for k in ("max_new_tokens", "temperature", "top_p", "top_k") if k in kw}
    if kw.get("value_model") == "policy":  # the value head on the policy, no value model
        kw.update(value_model="", value_on_policy=True)
    if kw.get("advantage_estimator") in ("rloo", "grpo") or kw.get("reward") == "judge":  # no model to start
        kw.setdefault("value_model", "")
    base.update(kw)
    return PPOConfig(**base, sampling=SamplingConfig(**{"max_new_tokens": 8, "temperature": 1.0, **sampling}))


def assert_same_metrics(runs: dict[bool, list[dict]], extra: tuple[str, ...], exact: bool = False) -> None:
    """Every step of the runs with a feature on (`runs[True]`) and off logged the same reward, KL, losses and
    `extra` metrics: bit for bit when `exact`, else to fp32 tolerance."""
    for on, off in zip(runs[True], runs[False], strict=True):
        for key in ("ppo/reward", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", *extra):
            assert on[key] == (off[key] if exact else pytest.approx(off[key], rel=1e-4, abs=1e-5)), key


def test_left_padded_logprobs_equal_each_sequence_alone(tiny_model, tokenizer):
    model = load_causal_lm(tiny_model, tokenizer).eval()
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in PROMPTS[:3]]
    gen = generate(
        model,
        prompts,
        SamplingConfig(max_new_tokens=6, temperature=1.0),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        torch.Generator().manual_seed(0),
    )
    seq = torch.cat([gen.prompt_ids, gen.response_ids], 1)
    mask = torch.cat([gen.prompt_mask, gen.response_mask], 1)
    width = gen.prompt_ids.shape[1]
    with torch.no_grad():
        batched = (
            gather_logprobs(response_logits(model, seq, mask, width, 1.0), gen.response_ids)
            * gen.response_mask
        )
        assert torch.allclose(batched, gen.logprobs, atol=1e-4)  # the sampler's log-probs agree
        for b, p in enumerate(prompts):
            n = int(gen.response_mask[b].sum())
            alone = torch.tensor([p + gen.response_ids[b, :n].tolist()])
            lp = gather_logprobs(
                response_logits(model, alone, torch.ones_like(alone), len(p), 1.0), alone[:, len(p) :]
            )
            assert torch.allclose(lp[0], batched[b, :n], atol=1e-4)


def test_reward_rises_and_the_right_parameters_change(tiny_model, tokenizer, prompts_file, tmp_path):
    cfg = ppo_config(tiny_model, prompts_file, tmp_path / "ppo", max_steps=16, top_k=10)
    train(cfg, reward_fn=low_half_reward(len(tokenizer)))
    rows = [r for r in read_metrics(cfg.output_dir) if "ppo/reward" in r]
    rewards = [r["ppo/reward"] for r in rows]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards
    assert all(torch.isfinite(torch.tensor([r["ppo/kl"] for r in rows])))
    assert {
        "ppo/entropy",
        "ppo/clipfrac",
        "ppo/approx_kl",
        "ppo/value_loss",
        "ppo/explained_variance",
        "ppo/eos_rate",
        "timing/rollout",
        "timing/score",
        "timing/update",
    } <= set(rows[-1])
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(cfg.output_dir).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    value_before = load_reward_model(tiny_model, tokenizer, "cpu").state_dict()
    value_after = load_reward_model(f"{cfg.output_dir}/value", tokenizer, "cpu").state_dict()
    assert any(not torch.equal(value_before[k], value_after[k]) for k in value_before if "score" not in k)
    assert (tmp_path / "ppo" / "ppo_curves.png").is_file() and (tmp_path / "ppo" / "samples.jsonl").is_file()


def test_reference_stays_bit_identical_through_an_update_that_changes_the_policy(
    tiny_model, tokenizer, prompts_file, tmp_path
):
    from accelerate import Accelerator

    from chatrlhf.ppo import UpdateContext, _PPOLoss, ppo_update, train_state

    cfg, models, exp = _experience(tiny_model, tokenizer, prompts_file, tmp_path, lr=1e-3)
    before = {n: p.detach().clone() for n, p in models.reference.named_parameters()}
    policy_before = {n: p.detach().clone() for n, p in models.policy.named_parameters()}
    state = train_state(cfg, models, 1, None)
    accelerator = Accelerator(cpu=True)
    wrapped, optimizer = accelerator.prepare(_PPOLoss(models, cfg, tokenizer.pad_token_id), state.optimizer)
    stats = ppo_update(
        UpdateContext(accelerator, wrapped, optimizer, cfg), exp, torch.Generator().manual_seed(0)
    )
    assert stats["ppo/grad_norm"] > 0
    changed = [n for n, p in models.policy.named_parameters() if not torch.equal(p, policy_before[n])]
    assert changed, "the update left the policy as it was"
    assert all(torch.equal(p, before[n]) for n, p in models.reference.named_parameters())


def _experience(tiny_model, tokenizer, prompts_file, tmp_path, models=None, **kw):
    from chatrlhf.ppo_models import load_models

    cfg = ppo_config(tiny_model, prompts_file, tmp_path / "x", **kw)
    if models is None:
        models = load_models(cfg, tokenizer, tiny_model, low_half_reward(len(tokenizer)), "cpu")
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in PROMPTS]
    gen = rollout(models, prompts, cfg, tokenizer, torch.Generator().manual_seed(0))
    scored = score_rollouts(
        models,
        gen,
        cfg,
        [[{"role": "user", "content": p["prompt"]}] for p in PROMPTS],
        tokenizer,
        low_half_reward(len(tokenizer)),
    )
    return cfg, models, make_experience(gen, scored, cfg, cfg.kl_coef)


def test_ptx_gradient_adds_coef_times_the_lm_gradient(tiny_model, tokenizer, prompts_file, tmp_path):
    from chatrlhf.data import chunk_stream

    cfg, models, exp = _experience(tiny_model, tokenizer, prompts_file, tmp_path)
    rows = chunk_stream([tokenizer("plain pretraining text about cats and dogs " * 4)["input_ids"]], 32)
    idx = torch.arange(8)

    def grads(coef, ptx_rows):
        models.policy.zero_grad()
        cfg.ptx_coef = coef
        loss, _ = minibatch_loss(models, exp, idx, cfg, ptx_rows, tokenizer.pad_token_id)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in models.policy.parameters()])

    no_ptx = grads(0.0, None)
    zero_coef = grads(0.0, rows)
    with_ptx = grads(2.0, rows)
    assert torch.allclose(no_ptx, zero_coef, atol=1e-7)  # gamma = 0 is no ptx
    from chatrlhf.forward import collate, target_logits
    from chatrlhf.losses import token_nll

    models.policy.zero_grad()
    token_nll(*target_logits(models.policy, collate(rows, tokenizer.pad_token_id, "cpu"))).mean().backward()
    lm = torch.cat([p.grad.flatten() for p in models.policy.parameters()])
    assert torch.allclose(with_ptx, no_ptx + 2.0 * lm, atol=1e-5)
    assert not torch.allclose(with_ptx, no_ptx)


def test_resume_gives_identical_metrics(tiny_model, tokenizer, prompts_file, tmp_path):
    reward = low_half_reward(len(tokenizer))
    whole = ppo_config(tiny_model, prompts_file, tmp_path / "whole", max_steps=4, save_every=2, batch_size=4)
    train(whole, reward_fn=reward)

    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 3:
            raise Killed

    cut = ppo_config(tiny_model, prompts_file, tmp_path / "cut", max_steps=4, save_every=2, batch_size=4)
    with pytest.raises(Killed):
        train(cut, reward_fn=reward, on_step=kill)
    cut.resume = True
    train(cut, reward_fn=reward)
    keys = ["ppo/reward", "ppo/kl", "ppo/value_loss", "ppo/policy_loss"]
    a = [[r[k] for k in keys] for r in read_metrics(whole.output_dir) if "ppo/reward" in r]
    b = [[r[k] for k in keys] for r in read_metrics(cut.output_dir) if "ppo/reward" in r]
    assert len(a) == len(b) == 4
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_ppo_command_with_a_reward_model(tmp_path, tokenizer, prompts_file):
    policy = make_tiny_model(tmp_path / "policy", tokenizer, seed=1)
    rm = make_tiny_model(tmp_path / "rm", tokenizer, seed=2)  # a causal LM: the scalar head starts random
    result = chatrlhf(
        "ppo",
        "--model",
        policy,
        "--reward_model",
        rm,
        "--data.train",
        prompts_file,
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--batch_size",
        "4",
        "--sampling.max_new_tokens",
        "6",
        "--kl_estimator",
        "k3",
        "--target_kl",
        "1.0",
        "--missing_eos_penalty",
        "1.0",
        "--ema_decay",
        "0.9",
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["ppo/kl_coef"] != rows[0]["ppo/kl_coef"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None


def test_ppo_input_errors(tmp_path, tiny_model, tokenizer):
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "hi"}, {"prompt": "word " * 300}])
    result = chatrlhf(
        "ppo",
        "--model",
        tiny_model,
        "--reward_model",
        tiny_model,
        "--data.train",
        long,
        "--max_prompt_length",
        "64",
        "--output_dir",
        str(tmp_path / "o"),
    )
    assert (
        result.returncode == 2
        and f"{long}:2: field `prompt`" in result.stderr
        and "max_prompt_length=64" in result.stderr
    )
    assert not (tmp_path / "o").exists()
    other = tokenizer.__class__.from_pretrained(tiny_model)
    other.add_tokens(["<extra_token>"])
    foreign = tmp_path / "foreign"
    make_tiny_model(foreign, other)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    result = chatrlhf(
        "ppo",
        "--model",
        tiny_model,
        "--reward_model",
        str(foreign),
        "--data.train",
        prompts,
        "--output_dir",
        str(tmp_path / "o2"),
    )
    assert result.returncode == 2 and "different tokenizer vocabulary" in result.stderr
    assert not (tmp_path / "o2").exists()


def test_lora_ppo_trains_adapters_and_uses_the_disabled_adapter_as_reference(
    tiny_model, tokenizer, prompts_file, tmp_path
):
    from chatrlhf.configs import LoraConfig
    from chatrlhf.ppo_models import load_models

    cfg = ppo_config(
        tiny_model,
        prompts_file,
        tmp_path / "lora",
        max_steps=2,
        lora=LoraConfig(rank=4, targets=["q_proj", "v_proj"]),
    )
    models = load_models(cfg, tokenizer, tiny_model, low_half_reward(len(tokenizer)), "cpu")
    assert models.reference is None
    trainable = [n for n, p in models.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".score." in n for n, p in models.value.named_parameters() if p.requires_grad)
    train(cfg, reward_fn=low_half_reward(len(tokenizer)))
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(cfg.output_dir).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def test_rows_that_finish_leave_the_batch_without_changing_the_others(tiny_model, tokenizer):
    model = load_causal_lm(tiny_model, tokenizer).eval()
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in PROMPTS[:3]]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    steps = []

    def stop_early(token, alive):  # row 0 stops after 2 tokens, row 1 after 5: both leave the batch
        steps.append(alive.clone())
        return torch.tensor([len(steps) == 2, len(steps) == 5, False])

    gen = generate(model, prompts, greedy, tokenizer.eos_token_id, tokenizer.pad_token_id, on_step=stop_early)
    assert gen.response_mask.sum(1).tolist() == [2, 5, 8]
    assert (gen.response_ids[0, 2:] == tokenizer.pad_token_id).all()
    for b, p in enumerate(prompts):  # each row's tokens and log-probs are those it gets decoded alone
        alone = generate(model, [p], greedy, tokenizer.eos_token_id, tokenizer.pad_token_id)
        n = int(gen.response_mask[b].sum())
        assert gen.response_ids[b, :n].tolist() == alone.response_ids[0, :n].tolist()
        assert torch.allclose(gen.logprobs[b, :n], alone.logprobs[0, :n], atol=1e-4)


def test_rloo_learns_without_a_value_model_and_resumes_exactly(tiny_model, tokenizer, prompts_file, tmp_path):
    reward = low_half_reward(len(tokenizer))
    rloo = dict(advantage_estimator="rloo", samples_per_prompt=4, batch_size=4, top_k=10)
    cfg = ppo_config(tiny_model, prompts_file, tmp_path / "rloo", max_steps=12, **rloo)
    train(cfg, reward_fn=reward)
    rows = [r for r in read_metrics(cfg.output_dir) if "ppo/reward" in r]
    rewards = [r["ppo/reward"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert "ppo/value_loss" not in rows[-1] and not (tmp_path / "rloo" / "value").exists()
    samples = [json.loads(line) for line in (tmp_path / "rloo" / "samples.jsonl").read_text().splitlines()]
    assert len([s for s in samples if s["step"] == 12]) == 16  # 4 prompts x 4 answers per step

    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 3:
            raise Killed

    whole = ppo_config(tiny_model, prompts_file, tmp_path / "whole", max_steps=4, save_every=2, **rloo)
    train(whole, reward_fn=reward)
    cut = ppo_config(tiny_model, prompts_file, tmp_path / "cut", max_steps=4, save_every=2, **rloo)
    with pytest.raises(Killed):
        train(cut, reward_fn=reward, on_step=kill)
    cut.resume = True
    train(cut, reward_fn=reward)
    keys = ["ppo/reward", "ppo/kl", "ppo/policy_loss"]
    a = [[r[k] for k in keys] for r in read_metrics(whole.output_dir) if "ppo/reward" in r]
    b = [[r[k] for k in keys] for r in read_metrics(cut.output_dir) if "ppo/reward" in r]
    assert len(a) == len(b) == 4
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_grpo_learns_without_a_value_model(tiny_model, tokenizer, prompts_file, tmp_path):
    grpo = dict(advantage_estimator="grpo", samples_per_prompt=4, batch_size=4, top_k=10)
    cfg = ppo_config(tiny_model, prompts_file, tmp_path / "grpo", max_steps=12, **grpo)
    train(cfg, reward_fn=low_half_reward(len(tokenizer)))
    rows = [r for r in read_metrics(cfg.output_dir) if "ppo/reward" in r]
    rewards = [r["ppo/reward"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert "ppo/value_loss" not in rows[-1] and not (tmp_path / "grpo" / "value").exists()


def test_reward_from_a_judge_scores_each_rollout_with_its_record(tiny_model, tmp_path):
    from chatrlhf.judges import IFEvalJudge

    records = [
        {
            "prompt": "Write about tea in all lowercase.",
            "instruction_id_list": ["change_case:english_lowercase"],
        },
        {"prompt": "Name a river without commas.", "instruction_id_list": ["punctuation:no_comma"]},
    ]
    prompts = write_jsonl(tmp_path / "ifeval.jsonl", records)
    cfg = ppo_config(
        tiny_model, prompts, tmp_path / "judge", max_steps=2, batch_size=2, samples_per_prompt=2,
        advantage_estimator="grpo", reward="judge", judge="ifeval", sample_every=1,
    )  # fmt: skip
    train(cfg)
    samples = [json.loads(x) for x in (tmp_path / "judge" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    by_prompt = {r["prompt"]: r for r in records}
    judge = IFEvalJudge()
    for s in samples:
        meta = {"kwargs": [{}], **by_prompt[s["prompt"]]}
        expected = judge.scores([{"role": "user", "content": s["prompt"]}], [s["response"]], meta)[0]
        assert s["score"] == pytest.approx(expected)
    run = json.loads((tmp_path / "judge" / "run.json").read_text())
    assert run["lineage"]["reward_model"] == "judge ifeval"


def test_reward_judge_refuses_a_reward_model_and_records_without_instructions(
    tmp_path, tiny_model, prompts_file
):
    result = chatrlhf(
        "ppo", "--model", tiny_model, "--reward_model", tiny_model, "--reward", "judge",
        "--data.train", prompts_file, "--output_dir", str(tmp_path / "o"),
    )  # fmt: skip
    assert result.returncode == 2 and "reward_model: with reward: judge" in result.stderr
    result = chatrlhf(
        "ppo", "--model", tiny_model, "--reward", "judge", "--judge", "ifeval", "--advantage_estimator", "rloo",
        "--samples_per_prompt", "2", "--data.train", prompts_file, "--output_dir", str(tmp_path / "o"),
        "--max_steps", "1", "--sampling.max_new_tokens", "4",
    )  # fmt: skip
    assert result.returncode == 2 and f"{prompts_file}:1" in result.stderr
    assert (
        "needs the record's field `instruction_id_list`" in result.stderr and "Traceback" not in result.stderr
    )
    assert not (tmp_path / "o").exists()


def test_old_logprobs_from_a_forward_are_the_reference_computation(
    tiny_model, tokenizer, prompts_file, tmp_path
):
    """`logprobs_from: forward` takes the policy's log-probs of the sampled tokens from a forward over the
    finished rollouts, the computation the reference and the update use: in fp32 it gives decoding's own to
    1e-5, in bf16 the untrained policy's (LoRA's B is zero) equal the reference's to the bit, so the first
    step's KL is exactly 0, which decoding's incremental bf16 forward does not promise."""
    from chatrlhf.configs import LoraConfig
    from chatrlhf.harness import autocast
    from chatrlhf.ppo_models import load_models

    lora = LoraConfig(rank=4, targets=["q_proj", "v_proj"], layers=1)
    reward = low_half_reward(len(tokenizer))
    cfg = ppo_config(tiny_model, prompts_file, tmp_path / "x", lora=lora)
    models = load_models(cfg, tokenizer, tiny_model, reward, "cpu")
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in PROMPTS]
    convs = [[{"role": "user", "content": p["prompt"]}] for p in PROMPTS]
    for dtype in (torch.float32, torch.bfloat16):
        with autocast(torch.device("cpu"), dtype):
            gen = rollout(models, prompts, cfg, tokenizer, torch.Generator().manual_seed(0))
            scored = score_rollouts(models, gen, cfg, convs, tokenizer, reward, recompute=True)
        exp = make_experience(gen, scored, cfg, cfg.kl_coef)
        assert exp.logprobs is scored.logprobs and gen.response_mask.sum() > 0
        if dtype == torch.float32:
            assert torch.allclose(scored.logprobs, gen.logprobs, atol=1e-5)
        else:
            assert torch.equal(scored.logprobs, scored.ref_logprobs) and torch.equal(
                exp.kl, torch.zeros_like(exp.kl)
            )
    run = ppo_config(
        tiny_model,
        prompts_file,
        tmp_path / "run",
        max_steps=1,
        lora=lora,
        dtype="bf16",
        logprobs_from="forward",
    )
    train(run, reward_fn=reward)
    assert next(r for r in read_metrics(run.output_dir) if "ppo/kl" in r)["ppo/kl"] == 0.0
    result = chatrlhf(
        "ppo", "--model", tiny_model, "--reward_model", tiny_model, "--data.train", prompts_file,
        "--output_dir", str(tmp_path / "bad"), "--logprobs_from", "decoder",
    )  # fmt: skip
    assert (
        result.returncode == 2
        and "`logprobs_from` must be one of rollout | forward, got 'decoder'" in result.stderr
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "bad").exists()


def test_rloo_needs_two_answers_per_prompt(tmp_path, tiny_model, prompts_file):
    for extra, message in (
        (["--advantage_estimator", "rloo"], "samples_per_prompt must be at least 2"),
        (
            ["--advantage_estimator", "vtrace"],
            "`advantage_estimator` must be one of gae | rloo | grpo, got 'vtrace'",
        ),
        (["--samples_per_prompt", "0"], "samples_per_prompt must be at least 1"),
    ):
        result = chatrlhf(
            "ppo", "--model", tiny_model, "--reward_model", tiny_model, "--data.train", prompts_file,
            "--output_dir", str(tmp_path / "o"), *extra,
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "o").exists()


def test_shared_trunk_changes_no_number_and_no_frozen_weight(tiny_model, tokenizer, prompts_file, tmp_path):
    """LoRA in the last layer only: the first layer's output is computed once per batch for the reference
    and every update pass. Reference log-probs, the update's new log-probs, every logged metric and the
    exported weights equal those of separate full-depth forwards; the layers below the adapters stay as
    they were."""
    from chatrlhf.configs import LoraConfig
    from chatrlhf.ppo_models import load_models

    lora = LoraConfig(rank=4, targets=["q_proj", "v_proj"], layers=1)
    runs = {}
    for shared in (True, False):
        cfg = ppo_config(
            tiny_model, prompts_file, tmp_path / f"trunk{shared}", max_steps=3, lora=lora, share_trunk=shared
        )
        models = load_models(cfg, tokenizer, tiny_model, low_half_reward(len(tokenizer)), "cpu")
        assert models.trunk_layers == (1 if shared else 0) and models.reference is None
        train(cfg, reward_fn=low_half_reward(len(tokenizer)))
        runs[shared] = [r for r in read_metrics(cfg.output_dir) if "ppo/kl" in r]
    assert_same_metrics(runs, ("ppo/approx_kl", "ppo/entropy"))
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = {s: AutoModelForCausalLM.from_pretrained(tmp_path / f"trunk{s}").state_dict() for s in runs}
    assert all(torch.equal(before[k], after[True][k]) for k in before if ".layers.0." in k or "embed" in k)
    assert all(torch.allclose(after[True][k], after[False][k], atol=1e-5) for k in before)
    assert any(not torch.equal(before[k], after[True][k]) for k in before if ".layers.1." in k)


def test_second_iteration_shares_the_trunk_with_its_separate_reference(
    tiny_model, tokenizer, prompts_file, tmp_path
):
    """A later iteration's PPO starts from the last policy (LoRA merged into its last layer) with the SFT
    model as a separately loaded reference: their bottom layer is the same weights, so it still runs once
    per batch, with the same numbers as separate full-depth forwards. A reference whose bottom differs
    shares nothing."""
    from chatrlhf.configs import LoraConfig
    from chatrlhf.ppo_models import load_models

    lora = LoraConfig(rank=4, targets=["q_proj", "v_proj"], layers=1)
    first = ppo_config(tiny_model, prompts_file, tmp_path / "iter1", max_steps=1, lora=lora)
    train(first, reward_fn=low_half_reward(len(tokenizer)))
    runs = {}
    for shared in (True, False):
        cfg = ppo_config(
            first.output_dir, prompts_file, tmp_path / f"iter2{shared}", max_steps=2, lora=lora,
            reference_model=tiny_model, share_trunk=shared,
        )  # fmt: skip
        models = load_models(cfg, tokenizer, first.output_dir, low_half_reward(len(tokenizer)), "cpu")
        assert models.reference is not None and models.trunk_layers == (1 if shared else 0)
        train(cfg, reward_fn=low_half_reward(len(tokenizer)))
        runs[shared] = [r for r in read_metrics(cfg.output_dir) if "ppo/kl" in r]
    assert_same_metrics(runs, ("ppo/approx_kl", "ppo/entropy"))
    assert runs[True][0]["ppo/kl"] != 0.0  # the reference really is the SFT model, not the policy
    # another model's bottom layer: not the policy's trunk
    other = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(0.01)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    cfg = ppo_config(
        first.output_dir, prompts_file, tmp_path / "o", lora=lora, reference_model=str(tmp_path / "other")
    )
    models = load_models(cfg, tokenizer, first.output_dir, low_half_reward(len(tokenizer)), "cpu")
    assert models.reference is not None and models.trunk_layers == 0


def test_shared_trunk_reference_and_policy_logprobs_equal_full_forwards(
    tiny_model, tokenizer, prompts_file, tmp_path
):
    from chatrlhf.configs import LoraConfig
    from chatrlhf.forward import response_logits, trunk_hidden

    lora = LoraConfig(rank=4, targets=["q_proj", "v_proj"], layers=1)
    cfg, models, exp = _experience(tiny_model, tokenizer, prompts_file, tmp_path, lora=lora)
    assert models.trunk_layers == 1 and exp.trunk is not None
    with torch.no_grad():
        for p in models.policy.parameters():  # adapters away from zero, so policy and reference differ
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        seq, att, width = exp.sequences, exp.attention_mask, exp.prompt_width
        trunk = trunk_hidden(models.policy, seq, att, 1)
        policy_full = response_logits(models.policy, seq, att, width, cfg.sampling.temperature)
        policy_split = response_logits(models.policy, seq, att, width, cfg.sampling.temperature, trunk)
        with models.policy.disable_adapter():
            ref_full = response_logits(models.policy, seq, att, width, cfg.sampling.temperature)
            ref_split = response_logits(models.policy, seq, att, width, cfg.sampling.temperature, trunk)
    assert not torch.allclose(policy_full, ref_full, atol=1e-3)
    assert torch.allclose(policy_full, policy_split, atol=1e-5)
    assert torch.allclose(ref_full, ref_split, atol=1e-5)


def test_frozen_weights_held_in_bf16_change_no_number(tiny_model, prompts_file, tmp_path, monkeypatch):
    """In bf16, PPO holds every frozen Linear weight (LoRA's base, the reward model) as a bf16 copy so that
    autocast does not cast it again at every forward; the reward model, never exported, lets its fp32
    weights go. Every logged metric equals a run that leaves them in fp32, and the export (LoRA merged into
    the fp32 weights) is the same to the bit."""
    from chatrlhf import ppo_models
    from chatrlhf.configs import LoraConfig

    lora = LoraConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"], layers=1)
    runs, held, kept = {}, [], []
    real = ppo_models.hold_frozen_linears

    def counting(model, dtype, keep_originals=True):
        restore = real(model, dtype, keep_originals)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        held.append(sum(m.weight.dtype == torch.bfloat16 for m in linears))
        kept.append(keep_originals)
        return restore

    for hold in (True, False):
        if hold:
            monkeypatch.setattr(ppo_models, "hold_frozen_linears", counting)
        else:
            monkeypatch.setattr(ppo_models, "hold_frozen_linears", lambda *args, **kwargs: lambda: None)
        cfg = ppo_config(
            tiny_model, prompts_file, tmp_path / f"hold{hold}", max_steps=2, lora=lora, dtype="bf16",
            reward_model=tiny_model,
        )  # fmt: skip
        train(cfg)
        runs[hold] = [r for r in read_metrics(cfg.output_dir) if "ppo/kl" in r]
    assert held and all(n > 0 for n in held)  # policy, value and reward model each held some weights
    assert kept == [True, True, False]  # the reward model's fp32 weights are not kept
    assert_same_metrics(runs, ("ppo/entropy", "ppo/grad_norm"), exact=True)
    after = {h: AutoModelForCausalLM.from_pretrained(tmp_path / f"hold{h}").state_dict() for h in runs}
    assert all(v.dtype == torch.float32 for v in after[True].values())
    assert all(torch.equal(after[True][k], after[False][k]) for k in after[False])


def test_a_model_never_exported_lets_its_fp32_linear_weights_go(tiny_model, tokenizer):
    from chatrlhf.models import hold_frozen_linears, load_causal_lm

    model = load_causal_lm(tiny_model, tokenizer).requires_grad_(False)
    model.model.layers[-1].mlp.down_proj.requires_grad_(True)
    originals = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.autocast("cpu", torch.bfloat16):
        expected = model(x).logits
    restore = hold_frozen_linears(model, torch.bfloat16, keep_originals=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears["model.layers.1.mlp.down_proj"].weight is originals["model.layers.1.mlp.down_proj"]
    assert all(m.weight.dtype == torch.bfloat16 for n, m in linears.items() if "layers.1.mlp.down" not in n)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(model(x).logits, expected)
    restore()
    assert all(m.weight.dtype == torch.bfloat16 for n, m in linears.items() if "layers.1.mlp.down" not in n)


def test_value_and_reward_models_read_the_shared_trunk_when_their_layers_are_the_policys(
    tiny_model, tokenizer, prompts_file, tmp_path
):
    """A value and a reward model whose bottom layers are the policy's weights (here all three start from
    one checkpoint) run only the layers above the shared trunk: values, scores, every metric and the export
    equal separate full-depth forwards. A reward model with other weights is detected and runs in full."""
    from chatrlhf.configs import LoraConfig
    from chatrlhf.ppo_models import load_models

    lora = LoraConfig(rank=4, targets=["q_proj", "v_proj"], layers=1)
    other_rm = make_tiny_model(tmp_path / "other_rm", tokenizer, seed=7)
    cfg = ppo_config(tiny_model, prompts_file, tmp_path / "x", lora=lora, reward_model=other_rm)
    models = load_models(cfg, tokenizer, tiny_model, None, "cpu")
    assert (models.trunk_layers, models.value_shares_trunk, models.reward_shares_trunk) == (1, True, False)
    runs = {}
    # lr 3e-4: the two paths round differently in fp32, and at 3e-3 the updates grow that into a flipped
    # sampled token of this near-uniform tiny model by step 3 on some CPUs (AVX-512 kernels)
    for shared in (True, False):
        cfg = ppo_config(
            tiny_model, prompts_file, tmp_path / f"share{shared}", max_steps=3, lora=lora,
            reward_model=tiny_model, share_trunk=shared, lr=3e-4,
        )  # fmt: skip
        models = load_models(cfg, tokenizer, tiny_model, None, "cpu")
        assert (models.value_shares_trunk, models.reward_shares_trunk) == (shared, shared)
        train(cfg)
        runs[shared] = [r for r in read_metrics(cfg.output_dir) if "ppo/kl" in r]
    assert_same_metrics(runs, ("ppo/explained_variance",))
    after = {s: AutoModelForCausalLM.from_pretrained(tmp_path / f"share{s}").state_dict() for s in runs}
    assert all(torch.allclose(after[True][k], after[False][k], atol=1e-5) for k in after[False])


def test_value_head_on_the_policy_learns_in_one_forward_and_resumes_exactly(
    tiny_model, tokenizer, prompts_file, tmp_path
):
    """`value_on_policy`: no value model, a scalar head on the policy's last hidden state. The reward
    rises, the head learns (value loss falls, its weights leave zero), the export holds the head and no
    value model, and an interrupted run resumes to the same metrics."""
    from safetensors.torch import load_file

    reward = low_half_reward(len(tokenizer))
    cfg = ppo_config(tiny_model, prompts_file, tmp_path / "ppo", max_steps=16, top_k=10, value_model="policy")
    train(cfg, reward_fn=reward)
    rows = [r for r in read_metrics(cfg.output_dir) if "ppo/reward" in r]
    rewards, value_losses = [r["ppo/reward"] for r in rows], [r["ppo/value_loss"] for r in rows]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards
    assert sum(value_losses[-4:]) < sum(value_losses[:4]), value_losses
    assert "ppo/explained_variance" in rows[-1]
    head = load_file(str(tmp_path / "ppo" / "value_head.safetensors"))
    assert head["weight"].shape == (1, 32) and head["weight"].abs().sum() > 0
    assert not (tmp_path / "ppo" / "value").exists()

    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 3:
            raise Killed

    runs = {}
    for name in ("whole", "cut"):
        run = ppo_config(
            tiny_model, prompts_file, tmp_path / name, max_steps=4, save_every=2, value_model="policy"
        )
        if name == "cut":
            with pytest.raises(Killed):
                train(run, reward_fn=reward, on_step=kill)
            run.resume = True
        train(run, reward_fn=reward)
        runs[name] = [r for r in read_metrics(run.output_dir) if "ppo/reward" in r]
    assert len(runs["whole"]) == len(runs["cut"]) == 4
    assert_same_metrics({True: runs["cut"], False: runs["whole"]}, ("ppo/explained_variance",))


def test_value_head_on_the_policy_reads_the_hidden_states_of_one_policy_forward(
    tiny_model, tokenizer, prompts_file, tmp_path
):
    """With LoRA in the last layer and the trunk shared, the rollout values are the head on the policy's
    full-depth hidden states, and a minibatch's loss runs the decoder's layers once for the policy and its
    value head together (a separate value model runs them a second time)."""
    from chatrlhf.configs import LoraConfig
    from chatrlhf.forward import response_hidden
    from chatrlhf.models import unwrap

    lora = LoraConfig(rank=4, targets=["q_proj", "v_proj"], layers=1)
    calls = []

    def count(module, args, output):
        if type(module).__name__.endswith("DecoderLayer"):
            calls.append(module)

    layers = AutoModelForCausalLM.from_pretrained(tiny_model).config.num_hidden_layers
    for value_model, forwards in (("policy", 1), (tiny_model, 2)):
        cfg, models, exp = _experience(
            tiny_model, tokenizer, prompts_file, tmp_path, lora=lora, value_model=value_model
        )
        assert models.trunk_layers == 1
        if value_model == "policy":
            assert models.value is None and models.has_critic
            with torch.no_grad():
                models.value_head.weight.normal_()  # a head away from zero, so the check can fail
                hidden = response_hidden(models.policy, exp.sequences, exp.attention_mask, exp.prompt_width)
                expected = models.value_head(hidden)[..., 0] * exp.response_mask
            _, _, exp = _experience(
                tiny_model, tokenizer, prompts_file, tmp_path, lora=lora, value_model="policy", models=models
            )
            assert torch.allclose(exp.values, expected, atol=1e-5) and exp.values.abs().sum() > 0
        calls.clear()
        handle = torch.nn.modules.module.register_module_forward_hook(count)
        try:
            loss, stats = minibatch_loss(models, exp, torch.arange(4), cfg)
        finally:
            handle.remove()
        assert len(calls) == forwards * (layers - models.trunk_layers)
        loss.backward()
        assert "ppo/value_loss" in stats
        if value_model == "policy":
            assert models.value_head.weight.grad.abs().sum() > 0
            lora_grads = [p.grad for p in unwrap(models.policy).parameters() if p.requires_grad]
            assert all(g is not None for g in lora_grads)


def test_value_head_on_the_policy_needs_gae(tmp_path, tiny_model, prompts_file):
    result = chatrlhf(
        "ppo", "--model", tiny_model, "--reward_model", tiny_model, "--data.train", prompts_file,
        "--output_dir", str(tmp_path / "out"), "--value_on_policy",
        "--advantage_estimator", "rloo", "--samples_per_prompt", "2",
    )  # fmt: skip
    assert result.returncode != 0
    assert "value_on_policy: advantage_estimator rloo uses no value model" in result.stderr
    assert "Traceback" not in result.stderr


def test_freeze_layers_full_fine_tune_shares_the_frozen_trunk_with_reference_value_and_reward(
    tiny_model, tokenizer, prompts_file, tmp_path
):
    """Full fine-tuning with the bottom layer frozen, and a reward model trained from the same start with
    `freeze_layers` too: reference, value and reward model all read the policy's trunk, and every metric and
    the export equal separate full-depth forwards; the frozen layer stays bit-identical."""
    from conftest import preference_rows

    from chatrlhf.configs import RewardConfig
    from chatrlhf.ppo_models import load_models
    from chatrlhf.reward import train as train_reward

    rm = RewardConfig(
        model=tiny_model, data=RankingData(train=write_jsonl(tmp_path / "rank.jsonl", preference_rows(40, 0))),
        output_dir=str(tmp_path / "rm"), batch_size=8, lr=1e-3, save_every=0, dtype="fp32", freeze_layers=1,
    )  # fmt: skip
    train_reward(rm)
    runs = {}
    # lr 3e-4: at 3e-3 Adam grows the paths' different fp32 rounding past 1e-5 in an export weight on some
    # CPUs (AVX-512 kernels)
    for shared in (True, False):
        cfg = ppo_config(
            tiny_model, prompts_file, tmp_path / f"frozen{shared}", max_steps=3, freeze_layers=1,
            reward_model=rm.output_dir, value_model=rm.output_dir, share_trunk=shared, lr=3e-4,
        )  # fmt: skip
        models = load_models(cfg, tokenizer, tiny_model, None, "cpu")
        assert models.reference is not None
        assert (models.trunk_layers, models.value_shares_trunk, models.reward_shares_trunk) == (
            (1, True, True) if shared else (0, False, False)
        )
        train(cfg)
        runs[shared] = [r for r in read_metrics(cfg.output_dir) if "ppo/kl" in r]
    assert_same_metrics(runs, ("ppo/explained_variance", "ppo/approx_kl"))
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = {s: AutoModelForCausalLM.from_pretrained(tmp_path / f"frozen{s}").state_dict() for s in runs}
    assert all(torch.equal(before[k], after[True][k]) for k in before if ".layers.0." in k or "embed" in k)
    assert any(not torch.equal(before[k], after[True][k]) for k in before if ".layers.1." in k)
    assert all(torch.allclose(after[True][k], after[False][k], atol=1e-5) for k in before)


def test_minibatches_take_a_prompts_answers_together(tiny_model, tokenizer, prompts_file, tmp_path):
    """The update shuffles prompts, not rows: each minibatch holds whole prompts' answers (so each prompt
    runs once per minibatch), every row once per epoch; with one answer per prompt it is the shuffle of rows
    it always was."""
    from accelerate import Accelerator

    from chatrlhf.forward import prompt_groups
    from chatrlhf.ppo import UpdateContext, ppo_update

    cfg, models, exp = _experience(tiny_model, tokenizer, prompts_file, tmp_path)
    rows = exp.sequences.shape[0]
    assert prompt_groups(exp.sequences, exp.attention_mask, exp.prompt_width) == [[r] for r in range(rows)]
    twice = torch.cat([exp.sequences, exp.sequences])  # every prompt twice, rows r and r + rows
    mask = torch.cat([exp.attention_mask, exp.attention_mask])
    assert prompt_groups(twice, mask, exp.prompt_width) == [[r, r + rows] for r in range(rows)]

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def forward(self, exp, idx, ptx_rows=None):
            self.seen.append(idx.tolist())
            return (self.w * 0).sum(), {}

    for sequences, attention, groups in ((exp.sequences, exp.attention_mask, 1), (twice, mask, 2)):
        recorder = Recorder()
        batch = dataclasses.replace(exp, sequences=sequences, attention_mask=attention)
        cfg.ppo_epochs, cfg.minibatches = 2, 2
        context = UpdateContext(
            Accelerator(cpu=True), recorder, torch.optim.SGD(recorder.parameters(), lr=0.1), cfg
        )
        ppo_update(context, batch, torch.Generator().manual_seed(4))
        assert len(recorder.seen) == 4
        for epoch in (recorder.seen[:2], recorder.seen[2:]):
            assert sorted(r for mb in epoch for r in mb) == list(range(len(sequences)))
            if groups == 2:  # a row and its prompt's other answer are in the same minibatch
                assert all((r + rows) % (2 * rows) in mb for mb in epoch for r in mb)
        if groups == 1:
            expected = torch.randperm(rows, generator=torch.Generator().manual_seed(4)).tolist()
            assert recorder.seen[0] + recorder.seen[1] == expected

"""The reward model: pair expansion, the K-way loss, padding, learning a preference, export, formats."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import SHARED_DATA, chatrlhf, preference_rows, write_jsonl
from transformers import AutoModelForSequenceClassification

from chatrlhf.chat_template import sequence_ids
from chatrlhf.configs import RankingData, RewardConfig
from chatrlhf.forward import reward_scores
from chatrlhf.losses import ranking_loss, ranking_pairs
from chatrlhf.models import load_reward_model, load_tokenizer, resolve_model
from chatrlhf.preferences import Ranking, check_ranking, load_rankings
from chatrlhf.records import DataError
from chatrlhf.reward import RankedItem, _reward_stage, split_by_prompt, train


def test_pairs_from_ranks_with_ties():
    assert sorted(ranking_pairs([1, 2, 2, 3])) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert ranking_pairs([3, 1]) == [(1, 0)]
    with pytest.raises(DataError, match="all answers tie"):
        check_ranking(Ranking("f.jsonl:1", [{"role": "user", "content": "q"}], ["a", "b"], [1, 1]))


def test_kway_loss_is_mean_of_pairwise_losses_with_k_forwards(tiny_model, tokenizer):
    model = load_reward_model(tiny_model, tokenizer, "cpu", init_head=True)
    prompt = [{"role": "user", "content": "Pick a fruit."}]
    answers = ["Apple.", "A ripe banana.", "Cherry, I think.", "None."]
    ranks = [2, 1, 3, 3]
    item = RankedItem([sequence_ids(tokenizer, prompt, a) for a in answers], ranking_pairs(ranks))
    rows_forwarded = []
    hook = model.model.register_forward_hook(
        lambda m, args, kwargs, out: rows_forwarded.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    stage = _reward_stage(tokenizer, "cpu", {})
    loss, stats = stage.loss(model, [item], stage.weight(item))
    hook.remove()
    # one packed row: the shared prompt once, then each answer once (not twice per pair), no padding
    shared = next(i for i in range(len(item.sequences[0])) if len({s[i] for s in item.sequences}) > 1)
    assert rows_forwarded == [(1, shared + sum(len(s) - shared for s in item.sequences))]
    one_by_one = []
    for w, loser in item.pairs:
        r = reward_scores(model, [item.sequences[w], item.sequences[loser]], tokenizer.pad_token_id, "cpu")
        one_by_one.append(-torch.nn.functional.logsigmoid(r[0] - r[1]))
    assert len(one_by_one) == 5
    assert loss.item() == pytest.approx(torch.stack(one_by_one).mean().item(), abs=1e-5)
    assert stats["pairs"] == 5


def test_ranking_loss_hand_computed():
    rewards = torch.tensor([1.0, 0.0, -1.0])
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])
    expected = (
        torch.log1p(torch.exp(torch.tensor(-1.0))) * 2 + torch.log1p(torch.exp(torch.tensor(-2.0)))
    ) / 3
    assert ranking_loss(rewards, pairs).item() == pytest.approx(expected.item(), abs=1e-6)


def test_score_unchanged_by_padding_on_either_side(tiny_model, tokenizer):
    model = load_reward_model(tiny_model, tokenizer, "cpu", init_head=True).eval()
    prompt = [{"role": "user", "content": "Hello"}]
    short, long = (
        sequence_ids(tokenizer, prompt, "Hi."),
        sequence_ids(tokenizer, prompt, "Hello there, how are you today?"),
    )
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        alone = reward_scores(model, [short], pad, "cpu")[0]
        right = reward_scores(model, [short, long], pad, "cpu")[0]
        n = len(long) - len(short)
        ids = torch.tensor([[pad] * n + short])
        mask = torch.tensor([[0] * n + [1] * len(short)])
        left = model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits[0, 0]
    assert right.item() == pytest.approx(alone.item(), abs=1e-5)
    assert left.item() == pytest.approx(alone.item(), abs=1e-5)


def test_learns_a_synthetic_preference(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "rank.jsonl", preference_rows(240, 0))
    cfg = RewardConfig(
        model=tiny_model,
        data=RankingData(train=data),
        output_dir=str(tmp_path / "rm"),
        epochs=3,
        batch_size=8,
        lr=3e-3,
        eval_fraction=0.2,
        save_every=0,
        dtype="fp32",
    )
    summary = train(cfg)
    assert summary["rm/accuracy"] > 0.9
    assert {"rm/accuracy_k2", "rm/accuracy_k3", "rm/accuracy_k4"} <= set(summary)


def test_gradient_checkpointing_trains_packed_rows_the_same(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "rank.jsonl", preference_rows(16, 0))
    summaries = []
    for checkpointing in (False, True):
        cfg = RewardConfig(
            model=tiny_model,
            data=RankingData(train=data),
            output_dir=str(tmp_path / f"rm{checkpointing}"),
            max_steps=2,
            batch_size=4,
            lr=1e-3,
            eval_fraction=0.25,
            save_every=0,
            dtype="fp32",
            gradient_checkpointing=checkpointing,
        )
        summaries.append(train(cfg))
    for key in ("rm/loss", "train/grad_norm", "rm/eval_loss"):
        assert summaries[1][key] == pytest.approx(summaries[0][key], rel=1e-4)


def test_split_keeps_each_prompt_on_one_side():
    p = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    rankings = [Ranking(f"f:{i}", p(f"q{i % 5}"), ["a", "b"], [1, 2]) for i in range(20)]
    train_part, eval_part = split_by_prompt(rankings, 0.4, seed=1)
    seen_train = {r.prompt[0]["content"] for r in train_part}
    seen_eval = {r.prompt[0]["content"] for r in eval_part}
    assert seen_eval and not seen_train & seen_eval and len(train_part) + len(eval_part) == 20


def test_export_loads_in_transformers_and_matches_score_command(tiny_model, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "rank.jsonl", preference_rows(24, 1))
    demos = write_jsonl(
        tmp_path / "demos.jsonl",
        [{"prompt": "Review?", "completion": "great lovely"}, {"prompt": "Hi", "completion": "awful"}],
    )
    cfg = RewardConfig(
        model=tiny_model,
        data=RankingData(train=data),
        output_dir=str(tmp_path / "rm"),
        max_steps=2,
        lr=1e-3,
        save_every=0,
        normalize_with=demos,
    )
    train(cfg)
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "Review?", "chosen": "great superb", "rejected": "awful"}]
    )
    result = chatrlhf("score", "--model", cfg.output_dir, "--data", pairs)
    assert result.returncode == 0, result.stderr
    cli_scores = json.loads(result.stdout.strip().splitlines()[-1])["scores"]

    plain = AutoModelForSequenceClassification.from_pretrained(cfg.output_dir).eval()
    assert plain.config.num_labels == 1
    bias = plain.config.reward_bias
    prompt = [{"role": "user", "content": "Review?"}]
    with torch.no_grad():
        raw = [
            plain(input_ids=torch.tensor([sequence_ids(tokenizer, prompt, a)])).logits[0, 0].item()
            for a in ("great superb", "awful")
        ]
    assert cli_scores == pytest.approx([r + bias for r in raw], abs=1e-4)
    # the bias centres the demonstrations' answers on 0
    with torch.no_grad():
        demo_scores = [
            plain(input_ids=torch.tensor([sequence_ids(tokenizer, [{"role": "user", "content": q}], a)]))
            .logits[0, 0]
            .item()
            + bias
            for q, a in (("Review?", "great lovely"), ("Hi", "awful"))
        ]
    assert sum(demo_scores) / 2 == pytest.approx(0.0, abs=1e-4)


def test_formats_pairs_hh_and_rankings_without_ranks(tmp_path):
    rows = [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
        {
            "prompt": [{"role": "user", "content": "Q2"}],
            "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}],
        },
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: A good one.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No.",
        },
        {"prompt": "Q4", "responses": ["best", "mid", "worst"]},
    ]
    r = load_rankings(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert [x.responses for x in r] == [
        ["good", "bad"],
        ["c", "r"],
        ["A good one.", "No."],
        ["best", "mid", "worst"],
    ]
    assert r[2].prompt == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Joke?"},
    ]
    assert r[3].ranks == [1, 2, 3]


BAD_RECORDS = {
    "wrong rank count": (
        {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [1, 2]},
        "field `ranks` has 2 entries for 3",
    ),
    "empty response": (
        {"prompt": "q", "responses": ["a", " "], "ranks": [1, 2]},
        "field `responses[1]` is empty",
    ),
    "all tie": ({"prompt": "q", "responses": ["a", "b"], "ranks": [1, 1]}, "field `ranks`: all answers tie"),
    "broken line": ('{"prompt": "q", "responses": ', "broken JSON"),
    "one response": ({"prompt": "q", "responses": ["a"], "ranks": [1]}, "needs at least 2 answers"),
    "chosen is rejected": (
        {"prompt": "q", "chosen": "a", "rejected": "a"},
        "fields `chosen` and `rejected` hold the same answer",
    ),
    "one answer ranked twice": (
        {"prompt": "q", "responses": ["a", "b", "a"], "ranks": [1, 2, 3]},
        "field `responses[2]` is the same text as `responses[0]` but ranked 3 against 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_ranking_records(tmp_path, tiny_model, case):
    record, message = BAD_RECORDS[case]
    good = {"prompt": "q", "responses": ["a", "b"], "ranks": [1, 2]}
    data = write_jsonl(tmp_path / "r.jsonl", [good, record])
    result = chatrlhf(
        "reward", "--model", tiny_model, "--data.train", data, "--output_dir", str(tmp_path / "o")
    )
    assert result.returncode == 2 and f"{data}:2:" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_default_model_on_openassistant_rankings(tmp_path):
    trees = SHARED_DATA / "openassistant-oasst-en100" / "en_100_tree.jsonl"
    if not trees.is_file():
        pytest.skip(f"shared data not found at {trees} (set CHATRLHF_SHARED_DATA)")
    lines = trees.read_text(encoding="utf-8").splitlines()  # one message tree per line
    train_file = write_jsonl(tmp_path / "train.jsonl", [json.loads(x) for x in lines[:80]])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [json.loads(x) for x in lines[80:]])
    cfg = RewardConfig(
        data=RankingData(train=train_file, eval=eval_file, max_length=320, truncation=True),
        output_dir=str(tmp_path / "rm"),
        max_steps=3,
        batch_size=2,
        save_every=0,
    )
    summary = train(cfg)
    # held-out accuracy over exactly the held-out trees' ranked pairs that fit max_length
    tok = load_tokenizer(resolve_model(""))
    held_out = [
        r
        for r in load_rankings(eval_file)
        if all(len(sequence_ids(tok, r.prompt, a)) <= cfg.data.max_length for a in r.responses)
    ]
    assert summary["rm/eval_pairs"] == sum(len(ranking_pairs(r.ranks)) for r in held_out) > 0
    assert torch.isfinite(torch.tensor(summary["rm/loss"]))
    # training moved the weights the reward model started from
    before = load_reward_model(resolve_model(""), tok, torch.device("cpu")).state_dict()
    after = load_reward_model(cfg.output_dir, tok, torch.device("cpu")).state_dict()
    moved = [k for k in after if k in before and "score" not in k and not torch.equal(after[k], before[k])]
    assert moved, "no trunk weight changed"
    print(f"OpenAssistant held-out pairwise accuracy after 3 steps: {summary['rm/accuracy']:.3f}")


def test_packed_rows_attend_per_answer_segment_under_sdpa(tiny_model, tokenizer):
    """Under SDPA each layer takes the packed row's segments, so no answer-to-answer block is computed."""
    from transformers import AttentionInterface

    from chatrlhf.forward import SEGMENT_ATTENTION, segment_attention, shared_prompt_scores

    seen = []

    def spy(*args, packed_row=None, **kwargs):
        seen.append((packed_row.shared, packed_row.lengths))
        return segment_attention(*args, packed_row=packed_row, **kwargs)

    prompt = [{"role": "user", "content": "Which is best?"}]
    seqs = [sequence_ids(tokenizer, prompt, a) for a in ("One.", "Two is a longer answer.")]
    shared = next(i for i, (a, b) in enumerate(zip(*seqs)) if a != b)
    model = load_reward_model(tiny_model, tokenizer, "cpu", init_head=True)
    AttentionInterface.register(SEGMENT_ATTENTION, spy)
    try:
        shared_prompt_scores(model, seqs, tokenizer.pad_token_id, "cpu")
    finally:
        AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    lengths = [len(s) - shared for s in seqs]
    assert seen == [(shared, lengths)] * model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"  # switched back after the row


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_forward_equals_full_forward(tiny_model, tokenizer, attention):
    """Packing the prompt once with its K answers gives the same rewards and gradients as K full sequences."""
    from chatrlhf.forward import shared_prompt_scores

    prompt = [{"role": "user", "content": "Which is best?"}]
    seqs = [sequence_ids(tokenizer, prompt, a) for a in ("One.", "Two is a longer answer.", "Three, three.")]
    pad = tokenizer.pad_token_id
    grads = []
    one_row_each = functools.partial(shared_prompt_scores, limit=1)  # every answer in a row of its own
    for score_fn in (reward_scores, shared_prompt_scores, one_row_each):
        model = load_reward_model(tiny_model, tokenizer, "cpu", init_head=False)
        model.set_attn_implementation(attention)
        torch.manual_seed(0)
        torch.nn.init.normal_(model.score.weight)
        rewards = score_fn(model, seqs, pad, "cpu")
        (rewards * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        grads.append((rewards.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    for rewards, grad in grads[1:]:
        assert torch.allclose(grads[0][0], rewards, atol=1e-5)
        assert torch.allclose(grads[0][1], grad, atol=1e-5)


def test_freeze_layers_trains_the_top_and_head_and_keeps_the_bottom_to_the_bit(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "rank.jsonl", preference_rows(240, 0))
    cfg = RewardConfig(
        model=tiny_model, data=RankingData(train=data), output_dir=str(tmp_path / "rm"), epochs=3, batch_size=8,
        lr=3e-3, eval_fraction=0.2, save_every=0, dtype="fp32", freeze_layers=1,
    )  # fmt: skip
    summary = train(cfg)
    assert summary["rm/accuracy"] > 0.8
    before = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(cfg.output_dir).state_dict()
    bottom = [k for k in before if "embed_tokens" in k or ".layers.0." in k]
    assert bottom and all(torch.equal(before[k], after[k]) for k in bottom)
    assert any(not torch.equal(before[k], after[k]) for k in before if ".layers.1." in k)

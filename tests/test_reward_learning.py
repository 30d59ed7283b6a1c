"""The reward stage's objective and held-out report: per-comparison or per-prompt weighting of the K-way loss,
the fresh head's held-out accuracy next to the trained one, per-prompt accuracy by K."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from transformers import set_seed

from chatrlhf.chat_template import sequence_ids
from chatrlhf.configs import RewardConfig, load_config
from chatrlhf.errors import UserError
from chatrlhf.forward import reward_scores
from chatrlhf.losses import ranking_pairs
from chatrlhf.models import load_reward_model, load_tokenizer
from chatrlhf.preferences import load_rankings
from chatrlhf.reward import RankedItem, _reward_stage, score_rankings, train

PROMPT = [{"role": "user", "content": "Name a colour."}]


def items_of(tokenizer, groups: list[tuple[list[str], list[int]]]) -> list[RankedItem]:
    return [
        RankedItem([sequence_ids(tokenizer, PROMPT, a) for a in answers], ranking_pairs(ranks))
        for answers, ranks in groups
    ]


def pair_losses(model, tokenizer, item: RankedItem) -> torch.Tensor:
    """-log sigmoid(r_w - r_l) of each pair, every answer scored on its own (no packing)."""
    r = reward_scores(model, item.sequences, tokenizer.pad_token_id, "cpu")
    return torch.stack([-torch.nn.functional.logsigmoid(r[w] - r[lo]) for w, lo in item.pairs])


@pytest.mark.parametrize("weighting", ["pair", "prompt"])
def test_step_loss_weights_each_comparison_or_each_prompt(tiny_model, tokenizer, weighting):
    model = load_reward_model(tiny_model, tokenizer, "cpu", init_head=True)
    # K=2 (one pair) and K=4 (six pairs): the two weightings give different losses and gradients
    items = items_of(
        tokenizer, [(["Red.", "Blue, I think."], [1, 2]), (["Green.", "Teal.", "Grey.", "No."], [1, 2, 3, 4])]
    )
    stage = _reward_stage(tokenizer, "cpu", {}, loss_weighting=weighting)
    step_weight = sum(stage.weight(item) for item in items)
    loss, stats = stage.loss(model, items, step_weight)
    per_item = [pair_losses(model, tokenizer, item) for item in items]
    if weighting == "pair":
        assert step_weight == 7
        expected = torch.cat(per_item).mean()
    else:
        assert step_weight == 2
        expected = torch.stack([p.mean() for p in per_item]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    # the logged loss is the mean over the step's pairs whatever the weighting
    assert stage.summarize(stats)["rm/loss"] == pytest.approx(torch.cat(per_item).mean().item(), abs=1e-5)


def test_pair_weighting_splits_into_micro_batches_like_the_full_step(tiny_model, tokenizer):
    """Dividing each micro-batch's summed pair losses by the step's pair count gives the full step's gradient."""
    groups = [(["Red.", "Blue, I think."], [1, 2]), (["Green.", "Teal.", "Grey."], [2, 1, 3])]
    items = items_of(tokenizer, groups)
    stage = _reward_stage(tokenizer, "cpu", {}, loss_weighting="pair")
    weight = sum(stage.weight(item) for item in items)
    grads = []
    for batches in ([items], [items[:1], items[1:]]):
        model = load_reward_model(tiny_model, tokenizer, "cpu", init_head=True)
        torch.manual_seed(0)
        with torch.no_grad():
            model.score.weight.normal_()
        for batch in batches:
            stage.loss(model, batch, weight)[0].backward()
        grads.append(model.score.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_unknown_loss_weighting_is_refused_naming_the_key(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "responses": ["a", "b"], "ranks": [1, 2]}])
    with pytest.raises(UserError, match=r"`loss_weighting` must be one of prompt \| pair, got 'per_token'"):
        config(tiny_model, data, "", tmp_path / "rm", "--loss_weighting", "per_token")
    assert not (tmp_path / "rm").exists()


def config(model: str, train_file: str, eval_file: str, output: Path, *overrides: str) -> RewardConfig:
    args = ["--model", model, "--data.train", train_file, "--output_dir", str(output), "--save_every", "0"]
    args += ["--dtype", "fp32", "--lr", "3e-3", "--batch_size", "2"]
    if eval_file:
        args += ["--data.eval", eval_file]
    return load_config(RewardConfig, None, args + list(overrides))


def ranking_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        k = 2 + (i % 3)  # K = 2, 3, 4
        answers = [f"Answer {j} to question {i + offset}: " + "good " * (k - j) for j in range(k)]
        rows.append(
            {"prompt": f"Question {i + offset}?", "responses": answers, "ranks": list(range(1, k + 1))}
        )
    return rows


def test_heldout_accuracy_before_and_after_and_per_prompt_by_k(tiny_model, tmp_path, capsys):
    train_file = write_jsonl(tmp_path / "train.jsonl", ranking_rows(12))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", ranking_rows(9, offset=100))
    out = tmp_path / "rm"
    summary = train(config(tiny_model, train_file, eval_file, out, "--max_steps", "3"))

    info = json.loads((out / "run.json").read_text())["summary"]
    eval_rankings = load_rankings(eval_file)
    # after: recomputed from the exported model's scores, per prompt, grouped by K
    scores = score_rankings(str(out), eval_rankings)
    for k in (2, 3, 4):
        shares = [
            sum(s[w] > s[lo] for w, lo in ranking_pairs(r.ranks)) / len(ranking_pairs(r.ranks))
            for r, s in zip(eval_rankings, scores)
            if len(r.responses) == k
        ]
        assert info[f"rm/prompt_accuracy_k{k}"] == pytest.approx(sum(shares) / len(shares), abs=1e-6)
        assert info[f"rm/prompts_k{k}"] == 3
    assert info["rm/eval_pairs"] == 3 * (1 + 3 + 6)
    # before: the same seed's fresh head, untrained, each answer scored on its own
    tokenizer = load_tokenizer(tiny_model)
    set_seed(RewardConfig().seed)
    fresh = load_reward_model(tiny_model, tokenizer, "cpu", init_head=True).eval()
    right = total = 0
    with torch.no_grad():
        for r in eval_rankings:
            seqs = [sequence_ids(tokenizer, r.prompt, a) for a in r.responses]
            s = reward_scores(fresh, seqs, tokenizer.pad_token_id, "cpu")
            pairs = ranking_pairs(r.ranks)
            right += sum(bool(s[w] > s[lo]) for w, lo in pairs)
            total += len(pairs)
    assert info["rm/accuracy_before"] == pytest.approx(right / total, abs=1e-6)
    assert summary["rm/accuracy_before"] == info["rm/accuracy_before"]
    assert info["rm/accuracy"] != info["rm/accuracy_before"] or info["rm/margin"] != info["rm/margin_before"]
    # the last metrics line (the final evaluation) carries both
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"rm/accuracy", "rm/accuracy_before", "rm/prompt_accuracy_k4"} <= set(last)
    console = capsys.readouterr().err
    assert f"held-out accuracy {info['rm/accuracy']:.4f} on 30 pairs" in console
    assert f"(before training, fresh head: {info['rm/accuracy_before']:.4f})" in console
    assert "K=2 " in console and "K=4 " in console and "3 prompts" in console

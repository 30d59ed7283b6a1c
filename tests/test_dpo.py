"""DPO and its listwise forms: the losses by hand, the packed answer log-probs, learning, the frozen reference,
resume and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import chatrlhf, preference_rows, write_jsonl

from chatrlhf.chat_template import answer_ids
from chatrlhf.configs import DPOConfig, LoraConfig, RankingData
from chatrlhf.dpo import _dpo_stage, attach_reference, prompt_loss, train
from chatrlhf.forward import answer_logprobs, shared_prompt_logprobs
from chatrlhf.losses import dpo_pair_losses, lambda_weights, plackett_luce_loss, ranking_pairs
from chatrlhf.models import load_causal_lm
from chatrlhf.ranked import RankedItem
from chatrlhf.training import fit

PROMPT = [{"role": "user", "content": "Pick a fruit."}]


def _item(tokenizer, answers: list[str], ranks: list[int]) -> RankedItem:
    spans = [answer_ids(tokenizer, PROMPT, a) for a in answers]
    return RankedItem([s for s, _ in spans], ranking_pairs(ranks), ranks, min(i for _, i in spans))


def test_sigmoid_and_ipo_losses_by_hand():
    margins = torch.tensor([2.0, -1.0])
    beta = 0.5
    sigmoid = [math.log1p(math.exp(-beta * m)) for m in (2.0, -1.0)]
    assert dpo_pair_losses(margins, beta, "sigmoid").tolist() == pytest.approx(sigmoid, abs=1e-6)
    assert dpo_pair_losses(margins, beta, "ipo").tolist() == pytest.approx([(2 - 1) ** 2, (-1 - 1) ** 2])


def test_plackett_luce_by_hand_and_with_two_answers_equals_pairwise_dpo():
    s = torch.tensor([0.3, -0.2])
    assert plackett_luce_loss(s, [2, 1]).item() == pytest.approx(math.log1p(math.exp(0.3 + 0.2)), abs=1e-6)
    # ranks 1, 2, 2, 3: the best is chosen from all four, each tied second from itself and the last
    s = torch.tensor([1.0, 0.5, 0.0, -1.0])
    e = [math.exp(x) for x in s.tolist()]
    terms = [
        -math.log(e[0] / sum(e)),
        -math.log(e[1] / (e[1] + e[3])),
        -math.log(e[2] / (e[2] + e[3])),
    ]
    assert plackett_luce_loss(s, [1, 2, 2, 3]).item() == pytest.approx(sum(terms) / 3, abs=1e-6)


def test_lipo_weights_by_hand():
    pairs = torch.tensor([[0, 1]])
    assert lambda_weights(torch.tensor([0.1, 0.4]), [1, 2], pairs).tolist() == pytest.approx([1.0])
    # ranks 1, 2, 3 -> gains 1, sqrt(2)-1, 0; the scores put answer 2 first, then 0, then 1
    scores = torch.tensor([0.5, 0.0, 0.9])
    pairs = torch.tensor(ranking_pairs([1, 2, 3]))
    gain = [1.0, 2**0.5 - 1, 0.0]
    inv = {0: 1 / math.log2(3), 1: 1 / math.log2(4), 2: 1 / math.log2(2)}
    raw = [abs(gain[w] - gain[loser]) * abs(inv[w] - inv[loser]) for w, loser in pairs.tolist()]
    expected = [r / (sum(raw) / len(raw)) for r in raw]
    assert lambda_weights(scores, [1, 2, 3], pairs).tolist() == pytest.approx(expected, abs=1e-6)


def test_ties_make_no_pair_and_a_fully_tied_ranking_is_refused(tmp_path, tiny_model):
    assert ranking_pairs([1, 2, 2]) == [(0, 1), (0, 2)]
    good = {"prompt": "q", "responses": ["a", "b"], "ranks": [1, 2]}
    tied = {"prompt": "q2", "responses": ["a", "b", "c"], "ranks": [2, 2, 2]}
    data = write_jsonl(tmp_path / "r.jsonl", [good, tied])
    result = chatrlhf("dpo", "--model", tiny_model, "--data.train", data, "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 2 and f"{data}:2:" in result.stderr and "all answers tie" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_plackett_luce_with_ipo_is_refused_naming_the_keys(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "r.jsonl", preference_rows(4, 0))
    result = chatrlhf(
        "dpo", "--model", tiny_model, "--data.train", data, "--listwise", "plackett_luce", "--loss", "ipo"
    )
    assert result.returncode == 2 and "listwise: plackett_luce" in result.stderr
    assert "Traceback" not in result.stderr


def test_packed_answer_logprobs_equal_a_full_forward(tiny_model, tokenizer):
    model = load_causal_lm(tiny_model, tokenizer, "cpu").eval()
    item = _item(tokenizer, ["Apple.", "A ripe banana, please.", "Cherry."], [1, 2, 3])
    with torch.no_grad():
        packed = shared_prompt_logprobs(model, item.sequences, item.answer_start, "cpu")
        padded = answer_logprobs(model, item.sequences, item.answer_start, tokenizer.pad_token_id, "cpu")
        by_hand = []
        for seq in item.sequences:
            logits = model(input_ids=torch.tensor([seq])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            by_hand.append(sum(logp[t - 1, seq[t]].item() for t in range(item.answer_start, len(seq))))
    assert packed.tolist() == pytest.approx(by_hand, abs=1e-4)
    assert padded.tolist() == pytest.approx(by_hand, abs=1e-4)


def test_prompt_loss_of_two_answers_is_the_same_for_every_listwise_form(tokenizer):
    item = RankedItem([[1], [2]], [(1, 0)], [2, 1], 0)
    h = torch.tensor([0.4, -0.3])
    losses = [
        prompt_loss(h, item, DPOConfig(beta=0.2, listwise=form)).item()
        for form in ("off", "plackett_luce", "lipo")
    ]
    assert losses == pytest.approx([math.log1p(math.exp(-0.2 * (-0.3 - 0.4)))] * 3, abs=1e-6)


def _config(tiny_model, data, out, **kw) -> DPOConfig:
    base = dict(
        model=tiny_model,
        data=RankingData(train=data),
        output_dir=str(out),
        batch_size=8,
        lr=2e-3,
        beta=0.5,
        eval_fraction=0.2,
        save_every=0,
        dtype="fp32",
    )
    return DPOConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "form",
    [dict(listwise="off"), dict(loss="ipo", beta=0.5), dict(listwise="plackett_luce"), dict(listwise="lipo")],
)
def test_each_form_learns_an_easy_preference(tiny_model, tmp_path, form):
    data = write_jsonl(tmp_path / "rank.jsonl", preference_rows(160, 0))
    summary = train(_config(tiny_model, data, tmp_path / "dpo", epochs=2, **form))
    assert summary["dpo/accuracy"] >= 0.85, summary
    assert summary["dpo/margin"] > 0
    saved = json.loads((tmp_path / "dpo" / "run.json").read_text())
    assert saved["config"]["listwise"] == form.get("listwise", "off")


def test_lora_dpo_learns_and_exports_a_plain_model(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "rank.jsonl", preference_rows(160, 0))
    cfg = _config(tiny_model, data, tmp_path / "lora", epochs=2, lr=1e-2, lora=LoraConfig(rank=8))
    assert train(cfg)["dpo/accuracy"] >= 0.8
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora").state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert not any("lora" in key for key in merged) and set(merged) == set(start)
    assert any(not torch.equal(merged[k], start[k]) for k in start)


def test_reference_stays_frozen_while_the_policy_moves(tiny_model, tokenizer, tmp_path):
    cfg = _config(tiny_model, "", tmp_path / "run", max_steps=4)
    items = [
        _item(tokenizer, ["great lovely", "awful", "terrible lousy"], [1, 2, 3]),
        _item(tokenizer, ["superb", "dreadful"], [1, 2]),
    ]
    policy = load_causal_lm(tiny_model, tokenizer, "cpu")
    attach_reference(policy, items, cfg, tokenizer.pad_token_id, "cpu")
    cached = [list(item.reference) for item in items]
    fit(cfg, _dpo_stage(tokenizer, "cpu", {}, cfg), policy, items)
    untouched = load_causal_lm(tiny_model, tokenizer, "cpu").eval()
    with torch.no_grad():
        fresh = [
            shared_prompt_logprobs(untouched, i.sequences, i.answer_start, "cpu").tolist() for i in items
        ]
        moved = [
            shared_prompt_logprobs(policy.eval(), i.sequences, i.answer_start, "cpu").tolist() for i in items
        ]
    assert [item.reference for item in items] == cached
    assert fresh[0] == pytest.approx(cached[0], abs=1e-5) and fresh[1] == pytest.approx(cached[1], abs=1e-5)
    assert max(abs(a - b) for a, b in zip(moved[0], cached[0])) > 1e-2


class Killed(Exception):
    pass


def test_resume_continues_the_same_curve(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "rank.jsonl", preference_rows(48, 1))
    whole = _config(tiny_model, data, tmp_path / "whole", max_steps=6, save_every=2, batch_size=4)
    train(whole)
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    reference = [r["dpo/loss"] for r in rows if "dpo/loss" in r]

    cut = _config(tiny_model, data, tmp_path / "cut", max_steps=6, save_every=2, batch_size=4)

    def kill_after_step_5(step, metrics):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(cut, on_step=kill_after_step_5)
    cut.resume = True
    train(cut)
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "dpo/loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5, 6]
    assert [r["dpo/loss"] for r in losses] == pytest.approx(reference, abs=1e-6)

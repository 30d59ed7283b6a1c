"""The parts of the benchmark scripts that read chatrlhf's configs and data, so a change in the package that
breaks a benchmark fails here rather than on the next benchmark run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from conftest import write_jsonl

from chatrlhf.configs import PPOConfig

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ppo_bench_prompt_widths_follow_the_ppo_stages_prompt_order(tokenizer_dir):
    from chatrlhf.chat_template import prompt_ids
    from chatrlhf.models import load_tokenizer
    from chatrlhf.ppo import step_prompts

    ppo_bench = bench_module("ppo")
    rows = [{"prompt": "word " * (i * 3 + 1)} for i in range(6)]
    cfg = PPOConfig(model=tokenizer_dir, batch_size=2, seed=3)
    widths = ppo_bench.prompt_widths(cfg, rows, steps=5)  # past one epoch: the second permutation too
    tokenizer = load_tokenizer(tokenizer_dir)
    lengths = [len(prompt_ids(tokenizer, [{"role": "user", "content": r["prompt"]}])) for r in rows]
    expected = [max(lengths[i] for i in step_prompts(cfg, 6, step)) for step in range(5)]
    assert widths == expected
    assert len(set(widths)) > 1  # the prompts differ in length, so the order matters


def test_reward_real_qa_feedback_holds_out_the_human_pairs_of_each_question(tmp_path, tokenizer, monkeypatch):
    rr = bench_module("reward_real")
    answers = ["Paris is the capital.", "It is Paris, in France.", "Lyon.", "Marseille, I think."]
    write_jsonl(
        tmp_path / "rankings.jsonl",
        [
            {
                "question_id": "qaf-1",
                "prompt": "Capital of France?",
                "responses": answers,
                "ranks": [1, 1, 3, 2],
            },
            {"question_id": "qaf-2", "prompt": "Two?", "responses": ["2", "two", "3"], "ranks": [1, 2, 3]},
        ],
    )
    write_jsonl(
        tmp_path / "human_pairs.jsonl",
        [
            {
                "question_id": "qaf-1",
                "prompt": "Capital of France?",
                "chosen": answers[1],
                "rejected": answers[0],
            },
            {
                "question_id": "qaf-1",
                "prompt": "Capital of France?",
                "chosen": answers[3],
                "rejected": answers[2],
            },
            {
                "question_id": "qaf-1",
                "prompt": "Capital of France?",
                "chosen": "not an answer",
                "rejected": answers[2],
            },
            {"question_id": "qaf-2", "prompt": "Two?", "chosen": "2", "rejected": "3"},
        ],
    )
    monkeypatch.setattr(rr, "QA_FEEDBACK", tmp_path)
    groups, dropped = rr.qa_feedback_groups(tokenizer, max_length=512)
    assert dropped == 0
    first = groups["qaf-1"]
    assert first["train"][0]["ranks"] == [1, 1, 3, 2]  # trained on the ranking, ties as ties
    assert first["heldout"][0]["pairs"] == [[1, 0], [3, 2]]  # held out on the human pairs, by answer index
    assert rr.heldout_pairs(first["heldout"][0]) == [(1, 0), (3, 2)]
    # the human pairs decide, not the ranking: answers 0 and 1 tie there, yet their pair counts
    metrics = rr.heldout_metrics([[2.0, 2.5, 0.0, 1.0]], first["heldout"])
    assert metrics["heldout_accuracy"] == 1.0 and metrics["heldout_pairs"] == 2
    metrics = rr.heldout_metrics([[3.0, 2.5, 0.0, 1.0]], first["heldout"])
    assert metrics["heldout_accuracy"] == 0.5
    assert math.isclose(metrics["heldout_margin"], ((2.5 - 3.0) + (1.0 - 0.0)) / 2)
    assert json.loads(json.dumps(groups))  # written to the children as JSON

"""The built-in task, its rule judge, and `chatrlhf demo` (the whole pipeline) end to end on a tiny model."""

from __future__ import annotations

import json
import random

import pytest
from conftest import chatrlhf

from chatrlhf.demo import CONSTRAINTS, HELD_OUT_TOPICS, TOPICS, paired_prompts, prompts, written_answer
from chatrlhf.judges import RuleJudge, constraints_of, satisfies_all
from chatrlhf.runs import read_metrics

ASKS = {
    "lowercase": "Tell me about bees, writing in all lowercase letters.",
    "bullets": "Describe bees as exactly 3 bullet points.",
    "short": "Describe bees in at most 15 words.",
    "question": "Say one fact about bees and end with a question.",
}


@pytest.mark.parametrize(
    "answer,constraint,expected",
    [
        ("bees make honey. they live in hives.", "lowercase", True),
        ("Bees make honey.", "lowercase", False),
        ("123 !!!", "lowercase", False),
        ("- one\n- two\n- three", "bullets", True),
        ("1. one\n2. two\n3. three", "bullets", True),
        ("- one\n- two", "bullets", False),
        ("Intro:\n- one\n- two\n- three", "bullets", False),
        ("Bees make honey and pollinate flowers.", "short", True),
        ("word " * 16, "short", False),
        ("", "short", False),
        ("Bees make honey. Did you know?", "question", True),
        ("Bees make honey? No. They do.", "question", False),
    ],
)
def test_the_built_in_prompts_constraints(answer, constraint, expected):
    assert satisfies_all([{"role": "user", "content": ASKS[constraint]}], answer) is expected


def test_written_answers_meet_their_constraints_and_topics_split():
    rows = prompts(list(TOPICS))
    assert len(rows) == len(TOPICS) * len(CONSTRAINTS)
    rng = random.Random(0)
    assert all(
        satisfies_all([{"role": "user", "content": r["prompt"]}], written_answer(r, rng), r) for r in rows
    )
    assert set(HELD_OUT_TOPICS) < set(TOPICS)


def test_paired_prompts_combine_two_constraints_the_demonstrations_teach_alone():
    rows = paired_prompts(["bees", "the moon"])
    assert len(rows) == 2 * 6  # every pair of the four constraints, per topic
    for r in rows:
        found = constraints_of([{"role": "user", "content": r["prompt"]}], r)
        assert len(found) == 3 and found[-1].kind == "about"  # two constraints and the topic
        # the prompt's words say what its record lists: the parser reads the same two constraints
        parsed = constraints_of([{"role": "user", "content": r["prompt"]}], {})
        assert {c.kind for c in parsed} == {c.kind for c in found[:2]}, r["prompt"]
    asks = {r["constraint"] for r in rows}
    assert "lowercase+short" in asks and "bullets+question" in asks


def test_held_out_prompts_ask_every_pair_in_every_wording():
    """The held-out set takes each topic's pairs in both wordings (twice the prompts of the training set's
    alternating wording, which it contains), so the intervals over prompts are narrower."""
    every = paired_prompts(list(HELD_OUT_TOPICS), every_template=True)
    alternating = paired_prompts(list(HELD_OUT_TOPICS))
    assert len(every) == 2 * len(alternating) == len({r["prompt"] for r in every}) == 48
    assert {r["prompt"] for r in alternating} < {r["prompt"] for r in every}
    for topic in HELD_OUT_TOPICS:
        for pair in {r["constraint"] for r in every}:
            wordings = [r["prompt"] for r in every if (r["topic"], r["constraint"]) == (topic, pair)]
            assert len(wordings) == 2 and wordings[0].split()[0] != wordings[1].split()[0]


@pytest.mark.parametrize(
    "answer,met",
    [
        ("bees make honey and live in hives.", True),
        ("bees", False),  # one word: no substance, though short and lowercase
        ("", False),
        ("they make honey and live in hives.", False),  # never names the topic
        ("a bee makes honey in its hive.", True),  # the singular names it too
    ],
)
def test_the_gold_judge_asks_for_substance(answer, met):
    row = next(r for r in paired_prompts(["bees"]) if r["constraint"] == "lowercase+short")
    prompt = [{"role": "user", "content": row["prompt"]}]
    assert satisfies_all(prompt, answer, row) is met
    best, degenerate = RuleJudge().scores(prompt, ["bees make honey and live in hives.", "bees"], row)
    assert best > degenerate


def test_demo_runs_the_whole_pipeline_on_a_tiny_model(tiny_model, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--model", tiny_model, "--output_dir", str(out), "--sft_steps", "2", "--ppo_steps", "2"]
    args += ["--best_of", "2", "--max_new_tokens", "8"]
    result = chatrlhf(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "pipeline.json").read_text())
    rounds = [f"iter{i}/{stage}" for i in (1, 2) for stage in ("sample", "label", "rm", "ppo")]
    assert list(state["stages"]) == ["sft", *rounds, "eval"]  # two rounds by default
    for i in (1, 2):
        assert state["stages"][f"iter{i}/sample"]["tasks"] == len(
            paired_prompts([t for t in TOPICS if t not in HELD_OUT_TOPICS])
        )
    assert state["stages"]["iter2/sample"]["model"] == str(out / "iter1" / "ppo")  # ranks the PPO answers
    for folder in ("sft", "iter1/rm", "iter1/ppo", "iter2/rm", "iter2/ppo"):
        assert (out / folder / "model.safetensors").is_file()
    report = (out / "report.md").read_text()
    assert "decisive win-rate" in report and "held-out accuracy" in report
    assert (out / "success_by_model.png").is_file() and report.index("success_by_model.png") < report.index(
        "## Stages"
    )
    figures = json.loads((out / "eval" / "eval.json").read_text())
    assert {"win_rate", "win_rate_ci", "decisive_win_rate", "success_rate", "success_diff_ci"} <= set(figures)
    assert set(figures["success_rate"]) == {"policy", "baseline", "base"}
    assert (out / "proxy_vs_gold.png").is_file() and "proxy_vs_gold.png" in report
    gold = [
        r["ppo/gold_reward"]
        for i in (1, 2)
        for r in read_metrics(out / f"iter{i}" / "ppo")
        if "ppo/gold_reward" in r
    ]
    assert len(gold) == 4 and f"gold {sum(gold[:3]) / 3:.3f} -> {sum(gold[-3:]) / 3:.3f}" in report
    ranked = [json.loads(line) for line in (out / "iter1" / "rankings.jsonl").read_text().splitlines()]
    assert ranked and all(len(r["responses"]) == len(r["ranks"]) >= 2 for r in ranked)
    assert f"chatrlhf chat {out / 'iter2' / 'ppo'}" in result.stdout.replace("\n", "")
    # interrupted in the second round's PPO: `--resume true` redoes only that stage and the eval, with the
    # same numbers, and leaves the finished stages' models as they were
    state["stages"] = {k: v for k, v in state["stages"].items() if k not in ("iter2/ppo", "eval")}
    (out / "pipeline.json").write_text(json.dumps(state))
    kept = {f: (out / f / "model.safetensors").stat().st_mtime_ns for f in ("sft", "iter1/ppo", "iter2/rm")}
    resumed = chatrlhf(*args, "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list(json.loads((out / "pipeline.json").read_text())["stages"])[-2:] == ["iter2/ppo", "eval"]
    assert {f: (out / f / "model.safetensors").stat().st_mtime_ns for f in kept} == kept
    again = json.loads((out / "eval" / "eval.json").read_text())
    assert {k: again[k] for k in ("win_rate", "success_rate", "kl")} == {
        k: figures[k] for k in ("win_rate", "success_rate", "kl")
    }


def test_the_demo_reward_model_freezes_exactly_the_trunk_ppo_shares(tmp_path):
    """The demo's reward model trains only the layers where PPO's adapters are, so PPO scores every rollout
    from the trunk it computes for the reference anyway; on a model shallower than that it trains all."""
    from chatrlhf.configs import DemoConfig
    from chatrlhf.demo_pipeline import pipeline_config

    cfg = pipeline_config(DemoConfig(), tmp_path, depth=30)
    assert cfg.reward.freeze_layers == 30 - cfg.ppo.lora.layers == 22 and cfg.ppo.share_trunk
    small = pipeline_config(DemoConfig(), tmp_path, depth=2)
    assert small.reward.freeze_layers == 0 and small.ppo.lora.layers == 2

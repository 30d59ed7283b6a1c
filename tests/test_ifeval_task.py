"""The built-in instruction-following task in IFEval's format, and `chatrlhf demo --task ifeval` end to end."""

from __future__ import annotations

import json
import random

import pytest
from conftest import SHARED_DATA, chatrlhf, write_jsonl

from chatrlhf.ifeval.checkers import follows, instruction_names, read_instructions
from chatrlhf.ifeval.kinds import KINDS, LEFT_OUT
from chatrlhf.ifeval.task import (
    HELD_OUT_TOPICS,
    TOPICS,
    conflicts,
    make_prompt,
    make_prompts,
    split_topics,
    word_ngrams,
)


def _many() -> list[dict]:
    train, held_out = split_topics()
    return make_prompts(train, 1500, 0, "t") + make_prompts(held_out, 500, 1, "h")


def test_every_kind_but_the_left_out_ones_is_made_and_read_back_by_the_checkers():
    assert set(KINDS) | set(LEFT_OUT) == set(instruction_names())
    rows = _many()
    table = conflicts()
    seen: dict[str, set[str]] = {}
    for row in rows:
        ids, kwargs = read_instructions(row["key"], row["prompt"], row)  # the checkers accept every argument
        assert ids == row["instruction_id_list"] and 1 <= len(ids) <= 3
        assert len(set(ids)) == len(ids)
        for i, a in enumerate(ids):
            assert not any(b in table.get(a, ()) for b in ids[i + 1 :]), row["prompt"]
        for name in ids:
            seen.setdefault(name, set()).add(row["prompt"])
    assert set(seen) == set(KINDS)
    # each kind is worded in several ways, and each wording is used
    for name, kind in KINDS.items():
        wordings = [w for group in kind.wordings.values() for w in group]
        assert len(wordings) >= 2
        for wording in wordings:
            start = wording.split("{")[0][:25]
            assert any(start.lower() in p.lower() for p in seen[name]), (name, wording)


def test_no_8_word_sequence_of_an_ifeval_prompt_occurs_in_the_generated_prompts():
    path = SHARED_DATA / "ifeval" / "input_data.jsonl"
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set CHATRLHF_SHARED_DATA)")
    ifeval = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines()]
    theirs = set().union(*(word_ngrams(p) for p in ifeval))
    assert len(theirs) > 10_000
    ours = set().union(*(word_ngrams(r["prompt"]) for r in _many()))
    # every wording with every request, drawn directly too, so a rare combination cannot hide
    table, rng = conflicts(), random.Random(0)
    for _ in range(20_000):
        ours |= word_ngrams(make_prompt(rng, rng.choice(TOPICS), "x", table)["prompt"])
    assert not ours & theirs, sorted(ours & theirs)[:5]


def test_held_out_topics_stay_out_of_training_prompts():
    train, held_out = split_topics()
    assert set(held_out) == set(HELD_OUT_TOPICS) and not set(train) & set(held_out)
    rows = make_prompts(train, 300, 3, "t")
    assert {r["topic"] for r in rows} == set(train)
    assert make_prompts(train, 50, 3, "t") == rows[:50]  # seeded


def test_a_repeated_request_is_what_the_checker_reads_and_an_answer_can_follow_everything():
    rng, table = random.Random(1), conflicts()
    rows = [make_prompt(rng, "bees", str(i), table) for i in range(600)]
    repeats = [r for r in rows if "combination:repeat_prompt" in r["instruction_id_list"]]
    assert repeats
    for r in repeats:
        assert r["instruction_id_list"][-1] == "combination:repeat_prompt"
        said = r["kwargs"][-1]["prompt_to_repeat"]
        assert r["prompt"].startswith(said) and len(said) < len(r["prompt"])
        assert follows(
            "combination:repeat_prompt", r["kwargs"][-1], r["prompt"], said + "\n\nBees make honey."
        )
    # hand-written answers that follow each instruction of three made prompts, through lm-eval's functions
    cases = {
        "punctuation:no_comma": "Bees make honey and live in hives.",
        "change_case:english_lowercase": "bees make honey and live in hives.",
        "startend:quotation": '"Bees make honey."',
        "detectable_format:title": "<<Bees>>\nBees make honey.",
    }
    for name, answer in cases.items():
        assert follows(name, {}, "p", answer)


def _ifeval_file(tmp_path) -> str:
    rows = [
        {"key": 1, "prompt": "Write about tea without commas.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]},
        {"key": 2, "prompt": "Describe rain in under 20 words with a title in <<>>.",
         "instruction_id_list": ["length_constraints:number_words", "detectable_format:title"],
         "kwargs": [{"relation": "less than", "num_words": 20}, {}]},
        {"key": 3, "prompt": "Say hello in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
         "kwargs": [{}]},
    ]  # fmt: skip
    return write_jsonl(tmp_path / "ifeval.jsonl", rows)


def test_demo_task_ifeval_runs_the_loop_and_ends_with_ifeval_for_three_models(tiny_model, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--task", "ifeval", "--model", tiny_model, "--output_dir", str(out), "--iterations", "1"]
    args += ["--sft_steps", "2", "--ppo_steps", "2", "--max_new_tokens", "8"]
    args += ["--ifeval_prompts", _ifeval_file(tmp_path), "--ifeval_max_new_tokens", "10"]
    result = chatrlhf(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state["stages"]) == [
        "sft", "iter1/sample", "iter1/label", "iter1/rm", "iter1/ppo", "eval",
        "ifeval/start", "ifeval/sft", "ifeval/ppo",
    ]  # fmt: skip
    from chatrlhf.labeling.store import Store

    data = tmp_path / "demo_data"
    demos = [json.loads(line) for line in (data / "demonstrations.jsonl").read_text().splitlines()]
    assert demos and all(d["source"] == "edited" and d["draft"] for d in demos)
    # the ranking tasks written from the drafts were ranked with the first round's sampled answers
    ahead = [json.loads(line) for line in (data / "ranking_tasks.jsonl").read_text().splitlines()]
    store = Store(str(out / "labels.db"))
    assert ahead and all(len(store.task_ids(key=r["key"], iteration=1)) == 1 for r in ahead)
    prompts = [json.loads(line) for line in (data / "prompts.jsonl").read_text().splitlines()]
    assert all(r["instruction_id_list"] and r["topic"] not in HELD_OUT_TOPICS for r in prompts)
    figures = json.loads((out / "ifeval" / "ifeval.json").read_text())
    assert figures["prompts"] == 3 and figures["instructions"] == 4
    assert set(figures["scores"]) == {"start", "sft", "ppo"}
    assert figures["models"]["sft"] == str(out / "sft") and figures["models"]["ppo"] == str(
        out / "iter1" / "ppo"
    )
    for who in ("start", "sft", "ppo"):
        rows = [json.loads(line) for line in (out / "ifeval" / f"{who}.jsonl").read_text().splitlines()]
        loose = figures["scores"][who]["overall"]["prompt_loose"]
        assert len(rows) == 3 and 0 <= loose <= 1
    d = figures["differences"]["ppo-start"]["mean"]["prompt_loose"]
    assert d == pytest.approx(
        figures["scores"]["ppo"]["overall"]["prompt_loose"]
        - figures["scores"]["start"]["overall"]["prompt_loose"]
    )
    report = (out / "report.md").read_text()
    # the report opens with IFEval: the chart per instruction type, then the pipeline's own figures
    assert report.index("## IFEval") < report.index("ifeval_by_type.png") < report.index("## Stages")
    assert (out / "ifeval_by_type.png").is_file()
    assert "fell from the starting model to PPO" in report
    # the same seed again, resumed: nothing is trained or answered again and the figures repeat
    again = chatrlhf(*args, "--resume", "true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "ifeval" / "ifeval.json").read_text()) == figures


def test_the_starting_models_ifeval_answers_come_from_the_cache(tiny_model, tmp_path):
    from chatrlhf.configs import IFEvalConfig, SamplingConfig
    from chatrlhf.ifeval.checkers import load_items
    from chatrlhf.ifeval.loop import answers_key, cached_answers

    items = load_items(_ifeval_file(tmp_path))
    bench = IFEvalConfig(prompts="x", sampling=SamplingConfig(max_new_tokens=6), batch_size=2)
    from pathlib import Path

    from rich.console import Console

    first = cached_answers(tiny_model, items, bench, Console())
    key = answers_key(Path(tiny_model), items, bench)
    assert key != answers_key(Path(tiny_model), items[:2], bench)
    longer = IFEvalConfig(prompts="x", sampling=SamplingConfig(max_new_tokens=7), batch_size=2)
    assert key != answers_key(Path(tiny_model), items, longer)
    console = Console(record=True)
    second = cached_answers(tiny_model, items, bench, console)
    assert "from the cache" in console.export_text()
    assert [a.text for a in second] == [a.text for a in first]
    assert [a.verdict for a in second] == [a.verdict for a in first]


@pytest.mark.parametrize(
    "record,message",
    [
        ({"key": 1, "prompt": "Hi.", "instruction_id_list": ["punctuation:no_colon"], "kwargs": [{}]},
         "field 'instruction_id_list[0]': unknown instruction"),
        ({"key": 1, "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "field 'prompt'"),
        ({"key": 1, "prompt": "Hi.", "instruction_id_list": ["keywords:frequency"],
          "kwargs": [{"relation": "about", "keyword": "tea", "frequency": 2}]}, "the checker refuses"),
    ],
)  # fmt: skip
def test_a_bad_ifeval_file_stops_the_demo_before_anything_is_written(tiny_model, tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"key": 0, "prompt": "Fine.", "instruction_id_list":
                       ["punctuation:no_comma"], "kwargs": [{}]}, record])  # fmt: skip
    out = tmp_path / "demo"
    result = chatrlhf("demo", "--task", "ifeval", "--model", tiny_model, "--output_dir", str(out),
                      "--ifeval_prompts", path)  # fmt: skip
    assert result.returncode != 0
    assert f"{path}:2" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "demo_data").exists()

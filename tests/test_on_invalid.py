"""`data.on_invalid: skip`: invalid records are left out, counted, printed and recorded in run.json, by every
loader through one mechanism; a file of nothing but invalid records still stops."""

from __future__ import annotations

import json

import pytest
from conftest import chatrlhf, write_jsonl

from chatrlhf.data import load_demonstrations, load_prompts, load_texts
from chatrlhf.errors import UserError
from chatrlhf.preferences import load_rankings
from chatrlhf.records import DataError, InvalidRecords


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# Anthropic HH holds pairs like the second: the chosen answer's final assistant turn is empty
HH_ROWS = [
    {"chosen": hh("Hi", "Hello there."), "rejected": hh("Hi", "Go away.")},
    {"chosen": hh("Tell me a joke.", ""), "rejected": hh("Tell me a joke.", "No.")},
    {"chosen": hh("Name a fruit.", "Apple."), "rejected": hh("Name a fruit.", "A car.")},
    {"chosen": hh("Name a colour.", "Blue."), "rejected": hh("Name a colour.", "Seven.")},
]
EMPTY_TURN = "field `chosen` must end in a non-empty Assistant turn"


def test_stop_is_the_default_and_names_the_record(tmp_path):
    data = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    with pytest.raises(DataError, match=f"hh.jsonl:2: {EMPTY_TURN}"):
        load_rankings(data)


def test_skip_leaves_invalid_records_out_of_every_loader(tmp_path, capsys):
    good_demo = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    files = {
        "demos": (
            [good_demo, {"prompt": "Hi", "completion": ""}, '{"messages": [', good_demo],
            load_demonstrations,
            ["demos.jsonl:2: field `completion`", "demos.jsonl:3: broken JSON"],
        ),
        "prompts": (
            [{"prompt": "Hi"}, {"messages": [{"role": "robot", "content": "x"}]}, {"prompt": "Bye"}],
            load_prompts,
            ["prompts.jsonl:2: field `messages[0].role` is 'robot'"],
        ),
        "texts": (
            [{"text": "a b c"}, {"text": ""}, {"body": "x"}],
            load_texts,
            ["texts.jsonl:2:", "texts.jsonl:3:"],
        ),
        "rankings": (HH_ROWS, load_rankings, [f"rankings.jsonl:2: {EMPTY_TURN}"]),
    }
    for name, (rows, load, reasons) in files.items():
        invalid = InvalidRecords("skip")
        loaded = load(write_jsonl(tmp_path / f"{name}.jsonl", rows), invalid=invalid)
        assert len(loaded) == len(rows) - len(reasons)
        assert invalid.summary()["left_out"] == len(reasons)
        assert all(
            got.split(f"{tmp_path}/")[-1].startswith(want) for got, want in zip(invalid.reasons, reasons)
        )
        err = capsys.readouterr().err
        assert f"{name}.jsonl: {len(reasons)} invalid record(s) left out" in err
        assert all(want in err for want in reasons)


def test_skip_counts_across_files_and_keeps_oasst_trees(tmp_path):
    tree = {"text": "Q", "role": "prompter", "replies": [{"text": "A", "role": "assistant", "replies": []}]}
    data = write_jsonl(
        tmp_path / "trees.jsonl",
        [{"message_tree_id": "t1", "prompt": tree}, {"message_tree_id": "t2", "prompt": "not a tree"}],
    )
    invalid = InvalidRecords("skip")
    assert [c.messages[-1]["content"] for c in load_demonstrations(data, invalid=invalid)] == ["A"]
    load_rankings(write_jsonl(tmp_path / "hh.jsonl", HH_ROWS), invalid=invalid)
    assert [r.split(f"{tmp_path}/")[1] for r in invalid.reasons] == [
        "trees.jsonl:2: field `prompt` must be an OpenAssistant message with `replies`",
        f"hh.jsonl:2: {EMPTY_TURN}",
    ]
    with pytest.raises(DataError, match="trees.jsonl:2: field `prompt`"):
        load_demonstrations(data)


def test_a_file_of_only_invalid_records_still_stops(tmp_path):
    data = write_jsonl(tmp_path / "hh.jsonl", [HH_ROWS[1], "{broken"])
    with pytest.raises(
        DataError, match=r"hh.jsonl: all 2 records are invalid, nothing is left .* the first: "
    ):
        load_rankings(data, invalid=InvalidRecords("skip"))
    with pytest.raises(UserError, match="data.on_invalid: 'ignore' is not one of stop, skip"):
        InvalidRecords("ignore")


def test_reward_command_skips_the_empty_hh_answer_and_records_it(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS * 3)
    args = ["reward", "--model", tiny_model, "--data.train", data, "--max_steps", "1", "--batch_size", "2"]
    result = chatrlhf(*args, "--output_dir", str(tmp_path / "stopped"))
    assert result.returncode == 2 and f"{data}:2: {EMPTY_TURN}" in result.stderr
    assert not (tmp_path / "stopped").exists()

    result = chatrlhf(*args, "--output_dir", str(tmp_path / "rm"), "--data.on_invalid", "skip")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{data}: 3 invalid record(s) left out (data.on_invalid: skip)" in result.stderr
    assert f"{data}:2: {EMPTY_TURN}" in result.stderr and "... and 1 more" not in result.stderr
    run = json.loads((tmp_path / "rm" / "run.json").read_text())
    assert run["config"]["data"]["on_invalid"] == "skip"
    assert run["lineage"]["invalid_records"] == {
        "on_invalid": "skip",
        "left_out": 3,
        "reasons": [f"{data}:{line}: {EMPTY_TURN}" for line in (2, 6, 10)],
    }

    only_bad = write_jsonl(tmp_path / "bad.jsonl", [HH_ROWS[1]] * 2)
    result = chatrlhf(*args[:4], only_bad, "--output_dir", str(tmp_path / "x"), "--data.on_invalid", "skip")
    assert result.returncode == 2 and f"{only_bad}: all 2 records are invalid" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


def test_sft_command_records_none_left_out_under_stop(tmp_path, tiny_model, demos_file):
    args = ["sft", "--model", tiny_model, "--data.train", demos_file, "--max_steps", "1"]
    result = chatrlhf(*args, "--output_dir", str(tmp_path / "sft"))
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((tmp_path / "sft" / "run.json").read_text())
    assert run["lineage"]["invalid_records"] == {"on_invalid": "stop", "left_out": 0, "reasons": []}
    result = chatrlhf(*args, "--output_dir", str(tmp_path / "x"), "--data.on_invalid", "maybe")
    assert (
        result.returncode == 2
        and "`data.on_invalid` must be one of stop | skip, got 'maybe'" in result.stderr
    )


def test_contradictory_preferences_are_refused_and_ties_are_fine(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "Same answer.", "rejected": "Same answer. "},
        {"chosen": hh("Hi", "Hello."), "rejected": hh("Hi", "Hello.")},
        {"prompt": "q", "responses": ["a", "b", "a"], "ranks": [1, 2, 3]},
        {"prompt": "q", "responses": ["a", "b", "a"], "ranks": [1, 2, 1]},  # a tie with itself: fine
    ]
    data = write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(DataError, match="r.jsonl:1: fields `chosen` and `rejected` hold the same answer"):
        load_rankings(data)
    invalid = InvalidRecords("skip")
    (kept,) = load_rankings(data, invalid=invalid)
    assert kept.responses == ["a", "b", "a"] and kept.ranks == [1, 2, 1]
    assert [r.split(f"{tmp_path}/")[1] for r in invalid.reasons] == [
        "r.jsonl:1: fields `chosen` and `rejected` hold the same answer: a contradictory preference",
        "r.jsonl:2: fields `chosen` and `rejected` hold the same answer: a contradictory preference",
        "r.jsonl:3: field `responses[2]` is the same text as `responses[0]` but ranked 3 against 1: "
        "a contradictory preference",
    ]

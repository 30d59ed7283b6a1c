"""Reading and validating data: every malformed record stops the run with file, line and field, and
nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import demo_rows, write_jsonl

from chatrlhf.cli import main
from chatrlhf.data import load_demonstrations, pack, tokenize_conversations
from chatrlhf.oasst import tree_demonstrations
from chatrlhf.records import DataError

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def run_sft(tmp_path, model, data, *extra) -> tuple[int, str]:
    out = tmp_path / "out"
    argv = [
        "sft",
        "--model",
        model,
        "--data.train",
        data,
        "--output_dir",
        str(out),
        "--max_steps",
        "1",
        *extra,
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, str(out)


BAD_LINES = {
    "broken JSON": ('{"messages": [', "broken JSON"),
    "unknown role": (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "x"}]},
        "field `messages[1].role` is 'robot'",
    ),
    "empty content": (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
        "field `messages[1].content` is empty",
    ),
    "not ending in assistant": (
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "?"},
            ]
        },
        "field `messages[2].role`: the conversation must end in a assistant turn",
    ),
    "no known fields": ({"question": "Hi"}, "expected field `messages`"),
    "empty completion": ({"prompt": "Hi", "completion": ""}, "field `completion` is missing, empty"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_record_names_file_line_and_field(tmp_path, tiny_model, capsys, case):
    line, message = BAD_LINES[case]
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, line])
    code, out = run_sft(tmp_path, tiny_model, data)
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}:3:" in err and message in err
    assert "Traceback" not in err
    assert not Path(out).exists()


def test_non_utf8_line(tmp_path, tiny_model, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    code, out = run_sft(tmp_path, tiny_model, str(data))
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:2: not UTF-8" in err and not Path(out).exists()


def test_too_long_without_truncation(tmp_path, tiny_model, capsys):
    long = {"prompt": "word " * 20, "completion": "answer " * 200}
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, long])
    code, out = run_sft(tmp_path, tiny_model, data, "--data.max_length", "64")
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:2:" in err and "more than data.max_length=64" in err
    assert not Path(out).exists()
    # with truncation on the same file trains
    main(
        [
            "sft",
            "--model",
            tiny_model,
            "--data.train",
            data,
            "--output_dir",
            str(tmp_path / "cut"),
            "--max_steps",
            "1",
            "--data.max_length",
            "64",
            "--data.truncation",
            "true",
        ]
    )
    assert (tmp_path / "cut" / "run.json").is_file()


def test_existing_run_is_not_overwritten(tmp_path, tiny_model, capsys, demos_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _ = run_sft(tmp_path, tiny_model, demos_file)
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_config_errors_name_file_and_line(tmp_path, tiny_model, capsys):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {tiny_model}\ndata:\n  train: x.jsonl\n  max_lenght: 10\n")
    with pytest.raises(SystemExit):
        main(["sft", "--config", str(cfg)])
    assert f"{cfg}:4: unknown key `data.max_lenght`" in capsys.readouterr().err
    cfg.write_text(f"model: {tiny_model}\ndata:\n  train: x.jsonl\n")
    with pytest.raises(SystemExit):
        main(["sft", "--config", str(cfg), "--batch_size", "many"])
    assert "`batch_size` must be int" in capsys.readouterr().err


def test_formats_json_parquet_and_prompt_completion(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "Name a colour.", "completion": "Blue."}, GOOD]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    convs = load_demonstrations(str(tmp_path / "d.json"))
    assert convs[0].messages == [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    assert convs[1].where.endswith(":6")  # the second record starts on line 6 of the pretty-printed list
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "Name a colour.", "completion": "Blue."}]), tmp_path / "d.parquet"
    )
    assert load_demonstrations(str(tmp_path / "d.parquet"))[0].messages == convs[0].messages
    bad = [{"prompt": "x", "completion": "y"}, {"messages": [{"role": "user", "content": ""}]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad, indent=2))
    with pytest.raises(DataError, match=r"bad.json:6: field `messages\[0\].content`"):
        load_demonstrations(str(tmp_path / "bad.json"))


def test_oasst_best_ranked_path_without_synthetic(tmp_path):
    def msg(text, role, rank=None, replies=(), synthetic=False):
        return {"text": text, "role": role, "rank": rank, "synthetic": synthetic, "replies": list(replies)}

    tree = msg(
        "Q1",
        "prompter",
        replies=[
            msg("A-worse", "assistant", rank=1),
            msg("A-synthetic", "assistant", rank=0, synthetic=True),
            msg(
                "A-best",
                "assistant",
                rank=0,
                replies=[msg("Q2", "prompter", replies=[msg("A2", "assistant")])],
            ),
        ],
    )
    dangling = msg("Q", "prompter", replies=[msg("A", "assistant", replies=[msg("follow-up", "prompter")])])
    path = write_jsonl(
        tmp_path / "trees.jsonl",
        [{"message_tree_id": "t1", "prompt": tree}, {"message_tree_id": "t2", "prompt": dangling}],
    )
    convs = load_demonstrations(path)
    assert [[m["content"] for m in c.messages] for c in convs] == [["Q1", "A-best", "Q2", "A2"], ["Q", "A"]]
    assert convs[0].messages[0]["role"] == "user"
    assert tree_demonstrations  # imported for the format="oasst" path


def test_packing_keeps_samples_apart(tokenizer):
    from chatrlhf.records import Conversation

    convs = [Conversation(f"x:{i}", r["messages"]) for i, r in enumerate(demo_rows(6))]
    samples = tokenize_conversations(convs, tokenizer, 256, False)
    rows = pack(samples, 256)
    assert len(rows) < len(samples)
    assert sum(len(r.input_ids) for r in rows) == sum(len(s.input_ids) for s in samples)
    assert all(len(r.input_ids) <= 256 for r in rows)
    assert sum(p == 0 for r in rows for p in r.position_ids) == len(samples)

"""The rule judge of the built-in task, and `chatrlhf demo` end to end on a tiny model."""

from __future__ import annotations

import pytest
from conftest import chatrlhf

from chatrlhf.demo import CONSTRAINTS, HELD_OUT_TOPICS, TOPICS, demonstrations
from chatrlhf.judges import satisfies


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
def test_rule_judge(answer, constraint, expected):
    assert satisfies(answer, constraint) is expected


def test_built_in_demonstrations_meet_their_constraints():
    import random

    rows = demonstrations(list(TOPICS), random.Random(0))
    assert len(rows) == len(TOPICS) * len(CONSTRAINTS)
    assert all(satisfies(r["completion"], r["constraint"]) for r in rows)
    assert set(HELD_OUT_TOPICS) <= set(TOPICS)


def test_demo_command_on_a_tiny_model(tiny_model, tmp_path):
    result = chatrlhf(
        "demo", "--model", tiny_model, "--sft_steps", "2", "--output_dir", str(tmp_path / "demo")
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "constraints met on 12 held-out prompts" in result.stdout
    assert (tmp_path / "demo" / "sft" / "model.safetensors").is_file()

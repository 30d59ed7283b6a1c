"""Crash safety: a real `chatrlhf sft`, `reward` and `ppo` process is killed with SIGKILL in the middle of a
step, resumed and killed again half-way through writing a checkpoint, then resumed to the end. The finished
run has the metrics, samples and weights of a run that was never interrupted, and the half-written
checkpoint is never the one resumed from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import demo_rows, make_tiny_model, write_jsonl
from safetensors.torch import load_file

from chatrlhf.cli import main
from chatrlhf.runs import DIE_IN_CHECKPOINT, read_metrics

# the resumed run dies while writing checkpoint 6, so checkpoint 4 is the last whole one
STEPS, SAVE_EVERY, DIE_AT = 8, 2, 6
UNTIMED = ("time", "timing/", "train/tokens_per_s")  # wall-clock values differ between any two runs


def stage_args(stage: str, data: Path, tiny_model: str, tokenizer) -> list[str]:
    common = ["--max_steps", STEPS, "--save_every", SAVE_EVERY, "--seed", 7, "--dtype", "fp32", "--lr", 1e-3]
    if stage == "sft":
        train = write_jsonl(data / "demos.jsonl", demo_rows(16))
        args = ["sft", "--model", tiny_model, "--data.train", train, "--batch_size", 2]
    elif stage == "reward":
        rows = [
            {"prompt": f"Review {i}?", "responses": ["great fun", "dull", "awful mess"], "ranks": [1, 2, 3]}
            for i in range(20)
        ]
        train = write_jsonl(data / "rankings.jsonl", rows)
        args = ["reward", "--model", tiny_model, "--data.train", train, "--batch_size", 2]
    else:
        prompts = write_jsonl(data / "prompts.jsonl", [{"prompt": f"Name thing {i}."} for i in range(8)])
        rm = make_tiny_model(data / "rm", tokenizer, seed=2)
        args = ["ppo", "--model", tiny_model, "--reward_model", rm, "--data.train", prompts]
        args += ["--batch_size", 4, "--sampling.max_new_tokens", 6, "--ppo_epochs", 1, "--sample_every", 1]
    return [str(a) for a in args + common]


def start(args: list[str], out: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(out.parent / f"{out.name}.log", "a") as log:  # the child keeps its own copy open
        return subprocess.Popen(
            [sys.executable, "-m", "chatrlhf", *args, "--output_dir", str(out)],
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
        )


def metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def comparable(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED)} for r in read_metrics(out)]


def weights(out: Path) -> dict[str, torch.Tensor]:
    files = sorted(out.glob("**/model.safetensors"))  # PPO: the policy, and the value model in value/
    return {f"{f.relative_to(out)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_killed_twice_then_resumed_equals_an_uninterrupted_run(stage, tiny_model, tokenizer, tmp_path):
    args = stage_args(stage, tmp_path, tiny_model, tokenizer)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    main([*args, "--output_dir", str(whole)])  # the uninterrupted run, in this process

    proc = start(args, cut)  # killed in the middle of a step, once three steps are logged
    while proc.poll() is None and metric_lines(cut) < 3:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, (cut.parent / "cut.log").read_text()
    assert 3 <= metric_lines(cut) < DIE_AT and not (cut / "run.json").exists()

    proc = start([*args, "--resume", "true"], cut, {DIE_IN_CHECKPOINT: str(DIE_AT)})
    assert proc.wait(timeout=300) == -signal.SIGKILL, (cut.parent / "cut.log").read_text()
    checkpoints = cut / "checkpoints"
    assert (checkpoints / f"step-{DIE_AT - SAVE_EVERY}" / "trainer_state.pt").is_file()
    assert not (checkpoints / f"step-{DIE_AT}").exists()
    assert [p.name.split(".")[1] for p in checkpoints.glob(".step-*")] == [f"step-{DIE_AT}"]  # half written

    resumed_at = time.time()
    proc = start([*args, "--resume", "true"], cut)
    assert proc.wait(timeout=300) == 0, (cut.parent / "cut.log").read_text()

    assert comparable(cut) == comparable(whole)
    # resumed from the last whole checkpoint: what came before it was kept, everything after it redone
    times = {r["step"]: r["time"] for r in read_metrics(cut)}
    assert all((t >= resumed_at) == (step > DIE_AT - SAVE_EVERY) for step, t in times.items()), times
    expected, got = weights(whole), weights(cut)
    assert expected.keys() == got.keys() and len(expected) > 0
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not list(checkpoints.glob(".step-*"))  # the half-written checkpoint was cleared away
    if stage == "ppo":  # its answers log too: each step's samples once, as in the uninterrupted run
        assert read_metrics(cut / "samples.jsonl") == read_metrics(whole / "samples.jsonl")

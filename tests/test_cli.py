"""Each sub-command end to end, as a user runs it, and the real default model on real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, chatrlhf, demo_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_sft_command_then_plain_transformers(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", demo_rows(12))
    held = write_jsonl(tmp_path / "eval.jsonl", demo_rows(4))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        f"model: {tiny_model}\ndata:\n  train: {train}\n  eval: {held}\noutput_dir: {tmp_path / 'out'}\n"
        "max_steps: 50\nbatch_size: 4\nlr: 3e-3\nlora: off\n"
    )
    result = chatrlhf("sft", "--config", str(cfg), "--max_steps", "4", "--report_to", "tensorboard")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]  # the override beat the file's 50
    final = [r for r in rows if "eval/loss" in r][-1]
    assert final["eval/ppl"] == pytest.approx(torch.tensor(final["eval/loss"]).exp().item(), rel=1e-4)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["max_steps"] == 4 and run["config"]["lr"] == 3e-3
    assert list((out / "tensorboard").iterdir())

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def test_pretrain_command_on_text(tiny_model, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    result = chatrlhf(
        "pretrain",
        "--model",
        tiny_model,
        "--data.train",
        str(corpus),
        "--data.max_length",
        "64",
        "--output_dir",
        str(tmp_path / "pt"),
        "--max_steps",
        "3",
        "--batch_size",
        "2",
        "--lr",
        "1e-2",
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pt" / "model.safetensors").is_file()


def test_bad_data_from_the_command_line(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"messages": [{"role": "user", "content": "hi"}]}'])
    result = chatrlhf("sft", "--model", tiny_model, "--data.train", data, "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 2
    assert (
        f"{data}:1: field `messages[0].role`: the conversation must end in a assistant turn" in result.stderr
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_help_lists_config_keys():
    result = chatrlhf("sft", "--help")
    assert result.returncode == 0 and "--data.train" in result.stdout and "--lora.rank" in result.stdout
    result = chatrlhf("label", "labeler", "add", "--help")
    assert result.returncode == 0 and "--name" in result.stdout and "--lora.rank" not in result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["label", "--help"], ["label", "labeler", "add", "--help"]])
def test_help_without_a_model_command_loads_no_torch(argv):
    """`chatrlhf --help` answers at once: stage modules (torch, transformers, peft) load only for their command."""
    code = (
        "import sys\nfrom chatrlhf.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('loaded:', sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert "usage: chatrlhf" in result.stdout and "loaded: []" in result.stdout, result.stdout + result.stderr


@pytest.mark.slow
def test_default_model_on_openassistant_trees(tmp_path):
    trees = SHARED_DATA / "openassistant-oasst-en100" / "en_100_tree.jsonl"
    if not trees.is_file():
        pytest.skip(f"shared data not found at {trees} (set CHATRLHF_SHARED_DATA)")
    from chatrlhf.configs import DemoData, SFTConfig
    from chatrlhf.data import load_demonstrations
    from chatrlhf.sft import train

    conversations = load_demonstrations(str(trees))
    assert len(conversations) > 50 and any(len(c.messages) > 2 for c in conversations)
    cfg = SFTConfig(
        data=DemoData(train=str(trees), max_length=256, truncation=True),
        output_dir=str(tmp_path / "oasst"),
        max_steps=2,
        batch_size=2,
        lr=1e-5,
        save_every=0,
    )
    train(cfg)
    steps = [json.loads(x) for x in Path(cfg.output_dir, "metrics.jsonl").read_text().splitlines()]
    losses = [s["train/loss"] for s in steps if "train/loss" in s]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # the exported checkpoint is the trained model: it differs from the start and loads with its tokenizer
    from chatrlhf.models import resolve_model

    start = AutoModelForCausalLM.from_pretrained(resolve_model("")).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(cfg.output_dir).state_dict()
    assert set(trained) == set(start)
    assert any(not torch.equal(trained[k], start[k]) for k in start), "SFT changed no weight"
    assert AutoTokenizer.from_pretrained(cfg.output_dir).eos_token_id is not None

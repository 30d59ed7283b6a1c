"""Shared fixtures: the real SmolLM2 tokenizer (from the packaged default model) and tiny random llamas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(
    os.environ.get("CHATRLHF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from chatrlhf.models import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="session")
def tokenizer_dir(default_model_dir, tmp_path_factory) -> str:
    """A folder holding only the default model's tokenizer (pad added), shared by the tiny models."""
    from chatrlhf.models import load_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(default_model_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from chatrlhf.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def make_tiny_model(folder: Path, tokenizer, seed: int = 0, layers: int = 2) -> str:
    """A tiny random llama with the real tokenizer, saved like any checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), tokenizer)


def chatrlhf(*args: str) -> subprocess.CompletedProcess:
    """Run the `chatrlhf` command as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "chatrlhf", *args], capture_output=True, text=True, timeout=600
    )


def write_jsonl(path: Path, rows) -> str:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def demo_rows(n: int = 16) -> list[dict]:
    topics = ["cats", "rain", "tea", "maps", "jazz", "salt", "bread", "glass"]
    rows = []
    for i in range(n):
        t = topics[i % len(topics)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Tell me about {t}, item {i}."},
                    {"role": "assistant", "content": f"{t.capitalize()} are interesting. Fact number {i}."},
                ]
            }
        )
    return rows


@pytest.fixture
def demos_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "demos.jsonl", demo_rows())

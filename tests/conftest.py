"""Shared fixtures: the real SmolLM2 tokenizer (from the packaged default model) and tiny random llamas."""

from __future__ import annotations

import json
import os
import random
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


# --------------------------------------------------------------------------------------------------
# labeling databases: a SQLite file, and a throwaway PostgreSQL cluster started for the session


def _postgres_bin() -> Path | None:
    import glob

    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    newest = max(found, key=lambda p: [int(x) for x in Path(p).parts[-3].split(".") if x.isdigit()])
    return Path(newest).parent


@pytest.fixture(scope="session")
def postgres_server():
    """`postgresql://postgres@127.0.0.1:PORT` of a cluster in a temporary folder, stopped after the session.

    PostgreSQL refuses to run as root, so under root it runs as the `postgres` user the Debian package makes.
    """
    import pwd
    import shutil
    import socket
    import tempfile

    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does it)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="chatrlhf-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, log = root / "data", root / "server.log"

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120, check=check)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
            "--locale=C", "--no-sync")  # fmt: skip
        # fsync off: a throwaway cluster; durability of acknowledged writes is the server's own guarantee
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or (log.read_text() if log.exists() else "") or str(e)
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL could not be started here: {detail.strip()[-300:]}")
    yield f"postgresql://postgres@127.0.0.1:{port}"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop", check=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """An empty database on the session's PostgreSQL server (one database, emptied for each test: cheaper
    than a database per test)."""
    import psycopg

    url = postgres_server + "/labels"
    with psycopg.connect(postgres_server + "/postgres", autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'labels'").fetchone() is None:
            conn.execute("CREATE DATABASE labels")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def labels_db(request, tmp_path) -> str:
    """A fresh labeling database URL on each backend."""
    if request.param == "sqlite":
        return str(tmp_path / "labels.db")
    return request.getfixturevalue("postgres_url")


def db_snapshot(store) -> dict[str, list[tuple]]:
    """Every row of every labeling table, for "nothing changed" assertions."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from chatrlhf.labeling.store import Base

    with Session(store.engine) as session:
        return {
            table.name: sorted(tuple(row) for row in session.execute(select(table)).all())
            for table in Base.metadata.sorted_tables
        }


# --------------------------------------------------------------------------------------------------
# preference data

GOOD = ["great", "excellent", "wonderful", "superb", "lovely"]
BAD = ["awful", "terrible", "dreadful", "horrid", "lousy"]


def preference_rows(n: int, seed: int) -> list[dict]:
    """A learnable preference: the more positive words an answer has, the better it ranks."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.choice([2, 3, 4])
        counts = rng.sample(range(4), k)
        responses = [" ".join(rng.sample(GOOD, c) + rng.sample(BAD, 3 - min(c, 3))) for c in counts]
        ranks = [sorted(counts, reverse=True).index(c) + 1 for c in counts]
        rows.append({"prompt": f"Review number {i} of the film?", "responses": responses, "ranks": ranks})
    return rows

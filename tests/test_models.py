"""Model-level helpers: the measured choice of `dtype: auto` on a CPU."""

from __future__ import annotations

import json

import pytest
import torch

from chatrlhf import models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATRLHF_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_announced", set())  # said once per process: earlier tests may have said it
    return tmp_path / "dtype_probe.json"


def test_auto_dtype_is_measured_once_and_cached(cache, capsys):
    chosen = models.resolve_dtype("auto")
    probes = json.loads(cache.read_text())
    probe = probes[models._cpu_key()]
    assert probe["fp32"] > 0 and probe["bf16"] > 0
    faster = probe["bf16"] >= models.BF16_MARGIN * probe["fp32"]
    assert chosen == (torch.bfloat16 if faster else torch.float32)
    assert "dtype auto:" in capsys.readouterr().err


def test_auto_dtype_follows_the_cache_without_measuring(cache, monkeypatch):
    # a cached verdict is used as is: the probe never runs again on the same machine
    for verdict, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cache.write_text(json.dumps({models._cpu_key(): {"dtype": verdict, "fp32": 1.0, "bf16": 1.0}}))
        monkeypatch.setattr(models, "_matmul_gflops", lambda *a, **k: pytest.fail("measured again"))
        assert models.resolve_dtype("auto") == dtype


def test_a_corrupt_cache_is_measured_again(cache):
    cache.write_text("{not json")
    models.resolve_dtype("auto")
    assert models._cpu_key() in json.loads(cache.read_text())

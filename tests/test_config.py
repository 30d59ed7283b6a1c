"""Config files and command-line overrides."""

from __future__ import annotations

import pytest

from chatrlhf.config import ConfigError, load_config
from chatrlhf.configs import ScoreConfig, SFTConfig


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "sft.yaml"
    cfg_file.write_text("lr: 2e-5\nlora:\n  rank: 8\ndata:\n  train: a.jsonl\n  packing: yes\n")
    cfg = load_config(
        SFTConfig, str(cfg_file), ["--lr", "1e-4", "--lora.targets", "[q_proj, v_proj]", "--data.truncation"]
    )
    assert cfg.lr == 1e-4 and cfg.lora.rank == 8 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.data.packing is True and cfg.data.truncation is True and cfg.data.train == "a.jsonl"
    assert load_config(SFTConfig, None, ["--lora", "off"]).lora.enabled is False


def test_repeated_flag_collects_values_and_text_keeps_its_commas():
    cfg = load_config(ScoreConfig, None, ["--response", "Hello, world", "--response", "Bye."])
    assert cfg.response == ["Hello, world", "Bye."]
    assert load_config(ScoreConfig, None, ["--response", "One, two"]).response == ["One, two"]


def test_wrong_types_and_unknown_keys():
    with pytest.raises(ConfigError, match="`epochs` must be float"):
        load_config(SFTConfig, None, ["--epochs", "many"])
    with pytest.raises(ConfigError, match="unknown key `lora.rnak`"):
        load_config(SFTConfig, None, ["--lora.rnak", "4"])
    with pytest.raises(ConfigError, match="`max_steps` must be int"):
        load_config(SFTConfig, None, ["--max_steps", "1", "--max_steps", "2"])

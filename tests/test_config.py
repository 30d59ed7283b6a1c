"""Config files and command-line overrides."""

from __future__ import annotations

import pytest

from chatrlhf.configs import ConfigError, ScoreConfig, SFTConfig, load_config


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


def test_a_section_keeps_the_defaults_its_command_gives_it():
    """`sample` samples at temperature 1 by default; setting another key of its `sampling` block keeps that."""
    from chatrlhf.configs import EvalConfig, SampleConfig

    cfg = load_config(SampleConfig, None, ["--sampling.max_new_tokens", "6"])
    assert cfg.sampling.max_new_tokens == 6 and cfg.sampling.temperature == 1.0
    assert load_config(EvalConfig, None, ["--sampling.max_new_tokens", "6"]).sampling.temperature == 0.0


def test_closed_choices_are_checked_when_read_and_listed_in_help():
    from chatrlhf.configs import Dtype, PPOConfig, field_help

    with pytest.raises(ConfigError, match=r"`dtype` must be one of fp32 \| bf16 \| auto, got 'fp16'"):
        load_config(SFTConfig, None, ["--dtype", "fp16"])
    assert load_config(SFTConfig, None, ["--dtype", "bf16"]).dtype is Dtype.bf16
    rows = {name: (text, default) for name, text, default in field_help(PPOConfig)}
    assert (
        rows["advantage_estimator"][0].endswith("(gae | rloo | grpo)")
        and rows["advantage_estimator"][1] == "gae"
    )


def test_a_key_the_command_does_not_read_is_refused_naming_it(tmp_path):
    from chatrlhf.configs import PPOConfig

    path = tmp_path / "ppo.yaml"
    path.write_text("lr: 1e-5\ndata:\n  train: p.jsonl\n  packing: true\n")
    with pytest.raises(ConfigError, match=rf"{path}:4: unknown key `data.packing`"):
        load_config(PPOConfig, str(path))
    with pytest.raises(ConfigError, match="unknown key `grad_accum`"):
        load_config(PPOConfig, None, ["--grad_accum", "2"])

"""PPO's four models: loading them (`load_models`), what they share, holding their frozen weights in bf16, and
writing the trained ones out at the end.

The policy comes from the SFT checkpoint; the frozen reference is the SFT model (with LoRA, the policy with
its adapters disabled); the value model is initialised from the reward model (or, with `value_on_policy: true`,
is a scalar head on the policy itself); the reward model is frozen (or a reward function stands in for it).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import set_seed

from chatrlhf.configs import PPOConfig
from chatrlhf.errors import UserError
from chatrlhf.forward import shares_trunk, trunk_matches_full_forward
from chatrlhf.harness import trainable_state
from chatrlhf.models import (
    apply_lora,
    freeze_bottom,
    hold_frozen_linears,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_model,
    save_model,
    unwrap,
)
from chatrlhf.ppo_state import EMA


@dataclass
class Models:
    policy: torch.nn.Module
    value: torch.nn.Module | None  # None: rloo or grpo advantages, or the value head on the policy
    reference: torch.nn.Module | None  # None: the policy with LoRA adapters disabled
    reward: torch.nn.Module | None  # None: a reward function is used
    reward_bias: float = 0.0
    # > 0: the policy's first `trunk_layers` layers carry no adapters and the reference is the policy with its
    # adapters disabled, so their output, which decoding the rollouts computes (`Generation.trunk`), is shared
    trunk_layers: int = 0
    # the value and reward models' first `trunk_layers` layers are the policy's weights too: they read the
    # shared trunk and run only the layers above it
    value_shares_trunk: bool = False
    reward_shares_trunk: bool = False
    # `value_on_policy`: a scalar head on the policy's last hidden state instead of a value model
    value_head: torch.nn.Module | None = None

    @property
    def has_critic(self) -> bool:
        return self.value is not None or self.value_head is not None


def _same_vocabulary(path: str, tokenizer, policy_tokenizer, what: str) -> None:
    if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise UserError(
            f"{what}: {path} uses a different tokenizer vocabulary than the policy; train it from the same SFT model"
        )


def load_models(cfg: PPOConfig, tokenizer, model_path: str, reward_fn, device) -> Models:
    """The policy (with LoRA when configured), the frozen reference, the value model (gae) and the frozen
    reward model (unless a reward function stands in for it)."""
    set_seed(cfg.seed)
    policy = load_causal_lm(model_path, tokenizer, device)
    reference = None
    reference_path = resolve_model(cfg.reference_model) if cfg.reference_model else model_path
    if reference_path != model_path or (cfg.reference_model and not cfg.lora.enabled):
        _same_vocabulary(reference_path, load_tokenizer(reference_path), tokenizer, "reference_model")
        reference = load_causal_lm(reference_path, tokenizer, device).eval().requires_grad_(False)
    elif not cfg.lora.enabled:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora)
    freeze_bottom(policy, cfg.freeze_layers)
    value = value_head = None
    if cfg.advantage_estimator == "gae" and cfg.value_on_policy:
        value_head = policy_value_head(policy, device)
    elif cfg.advantage_estimator == "gae":
        value_path = resolve_model(cfg.value_model or cfg.reward_model or cfg.model)
        _same_vocabulary(value_path, load_tokenizer(value_path), tokenizer, "value_model")
        value = load_reward_model(value_path, tokenizer, device)
        freeze_bottom(value, cfg.freeze_layers)
    if cfg.lora.enabled and value is not None:
        value = apply_lora(value, cfg.lora)
        for name, p in value.named_parameters():
            p.requires_grad = p.requires_grad or ".score." in name
    reward, bias = None, 0.0
    if reward_fn is None:
        reward_path = resolve_model(cfg.reward_model)
        _same_vocabulary(reward_path, load_tokenizer(reward_path), tokenizer, "reward_model")
        reward = load_reward_model(reward_path, tokenizer, device).eval().requires_grad_(False)
        bias = float(getattr(reward.config, "reward_bias", 0.0) or 0.0)
    layers = _shared_trunk(cfg, policy, reference, len(tokenizer))
    shared = [m is not None and layers > 0 and shares_trunk(m, policy, layers) for m in (value, reward)]
    if layers:
        users = ["policy", "reference"] + [
            n for n, yes in zip(("value model", "reward model"), shared) if yes
        ]
        print(
            f"ppo: share_trunk: layers 0-{layers - 1} run once per batch for the {', '.join(users)}",
            file=sys.stderr,
        )
    return Models(policy, value, reference, reward, bias, layers, *shared, value_head=value_head)


def policy_value_head(policy, device) -> torch.nn.Linear:
    """The value head of `value_on_policy: true`: a fp32 scalar Linear on the policy's last hidden state,
    zero-initialised so that it predicts 0 (the scale of a normalised reward model's scores) and sends no
    gradient into the policy until it has learned something."""
    head = torch.nn.Linear(unwrap(policy).config.hidden_size, 1).to(device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def _shared_trunk(cfg: PPOConfig, policy, reference, vocab: int) -> int:
    """How many of the policy's first layers it shares with the reference: with LoRA only in the last
    `lora.layers` the layers below them, with full fine-tuning the `freeze_layers` frozen ones. A reference
    loaded on its own (`reference_model`, e.g. the SFT model under a later iteration's policy) shares them
    only when its weights there are the policy's to the bit; the policy without its adapters always does.
    0 when none, or when `share_trunk` is off or this model class does not split cleanly."""
    depth = policy.config.num_hidden_layers
    if not cfg.share_trunk:
        return 0
    if cfg.lora.enabled and 0 < cfg.lora.layers < depth:
        layers = depth - cfg.lora.layers
    elif 0 < cfg.freeze_layers < depth and reference is not None:
        layers = cfg.freeze_layers
    else:
        return 0
    if reference is not None and not shares_trunk(reference, policy, layers):
        return 0
    if not trunk_matches_full_forward(policy, layers, vocab):
        print(
            f"ppo: share_trunk: {type(unwrap(policy)).__name__} does not split cleanly; off", file=sys.stderr
        )
        return 0
    return layers


def hold_frozen_weights(models: Models, dtype: torch.dtype) -> Callable[[], None]:
    """Hold every model's frozen Linear weights as `dtype` copies (`models.hold_frozen_linears`); returns a
    function that puts the fp32 weights of the exported models (policy, value) back, for LoRA's merge. The
    reference and reward model are never exported: their fp32 weights are let go."""
    restores = [hold_frozen_linears(m, dtype) for m in (models.policy, models.value) if m is not None]
    for model in (models.reference, models.reward):
        if model is not None:
            hold_frozen_linears(model, dtype, keep_originals=False)

    def restore() -> None:
        for each in restores:
            each()

    return restore


def trained(models: Models) -> dict[str, torch.nn.Module]:
    """The models PPO updates, by checkpoint name."""
    named = {"policy": models.policy, "value": models.value, "value_head": models.value_head}
    return {name: model for name, model in named.items() if model is not None}


def export_models(folder: Path, models: Models, tokenizer, ema: EMA | None) -> None:
    """Write the trained models into `folder`: the policy (its EMA weights when kept) with the tokenizer,
    the value model under `value/`, the policy's value head as `value_head.safetensors`."""
    if ema is not None:
        models.policy.load_state_dict(ema.shadow, strict=False)
    save_model(models.policy, folder, tokenizer)
    if models.value is not None:
        save_model(models.value, folder / "value")
    if models.value_head is not None:
        save_file(trainable_state(models.value_head), str(folder / "value_head.safetensors"))

"""PPO's own state beyond the weights and the optimizer: the adaptive KL controller, the EMA of the policy and
the PPO-ptx pretraining stream, held together by `PPOExtras`, which a checkpoint saves and resume restores
(`harness.TrainState.extras`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chatrlhf.configs import PPOConfig
from chatrlhf.data import chunk_stream, load_texts, tokenize_texts
from chatrlhf.harness import Resumable
from chatrlhf.records import InvalidRecords


class EMA:
    """Exponential moving average of the trainable policy weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = state["shadow"]


class AdaptiveKL:
    """Ziegler et al. (2019): move beta so the KL per answer tracks a target."""

    def __init__(self, cfg: PPOConfig):
        self.value, self.target, self.horizon = cfg.kl_coef, cfg.target_kl, cfg.kl_horizon

    def update(self, kl: float, episodes: int) -> None:
        """Steer by `kl`, the KL per answer measured over a step of `episodes` answers."""
        if self.target > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.value *= 1.0 + error * episodes / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["kl_coef"]


class PtxStream:
    """PPO-ptx's pretraining rows, `ptx_batch_size` per optimizer step, cycling through the text."""

    def __init__(self, rows: list, batch_size: int):
        self.rows, self.batch_size, self.at = rows, batch_size, 0

    @classmethod
    def of(cls, cfg: PPOConfig, tokenizer, invalid: InvalidRecords) -> PtxStream | None:
        if cfg.ptx_coef <= 0:
            return None
        texts = tokenize_texts(load_texts(cfg.ptx_data, invalid), tokenizer)
        return cls(chunk_stream(texts, cfg.ptx_max_length), cfg.ptx_batch_size)

    def next_rows(self) -> list:
        picked = [self.rows[(self.at + i) % len(self.rows)] for i in range(self.batch_size)]
        self.at += self.batch_size
        return picked

    def state_dict(self) -> dict[str, Any]:
        return {"ptx_at": self.at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.at = state["ptx_at"]


@dataclass
class PPOExtras:
    """What PPO adds to a checkpoint, each part under its own key ("kl", "ema", "ptx"; the last two only
    when configured)."""

    kl: AdaptiveKL
    ema: EMA | None = None  # ema_decay > 0
    ptx: PtxStream | None = None  # ptx_coef > 0

    @classmethod
    def of(cls, cfg: PPOConfig, policy: torch.nn.Module, ptx: PtxStream | None) -> PPOExtras:
        kl = AdaptiveKL(cfg)
        return cls(kl, EMA(policy, cfg.ema_decay) if cfg.ema_decay > 0 else None, ptx)

    def _parts(self) -> dict[str, Resumable]:
        parts = {"kl": self.kl, "ema": self.ema, "ptx": self.ptx}
        return {name: part for name, part in parts.items() if part is not None}

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self._parts().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self._parts().items():
            part.load_state_dict(state[name])

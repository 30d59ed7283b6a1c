"""Loss functions as pure tensor math (no models, files or processes); shapes in the docstrings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token.

    logits: (N, V) at the positions that predict a target; targets: (N,) token ids. Returns (N,) in fp32,
    whatever the logits' dtype (log-softmax over a large vocabulary in bf16 loses the small probabilities).
    """
    return F.cross_entropy(logits.float(), targets, reduction="none")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1. values, mask: same shape, e.g. (B, T); padding adds nothing."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)

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


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """All (winner, loser) index pairs of one prompt's K ranked responses; rank 1 is best, ties make no pair."""
    return [
        (i, j) if ranks[i] < ranks[j] else (j, i)
        for i in range(len(ranks))
        for j in range(i + 1, len(ranks))
        if ranks[i] != ranks[j]
    ]


def ranking_loss(rewards: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """InstructGPT eq. 1 for one prompt: mean over its ranked pairs of -log sigmoid(r_winner - r_loser).

    rewards: (K,) one scalar per response; pairs: (P, 2) long, columns (winner, loser). Returns a scalar.
    """
    return -F.logsigmoid(rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).mean()

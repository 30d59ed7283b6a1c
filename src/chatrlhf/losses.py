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


# --------------------------------------------------------------------------------------------------
# PPO (Schulman et al. 2017; as used for RLHF by Ziegler et al. 2019 and InstructGPT)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the entries where mask is 1.

    values, mask: (B, T). Padding neither enters the statistics nor changes; returns (B, T).
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens' log-probs (Schulman's k1/k3).

    logprobs, ref_logprobs: (B, T). k1 = log p - log q (unbiased, can be negative);
    k3 = (q/p - 1) - log(q/p) (unbiased, always >= 0). Returns (B, T).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, response_mask: torch.Tensor
) -> torch.Tensor:
    """InstructGPT's per-token reward: -kl_coef * KL at every response token, plus the reward model's
    score at the last one. scores: (B,); kl, response_mask: (B, T) with T >= 1. Returns (B, T)."""
    rewards = -kl_coef * kl * response_mask
    last = (response_mask.sum(1).long() - 1).clamp(min=0)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses, vectorised.

    rewards, values, mask: (B, T); the state after a response's last valid token is terminal (value 0).
    A_t = sum_l (gamma*lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, computed as one product with
    a (T, T) discount matrix. Returns (advantages, returns), each (B, T), zero on padding.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * torch.cat(
        [mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1
    )
    deltas = (rewards + gamma * next_values - values) * mask
    t = torch.arange(values.shape[1], device=values.device)
    offset = (t[None, :] - t[:, None]).to(values.dtype)  # offset[s, u] = u - s
    discount = torch.where(offset >= 0, (gamma * lam) ** offset.clamp(min=0), torch.zeros_like(offset))
    advantages = deltas @ discount.T * mask
    return advantages, (advantages + values) * mask


def leave_one_out_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): each answer's return (its score
    minus the KL penalty summed over its tokens) minus the mean return of the other answers to the same
    prompt, at every one of its tokens. No value model: the other answers are the baseline.

    rewards, mask: (B, T) per-token rewards, B = prompts x group_size with a prompt's answers consecutive;
    group_size >= 2. Returns (advantages, returns), each (B, T), zero on padding; returns hold the answer's
    total return at each of its tokens.
    """
    assert group_size >= 2 and rewards.shape[0] % group_size == 0, (rewards.shape, group_size)
    mask = mask.to(rewards.dtype)
    total = (rewards * mask).sum(1)
    grouped = total.view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - baseline).reshape(-1)[:, None] * mask
    return advantages, total[:, None] * mask


def group_normalized_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's advantages (Shao et al. 2024, outcome supervision): each answer's return (its score minus the
    KL penalty summed over its tokens) minus the mean return of its prompt's group, divided by the group's
    standard deviation, at every one of its tokens. A group whose returns are all equal gets 0.

    rewards, mask: (B, T), B = prompts x group_size with a prompt's answers consecutive; group_size >= 2.
    Returns (advantages, returns), each (B, T), zero on padding.
    """
    assert group_size >= 2 and rewards.shape[0] % group_size == 0, (rewards.shape, group_size)
    mask = mask.to(rewards.dtype)
    total = (rewards * mask).sum(1)
    grouped = total.view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    spread = grouped.std(1, keepdim=True)
    advantages = torch.where(spread > eps, centred / (spread + eps), torch.zeros_like(centred))
    return advantages.reshape(-1)[:, None] * mask, total[:, None] * mask


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective, as a loss. All inputs (B, T); returns (loss, {clipfrac, approx_kl})."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2). Inputs (B, T); returns (loss, clipfrac)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    return loss, masked_mean((clipped_err > unclipped_err).float(), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position. logits (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over valid entries; (B, T) inputs, scalar output."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return 1 - var_residual / var_returns.clamp(min=1e-8)


# --------------------------------------------------------------------------------------------------
# preference optimisation from rankings (DPO and its listwise forms); a score here is an answer's implicit
# reward beta * (log pi(y|x) - log pi_ref(y|x))


def dpo_pair_losses(margins: torch.Tensor, beta: float, kind: str) -> torch.Tensor:
    """The loss of each pair from its margin h = log-ratio(winner) - log-ratio(loser), where a log-ratio is
    log pi(y|x) - log pi_ref(y|x) summed over the answer's tokens. sigmoid (DPO, Rafailov et al. 2023):
    -log sigmoid(beta h); ipo (Azar et al. 2023): (h - 1/(2 beta))^2. margins: (P,). Returns (P,)."""
    if kind == "sigmoid":
        return -F.logsigmoid(beta * margins)
    if kind == "ipo":
        return (margins - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {kind!r}")


def plackett_luce_loss(scores: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Negative log-likelihood of a ranking under Plackett-Luce (as in PRO, Song et al. 2023): going down
    the ranking, each answer is chosen from itself and every answer ranked strictly below it. Answers that
    tie are not compared with each other. The mean over the answers that have one below them, so a ranking
    of K = 2 gives -log sigmoid(s_winner - s_loser), pairwise DPO.

    scores: (K,); ranks: K ints, 1 is best, not all equal. Returns a scalar.
    """
    r = torch.tensor(ranks, device=scores.device)
    below = r[None, :] > r[:, None]  # below[i, j]: j is ranked under i
    choice = below | torch.eye(len(ranks), dtype=torch.bool, device=scores.device)
    logits = scores[None, :].expand(len(ranks), -1).masked_fill(~choice, float("-inf"))
    nll = torch.logsumexp(logits, dim=1) - scores
    return nll[below.any(1)].mean()


def lambda_weights(scores: torch.Tensor, ranks: list[int], pairs: torch.Tensor) -> torch.Tensor:
    """LiPO-lambda's weight of each pair (Liu et al. 2024): |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|, the
    gain G = 2^psi - 1 of a label score psi that runs from 1 (best rank) to 0 (worst) evenly by rank, and
    the discount D(tau) = log2(1 + tau) of the place tau (1 is first) in the order of the current scores.
    Pairs the model already orders well, far apart in the ranking, weigh less than close calls it gets
    wrong. Scaled to mean 1 over the prompt's pairs (a prompt weighs as in pairwise DPO; with K = 2 the
    weight is 1); no gradient.

    scores: (K,); ranks: K ints, 1 is best; pairs: (P, 2) long (winner, loser). Returns (P,).
    """
    r = torch.tensor(ranks, dtype=torch.float32, device=scores.device)
    psi = (r.max() - r) / (r.max() - r.min())
    gain = 2.0**psi - 1
    order = torch.argsort(scores.detach().float(), descending=True, stable=True)
    place = torch.empty_like(order)
    place[order] = torch.arange(1, len(ranks) + 1, device=scores.device)
    inverse_discount = 1 / torch.log2(1 + place.float())
    w, lo = pairs[:, 0], pairs[:, 1]
    weights = (gain[w] - gain[lo]).abs() * (inverse_discount[w] - inverse_discount[lo]).abs()
    return weights / weights.mean().clamp(min=1e-12)

"""PPO's experience collection: roll out the policy, score the answers, and turn them into an `Experience`.

    rollout (the shared generation engine) -> score_rollouts (reward model, reference log-probs, values:
    a `ScoredRollouts`) -> make_experience (KL-shaped per-token rewards, GAE, whitening: pure math from
    `losses.py`)

The update that consumes an `Experience` lives in `ppo.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from chatrlhf.configs import PPOConfig
from chatrlhf.forward import (
    Trunk,
    gather_logprobs,
    head_values,
    response_hidden,
    response_logits,
    sequence_scores,
    token_values,
    trunk_hidden,
    unembed,
)
from chatrlhf.generation import Generation, generate
from chatrlhf.losses import (
    gae,
    group_normalized_advantages,
    kl_penalty,
    leave_one_out_advantages,
    masked_whiten,
    token_rewards,
)
from chatrlhf.ppo_models import Models

RewardFn = Callable[[list[list[dict]], list[str], list[list[int]]], list[float]]  # (prompts, answers, ids)


@dataclass
class ScoredRollouts:
    """What the frozen models say about a batch of rollouts: the hand-off from scoring to `make_experience`."""

    sequences: torch.Tensor  # (B, P+R) left-padded prompt, then the right-padded response
    attention_mask: torch.Tensor  # (B, P+R)
    ref_logprobs: torch.Tensor  # (B, R) of the sampled tokens under the reference model, 0 on padding
    values: torch.Tensor  # (B, R) value before each answer token; zeros without a value model
    scores: torch.Tensor  # (B,) reward-model (or reward-function) score, before any penalty
    trunk: Trunk | None = None  # the policy's (and reference's) first layers' output, when they share them
    logprobs: torch.Tensor | None = None  # (B, R) the policy's, from a forward (`logprobs_from`); else None


@dataclass
class Experience:
    """One batch of rollouts, ready for the update."""

    sequences: torch.Tensor  # (B, P+R) left-padded prompt, then the right-padded response
    attention_mask: torch.Tensor  # (B, P+R)
    prompt_width: int  # P
    response_mask: torch.Tensor  # (B, R) 1 on answer tokens, EOS included
    logprobs: torch.Tensor  # (B, R) of the sampled tokens, when sampled
    values: torch.Tensor  # (B, R) value before each answer token
    scores: torch.Tensor  # (B,) reward-model score after penalties
    kl: torch.Tensor  # (B, R) per-token KL estimate
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)
    trunk: Trunk | None = None  # reused by every update pass: only the layers above it run


def rollout(models: Models, prompts: list[list[int]], cfg: PPOConfig, tokenizer, generator) -> Generation:
    sampling = cfg.sampling
    models.policy.eval()
    # decoding runs the shared trunk anyway: its output comes back with the rollouts (`Generation.trunk`)
    return generate(
        models.policy,
        prompts,
        sampling,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        generator,
        keep_trunk=models.trunk_layers,
    )


@torch.no_grad()
def score_rollouts(
    models: Models, gen: Generation, cfg: PPOConfig, conversations, tokenizer, reward_fn, recompute=False
) -> ScoredRollouts:
    """Reward-model scores, reference log-probs and values of a batch of rollouts; with `recompute` also the
    policy's log-probs from a forward like the reference's (instead of decoding's)."""
    sequences, mask, width = gen.sequences, gen.attention_mask, gen.prompt_width
    trunk = None
    if gen.trunk is not None:
        trunk = Trunk(gen.trunk, models.trunk_layers)
    elif models.trunk_layers:
        trunk = trunk_hidden(models.policy, sequences, mask, models.trunk_layers)
    if models.reference is None:
        with models.policy.disable_adapter():
            ref_logits = response_logits(
                models.policy, sequences, mask, width, cfg.sampling.temperature, trunk
            )
    else:
        # a separate reference shares the trunk only when it is the policy's frozen bottom (`freeze_layers`)
        ref_logits = response_logits(
            models.reference, sequences, mask, width, cfg.sampling.temperature, trunk
        )
    ref_logprobs = gather_logprobs(ref_logits, gen.response_ids) * gen.response_mask
    del ref_logits
    logprobs = hidden = None
    if recompute or models.value_head is not None:
        hidden = response_hidden(models.policy, sequences, mask, width, trunk)
    if recompute:
        logits = unembed(models.policy, hidden, cfg.sampling.temperature)
        logprobs = gather_logprobs(logits, gen.response_ids) * gen.response_mask
        del logits
    if models.value_head is not None:  # value_on_policy
        values = head_values(models.value_head, hidden) * gen.response_mask
    elif models.value is None:  # rloo, grpo: the other answers to the prompt are the baseline
        values = torch.zeros_like(ref_logprobs)
    else:
        value_trunk = trunk if models.value_shares_trunk else None
        values = token_values(models.value, sequences, mask, width, value_trunk) * gen.response_mask
    if reward_fn is not None:
        ids = gen.token_lists(tokenizer.eos_token_id)
        scores = torch.tensor(
            reward_fn(conversations, gen.texts(tokenizer), ids), dtype=torch.float32, device=sequences.device
        )
    else:
        last = width + gen.response_mask.sum(1) - 1
        reward_trunk = trunk if models.reward_shares_trunk else None
        scores = (
            sequence_scores(models.reward, sequences, mask, last, reward_trunk, width) + models.reward_bias
        )
    return ScoredRollouts(sequences, mask, ref_logprobs, values, scores, trunk, logprobs)


def make_experience(gen: Generation, scored: ScoredRollouts, cfg: PPOConfig, kl_coef: float) -> Experience:
    """KL-shaped per-token rewards, GAE (or leave-one-out) advantages and returns: pure tensor math."""
    mask = gen.response_mask.float()
    scores = scored.scores
    if cfg.missing_eos_penalty:
        scores = scores - cfg.missing_eos_penalty * (~gen.finished).float()
    if cfg.reward_clip > 0:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    logprobs = gen.logprobs if scored.logprobs is None else scored.logprobs
    kl = kl_penalty(logprobs, scored.ref_logprobs, cfg.kl_estimator) * mask
    rewards = token_rewards(scores, kl, kl_coef, mask)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if cfg.advantage_estimator == "rloo":
        advantages, returns = leave_one_out_advantages(rewards, mask, cfg.samples_per_prompt)
    elif cfg.advantage_estimator == "grpo":
        advantages, returns = group_normalized_advantages(rewards, mask, cfg.samples_per_prompt)
    else:
        advantages, returns = gae(rewards, scored.values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return Experience(
        sequences=scored.sequences,
        attention_mask=scored.attention_mask,
        prompt_width=gen.prompt_width,
        response_mask=gen.response_mask,
        logprobs=logprobs,
        values=scored.values,
        scores=scores,
        kl=kl,
        advantages=advantages,
        returns=returns,
        trunk=scored.trunk,
    )

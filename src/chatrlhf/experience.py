"""PPO's experience collection: roll out the policy, score the answers, and turn them into an `Experience`.

    rollout (the shared generation engine) -> score (reward model, reference log-probs, values)
    -> make_experience (KL-shaped per-token rewards, GAE, whitening: pure math from `losses.py`)

The update that consumes an `Experience` lives in `ppo.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from chatrlhf.generation import Generation, SamplingConfig, generate, positions, response_token_lists
from chatrlhf.losses import gae, kl_penalty, leave_one_out_advantages, masked_whiten, token_rewards
from chatrlhf.models import unwrap
from chatrlhf.reward import backbone_hidden, scalar_head

if TYPE_CHECKING:
    from chatrlhf.ppo import PPOConfig

RewardFn = Callable[[list[list[dict]], list[str], list[list[int]]], list[float]]  # (prompts, answers, ids)


@dataclass
class Experience:
    """One batch of rollouts, ready for the update."""

    sequences: torch.Tensor  # (B, P+R) left-padded prompt, then the right-padded response
    attention_mask: torch.Tensor  # (B, P+R)
    prompt_width: int  # P
    response_mask: torch.Tensor  # (B, R) 1 on answer tokens, EOS included
    logprobs: torch.Tensor  # (B, R) of the sampled tokens, when sampled
    ref_logprobs: torch.Tensor  # (B, R) under the reference model
    values: torch.Tensor  # (B, R) value before each answer token
    scores: torch.Tensor  # (B,) reward-model score after penalties
    kl: torch.Tensor  # (B, R) per-token KL estimate
    rewards: torch.Tensor  # (B, R) KL-shaped per-token rewards
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)


# --------------------------------------------------------------------------------------------------
# model forwards


def response_logits(model, sequences, attention_mask, prompt_width: int, temperature: float) -> torch.Tensor:
    """Temperature-scaled logits at the positions that predict each answer token. Returns (B, R, V) fp32."""
    base = unwrap(model)
    hidden = base.get_decoder()(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return base.get_output_embeddings()(hidden[:, prompt_width - 1 : -1]).float() / temperature


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) for logits (B, R, V) and tokens (B, R). Returns (B, R)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]


def token_values(value_model, sequences, attention_mask, prompt_width: int) -> torch.Tensor:
    """The value head at each state before an answer token. Returns (B, R) fp32."""
    hidden = backbone_hidden(value_model, sequences, attention_mask)
    return scalar_head(value_model, hidden[:, prompt_width - 1 : -1])


def sequence_scores(reward_model, sequences, attention_mask, last_index: torch.Tensor) -> torch.Tensor:
    """The reward head at each sequence's last answer token (its EOS when it stopped). Returns (B,)."""
    hidden = backbone_hidden(reward_model, sequences, attention_mask)
    return scalar_head(reward_model, hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index])


# --------------------------------------------------------------------------------------------------
# the phases


@dataclass
class Models:
    policy: torch.nn.Module
    value: torch.nn.Module | None  # None: rloo advantages need no value model
    reference: torch.nn.Module | None  # None: the policy with LoRA adapters disabled
    reward: torch.nn.Module | None  # None: a reward function is used
    reward_bias: float = 0.0


def rollout(models: Models, prompts: list[list[int]], cfg: PPOConfig, tokenizer, generator) -> Generation:
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_new_tokens)
    models.policy.eval()
    return generate(
        models.policy, prompts, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id, generator
    )


@torch.no_grad()
def score(models: Models, gen: Generation, cfg: PPOConfig, conversations, tokenizer, reward_fn) -> dict:
    """Reward-model scores, reference log-probs and values of a batch of rollouts."""
    sequences = torch.cat([gen.prompt_ids, gen.response_ids], dim=1)
    mask = torch.cat([gen.prompt_mask, gen.response_mask], dim=1)
    width = gen.prompt_ids.shape[1]
    if models.reference is None:
        with models.policy.disable_adapter():
            ref_logits = response_logits(models.policy, sequences, mask, width, cfg.temperature)
    else:
        ref_logits = response_logits(models.reference, sequences, mask, width, cfg.temperature)
    ref_logprobs = gather_logprobs(ref_logits, gen.response_ids) * gen.response_mask
    del ref_logits
    if models.value is None:  # rloo: the other answers to the prompt are the baseline
        values = torch.zeros_like(ref_logprobs)
    else:
        values = token_values(models.value, sequences, mask, width) * gen.response_mask
    if reward_fn is not None:
        ids = response_token_lists(gen, tokenizer.eos_token_id)
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
        scores = torch.tensor(
            reward_fn(conversations, texts, ids), dtype=torch.float32, device=sequences.device
        )
    else:
        last = width + gen.response_mask.sum(1) - 1
        scores = sequence_scores(models.reward, sequences, mask, last) + models.reward_bias
    return {
        "sequences": sequences,
        "mask": mask,
        "ref_logprobs": ref_logprobs,
        "values": values,
        "raw_scores": scores,
    }


def make_experience(gen: Generation, scored: dict, cfg: PPOConfig, kl_coef: float) -> Experience:
    """KL-shaped per-token rewards, GAE advantages and returns: pure tensor math on the rollout."""
    mask = gen.response_mask.float()
    scores = scored["raw_scores"]
    if cfg.missing_eos_penalty:
        scores = scores - cfg.missing_eos_penalty * (~gen.finished).float()
    if cfg.reward_clip > 0:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    kl = kl_penalty(gen.logprobs, scored["ref_logprobs"], cfg.kl_estimator) * mask
    rewards = token_rewards(scores, kl, kl_coef, mask)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if cfg.advantage_estimator == "rloo":
        advantages, returns = leave_one_out_advantages(rewards, mask, cfg.samples_per_prompt)
    else:
        advantages, returns = gae(rewards, scored["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return Experience(
        sequences=scored["sequences"],
        attention_mask=scored["mask"],
        prompt_width=gen.prompt_ids.shape[1],
        response_mask=gen.response_mask,
        logprobs=gen.logprobs,
        ref_logprobs=scored["ref_logprobs"],
        values=scored["values"],
        scores=scores,
        kl=kl,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
    )

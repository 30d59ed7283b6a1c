"""Stage 3, PPO: the policy answers prompts, the reward model scores the answers, PPO raises the score while a
per-token KL penalty keeps the policy near the SFT model (InstructGPT section 3.5).

    chatrlhf ppo --config ppo.yaml --max_steps 20

Four models: the policy (from the SFT checkpoint), a frozen reference (the SFT model; with LoRA, the policy
with its adapters disabled), a value model initialised from the reward model (or, with `value_model: policy`,
a scalar head on the policy itself), and the reward model. Each step runs named phases, each timed
(`ppo_step`):

    prompts -> rollout -> score_rollouts -> make_experience (all three in `experience.py`)
    -> ppo_update (clipped policy and value losses, optional PPO-ptx; here) -> log

The run around the steps (resume, checkpoints, metrics, export) is `harness.py`'s.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from safetensors.torch import save_file
from transformers import set_seed

from chatrlhf.chat import prompt_ids
from chatrlhf.configs import PPOConfig
from chatrlhf.data import chunk_stream, load_prompts, load_texts, tokenize_texts
from chatrlhf.errors import UserError
from chatrlhf.experience import Experience, Models, RewardFn, make_experience, rollout, score_rollouts
from chatrlhf.forward import (
    collate,
    gather_logprobs,
    logits_and_values,
    prompt_groups,
    response_logits,
    shares_trunk,
    target_logits,
    token_values,
    trunk_matches_full_forward,
)
from chatrlhf.generation import Generation
from chatrlhf.harness import Harness, TrainState, autocast, check_config, make_optimizer, trainable_state
from chatrlhf.losses import (
    entropy_from_logits,
    explained_variance,
    masked_mean,
    ppo_policy_loss,
    token_nll,
    value_loss,
)
from chatrlhf.models import (
    apply_lora,
    freeze_bottom,
    hold_frozen_linears,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    pick_device,
    resolve_model,
    save_model,
    unwrap,
)
from chatrlhf.records import Conversation, DataError, InvalidRecords
from chatrlhf.runs import RunDir, data_lineage, keep_rows_upto

PLOTS = ["ppo/reward", "ppo/gold_reward", "ppo/kl", "ppo/response_length", "ppo/entropy"]


def minibatch_loss(
    models: Models, exp: Experience, idx: torch.Tensor, cfg: PPOConfig, ptx_rows=None, pad_id=0
):
    """PPO loss on the rollouts `idx` (+ ptx_coef * LM loss on `ptx_rows`). Returns (loss, stats)."""
    seq, att, mask = exp.sequences[idx], exp.attention_mask[idx], exp.response_mask[idx].float()
    trunk = exp.trunk.rows(idx) if exp.trunk is not None else None
    if models.value_head is not None:  # one forward for the policy and its value head
        logits, values = logits_and_values(
            models.policy, models.value_head, seq, att, exp.prompt_width, cfg.temperature, trunk
        )
    else:
        logits = response_logits(models.policy, seq, att, exp.prompt_width, cfg.temperature, trunk)
    response = seq[:, exp.prompt_width :]
    logprobs = gather_logprobs(logits, response)
    pg_loss, pg_stats = ppo_policy_loss(
        logprobs, exp.logprobs[idx], exp.advantages[idx], mask, cfg.clip_range
    )
    loss = pg_loss
    stats = {
        "ppo/policy_loss": pg_loss.item(),
        "ppo/clipfrac": pg_stats["clipfrac"].item(),
        "ppo/approx_kl": pg_stats["approx_kl"].item(),
        "ppo/entropy": masked_mean(entropy_from_logits(logits.detach()), mask).item(),
    }
    if models.value is not None:
        value_trunk = trunk if models.value_shares_trunk else None
        values = token_values(models.value, seq, att, exp.prompt_width, value_trunk)
    if models.has_critic:
        v_loss, v_clipfrac = value_loss(values, exp.values[idx], exp.returns[idx], mask, cfg.value_clip)
        loss = loss + cfg.vf_coef * v_loss
        stats.update({"ppo/value_loss": v_loss.item(), "ppo/value_clipfrac": v_clipfrac.item()})
    if ptx_rows:
        # InstructGPT's PPO-ptx: the pretraining gradient is accumulated with the PPO gradient
        ptx_logits, ptx_targets = target_logits(models.policy, collate(ptx_rows, pad_id, seq.device))
        ptx_loss = token_nll(ptx_logits, ptx_targets).mean()
        loss = loss + cfg.ptx_coef * ptx_loss
        stats["ppo/ptx_loss"] = ptx_loss.item()
    return loss, stats


class _PPOLoss(torch.nn.Module):
    """`minibatch_loss` as a module forward over the policy and value models, so a data-parallel wrapper
    sees every forward pass and averages the gradients."""

    def __init__(self, models: Models, cfg: PPOConfig, pad_id: int):
        super().__init__()
        self.policy, self.value, self.value_head = models.policy, models.value, models.value_head
        self.models, self.cfg, self.pad_id = models, cfg, pad_id

    def forward(self, exp: Experience, idx: torch.Tensor, ptx_rows=None):
        return minibatch_loss(self.models, exp, idx, self.cfg, ptx_rows, self.pad_id)


def ppo_update(accelerator, wrapped, exp: Experience, cfg: PPOConfig, optimizer, generator, ptx, ema) -> dict:
    """`ppo_epochs` passes over the rollouts in `minibatches` optimizer steps; returns the mean stats. A
    non-finite loss stops the update at once, its `ppo/loss` NaN for the harness to report."""
    wrapped.train()
    batch = exp.sequences.shape[0]
    size = max(1, math.ceil(batch / cfg.minibatches))
    # minibatches take a prompt's answers together (a shuffle of prompts, not of rows), so that the prompt
    # runs once for all of them (`forward._shared_prompt_decode`); with one answer per prompt this is the
    # usual shuffle of rows
    groups = prompt_groups(exp.sequences, exp.attention_mask, exp.prompt_width)
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(cfg.ppo_epochs):
        shuffled = torch.randperm(len(groups), generator=generator).tolist()
        order = torch.tensor([row for g in shuffled for row in groups[g]], device=exp.sequences.device)
        for start in range(0, batch, size):
            ptx_rows = ptx.next_rows() if ptx is not None else None
            loss, stats = wrapped(exp, order[start : start + size], ptx_rows)
            if not math.isfinite(loss.item()):
                return {"ppo/loss": float("nan")}
            accelerator.backward(loss)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            norm = accelerator.clip_grad_norm_(wrapped.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            stats["ppo/grad_norm"] = float(norm)
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            updates += 1
    return {key: value / updates for key, value in sums.items()}


def step_prompts(cfg: PPOConfig, n_prompts: int, step: int, world: int = 1) -> list[int]:
    """The prompts of PPO step `step`, all processes together: `batch_size` per process, taken in order from
    a stream of seeded per-epoch permutations, so every step is full."""
    per_step = cfg.batch_size * world
    picked = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(position, n_prompts)
        picked.append(_epoch_order(cfg.seed, epoch, n_prompts, cfg.data.shuffle)[i])
    return picked


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


class EMA:
    """Exponential moving average of the trainable policy weights."""

    def __init__(self, model, decay: float):
        self.model, self.decay = model, decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = state["shadow"]


class AdaptiveKL:
    """Ziegler et al. (2019): move beta so the KL per answer tracks a target."""

    def __init__(self, cfg: PPOConfig):
        self.value, self.target, self.horizon = cfg.kl_coef, cfg.target_kl, cfg.kl_horizon

    def update(self, kl: float, episodes: int) -> None:
        if self.target > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.value *= 1.0 + error * episodes / self.horizon

    def state_dict(self) -> dict:
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict) -> None:
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

    def state_dict(self) -> dict:
        return {"ptx_at": self.at}

    def load_state_dict(self, state: dict) -> None:
        self.at = state["ptx_at"]


# --------------------------------------------------------------------------------------------------
# the stage


def _check(cfg: PPOConfig, reward_fn) -> None:
    check_config(cfg)
    if reward_fn is None and not cfg.reward_model:
        raise UserError("reward_model: name the reward model checkpoint (output_dir of `chatrlhf reward`)")
    if cfg.temperature <= 0:
        raise UserError("temperature: PPO samples its rollouts, so it must be positive")
    if cfg.kl_estimator not in ("k1", "k3"):
        raise UserError(f"kl_estimator: {cfg.kl_estimator!r} is not k1 or k3")
    if cfg.logprobs_from not in ("rollout", "forward"):
        raise UserError(f"logprobs_from: {cfg.logprobs_from!r} is not rollout or forward")
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        raise UserError("ptx_data: PPO-ptx (ptx_coef > 0) needs a text file to mix in")
    if cfg.minibatches < 1 or cfg.ppo_epochs < 1 or cfg.max_new_tokens < 1 or cfg.samples_per_prompt < 1:
        raise UserError("minibatches, ppo_epochs, max_new_tokens and samples_per_prompt must be at least 1")
    if cfg.advantage_estimator not in ("gae", "rloo"):
        raise UserError(f"advantage_estimator: {cfg.advantage_estimator!r} is not gae or rloo")
    if cfg.value_model == POLICY_VALUE and cfg.advantage_estimator != "gae":
        raise UserError(
            f"value_model: policy puts a value head on the policy for GAE; advantage_estimator "
            f"{cfg.advantage_estimator} uses no value model"
        )
    if cfg.advantage_estimator == "rloo" and cfg.samples_per_prompt < 2:
        raise UserError(
            "advantage_estimator: rloo compares the answers to one prompt, so samples_per_prompt must be "
            f"at least 2 (it is {cfg.samples_per_prompt})"
        )


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
    if cfg.advantage_estimator == "gae" and cfg.value_model == POLICY_VALUE:
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


POLICY_VALUE = "policy"  # value_model: a scalar head on the policy instead of a separate value model


def policy_value_head(policy, device) -> torch.nn.Linear:
    """The value head of `value_model: policy`: a fp32 scalar Linear on the policy's last hidden state,
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


def trained(models: Models) -> dict[str, torch.nn.Module]:
    """The models PPO updates, by checkpoint name."""
    named = {"policy": models.policy, "value": models.value, "value_head": models.value_head}
    return {name: model for name, model in named.items() if model is not None}


def train_state(cfg: PPOConfig, models: Models, steps: int, ptx: PtxStream | None) -> TrainState:
    """Optimizer and schedule over the trained models' parameters, the KL controller, EMA and PTX cursor."""
    params = [p for m in trained(models).values() for p in m.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(cfg, params, steps)
    extras = {"kl": AdaptiveKL(cfg)}
    if cfg.ema_decay > 0:
        extras["ema"] = EMA(models.policy, cfg.ema_decay)
    if ptx is not None:
        extras["ptx"] = ptx
    return TrainState(trained(models), optimizer, scheduler, extras)


def _prompt_ids(cfg: PPOConfig, tokenizer, invalid: InvalidRecords) -> tuple[list, list[list[int]]]:
    conversations = load_prompts(cfg.data.train, invalid)
    ids = []
    for conv in conversations:
        tokens = prompt_ids(tokenizer, conv.messages, cfg.data.system_prompt)
        if len(tokens) > cfg.max_prompt_length:
            raise DataError(
                f"{conv.where}: field `prompt`: {len(tokens)} tokens, more than max_prompt_length={cfg.max_prompt_length}"
            )
        ids.append(tokens)
    return conversations, ids


@contextmanager
def _timed(metrics: dict, name: str):
    began = time.perf_counter()
    yield
    metrics[f"timing/{name}"] = time.perf_counter() - began


@dataclass
class PPORun:
    """What every PPO step reads: the models, the prompts, the judges, and the harness's state."""

    cfg: PPOConfig
    harness: Harness
    state: TrainState
    models: Models
    wrapped: torch.nn.Module  # the loss over policy and value, as accelerate wrapped it
    tokenizer: object
    conversations: list[Conversation]
    prompts: list[list[int]]
    reward_fn: RewardFn | None
    gold_fn: object | None


def train(cfg: PPOConfig, reward_fn: RewardFn | None = None, on_step=None, gold_fn=None) -> dict[str, float]:
    """Run PPO. `reward_fn(prompts, answers, answer_ids) -> scores` may stand in for the reward model.
    `gold_fn(prompts, answers, records) -> scores` (records: each prompt's other fields), a judge the policy
    never sees, is logged as `ppo/gold_reward` beside the proxy reward, to show over-optimisation of the
    reward model when it happens.

    Under `accelerate launch` (or torchrun) each process rolls out `batch_size` prompts of its own per step;
    gradients are averaged over processes, metrics too, and only the main process writes.
    """
    _check(cfg, reward_fn)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    invalid = InvalidRecords(cfg.data.on_invalid)
    conversations, prompts = _prompt_ids(cfg, tokenizer, invalid)
    ptx = PtxStream.of(cfg, tokenizer, invalid)
    device = pick_device()
    harness = Harness(cfg, "ppo", device, on_step)
    models = load_models(cfg, tokenizer, model_path, reward_fn, device)
    exported, scoring_only = [models.policy, models.value], [models.reference, models.reward]
    restores = [hold_frozen_linears(m, harness.dtype) for m in exported if m is not None]
    for model in scoring_only:
        if model is not None:
            hold_frozen_linears(model, harness.dtype, keep_originals=False)
    per_step = cfg.batch_size * harness.world
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * len(prompts) / per_step))
    state = train_state(cfg, models, steps, ptx)
    wrapped, start = harness.begin(state, _PPOLoss(models, cfg, tokenizer.pad_token_id))
    if harness.main:
        keep_rows_upto(
            harness.run.path / "samples.jsonl", start
        )  # a resumed run writes the later samples again
    run = PPORun(cfg, harness, state, models, wrapped, tokenizer, conversations, prompts, reward_fn, gold_fn)
    for step in harness.steps(steps):
        metrics, convs, gen, exp = ppo_step(run, step)
        done = step + 1
        if harness.main and cfg.sample_every and (done % cfg.sample_every == 0 or done == steps):
            _write_samples(harness.run, done, convs, gen, exp, tokenizer, harness.progress.console)
        harness.end_step(done, metrics, f"reward {metrics['ppo/reward']:.3f}  kl {metrics['ppo/kl']:.3f}")
    lineage = {
        "parent": model_path,
        "reference": cfg.reference_model or model_path,
        "reward_model": cfg.reward_model or "reward function",
        "data": data_lineage(cfg.data.train, cfg.ptx_data),
        "invalid_records": invalid.summary(),
    }
    for restore in restores:  # the fp32 weights back, for LoRA's merge
        restore()
    export = functools.partial(_export, models=models, tokenizer=tokenizer, ema=state.extras.get("ema"))
    return harness.finish(export, lineage, PLOTS, processes=harness.world)


def ppo_step(run: PPORun, step: int) -> tuple[dict[str, float], list[list[dict]], Generation, Experience]:
    """One PPO iteration: prompts -> rollout -> score -> make_experience -> update. Returns the step's metrics
    (averaged over processes) and its rollouts."""
    cfg, harness, models, tokenizer = run.cfg, run.harness, run.models, run.tokenizer
    metrics: dict[str, float] = {}
    began = time.perf_counter()
    # every step's randomness comes from (seed, step, process), so a resumed run repeats it exactly
    generator = torch.Generator(device=harness.device).manual_seed(
        (cfg.seed * 100003 + step) * 1009 + harness.rank
    )
    # a prompt's samples_per_prompt answers lie next to each other in the batch
    mine = step_prompts(cfg, len(run.prompts), step, harness.world)[harness.rank :: harness.world]
    picked = [i for i in mine for _ in range(cfg.samples_per_prompt)]
    convs = [run.conversations[i].messages for i in picked]
    kl_ctl, compute = run.state.extras["kl"], autocast(harness.device, harness.dtype)
    with _timed(metrics, "rollout"), compute:
        gen = rollout(models, [run.prompts[i] for i in picked], cfg, tokenizer, generator)
    with _timed(metrics, "score"), compute:
        # logprobs_from: forward. Under bf16, decoding's incremental forward rounds differently from a full
        # one: on SmolLM2-135M a sampled token's log-prob differs by 0.06 (std; up to 0.26, past the ratio's
        # clip), where fp32 agrees to 1e-5 (README, PPO section)
        recompute = cfg.logprobs_from == "forward"
        scored = score_rollouts(models, gen, cfg, convs, tokenizer, run.reward_fn, recompute)
    exp = make_experience(gen, scored, cfg, kl_ctl.value)
    if run.gold_fn is not None:
        gold = run.gold_fn(convs, gen.texts(tokenizer), [run.conversations[i].extra for i in picked])
        metrics["ppo/gold_reward"] = sum(gold) / len(gold)
    with _timed(metrics, "update"), compute:
        optimizer, ptx, ema = run.state.optimizer, run.state.extras.get("ptx"), run.state.extras.get("ema")
        metrics.update(ppo_update(harness.accelerator, run.wrapped, exp, cfg, optimizer, generator, ptx, ema))
    run.state.scheduler.step()
    metrics.update(_rollout_metrics(exp, gen, kl_ctl.value, models.has_critic))
    metrics["timing/step"] = time.perf_counter() - began
    if harness.world > 1:
        metrics = _mean_over_processes(harness.accelerator, metrics, harness.device)
        _check_in_sync(harness.accelerator, models.policy, step + 1)
    kl_ctl.update(metrics["ppo/kl"], cfg.batch_size * harness.world * cfg.samples_per_prompt)
    return metrics, convs, gen, exp


def _mean_over_processes(accelerator, metrics: dict[str, float], device) -> dict[str, float]:
    keys = sorted(metrics)
    values = accelerator.reduce(
        torch.tensor([metrics[k] for k in keys], device=device, dtype=torch.float64), "mean"
    )
    return dict(zip(keys, values.tolist()))


def _check_in_sync(accelerator, policy, step: int) -> None:
    """The processes' policies must stay identical; a cheap checksum per step proves it."""
    total = sum(p.detach().double().sum() for p in policy.parameters() if p.requires_grad)
    sums = accelerator.gather(total.reshape(1))
    if float(sums.max() - sums.min()) > 1e-6 * max(1.0, float(sums.abs().max())):
        raise RuntimeError(
            f"ppo: the processes' policies diverged at step {step} (checksums {sums.tolist()})"
        )


def _rollout_metrics(exp: Experience, gen: Generation, kl_coef: float, has_value: bool) -> dict[str, float]:
    mask = exp.response_mask.float()
    return {
        "ppo/reward": exp.scores.mean().item(),
        "ppo/kl": (exp.kl * mask).sum(1).mean().item(),
        "ppo/non_score_reward": (-kl_coef * exp.kl * mask).sum(1).mean().item(),
        "ppo/kl_coef": kl_coef,
        "ppo/response_length": mask.sum(1).mean().item(),
        "ppo/eos_rate": gen.finished.float().mean().item(),
        "ppo/advantage_mean": masked_mean(exp.advantages, mask).item(),
    } | (
        {"ppo/explained_variance": explained_variance(exp.values, exp.returns, mask).item()}
        if has_value
        else {}
    )


def _write_samples(
    run: RunDir, step: int, convs, gen: Generation, exp: Experience, tokenizer, console
) -> None:
    """Append the step's answers to samples.jsonl and show a few of them."""
    texts = gen.texts(tokenizer)
    rows = [(conv[-1]["content"], text, s) for conv, text, s in zip(convs, texts, exp.scores.tolist())]
    with open(run.path / "samples.jsonl", "a", encoding="utf-8") as f:
        for prompt, text, s in rows:
            f.write(json.dumps({"step": step, "prompt": prompt, "response": text, "score": s}) + "\n")
    table = Table(title=f"samples at step {step}", show_lines=True)
    for column in ("prompt", "answer", "score"):
        table.add_column(column, overflow="fold")
    for prompt, text, s in rows[:3]:
        table.add_row(prompt, text, f"{s:.3f}")
    console.print(table)


def _export(folder: Path, models: Models, tokenizer, ema) -> None:
    if ema is not None:
        models.policy.load_state_dict(ema.shadow, strict=False)
    save_model(models.policy, folder, tokenizer)
    if models.value is not None:
        save_model(models.value, folder / "value")
    if models.value_head is not None:
        save_file(trainable_state(models.value_head), str(folder / "value_head.safetensors"))

"""Stage 3, PPO: the policy answers prompts, the reward model scores the answers, PPO raises the score while a
per-token KL penalty keeps the policy near the SFT model (InstructGPT section 3.5).

    chatrlhf ppo --config ppo.yaml --max_steps 20

Four models: the policy (from the SFT checkpoint), a frozen reference (the SFT model; with LoRA, the policy
with its adapters disabled), a value model initialised from the reward model (or, with `value_on_policy: true`,
a scalar head on the policy itself), and the reward model; `ppo_models.py` loads them. Each step runs named
phases, each timed (`ppo_step`):

    prompts -> rollout -> score_rollouts -> make_experience (all three in `experience.py`)
    -> ppo_update (clipped policy and value losses, optional PPO-ptx; here) -> log

The adaptive KL controller, EMA and PPO-ptx stream are `ppo_state.py`'s; the run around the steps (resume,
checkpoints, metrics, export) is `harness.py`'s.
"""

from __future__ import annotations

import functools
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from rich.table import Table

from chatrlhf.chat_template import prompt_ids
from chatrlhf.configs import PPOConfig
from chatrlhf.data import load_prompts
from chatrlhf.errors import UserError
from chatrlhf.experience import Experience, RewardFn, make_experience, rollout, score_rollouts
from chatrlhf.forward import (
    collate,
    gather_logprobs,
    logits_and_values,
    prompt_groups,
    response_logits,
    target_logits,
    token_values,
)
from chatrlhf.generation import Generation
from chatrlhf.harness import Harness, TrainState, autocast, check_config, epoch_order, make_optimizer
from chatrlhf.judges import make_judge
from chatrlhf.losses import (
    entropy_from_logits,
    explained_variance,
    masked_mean,
    ppo_policy_loss,
    token_nll,
    value_loss,
)
from chatrlhf.models import load_tokenizer, pick_device, resolve_model
from chatrlhf.ppo_models import Models, export_models, hold_frozen_weights, load_models, trained
from chatrlhf.ppo_state import EMA, AdaptiveKL, PPOExtras, PtxStream
from chatrlhf.records import Conversation, DataError, InvalidRecords
from chatrlhf.runs import RunDir, data_lineage, keep_rows_upto

if TYPE_CHECKING:
    from accelerate import Accelerator

PLOTS = ["ppo/reward", "ppo/gold_reward", "ppo/kl", "ppo/response_length", "ppo/entropy"]


def minibatch_loss(
    models: Models, exp: Experience, idx: torch.Tensor, cfg: PPOConfig, ptx_rows=None, pad_id=0
):
    """PPO loss on the rollouts `idx` (+ ptx_coef * LM loss on `ptx_rows`). Returns (loss, stats)."""
    seq, att, mask = exp.sequences[idx], exp.attention_mask[idx], exp.response_mask[idx].float()
    trunk = exp.trunk.rows(idx) if exp.trunk is not None else None
    if models.value_head is not None:  # one forward for the policy and its value head
        logits, values = logits_and_values(
            models.policy, models.value_head, seq, att, exp.prompt_width, cfg.sampling.temperature, trunk
        )
    else:
        logits = response_logits(models.policy, seq, att, exp.prompt_width, cfg.sampling.temperature, trunk)
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


@dataclass
class UpdateContext:
    """What `ppo_update` works with besides the rollouts: the same at every PPO step."""

    accelerator: Accelerator
    loss: torch.nn.Module  # `_PPOLoss` (its forward is `minibatch_loss`), as accelerate wrapped it
    optimizer: torch.optim.Optimizer  # over the parameters of `loss`, as accelerate wrapped it
    cfg: PPOConfig
    ptx: PtxStream | None = None  # PPO-ptx: pretraining rows mixed into every minibatch
    ema: EMA | None = None  # updated after every optimizer step


def ppo_update(ctx: UpdateContext, exp: Experience, generator: torch.Generator) -> dict[str, float]:
    """`ppo_epochs` passes over the rollouts in `minibatches` optimizer steps, shuffled by `generator`;
    returns the mean stats. A non-finite loss stops the update at once, its `ppo/loss` NaN for the harness
    to report."""
    cfg, wrapped = ctx.cfg, ctx.loss
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
            ptx_rows = ctx.ptx.next_rows() if ctx.ptx is not None else None
            loss, stats = wrapped(exp, order[start : start + size], ptx_rows)
            if not math.isfinite(loss.item()):
                return {"ppo/loss": float("nan")}
            ctx.accelerator.backward(loss)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            norm = ctx.accelerator.clip_grad_norm_(wrapped.parameters(), max_norm)
            ctx.optimizer.step()
            ctx.optimizer.zero_grad(set_to_none=True)
            if ctx.ema is not None:
                ctx.ema.update()
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
        picked.append(epoch_order(cfg.seed, epoch, n_prompts, cfg.data.shuffle)[i])
    return picked


def train_state(cfg: PPOConfig, models: Models, steps: int, extras: PPOExtras | None = None) -> TrainState:
    """Optimizer and schedule over the trained models' parameters; a checkpoint holds them with the models
    and `extras` (the KL controller, EMA and PTX cursor)."""
    params = [p for m in trained(models).values() for p in m.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(cfg, params, steps)
    return TrainState(trained(models), optimizer, scheduler, extras)


# --------------------------------------------------------------------------------------------------
# the stage


def _check(cfg: PPOConfig, reward_fn) -> None:
    check_config(cfg)
    if cfg.reward == "judge" and cfg.reward_model:
        raise UserError("reward_model: with reward: judge the judge scores the rollouts, so it is not read")
    if reward_fn is None and cfg.reward == "model" and not cfg.reward_model:
        raise UserError(
            "reward_model: name the reward model checkpoint (output_dir of `chatrlhf reward`), or set "
            "reward: judge to score rollouts with a judge"
        )
    if cfg.sampling.temperature <= 0:
        raise UserError("sampling.temperature: PPO samples its rollouts, so it must be positive")
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        raise UserError("ptx_data: PPO-ptx (ptx_coef > 0) needs a text file to mix in")
    if (
        cfg.minibatches < 1
        or cfg.ppo_epochs < 1
        or cfg.sampling.max_new_tokens < 1
        or cfg.samples_per_prompt < 1
    ):
        raise UserError(
            "minibatches, ppo_epochs, sampling.max_new_tokens and samples_per_prompt must be at least 1"
        )
    if cfg.advantage_estimator != "gae" and (cfg.value_on_policy or cfg.value_model):
        key = "value_on_policy" if cfg.value_on_policy else "value_model"
        raise UserError(
            f"{key}: advantage_estimator {cfg.advantage_estimator} uses no value model, so it is not read"
        )
    if cfg.value_on_policy and cfg.value_model:
        raise UserError("value_model: with value_on_policy: true there is no separate value model to start")
    if cfg.advantage_estimator != "gae" and cfg.samples_per_prompt < 2:
        raise UserError(
            f"advantage_estimator: {cfg.advantage_estimator} compares the answers to one prompt, so "
            "samples_per_prompt must be "
            f"at least 2 (it is {cfg.samples_per_prompt})"
        )


def _judge(cfg: PPOConfig, conversations: list[Conversation]):
    """`reward: judge`'s judge, once every prompt record is checked to carry what it reads (before anything
    is written)."""
    judge = make_judge(cfg.judge)
    need = getattr(judge, "needs", ())
    for conv in conversations:
        if need and not any(conv.extra.get(key) for key in need):
            fields = " or ".join(f"`{key}`" for key in need)
            raise DataError(
                f"{conv.where}: the {cfg.judge} judge (reward: judge) needs the record's field {fields}"
            )
    return judge


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


def _judge_reward(judge, records: list[Conversation]) -> RewardFn | None:
    """A step's reward function from the judge (None without one): each rollout scored with its prompt
    record's fields."""
    if judge is None:
        return None
    metas = [{"where": r.where, **r.extra} for r in records]
    return lambda convs, texts, ids: [judge.scores(c, [t], m)[0] for c, t, m in zip(convs, texts, metas)]


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
    kl_ctl: AdaptiveKL  # beta, checkpointed with `state.extras`
    models: Models
    update: UpdateContext
    tokenizer: object
    conversations: list[Conversation]
    prompts: list[list[int]]
    reward_fn: RewardFn | None
    gold_fn: object | None
    judge: object | None = None  # reward: judge; scores each rollout with its prompt record's fields


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
    judge = _judge(cfg, conversations) if cfg.reward == "judge" and reward_fn is None else None
    ptx = PtxStream.of(cfg, tokenizer, invalid)
    device = pick_device()
    harness = Harness(cfg, "ppo", device, on_step)
    models = load_models(cfg, tokenizer, model_path, reward_fn or judge, device)
    restore_fp32 = hold_frozen_weights(models, harness.dtype)
    per_step = cfg.batch_size * harness.world
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * len(prompts) / per_step))
    extras = PPOExtras.of(cfg, models.policy, ptx)
    state = train_state(cfg, models, steps, extras)
    wrapped, start = harness.begin(state, _PPOLoss(models, cfg, tokenizer.pad_token_id))
    if harness.main:  # a resumed run writes the later samples again
        keep_rows_upto(harness.run.path / "samples.jsonl", start)
    update = UpdateContext(harness.accelerator, wrapped, state.optimizer, cfg, extras.ptx, extras.ema)
    run = PPORun(
        cfg,
        harness,
        state,
        extras.kl,
        models,
        update,
        tokenizer,
        conversations,
        prompts,
        reward_fn,
        gold_fn,
        judge,
    )
    for step in harness.steps(steps):
        metrics, convs, gen, exp = ppo_step(run, step)
        done = step + 1
        if harness.main and cfg.sample_every and (done % cfg.sample_every == 0 or done == steps):
            _write_samples(harness.run, done, convs, gen, exp, tokenizer, harness.progress.console)
        harness.end_step(done, metrics, f"reward {metrics['ppo/reward']:.3f}  kl {metrics['ppo/kl']:.3f}")
    lineage = {
        "parent": model_path,
        "reference": cfg.reference_model or model_path,
        "reward_model": cfg.reward_model or (f"judge {cfg.judge}" if judge else "reward function"),
        "data": data_lineage(cfg.data.train, cfg.ptx_data),
        "invalid_records": invalid.summary(),
    }
    restore_fp32()  # for LoRA's merge
    export = functools.partial(export_models, models=models, tokenizer=tokenizer, ema=extras.ema)
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
    kl_ctl, compute = run.kl_ctl, autocast(harness.device, harness.dtype)
    with _timed(metrics, "rollout"), compute:
        gen = rollout(models, [run.prompts[i] for i in picked], cfg, tokenizer, generator)
    with _timed(metrics, "score"), compute:
        # logprobs_from: forward. Under bf16, decoding's incremental forward rounds differently from a full
        # one, at times by more than the ratio's clip; in fp32 they agree (README, PPO section)
        recompute = cfg.logprobs_from == "forward"
        reward_fn = run.reward_fn or _judge_reward(run.judge, [run.conversations[i] for i in picked])
        scored = score_rollouts(models, gen, cfg, convs, tokenizer, reward_fn, recompute)
    exp = make_experience(gen, scored, cfg, kl_ctl.value)
    if run.gold_fn is not None:
        gold = run.gold_fn(convs, gen.texts(tokenizer), [run.conversations[i].extra for i in picked])
        metrics["ppo/gold_reward"] = sum(gold) / len(gold)
    with _timed(metrics, "update"), compute:
        metrics.update(ppo_update(run.update, exp, generator))
    run.state.scheduler.step()
    kl = answer_kl(exp)
    metrics.update(_rollout_metrics(exp, gen, kl, kl_ctl.value, models.has_critic))
    metrics["timing/step"] = time.perf_counter() - began
    if harness.world > 1:  # every process logs, and steers the KL by, the mean over all processes
        metrics = _mean_over_processes(harness.accelerator, metrics, harness.device)
        kl = metrics["ppo/kl"]
        _check_in_sync(harness.accelerator, models.policy, step + 1)
    kl_ctl.update(kl, cfg.batch_size * harness.world * cfg.samples_per_prompt)
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


def answer_kl(exp: Experience) -> float:
    """The KL of an answer (summed over its tokens), averaged over the batch: what the KL controller steers."""
    return (exp.kl * exp.response_mask.float()).sum(1).mean().item()


def _rollout_metrics(
    exp: Experience, gen: Generation, kl: float, kl_coef: float, has_value: bool
) -> dict[str, float]:
    mask = exp.response_mask.float()
    return {
        "ppo/reward": exp.scores.mean().item(),
        "ppo/kl": kl,
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

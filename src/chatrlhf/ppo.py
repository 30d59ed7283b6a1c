"""Stage 3, PPO: the policy answers prompts, the reward model scores the answers, PPO raises the score while a
per-token KL penalty keeps the policy near the SFT model (InstructGPT section 3.5).

    chatrlhf ppo --config ppo.yaml --max_steps 20

Four models: the policy (from the SFT checkpoint), a frozen reference (the SFT model; with LoRA, the policy
with its adapters disabled), a value model initialised from the reward model, and the reward model. Each
step runs named phases, each timed: rollout -> score -> make_experience (in `experience.py`) -> ppo_update
(clipped policy and value losses, optional PPO-ptx; here) -> log.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from safetensors.torch import load_file, save_file
from transformers import set_seed

from chatrlhf.chat import prompt_ids
from chatrlhf.config import TrainConfig, help_field, to_dict
from chatrlhf.data import (
    DataError,
    InvalidRecords,
    chunk_stream,
    load_prompts,
    load_texts,
    tokenize_texts,
)
from chatrlhf.errors import UserError
from chatrlhf.experience import (
    Experience,
    Models,
    RewardFn,
    gather_logprobs,
    make_experience,
    response_logits,
    rollout,
    score,
    token_values,
)
from chatrlhf.generation import Generation, response_token_lists
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
    load_causal_lm,
    load_tokenizer,
    pick_device,
    resolve_dtype,
    resolve_model,
    save_model,
)
from chatrlhf.reward import load_reward_model
from chatrlhf.runs import MetricsLog, RunDir, data_lineage, keep_rows_upto, plot_metrics
from chatrlhf.sft import collate, target_logits
from chatrlhf.training import (
    autocast,
    check_config,
    load_resumable,
    make_optimizer,
    reuse_freed_memory,
    save_resumable,
)


@dataclass
class PPOConfig(TrainConfig):
    """PPO against a reward model; `data.train` is the prompts file, `max_steps` counts PPO steps."""

    output_dir: str = help_field("runs/ppo", "where the policy, value model, metrics and plots go")
    reward_model: str = help_field("", "reward model checkpoint (output_dir of `chatrlhf reward`)")
    value_model: str = help_field("", "value model start; empty: the reward model (InstructGPT)")
    reference_model: str = help_field(
        "",
        "frozen model of the KL penalty; empty: the starting policy (set it to the SFT model when PPO "
        "continues from an earlier PPO policy)",
    )
    batch_size: int = help_field(8, "prompts per PPO step")
    samples_per_prompt: int = help_field(
        1, "answers drawn per prompt; a step has batch_size x samples_per_prompt rollouts"
    )
    advantage_estimator: str = help_field(
        "gae",
        "gae: a value model and GAE (InstructGPT) | rloo: each answer's return minus the mean return of "
        "the other answers to its prompt, no value model (needs samples_per_prompt >= 2)",
    )
    lr: float = help_field(3e-6, "peak learning rate of policy and value")
    warmup_ratio: float = help_field(0.0, "fraction of the steps with linear warmup")
    lr_scheduler: str = help_field("linear", "learning-rate decay: cosine | linear | constant")
    save_every: int = help_field(20, "PPO steps between resumable checkpoints; 0 saves only at the end")
    max_prompt_length: int = help_field(512, "longest prompt in tokens; a longer one stops the run")
    max_new_tokens: int = help_field(64, "longest answer in tokens")
    temperature: float = help_field(1.0, "sampling temperature, also used when log-probs are recomputed")
    top_p: float = help_field(1.0, "nucleus sampling")
    top_k: int = help_field(0, "top-k sampling; 0 is off")
    min_new_tokens: int = help_field(0, "EOS is suppressed until an answer has this many tokens")
    ppo_epochs: int = help_field(4, "passes over each batch of rollouts")
    minibatches: int = help_field(1, "optimizer steps per pass over the rollouts")
    clip_range: float = help_field(0.2, "PPO ratio clip")
    value_clip: float = help_field(0.2, "value-function clip around the rollout values")
    vf_coef: float = help_field(0.1, "weight of the value loss")
    gamma: float = help_field(1.0, "discount")
    lam: float = help_field(0.95, "GAE lambda")
    kl_coef: float = help_field(0.02, "beta, the per-token KL penalty weight (InstructGPT 0.02)")
    kl_estimator: str = help_field("k1", "per-token KL estimator: k1 | k3")
    target_kl: float = help_field(0.0, "adaptive beta toward this KL per answer (0 keeps beta fixed)")
    kl_horizon: int = help_field(10000, "horizon of the adaptive KL controller, in episodes")
    missing_eos_penalty: float = help_field(0.0, "subtracted from the score of answers cut at max_new_tokens")
    reward_clip: float = help_field(0.0, "clip scores to [-c, c]; 0 is off")
    whiten_rewards: bool = help_field(False, "whiten per-token rewards within the batch")
    whiten_advantages: bool = help_field(True, "whiten advantages within the batch")
    ptx_coef: float = help_field(0.0, "PPO-ptx: weight of the pretraining loss (InstructGPT 27.8)")
    ptx_data: str = help_field("", "PPO-ptx text: {'text'} JSONL or .txt")
    ptx_batch_size: int = help_field(4, "pretraining rows per optimizer step")
    ptx_max_length: int = help_field(256, "tokens per pretraining row")
    ema_decay: float = help_field(
        0.0, "exponential moving average of the policy weights, exported instead; 0 is off"
    )
    sample_every: int = help_field(10, "steps between sample tables (samples.jsonl)")


def minibatch_loss(
    models: Models, exp: Experience, idx: torch.Tensor, cfg: PPOConfig, ptx_rows=None, pad_id=0
):
    """PPO loss on the rollouts `idx` (+ ptx_coef * LM loss on `ptx_rows`). Returns (loss, stats)."""
    seq, att, mask = exp.sequences[idx], exp.attention_mask[idx], exp.response_mask[idx].float()
    logits = response_logits(models.policy, seq, att, exp.prompt_width, cfg.temperature)
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
        values = token_values(models.value, seq, att, exp.prompt_width)
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
        self.policy, self.value = models.policy, models.value
        self.models, self.cfg, self.pad_id = models, cfg, pad_id

    def forward(self, exp: Experience, idx: torch.Tensor, ptx_rows=None):
        return minibatch_loss(self.models, exp, idx, self.cfg, ptx_rows, self.pad_id)


def ppo_update(
    accelerator, wrapped, exp: Experience, cfg: PPOConfig, optimizer, generator, ptx_sampler, ema
) -> dict:
    """`ppo_epochs` passes over the rollouts in `minibatches` optimizer steps; returns the mean stats."""
    wrapped.train()
    batch = exp.sequences.shape[0]
    size = max(1, math.ceil(batch / cfg.minibatches))
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(batch, generator=generator).to(exp.sequences.device)
        for start in range(0, batch, size):
            ptx_rows = ptx_sampler() if ptx_sampler else None
            loss, stats = wrapped(exp, order[start : start + size], ptx_rows)
            if not math.isfinite(loss.item()):
                raise FloatingPointError
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


class AdaptiveKL:
    """Ziegler et al. (2019): move beta so the KL per answer tracks a target."""

    def __init__(self, cfg: PPOConfig):
        self.value, self.target, self.horizon = cfg.kl_coef, cfg.target_kl, cfg.kl_horizon

    def update(self, kl: float, episodes: int) -> None:
        if self.target > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.value *= 1.0 + error * episodes / self.horizon


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
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        raise UserError("ptx_data: PPO-ptx (ptx_coef > 0) needs a text file to mix in")
    if cfg.minibatches < 1 or cfg.ppo_epochs < 1 or cfg.max_new_tokens < 1 or cfg.samples_per_prompt < 1:
        raise UserError("minibatches, ppo_epochs, max_new_tokens and samples_per_prompt must be at least 1")
    if cfg.advantage_estimator not in ("gae", "rloo"):
        raise UserError(f"advantage_estimator: {cfg.advantage_estimator!r} is not gae or rloo")
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


def _load_models(cfg: PPOConfig, tokenizer, model_path: str, reward_fn, device) -> Models:
    set_seed(cfg.seed)
    policy = load_causal_lm(model_path, tokenizer, device)
    reference = None
    if cfg.reference_model:
        reference_path = resolve_model(cfg.reference_model)
        _same_vocabulary(reference_path, load_tokenizer(reference_path), tokenizer, "reference_model")
        reference = load_causal_lm(reference_path, tokenizer, device).eval().requires_grad_(False)
    elif not cfg.lora.enabled:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora)
    value = None
    if cfg.advantage_estimator == "gae":
        value_path = resolve_model(cfg.value_model or cfg.reward_model or cfg.model)
        _same_vocabulary(value_path, load_tokenizer(value_path), tokenizer, "value_model")
        value = load_reward_model(value_path, tokenizer, device)
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
    return Models(policy, value, reference, reward, bias)


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


def _ptx_sampler(cfg: PPOConfig, tokenizer, invalid: InvalidRecords):
    if cfg.ptx_coef <= 0:
        return None
    rows = chunk_stream(tokenize_texts(load_texts(cfg.ptx_data, invalid), tokenizer), cfg.ptx_max_length)
    state = {"at": 0}

    def next_rows():
        picked = [rows[(state["at"] + i) % len(rows)] for i in range(cfg.ptx_batch_size)]
        state["at"] += cfg.ptx_batch_size
        return picked

    return next_rows, state


def _save(folder: Path, models: Models, optimizer, scheduler, step, kl: AdaptiveKL, ema, ptx_state) -> None:
    if ema is not None:
        save_file({n: t.contiguous() for n, t in ema.shadow.items()}, str(folder / "ema.safetensors"))
    ptx_at = ptx_state["at"] if ptx_state else 0
    named = _trained(models)
    save_resumable(folder, named, optimizer, scheduler, step, kl_coef=kl.value, ptx_at=ptx_at)


def _trained(models: Models) -> dict:
    return {"policy": models.policy} | ({"value": models.value} if models.value is not None else {})


def _load(folder: Path, models: Models, optimizer, scheduler, kl: AdaptiveKL, ema, ptx_state) -> int:
    state = load_resumable(folder, _trained(models), optimizer, scheduler)
    if ema is not None:
        ema.shadow = load_file(str(folder / "ema.safetensors"))
    kl.value = state["kl_coef"]
    if ptx_state is not None:
        ptx_state["at"] = state["ptx_at"]
    return int(state["step"])


@contextmanager
def _timed(metrics: dict, name: str):
    began = time.perf_counter()
    yield
    metrics[f"timing/{name}"] = time.perf_counter() - began


def train(cfg: PPOConfig, reward_fn: RewardFn | None = None, on_step=None, gold_fn=None) -> dict[str, float]:
    """Run PPO. `reward_fn(prompts, answers, answer_ids) -> scores` may stand in for the reward model.
    `gold_fn(prompts, answers, records) -> scores` (records: each prompt's other fields), a judge the policy never sees, is logged as `ppo/gold_reward`
    beside the proxy reward, to show over-optimisation of the reward model when it happens.

    Under `accelerate launch` (or torchrun) each process rolls out `batch_size` prompts of its own per step;
    gradients are averaged over processes, metrics too, and only the main process writes.
    """
    from accelerate import Accelerator

    _check(cfg, reward_fn)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    invalid = InvalidRecords(cfg.data.on_invalid)
    conversations, prompts = _prompt_ids(cfg, tokenizer, invalid)
    ptx = _ptx_sampler(cfg, tokenizer, invalid)
    ptx_sampler, ptx_state = ptx if ptx else (None, None)
    device = pick_device()
    if device.type == "cpu":
        reuse_freed_memory()
    accelerator = Accelerator(cpu=device.type == "cpu")
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    models = _load_models(cfg, tokenizer, model_path, reward_fn, device)
    dtype = resolve_dtype(cfg.dtype)
    per_step = cfg.batch_size * world
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * len(prompts) / per_step))
    params = [p for m in _trained(models).values() for p in m.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(cfg, params, steps)
    kl_ctl = AdaptiveKL(cfg)
    ema = EMA(models.policy, cfg.ema_decay) if cfg.ema_decay > 0 else None

    run = RunDir(cfg.output_dir)
    start = 0
    checkpoint = run.latest_checkpoint() if cfg.resume else None
    if checkpoint is not None:
        start = _load(checkpoint, models, optimizer, scheduler, kl_ctl, ema, ptx_state)
    wrapped, optimizer = accelerator.prepare(_PPOLoss(models, cfg, tokenizer.pad_token_id), optimizer)
    if main:
        run.start(overwrite=cfg.overwrite and not cfg.resume)
    accelerator.wait_for_everyone()
    log = MetricsLog(run, cfg.report_to, resume_step=start, enabled=main)
    if main:
        keep_rows_upto(run.path / "samples.jsonl", start)  # a resumed run writes the later samples again
    console = Console(stderr=True, quiet=not main)
    summary: dict[str, float] = {}
    columns = [TextColumn("[bold]ppo"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, TextColumn("{task.fields[info]}"), console=console, disable=not main) as progress:
        task = progress.add_task("ppo", total=steps, completed=start, info="")
        for step in range(start, steps):
            metrics: dict[str, float] = {}
            began = time.perf_counter()
            # every step's randomness comes from (seed, step, process), so a resumed run repeats it exactly
            generator = torch.Generator(device=device).manual_seed((cfg.seed * 100003 + step) * 1009 + rank)
            # a prompt's samples_per_prompt answers lie next to each other in the batch
            picked = [
                i
                for i in step_prompts(cfg, len(prompts), step, world)[rank::world]
                for _ in range(cfg.samples_per_prompt)
            ]
            batch_convs = [conversations[i].messages for i in picked]
            with _timed(metrics, "rollout"), autocast(device, dtype):
                gen = rollout(models, [prompts[i] for i in picked], cfg, tokenizer, generator)
            with _timed(metrics, "score"), autocast(device, dtype):
                scored = score(models, gen, cfg, batch_convs, tokenizer, reward_fn)
            exp = make_experience(gen, scored, cfg, kl_ctl.value)
            if gold_fn is not None:
                texts = tokenizer.batch_decode(
                    response_token_lists(gen, tokenizer.eos_token_id), skip_special_tokens=True
                )
                metas = [conversations[i].extra for i in picked]
                metrics["ppo/gold_reward"] = sum(gold_fn(batch_convs, texts, metas)) / len(texts)
            try:
                with _timed(metrics, "update"), autocast(device, dtype):
                    metrics.update(
                        ppo_update(accelerator, wrapped, exp, cfg, optimizer, generator, ptx_sampler, ema)
                    )
            except FloatingPointError:
                last = run.latest_checkpoint()
                kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                raise UserError(
                    f"ppo: a loss became NaN or infinite at step {step + 1}; {kept} (try a lower lr)"
                ) from None
            scheduler.step()
            metrics.update(_rollout_metrics(exp, gen, kl_ctl.value, models.value is not None))
            metrics["timing/step"] = time.perf_counter() - began
            if world > 1:
                metrics = _mean_over_processes(accelerator, metrics, device)
                _check_in_sync(accelerator, models.policy, step + 1)
            kl_ctl.update(metrics["ppo/kl"], per_step * cfg.samples_per_prompt)
            done = step + 1
            log.log(done, metrics)
            summary.update(metrics)
            progress.update(
                task, advance=1, info=f"reward {metrics['ppo/reward']:.3f}  kl {metrics['ppo/kl']:.3f}"
            )
            if main and cfg.sample_every and (done % cfg.sample_every == 0 or done == steps):
                _write_samples(run, done, batch_convs, gen, exp, tokenizer, progress.console)
            if cfg.save_every and done % cfg.save_every == 0 and done < steps:
                if main:
                    run.save_checkpoint(
                        done,
                        lambda f, s=done: _save(f, models, optimizer, scheduler, s, kl_ctl, ema, ptx_state),
                        cfg.keep_checkpoints,
                    )
                accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(done, metrics)
    if main:
        log.close()
        plot_metrics(
            run,
            ["ppo/reward", "ppo/gold_reward", "ppo/kl", "ppo/response_length", "ppo/entropy"],
            "ppo_curves.png",
            f"ppo: {cfg.output_dir}",
        )
        lineage = {
            "parent": model_path,
            "reference": cfg.reference_model or model_path,
            "reward_model": cfg.reward_model or "reward function",
            "data": data_lineage(cfg.data.train, cfg.ptx_data),
            "invalid_records": invalid.summary(),
        }
        info = {
            "stage": "ppo",
            "config": to_dict(cfg),
            "lineage": lineage,
            "summary": summary,
            "processes": world,
        }
        run.export(lambda folder: _export(folder, models, tokenizer, ema), info)
    accelerator.wait_for_everyone()
    return summary


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
    texts = [
        tokenizer.decode(r, skip_special_tokens=True)
        for r in response_token_lists(gen, tokenizer.eos_token_id)
    ]
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

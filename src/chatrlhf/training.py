"""The optimisation step shared by the supervised stages (pretrain, SFT, reward model), in `harness.py`'s frame.

A stage hands `fit` its model, its tokenized items and a `Stage` that knows how to turn a micro-batch into
a loss. One optimizer step takes `batch_size * grad_accum` items in a seeded order, sorts them by length
into micro-batches of `batch_size` (less padding), and divides every micro-batch's summed loss by the
step's total weight (loss tokens, pairs), so accumulation gives exactly the full-batch gradient.
Checkpoints (`harness.TrainState`) hold the trainable weights, optimizer, scheduler and RNG state: `resume`
continues the same data order and the loss curve as if never stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatrlhf.configs import TrainConfig
from chatrlhf.harness import Harness, TrainState, autocast, epoch_order, make_optimizer


@dataclass
class Stage:
    """What `fit` needs to know about one stage."""

    name: str  # "sft", "pretrain", "reward"
    loss: Callable[[Any, Sequence[Any], float], tuple[torch.Tensor, dict[str, float]]]
    # loss(model, micro_batch, step_weight) -> (summed loss / step_weight, sums of stats to log)
    weight: Callable[[Any], float]  # an item's share of the step's normaliser (its loss tokens, its pairs)
    length: Callable[[Any], int]  # tokens, for grouping items of similar length
    summarize: Callable[[dict[str, float]], dict[str, float]]  # step sums -> logged metrics (train/...)
    evaluate: Callable[[Any, Sequence[Any]], dict[str, float]] | None = None  # (model, items) -> eval/...
    export: Callable[[Any, Path], None] | None = None  # writes the final checkpoint into a folder
    plots: list[str] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)


def total_steps(cfg: TrainConfig, n_items: int, world: int = 1) -> tuple[int, int]:
    """(steps per epoch, total steps) for `max_steps` or `epochs`; a step takes batch_size x grad_accum
    items from each of `world` processes."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = max(1, math.ceil(n_items / per_step))
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return steps_per_epoch, steps


def step_items(cfg: TrainConfig, n_items: int, step: int, world: int = 1) -> list[int]:
    """Indices of the items of optimizer step `step` (0-based), all processes together: `epoch_order`'s
    seeded permutation per epoch, the same in every process."""
    steps_per_epoch, _ = total_steps(cfg, n_items, world)
    epoch, within = divmod(step, steps_per_epoch)
    order = epoch_order(cfg.seed, epoch, n_items, cfg.data.shuffle)
    per_step = cfg.batch_size * cfg.grad_accum * world
    return order[within * per_step : (within + 1) * per_step]


def micro_batches(items: Sequence[Any], batch_size: int, length: Callable[[Any], int]) -> list[list[Any]]:
    """Split a step's items into micro-batches of similar length (longest first)."""
    ordered = sorted(items, key=length, reverse=True)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


class _StageLoss(torch.nn.Module):
    """The stage's loss as a module forward, so a data-parallel wrapper (DDP, FSDP, DeepSpeed via
    accelerate) sees every forward pass and synchronises the gradients."""

    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, items, step_weight):
        return self.loss(self.model, items, step_weight)


def fit(
    cfg: TrainConfig,
    stage: Stage,
    model,
    train_items: Sequence[Any],
    eval_items: Sequence[Any] = (),
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train `model` on `train_items`; write checkpoints, metrics, plots and the final model.

    Under `accelerate launch` each process takes its share of every step's items; gradients are averaged
    by the wrapper accelerate chooses, and only the main process writes.
    """
    device = next(model.parameters()).device
    harness = Harness(cfg, stage.name, device, on_step)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    steps_per_epoch, steps = total_steps(cfg, len(train_items), harness.world)
    optimizer, scheduler = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], steps)
    state = TrainState({"model": model}, optimizer, scheduler)
    wrapped, _ = harness.begin(state, _StageLoss(model, stage.loss))
    torch.manual_seed(cfg.seed + harness.rank)  # each process its own random stream
    evaluate = stage.evaluate if eval_items and harness.main else None
    for step in harness.steps(steps):
        began = time.perf_counter()
        items = [train_items[i] for i in step_items(cfg, len(train_items), step, harness.world)]
        step_weight = sum(stage.weight(item) for item in items)
        sums = _accumulate(harness, wrapped, items[harness.rank :: harness.world], step_weight, stage)
        grad_norm = harness.accelerator.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm or math.inf)
        metrics = stage.summarize(sums)
        metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm)})
        state.optimizer.step()
        scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        metrics["train/epoch"] = (step + 1) / steps_per_epoch
        metrics["timing/step"] = time.perf_counter() - began
        if "input_tokens" in sums:
            metrics["train/tokens_per_s"] = sums["input_tokens"] / metrics["timing/step"]
        if evaluate and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps:
            metrics.update(_evaluate(evaluate, model, eval_items, harness))
        harness.end_step(step + 1, metrics)
    if evaluate:
        harness.log_final(_evaluate(evaluate, model, eval_items, harness))
    export = (lambda folder: stage.export(model, folder)) if stage.export else None
    return harness.finish(export, stage.lineage, stage.plots)


def _accumulate(harness: Harness, wrapped, items, step_weight: float, stage: Stage) -> dict[str, float]:
    """Forward and backward this process's share of a step; returns the step's stats summed over processes.

    Each share's summed loss is divided by the whole step's weight and multiplied by the number of
    processes, because the data-parallel wrapper averages gradients over them.
    """
    from accelerate.utils import gather_object

    accelerator, device = harness.accelerator, harness.device
    batches = micro_batches(items, harness.cfg.batch_size, stage.length) or [[]]
    sums: dict[str, float] = {}
    for i, batch in enumerate(batches):
        sync = accelerator.no_sync(wrapped) if i < len(batches) - 1 else contextlib.nullcontext()
        with sync, autocast(device, harness.dtype):
            if batch:
                loss, stats = wrapped(batch, step_weight / accelerator.num_processes)
            else:  # more processes than items in this step: take part in the gradient sync with zero
                loss, stats = sum(p.sum() for p in wrapped.parameters() if p.requires_grad) * 0.0, {}
        accelerator.backward(loss)
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
    if accelerator.num_processes > 1:
        keys = sorted(set().union(*gather_object([sorted(sums)])))
        totals = accelerator.reduce(torch.tensor([sums.get(k, 0.0) for k in keys], device=device), "sum")
        sums = dict(zip(keys, totals.tolist()))
    return sums


def _evaluate(evaluate, model, items, harness: Harness) -> dict[str, float]:
    model.eval()
    with torch.no_grad(), autocast(harness.device, harness.dtype):
        result = evaluate(model, items)
    model.train()
    return result

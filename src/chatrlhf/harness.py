"""The run harness every training stage shares (pretraining, SFT, the reward model, PPO).

A stage builds its models and a `TrainState` (what a checkpoint holds), hands the harness the module whose
forward computes its loss, and runs its own step inside the harness's loop:

    harness = Harness(cfg, "ppo", device, on_step)
    wrapped, start = harness.begin(state, loss_module)   # resume, accelerate, run folder, metrics log
    for step in harness.steps(total):                    # with a progress bar
        metrics = ...one optimizer step (or one PPO iteration)...
        harness.end_step(step + 1, metrics)              # NaN check, log, checkpoint, on_step
    harness.finish(export, lineage)                      # plots, exported model and run.json

The harness owns the accelerator (one process or `accelerate launch`: only the main process writes), the run
folder (`runs.RunDir`: atomic checkpoints and export), resume, metrics, progress and the NaN message.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from chatrlhf.configs import SupervisedConfig, TrainConfig, to_dict
from chatrlhf.errors import UserError
from chatrlhf.models import resolve_dtype
from chatrlhf.runs import MetricsLog, RunDir, plot_metrics

SCHEDULERS = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}


def check_config(cfg: TrainConfig) -> None:
    """The settings every training stage shares, checked before anything is read or written."""
    if not cfg.data.train:
        raise UserError("data.train: no training data named")
    if cfg.batch_size < 1:
        raise UserError("batch_size: must be at least 1")
    if isinstance(cfg, SupervisedConfig) and cfg.grad_accum < 1:
        raise UserError("grad_accum: must be at least 1")
    if cfg.lr <= 0:
        raise UserError("lr: must be positive")
    if cfg.lr_scheduler not in SCHEDULERS:
        raise UserError(f"lr_scheduler: {cfg.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if cfg.freeze_layers < 0:
        raise UserError(f"freeze_layers: {cfg.freeze_layers} is negative")
    if cfg.freeze_layers and cfg.lora.enabled:
        raise UserError(
            "freeze_layers: with LoRA only the adapters train already; lora.layers keeps them out of the "
            "bottom layers"
        )
    resolve_dtype(cfg.dtype)
    RunDir(cfg.output_dir).check_writable(cfg.resume, cfg.overwrite)


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 compute over fp32 master weights; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], steps: int):
    """AdamW over `params` with warmup and the configured decay over `steps` optimizer steps."""
    from transformers import get_scheduler

    # the fused kernel is much faster than the per-tensor loop, on CPU too
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8, fused=fused
    )
    warmup = int(cfg.warmup_ratio * steps)
    extra = {"min_lr_rate": cfg.min_lr_ratio} if cfg.lr_scheduler == "cosine" else None
    scheduler = get_scheduler(
        SCHEDULERS[cfg.lr_scheduler], optimizer, warmup, steps, scheduler_specific_kwargs=extra
    )
    return optimizer, scheduler


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> list[int]:
    """The order of `n` items in epoch `epoch` (0-based): a permutation seeded by `seed + epoch`, the same in
    every process and on resume; 0..n-1 without `shuffle`. Shared by the callers: do not modify it."""
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


class Resumable(Protocol):
    """State a stage keeps beyond its weights and optimizer, saved in its checkpoints (PPO's `PPOExtras`)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Everything a resumable checkpoint holds: the trainable weights of each named model, the optimizer,
    the scheduler, the RNG, and the stage's own `extras` (PPO's KL controller, EMA weights and
    pretraining-data cursor)."""

    models: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    extras: Resumable | None = None

    def save(self, folder: Path, step: int) -> None:
        for name, model in self.models.items():
            save_file(trainable_state(model), str(folder / f"{name}.safetensors"))
        state = {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "extras": self.extras.state_dict() if self.extras is not None else {},
        }
        torch.save(state, folder / "trainer_state.pt")

    def load(self, folder: Path) -> int:
        """Restore what `save` wrote; returns the step it was saved after."""
        for name, model in self.models.items():
            weights = load_file(str(folder / f"{name}.safetensors"))
            missing = set(trainable_state(model)) - set(weights)
            if missing:
                raise UserError(
                    f"{folder}: checkpoint does not match the {name} model ({len(missing)} parameters missing)"
                )
            model.load_state_dict(weights, strict=False)
        state = torch.load(folder / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if self.extras is not None:
            self.extras.load_state_dict(state["extras"])
        return int(state["step"])


class Harness:
    """The frame of one training run; see the module docstring for the order of calls."""

    def __init__(self, cfg: TrainConfig, name: str, device, on_step: Callable | None = None):
        from accelerate import Accelerator

        if device.type == "cpu":
            reuse_freed_memory()
        self.cfg, self.name, self.device, self.on_step = cfg, name, device, on_step
        self.accelerator = Accelerator(cpu=device.type == "cpu")
        self.world = self.accelerator.num_processes
        self.rank, self.main = self.accelerator.process_index, self.accelerator.is_main_process
        self.dtype = resolve_dtype(cfg.dtype)
        self.run = RunDir(cfg.output_dir)
        self.summary: dict[str, float] = {}
        self.start, self.total = 0, 0

    def begin(self, state: TrainState, module: torch.nn.Module) -> tuple[Any, int]:
        """Restore the last checkpoint when resuming, let accelerate wrap `module` (whose forward is the
        stage's loss) and the optimizer, and open the run folder. Returns (the wrapped module, first step)."""
        checkpoint = self.run.latest_checkpoint() if self.cfg.resume else None
        self.start = state.load(checkpoint) if checkpoint is not None else 0
        wrapped, state.optimizer = self.accelerator.prepare(module, state.optimizer)
        self.state = state
        if self.main:
            self.run.start(overwrite=self.cfg.overwrite and not self.cfg.resume)
        self.accelerator.wait_for_everyone()
        self.log = MetricsLog(self.run, self.cfg.report_to, resume_step=self.start, enabled=self.main)
        return wrapped, self.start

    def steps(self, total: int) -> Iterator[int]:
        """The 0-based steps still to run of `total`, under a progress bar (on stderr: stdout stays free for a
        command's own output)."""
        self.total = total
        columns = [TextColumn(f"[bold]{self.name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        console = Console(stderr=True, quiet=not self.main)
        with Progress(
            *columns, TextColumn("{task.fields[info]}"), console=console, disable=not self.main
        ) as self.progress:
            self.task = self.progress.add_task(self.name, total=total, completed=self.start, info="")
            yield from range(self.start, total)

    def end_step(self, done: int, metrics: dict[str, float], info: str | None = None) -> None:
        """After step `done` (1-based): stop on a non-finite loss, log the metrics, show progress, write a
        resumable checkpoint every `save_every` steps, and call `on_step(done, metrics)`."""
        cfg = self.cfg
        if any(not math.isfinite(v) for k, v in metrics.items() if "loss" in k or k.endswith("grad_norm")):
            last = self.run.latest_checkpoint()
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise UserError(
                f"{self.name}: the loss became NaN or infinite at step {done}; {kept} (try a lower lr)"
            )
        if done % max(cfg.log_every, 1) == 0 or done == self.total:
            self.log.log(done, metrics)
        self.summary.update(metrics)
        self.progress.update(self.task, advance=1, info=_short(metrics) if info is None else info)
        if cfg.save_every and done % cfg.save_every == 0 and done < self.total:
            if self.main:
                self.run.save_checkpoint(
                    done, lambda folder: self.state.save(folder, done), cfg.keep_checkpoints
                )
            self.accelerator.wait_for_everyone()
        if self.on_step is not None:
            self.on_step(done, metrics)

    def log_final(self, metrics: dict[str, float]) -> None:
        """Metrics measured after the last step (a final evaluation), logged at that step."""
        self.log.log(self.total, metrics)
        self.summary.update(metrics)

    def finish(
        self,
        export: Callable[[Path], None],
        lineage: dict[str, Any],
        plots: list[str] = (),
        **info: Any,
    ) -> dict[str, float]:
        """Close the metrics, draw `plots` (metric keys) and export the model with run.json (`info` adds
        keys to it). Returns the last value of every metric."""
        if self.main:
            self.log.close()
            if plots:
                title = f"{self.name}: {self.cfg.output_dir}"
                plot_metrics(self.run, list(plots), f"{self.name}_curves.png", title)
            run_info = {"stage": self.name, "config": to_dict(self.cfg), "lineage": lineage}
            self.run.export(export, {**run_info, "summary": self.summary, **info})
        self.accelerator.wait_for_everyone()
        return self.summary


def _short(metrics: dict[str, float]) -> str:
    shown = [
        (k.split("/")[-1], v)
        for k, v in metrics.items()
        if k.startswith(("train/loss", "rm/acc", "eval/loss"))
    ]
    return "  ".join(f"{k} {v:.4f}" for k, v in shown)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's malloc.h
_KEEP_BLOCKS_UP_TO = 1 << 30


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks up to 1 GiB for reuse; True when it took effect.

    By default glibc maps every block over 32 MiB straight from the kernel and unmaps it on free, and gives
    the top of the heap back once it exceeds its trim threshold. A CPU training step frees its gradients and
    activations and allocates them again in the next step, so each step faults fresh zeroed pages in; with
    the blocks kept, later steps reuse them, at the same peak memory. This is what a preloaded jemalloc or
    tcmalloc would give, without asking the user to preload one. A no-op (False) where the C library is not
    glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _KEEP_BLOCKS_UP_TO) and mallopt(_M_TRIM_THRESHOLD, _KEEP_BLOCKS_UP_TO)
    )

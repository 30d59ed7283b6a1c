"""Runs on disk: `output_dir` holds the final Hugging Face checkpoint, `run.json` (resolved config, lineage,
summary; written last, so its presence means the run finished), `metrics.jsonl`, plots, and resumable
checkpoints under `checkpoints/step-N/`. Every file and checkpoint is written to a temporary name first and
renamed into place, so a killed run never leaves a half-written file where a reader would take it as whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from chatrlhf.errors import UserError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
# test hook (tests/test_crash_safety.py): set to a step number, the process kills itself with SIGKILL while
# that step's checkpoint is half written. Unset, as in any real run, it changes nothing.
DIE_IN_CHECKPOINT = "CHATRLHF_TEST_DIE_IN_CHECKPOINT"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_jsonl(path: Path, records) -> None:
    """One JSON object per line (UTF-8 kept as is), written whole or not at all."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_lineage(*sources: str) -> dict[str, str]:
    """sha256 of each local data file (hub names are recorded as given)."""
    return {s: (sha256_file(s) if Path(s).is_file() else "hub") for s in sources if s}


class RunDir:
    """One stage's output folder."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir)
        self.checkpoints = self.path / "checkpoints"

    @property
    def finished(self) -> bool:
        return (self.path / RUN_FILE).is_file()

    def check_writable(self, resume: bool, overwrite: bool) -> None:
        """Refuse to mix a new run into a folder that holds another one (called before any writing)."""
        if not self.path.exists() or not any(self.path.iterdir()):
            return
        if overwrite:
            return
        if resume:
            if self.finished:
                raise UserError(
                    f"{self.path}: this run already finished; nothing to resume (set overwrite: true to redo it)"
                )
            return
        raise UserError(
            f"{self.path}: output_dir already holds a run; set resume: true to continue it "
            f"or overwrite: true to replace it"
        )

    def start(self, overwrite: bool) -> None:
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    # ---- resumable checkpoints

    def latest_checkpoint(self) -> Path | None:
        done = [p for p in self.checkpoints.glob("step-*") if (p / "trainer_state.pt").is_file()]
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)

    def save_checkpoint(self, step: int, write, keep: int) -> Path:
        """`write(folder)` fills a fresh folder that is then renamed to checkpoints/step-N."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"step-{step}"
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=f".step-{step}."))
        os.chmod(tmp, 0o755)
        write(tmp)
        if os.environ.get(DIE_IN_CHECKPOINT) == str(step):
            _die_half_written(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted(
            (p for p in self.checkpoints.glob("step-*") if p.is_dir()),
            key=lambda p: int(p.name.split("-")[1]),
        )
        for old in kept[: max(0, len(kept) - max(keep, 1))]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.checkpoints.glob(".step-*"):  # left by a run killed while writing a checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        return final

    # ---- the final checkpoint

    def export(self, write, run_info: dict[str, Any]) -> None:
        """Write the final model with `write(folder)`, move its files into output_dir, then run.json."""
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=".export."))
        write(tmp)
        for item in tmp.iterdir():
            target = self.path / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        tmp.rmdir()
        atomic_write_text(
            self.path / RUN_FILE, json.dumps(run_info, indent=2, sort_keys=True, default=str) + "\n"
        )


def _die_half_written(folder: Path) -> None:
    """The `DIE_IN_CHECKPOINT` hook: cut the checkpoint's largest file to half its length, as a kill in the
    middle of writing it leaves it, then SIGKILL this process."""
    biggest = max(folder.iterdir(), key=lambda p: p.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl; optional TensorBoard / W&B sinks."""

    def __init__(self, run: RunDir, report_to: list[str], resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = run.path / METRICS_FILE
        self.sinks: list[Any] = []
        if not enabled:
            return
        if resume_step:
            # drop what was logged after the checkpoint we resume from: the curve continues from there
            keep_rows_upto(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        for sink in report_to:
            if sink == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.sinks.append(SummaryWriter(log_dir=str(run.path / "tensorboard")))
            elif sink == "wandb":
                import wandb

                self.sinks.append(wandb.init(project="chatrlhf", name=str(run.path), resume="allow"))
            else:
                raise UserError(f"report_to: unknown sink {sink!r} (tensorboard or wandb)")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            if hasattr(sink, "add_scalar"):
                for key, value in metrics.items():
                    sink.add_scalar(key, value, step)
            else:
                sink.log(metrics, step=step)

    def close(self) -> None:
        for sink in self.sinks:
            (sink.close if hasattr(sink, "close") else sink.finish)()


def keep_rows_upto(path: Path, step: int) -> None:
    """Drop the rows of a per-step JSONL log (`{"step": N, ...}`) that come after `step`: a run resumed from
    checkpoint `step` logs them again."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(run: RunDir, keys: list[str], filename: str, title: str) -> Path | None:
    """One PNG with a panel per metric key (those that were logged), against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run.path)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, run.path / filename)


def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure as a PNG, written whole or not at all; the figure is closed."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class PipelineRun:
    """Where each stage of a pipeline run writes, spelled once for the pipeline and its report:

    pipeline.json  pipeline_config.json  labels.db  report.md
    sft/  iter{N}/rankings.jsonl  iter{N}/rm/  iter{N}/ppo/ (or iter{N}/dpo/)  eval/
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.state = self.root / "pipeline.json"  # which stages are done, with their figures
        self.config = self.root / "pipeline_config.json"
        self.db = self.root / "labels.db"
        self.sft = self.root / "sft"
        self.eval = self.root / "eval"
        self.report = self.root / "report.md"

    def iteration(self, it: int) -> Path:
        return self.root / f"iter{it}"

    def rankings(self, it: int) -> Path:
        return self.iteration(it) / "rankings.jsonl"

    def rm(self, it: int) -> Path:
        return self.iteration(it) / "rm"

    def ppo(self, it: int) -> Path:
        return self.iteration(it) / "ppo"

    def dpo(self, it: int) -> Path:
        return self.iteration(it) / "dpo"

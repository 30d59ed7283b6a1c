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

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also when loaded by path
import common  # noqa: E402

MODEL_DIR = common.MODEL_DIR
SFT_DATA_SHA256 = "392f139093cded7527856929adbe674c792e419525bce60f8204d5012683b00c"  # WORKLOAD.md, sft.jsonl
NOTES = [
    "train_wall_s: chatrlhf = sum of timing/step over the optimizer steps (excludes model loading and the final "
    "checkpoint write); TRL = trainer.train() wall (excludes setup, includes its per-step logging, entropy and "
    "token-accuracy metrics)",
    "loss tokens: chatrlhf trains on each assistant turn up to and including <|im_end|>, TRL also on the newline after it",
    "peak_rss_mib = ru_maxrss of the framework's own process",
]


# --------------------------------------------------------------------------------------------------
# parent: run each framework in its own process


def run_trl(shared: Path, threads: int) -> dict:
    raw = common.run_json_child(
        [
            str(common.TRL_VENV.python()),
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
    flags = ["--child", "--dtype", dtype, "--threads", str(threads), "--micro-batch", str(micro_batch)]
    return common.run_json_child(common.child_cmd(__file__, *flags))


def aggregate(runs: list[dict]) -> dict | None:
    keys = ("train_tokens_per_s", "loss_tokens_per_s", "train_wall_s", "peak_rss_mib")
    agg = common.aggregate(runs, keys, 1, listed=("train_tokens_per_s",))
    if agg:
        agg["loss_last"] = [r["loss_last"] for r in runs]
    return agg


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
            "train_tokens_per_s": common.ratio(chat, trl, "train_tokens_per_s_median"),
            "peak_rss_mib": common.ratio(chat, trl, "peak_rss_mib_median"),
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
    common.print_rows(rows, 14, 14)


def parent_main(args) -> None:
    shared = common.shared_bench_dir()
    if not args.skip_trl:
        common.TRL_VENV.ensure()
    common.ensure_model(shared, common.prepare_python())
    run = {
        "trl": lambda: run_trl(shared, args.threads),
        "chatrlhf": lambda: run_chatrlhf(args.dtype, args.threads, args.micro_batch),
    }
    common.run_comparison(args, run, summarize, print_table)


# --------------------------------------------------------------------------------------------------
# child: chatrlhf's SFT on the anchor's rows, in this fresh process


def count_tokens(rows: list[dict], batch_size: int) -> dict:
    """Non-pad tokens of the rendered conversations (default system turn included) and padded batch widths."""
    from chatrlhf.chat_template import render
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
    from chatrlhf.configs import DemoData, SFTConfig

    w = anchor.SFT
    if w["batch_size"] % micro_batch:
        raise SystemExit(f"--micro-batch must divide the batch size {w['batch_size']}")
    return SFTConfig(
        model=str(MODEL_DIR),
        data=DemoData(train=str(data), max_length=w["max_length"], shuffle=False),
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


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from chatrlhf.sft import train

    anchor = common.load_anchor(common.shared_bench_dir())
    rows = anchor.make_sft_data()
    with tempfile.TemporaryDirectory(prefix="chatrlhf-bench-sft-") as tmp:
        data = Path(tmp) / "sft.jsonl"
        sha = common.write_rows(rows, data)
        cfg = sft_config(anchor, data, Path(tmp) / "run", args.dtype, args.micro_batch)
        _, seen, call_s = common.run_training(train, cfg)
    peak_rss = common.peak_rss_mib()
    counts = count_tokens(rows, anchor.SFT["batch_size"])
    times = [m["timing/step"] for _, m in seen]
    wall = sum(times)
    loss_tokens = int(sum(m["train/tokens"] for _, m in seen))
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
        **common.step_stats(times),
        "peak_rss_mib": peak_rss,
        "loss_first": seen[0][1]["train/loss"],
        "loss_last": seen[-1][1]["train/loss"],
        "steps": len(seen),
        "tokens_nonpad": counts["tokens_nonpad"],
        "tokens_loss": loss_tokens,
        "tokens_padded_slots": counts["tokens_padded_slots"],
        "batch_padded_lens": counts["batch_padded_lens"],
        **common.loop_timing(seen, times, call_s),
        "data_sha256_ok": sha == SFT_DATA_SHA256,
        "versions": common.versions(common.CHATRLHF_PACKAGES),
    }
    print(json.dumps(record), flush=True)


def parse_args(argv=None):
    ap = common.comparison_parser(__doc__)
    ap.add_argument(
        "--micro-batch", type=int, default=4, help="chatrlhf rows per forward pass; the step still has 8 rows"
    )
    return common.parse_comparison(ap, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()

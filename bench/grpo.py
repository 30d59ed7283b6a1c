"""GRPO and RLOO benchmark: chatrlhf's PPO loop with `advantage_estimator: grpo | rloo` against Hugging Face
TRL's GRPOTrainer and RLOOTrainer, on the same workload, in one run.

The workload is section 4.4 of the shared TRL anchor (`../shared/bench/`, the RLOO fallback): SmolLM2-135M in
fp32 as policy, a frozen reference, and a reward model of the same weights with a fresh one-label scalar head
(meaningless rewards, real compute); the anchor's 16 prompts, 4 optimizer steps of 4 prompts x k = 2
completions, exactly 32 new tokens each (temperature 0.7), one pass over each batch, LR 1e-6 with linear
decay and no warm-up, KL coefficient 0.05 to the reference, every weight training, 2 torch threads. Each
framework trains in its own process:

* TRL 1.16 (`.venv-trl`): `GRPOTrainer` or `RLOOTrainer` with the anchor's common settings (gradient
  checkpointing off, fp32, or `bf16=True` with `--dtype bf16`), `beta` 0.05 for both (GRPOTrainer's
  default 0 would skip its reference model);
* chatrlhf: `chatrlhf.ppo.train` with the same settings and the estimator named by `--trainer`.

    .venv/bin/python bench/grpo.py                       # GRPO: TRL, then chatrlhf
    .venv/bin/python bench/grpo.py --trainer rloo --out bench/out/rloo.jsonl
    .venv/bin/python bench/grpo.py --dtype bf16          # both sides in bf16 (TRL mixed precision)

completions/s = 32 completions / training wall time (TRL: `trainer.train()`; chatrlhf: the sum of its steps).
stdout gets one JSON line per framework run, a summary JSON line and a short table; logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also when loaded by path
import common  # noqa: E402

MODEL_DIR = common.MODEL_DIR
GOAL_RATIO = 3.0  # the target: >= 3x TRL's completions/s at no more peak memory


def parent_main(args) -> None:
    shared = common.shared_bench_dir()
    if not args.skip_trl:
        common.TRL_VENV.ensure()
    common.ensure_model(shared, common.prepare_python())
    flags = ["--trainer", args.trainer, "--threads", str(args.threads), "--dtype", args.dtype]
    run = {
        "trl": lambda: common.run_json_child(
            common.child_cmd(__file__, "--trl-child", *flags, python=common.TRL_VENV.python())
        ),
        "chatrlhf": lambda: common.run_json_child(common.child_cmd(__file__, "--child", *flags)),
    }
    common.run_comparison(args, run, summarize, print_table)


def summarize(results: dict[str, list[dict]], args) -> dict:
    keys = ("completions_per_s", "train_wall_s", "peak_rss_mib")
    chat = common.aggregate(results["chatrlhf"], keys, 3, listed=("completions_per_s",))
    trl = common.aggregate(results["trl"], keys, 3, listed=("completions_per_s",))
    ratio = common.ratio(chat, trl, "completions_per_s_median")
    goal = None
    if ratio is not None:
        memory_ok = chat["peak_rss_mib_max"] <= trl["peak_rss_mib_max"]
        goal = {"ratio_min": GOAL_RATIO, "met": ratio >= GOAL_RATIO and memory_ok, "peak_rss_ok": memory_ok}
    return {
        "bench": "grpo",
        "summary": True,
        "trainer": args.trainer,
        "repeat": args.repeat,
        "chatrlhf_dtype": args.dtype,
        "trl": trl,
        "chatrlhf": chat,
        "ratio_chatrlhf_over_trl": {
            "completions_per_s": ratio,
            "peak_rss_mib": common.ratio(chat, trl, "peak_rss_mib_median"),
        },
        "goal": goal,
    }


def print_table(summary: dict) -> None:
    rows = [("framework", "completions/s", "train s", "peak RSS MiB")]
    for name in ("trl", "chatrlhf"):
        if agg := summary[name]:
            rows.append(
                (
                    name,
                    f"{agg['completions_per_s_median']:.3f}",
                    f"{agg['train_wall_s_median']:.1f}",
                    f"{agg['peak_rss_mib_median']:.0f}",
                )
            )
    r = summary["ratio_chatrlhf_over_trl"]
    if r["completions_per_s"] is not None:
        rows.append(("chatrlhf/TRL", f"{r['completions_per_s']:.2f}x", "", f"{r['peak_rss_mib']:.2f}x"))
    print(
        f"\n{summary['trainer'].upper()}, 32 completions of 32 tokens (4 steps of 4 prompts x 2), both in "
        f"{summary['chatrlhf_dtype']}, medians of {summary['repeat']} run(s):"
    )
    common.print_rows(rows, 14, 16)
    common.print_goal(summary["goal"], ">= {ratio_min:.0f}x TRL's completions/s, peak RSS <= TRL's")


# --------------------------------------------------------------------------------------------------
# TRL child (.venv-trl's interpreter)


def trl_child_main(args) -> None:
    anchor = common.load_anchor(common.shared_bench_dir())
    anchor.setup_torch(args.threads)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    w = anchor.RLOO
    config_class, trainer_class = (
        (GRPOConfig, GRPOTrainer) if args.trainer == "grpo" else (RLOOConfig, RLOOTrainer)
    )
    tok = anchor.load_tokenizer(str(MODEL_DIR))
    tok.padding_side = "left"
    policy = anchor.load_causal_lm(str(MODEL_DIR))
    reward = anchor.load_scalar_head(str(MODEL_DIR), anchor.SEED + 10)
    rows = anchor.make_prompt_data()
    dataset = Dataset.from_list([{"prompt": anchor.as_messages(r["prompt"])} for r in rows])
    completions = w["num_updates"] * w["completions_per_update"]
    step_ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_class(
            **anchor.common_args(
                tmp,
                per_device_train_batch_size=w["completions_per_update"],
                num_generations=w["num_generations"],
                max_completion_length=w["max_completion_length"],
                generation_kwargs={"min_new_tokens": w["max_completion_length"]},
                max_steps=w["num_updates"],
                num_iterations=w["num_iterations"],
                learning_rate=w["learning_rate"],
                temperature=w["temperature"],
                top_k=w["top_k"],
                top_p=w["top_p"],
                beta=w["beta"],
                shuffle_dataset=False,
                log_completions=False,
                bf16=args.dtype == "bf16",  # mixed precision, as chatrlhf's bf16 runs
            )
        )
        trainer = trainer_class(
            model=policy,
            reward_funcs=reward,
            args=cfg,
            train_dataset=dataset,
            processing_class=tok,
            reward_processing_classes=tok,
            callbacks=[StepEnds()],
        )
        began = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train()
        wall = time.perf_counter() - began
    record = {
        "bench": "grpo",
        "framework": "trl",
        "trainer": f"{trainer_class.__module__}.{trainer_class.__name__}",
        "dtype": args.dtype,
        "steps": trainer.state.global_step,
        "completions": completions,
        "completions_per_s": round(completions / wall, 3),
        "train_wall_s": round(wall, 2),
        **common.step_stats([b - a for a, b in zip(step_ends, step_ends[1:])]),
        "peak_rss_mib": common.peak_rss_mib(),
        "versions": common.versions(("trl", "transformers", "torch")),
    }
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------------
# chatrlhf child


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from chatrlhf.configs import PPOConfig, PromptData, SamplingConfig
    from chatrlhf.ppo import train

    anchor = common.load_anchor(common.shared_bench_dir())
    w = anchor.RLOO
    prompts_per_step = w["completions_per_update"] // w["num_generations"]
    with tempfile.TemporaryDirectory(prefix="chatrlhf-bench-grpo-") as tmp:
        data = Path(tmp) / "prompts.jsonl"
        common.write_rows(anchor.make_prompt_data(), data)
        length = w["max_completion_length"]
        cfg = PPOConfig(
            model=str(MODEL_DIR),
            reward_model=str(MODEL_DIR),  # a causal-LM folder loads as a one-label scorer with a fresh head
            data=PromptData(train=str(data), shuffle=False),
            output_dir=str(Path(tmp) / "run"),
            max_steps=w["num_updates"],
            batch_size=prompts_per_step,
            samples_per_prompt=w["num_generations"],
            advantage_estimator=args.trainer,
            lr=w["learning_rate"],
            lr_scheduler="linear",
            kl_coef=w["beta"],
            ppo_epochs=w["num_iterations"],
            minibatches=1,
            sampling=SamplingConfig(
                max_new_tokens=length, min_new_tokens=length, temperature=w["temperature"], top_k=w["top_k"]
            ),
            max_grad_norm=1.0,  # TrainingArguments' default, which the anchor keeps
            dtype=args.dtype,
            save_every=0,
            sample_every=0,
        )
        _, seen, call_s = common.run_training(train, cfg)
        peak_rss = common.peak_rss_mib()
    times = [m["timing/step"] for _, m in seen]
    completions = len(times) * prompts_per_step * w["num_generations"]
    record = {
        "bench": "grpo",
        "framework": "chatrlhf",
        "trainer": f"chatrlhf.ppo.train (advantage_estimator {args.trainer})",
        "dtype": args.dtype,
        "steps": len(times),
        "completions": completions,
        "completions_per_s": round(completions / sum(times), 3),
        "train_wall_s": round(sum(times), 2),
        **common.step_stats(times),
        "peak_rss_mib": peak_rss,
        **common.loop_timing(seen, times, call_s),
        "versions": common.versions(common.CHATRLHF_PACKAGES),
    }
    print(json.dumps(record), flush=True)


def main(argv=None) -> None:
    ap = common.comparison_parser(__doc__)
    ap.add_argument("--trainer", choices=("grpo", "rloo"), default="grpo")
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    args = common.parse_comparison(ap, argv)
    if args.trl_child:
        trl_child_main(args)
    elif args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()

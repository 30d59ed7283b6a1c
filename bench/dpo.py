"""DPO benchmark: chatrlhf's `dpo` against Hugging Face TRL's DPOTrainer, on the same preferences, in one run.

The data are the reward benchmark's (`bench/reward.py`, section 4.2 of the shared TRL anchor): SmolLM2-135M in
fp32, 20 prompts x K=4 ranked answers = 120 pairs, one epoch, LR 1e-5 with linear decay and no warm-up, beta
0.1, sigmoid loss, max length 256, CPU with 2 torch threads. Each framework trains in a fresh process:

* TRL: `trl.DPOTrainer` (its defaults otherwise: a frozen copy of the model as the reference, forwarded every
  step) on the 120 pairs as conversational prompt/chosen/rejected rows, 8 pairs a step (15 steps);
* chatrlhf: `chatrlhf.dpo.train` on the 20 rankings, `--prompts-per-step` prompts a step (default 1: its 4
  answers forwarded once, 6 pairs, 20 steps), the reference's log-probs computed once before training; with
  `--listwise plackett_luce` or `lipo` its listwise forms on the same rankings.

Both trained policies are then scored by one scoring process (this project's code, fp32, the same tokenization
for both): an answer's implicit reward is beta * (log pi(y|x) - log pi_ref(y|x)) with the starting model as
pi_ref, and a held-out pair is right when the better answer's reward is higher, on the reward benchmark's 48
held-out prompts (288 pairs on 12 topics not trained on).

    .venv/bin/python bench/dpo.py                          # TRL, then chatrlhf
    .venv/bin/python bench/dpo.py --seeds 1234,1,2,3 --out bench/out/dpo.jsonl
    .venv/bin/python bench/dpo.py --skip-trl --listwise plackett_luce

stdout gets one JSON line per framework run, a summary JSON line and a short table; logs go to stderr.
pairs/s = 120 / training wall time: TRL's `trainer.train()`; chatrlhf's from the call of `train` to its last
step, so loading the model, tokenizing and computing the reference log-probs count against it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also when loaded by path
import common  # noqa: E402

reward_bench = common.load_module("reward_bench", Path(__file__).resolve().parent / "reward.py")
MODEL_DIR = common.MODEL_DIR
BETA = 0.1
GOAL_PAIRS_RATIO = 3.0  # the target: >= 3x TRL's pairs/s at no more peak memory, accuracy >= TRL's


# --------------------------------------------------------------------------------------------------
# parent


def parent_main(args) -> None:
    shared = common.shared_bench_dir()
    if not args.skip_trl:
        common.TRL_VENV.ensure()
    common.ensure_model(shared, common.prepare_python())
    args.seeds = args.seeds or [common.load_anchor(shared).SEED]
    models = Path(tempfile.mkdtemp(prefix="chatrlhf-bench-dpo-"))
    counts = {"trl": 0, "chatrlhf": 0}

    def launch(name: str) -> dict:
        seed = args.seeds[counts[name] // args.repeat]
        folder = models / f"{name}-{counts[name]}"
        counts[name] += 1
        flags = ["--threads", str(args.threads), "--seed", str(seed), "--model-out", str(folder)]
        if name == "trl":
            cmd = common.child_cmd(__file__, "--trl-child", *flags, python=common.TRL_VENV.python())
        else:
            flags += ["--dtype", args.dtype, "--prompts-per-step", str(args.prompts_per_step)]
            cmd = common.child_cmd(__file__, "--child", *flags, "--listwise", args.listwise)
        record = common.run_json_child(cmd)
        scored = common.run_json_child(
            common.child_cmd(__file__, "--score-child", "--model-out", str(folder))
        )
        return {**record, **scored}

    args.repeat_per_seed = args.repeat
    args.repeat = args.repeat * len(args.seeds)
    run = {"trl": lambda: launch("trl"), "chatrlhf": lambda: launch("chatrlhf")}
    common.run_comparison(args, run, summarize, print_table)


def aggregate(runs: list[dict]) -> dict | None:
    keys = ("pairs_per_s", "train_wall_s", "peak_rss_mib", "wide_accuracy")
    agg = common.aggregate(runs, keys, 4, listed=("pairs_per_s", "wide_accuracy", "wide_margin", "seed"))
    if agg:
        agg["wide_accuracy_mean"] = round(statistics.mean(r["wide_accuracy"] for r in runs), 4)
        agg["steps"] = runs[0]["steps"]
    return agg


def summarize(results: dict[str, list[dict]], args) -> dict:
    chat, trl = aggregate(results["chatrlhf"]), aggregate(results["trl"])
    pairs_ratio = common.ratio(chat, trl, "pairs_per_s_median")
    goal = None
    if pairs_ratio is not None:
        memory_ok = chat["peak_rss_mib_max"] <= trl["peak_rss_mib_max"]
        accuracy_ok = chat["wide_accuracy_mean"] >= trl["wide_accuracy_mean"]
        goal = {
            "pairs_per_s_ratio_min": GOAL_PAIRS_RATIO,
            "pairs_per_s_ok": pairs_ratio >= GOAL_PAIRS_RATIO,
            "peak_rss_ok": memory_ok,
            "heldout_accuracy_ok": accuracy_ok,
            "met": pairs_ratio >= GOAL_PAIRS_RATIO and memory_ok and accuracy_ok,
        }
    return {
        "bench": "dpo",
        "summary": True,
        "seeds": args.seeds,
        "runs_per_seed": args.repeat_per_seed,
        "chatrlhf_dtype": args.dtype,
        "chatrlhf_prompts_per_step": args.prompts_per_step,
        "chatrlhf_listwise": args.listwise,
        "torch_threads": args.threads,
        "trl": trl,
        "chatrlhf": chat,
        "ratio_chatrlhf_over_trl": {
            "pairs_per_s": pairs_ratio,
            "peak_rss_mib": common.ratio(chat, trl, "peak_rss_mib_median"),
        },
        "goal": goal,
    }


def print_table(summary: dict) -> None:
    rows = [("framework", "steps", "pairs/s", "train s", "peak RSS MiB", "held-out acc")]
    for name in ("trl", "chatrlhf"):
        if agg := summary[name]:
            rows.append(
                (
                    name,
                    str(agg["steps"]),
                    f"{agg['pairs_per_s_median']:.3f}",
                    f"{agg['train_wall_s_median']:.1f}",
                    f"{agg['peak_rss_mib_median']:.0f}",
                    f"{agg['wide_accuracy_mean']:.4f}",
                )
            )
    r = summary["ratio_chatrlhf_over_trl"]
    if r["pairs_per_s"] is not None:
        rows.append(("chatrlhf/TRL", "", f"{r['pairs_per_s']:.2f}x", "", f"{r['peak_rss_mib']:.2f}x", ""))
    print(
        f"\nDPO, 120 pairs, seeds {summary['seeds']}: speed and RSS medians, held-out implicit-reward accuracy "
        f"mean over 288 pairs of 48 unseen prompts (chatrlhf dtype {summary['chatrlhf_dtype']}, "
        f"{summary['chatrlhf_prompts_per_step']} prompt(s) a step, listwise {summary['chatrlhf_listwise']}):"
    )
    common.print_rows(rows, 14, 14)
    target = ">= {pairs_per_s_ratio_min:.0f}x TRL's pairs/s, peak RSS <= TRL's, held-out accuracy >= TRL's"
    common.print_goal(summary["goal"], target)


# --------------------------------------------------------------------------------------------------
# TRL child (run by .venv-trl's interpreter): DPOTrainer on the 120 pairs; the trained model is saved


def trl_child_main(args) -> None:
    import random

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    anchor = common.load_anchor(common.shared_bench_dir())
    w, seed = anchor.RM, args.seed
    data = reward_bench.rm_data(anchor)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    rows = [
        {
            "prompt": [{"role": "user", "content": p["prompt"]}],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in data["pairs"]
    ]
    step_ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="chatrlhf-bench-dpo-trl-") as tmp:
        cfg = DPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=w["batch_size_pairs"],
            gradient_accumulation_steps=1,
            num_train_epochs=w["epochs"],
            learning_rate=w["learning_rate"],
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=BETA,
            max_length=w["max_length"],
            train_sampling_strategy="sequential",  # pairs in file order, as chatrlhf takes the rankings
            gradient_checkpointing=False,  # DPOConfig turns it on by default; chatrlhf runs without
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
        )
        trainer = DPOTrainer(
            model=model,
            args=cfg,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[StepEnds()],
        )
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result line
            trainer.train()
        wall = time.perf_counter() - t0
        peak_rss = common.peak_rss_mib()
        trainer.model.save_pretrained(args.model_out)
        tokenizer.save_pretrained(args.model_out)
    times = [b - a for a, b in zip(step_ends, step_ends[1:])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record = {
        "bench": "dpo",
        "seed": seed,
        "framework": "trl",
        "trainer": f"{DPOTrainer.__module__}.{DPOTrainer.__name__}",
        "dtype": "fp32",
        "pairs": len(rows),
        "steps": trainer.state.global_step,
        "pairs_per_step": w["batch_size_pairs"],
        "pairs_per_s": round(len(rows) / wall, 3),
        "train_wall_s": round(wall, 2),
        **common.step_stats(times),
        "peak_rss_mib": peak_rss,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "data_sha256_ok": data["data_sha256_ok"],
        "versions": common.versions(("trl", "transformers", "torch", "accelerate", "datasets")),
    }
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------------
# chatrlhf child: chatrlhf.dpo.train on the 20 rankings; the trained model is saved


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from chatrlhf.configs import DPOConfig, RankingData
    from chatrlhf.dpo import train

    anchor = common.load_anchor(common.shared_bench_dir())
    w = anchor.RM
    data = reward_bench.rm_data(anchor)
    with tempfile.TemporaryDirectory(prefix="chatrlhf-bench-dpo-") as tmp:
        train_file = Path(tmp) / "train.jsonl"
        reward_bench.write_rankings(data["train"], train_file)
        cfg = DPOConfig(
            model=str(MODEL_DIR),
            data=RankingData(train=str(train_file), max_length=w["max_length"], shuffle=False),
            output_dir=args.model_out,
            epochs=w["epochs"],
            batch_size=args.prompts_per_step,
            lr=w["learning_rate"],
            warmup_ratio=0.0,
            lr_scheduler="linear",
            beta=BETA,
            listwise=args.listwise,
            eval_fraction=0.0,
            seed=args.seed,
            dtype=args.dtype,
            save_every=0,
            overwrite=True,
        )
        began = time.perf_counter()
        _, seen, call_s = common.run_training(train, cfg)
        peak_rss = common.peak_rss_mib()
    times = [m["timing/step"] for _, m in seen]
    # the reference log-probs are computed between the call's start and the first step: counted as training
    wall = seen[-1][0] - began
    n_pairs = int(sum(m["train/pairs"] for _, m in seen))
    record = {
        "bench": "dpo",
        "seed": args.seed,
        "framework": "chatrlhf",
        "trainer": "chatrlhf.dpo.train",
        "listwise": args.listwise,
        "dtype": args.dtype,
        "pairs": n_pairs,
        "steps": len(seen),
        "prompts_per_step": args.prompts_per_step,
        "pairs_per_s": round(n_pairs / wall, 3),
        "train_wall_s": round(wall, 2),
        "steps_wall_s": round(sum(times), 2),
        **common.step_stats(times),
        "peak_rss_mib": peak_rss,
        "loss_first": seen[0][1]["dpo/loss"],
        "loss_last": seen[-1][1]["dpo/loss"],
        "train_call_s": round(call_s, 2),
        "data_sha256_ok": data["data_sha256_ok"],
        "versions": common.versions(common.CHATRLHF_PACKAGES),
    }
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------------
# scoring child: one code path for both frameworks' policies


def score_child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from chatrlhf.chat_template import answer_ids
    from chatrlhf.forward import shared_prompt_logprobs
    from chatrlhf.models import load_causal_lm, load_tokenizer

    data = reward_bench.rm_data(common.load_anchor(common.shared_bench_dir()))
    tokenizer = load_tokenizer(str(MODEL_DIR))
    items = []
    for r in data["wide"]:
        spans = [answer_ids(tokenizer, [{"role": "user", "content": r["prompt"]}], a) for a in r["responses"]]
        items.append(([s for s, _ in spans], min(i for _, i in spans)))

    def logprobs(path: str) -> list[list[float]]:
        model = load_causal_lm(path, tokenizer, "cpu").eval()
        with torch.no_grad():
            return [shared_prompt_logprobs(model, seqs, start, "cpu").tolist() for seqs, start in items]

    reference, policy = logprobs(str(MODEL_DIR)), logprobs(args.model_out)
    scores = [[BETA * (p - q) for p, q in zip(ps, qs)] for ps, qs in zip(policy, reference)]
    wide = reward_bench.pairwise(scores, "wide")  # answers listed best first
    print(json.dumps({k: v for k, v in wide.items() if k != "wide_accuracy_by_rank_pair"}), flush=True)


def parse_args(argv=None):
    ap = common.comparison_parser(__doc__)
    ap.add_argument("--prompts-per-step", type=int, default=1, help="chatrlhf prompts per step (default 1)")
    ap.add_argument("--listwise", choices=("off", "plackett_luce", "lipo"), default="off")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default: the anchor's 1234)")
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--score-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1234, help=argparse.SUPPRESS)
    ap.add_argument("--model-out", help=argparse.SUPPRESS)
    args = common.parse_comparison(ap, argv)
    try:
        args.seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else []
    except ValueError:
        ap.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.trl_child:
        trl_child_main(args)
    elif args.score_child:
        score_child_main(args)
    elif args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()

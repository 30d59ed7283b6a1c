"""Reward-model benchmark: chatrlhf against Hugging Face TRL's RewardTrainer, on the same rankings, in one run.

The workload is section 4.2 of the shared TRL anchor in `<repo>/../shared/bench/` (WORKLOAD.md and
trl_baseline.py; point CHATRLHF_SHARED_BENCH at another folder to override): SmolLM2-135M in fp32 with a
one-label scalar head, 20 prompts x K=4 ranked answers (index = rank, r0 best) = 120 pairs, one epoch,
LR 1e-5 with linear decay and no warmup, max length 256, CPU with 2 torch threads. Both frameworks are then
scored on the same held-out rankings: prompts 21-32 of the anchor's 32-prompt stream (`make_rm_data(32)`,
whose first 20 prompts are the training data; 12 prompts, 72 pairs, topics not seen in training), and a wider
set of 48 prompts (288 pairs) on the same 12 unseen topics: those 12 prompts and three more draws of each
topic from the anchor's stream (prompts p < 128 with p mod 32 >= 20 of `make_rm_data(128)`).

Each framework trains in a fresh process, so peak RSS is per framework:

* TRL: this script's hidden `--trl-child` mode run by the interpreter of `.venv-trl` (created here when
  missing): `trl.RewardTrainer` on the 120 pairs as conversational chosen/rejected columns, batch 8 pairs
  (15 optimizer steps), then the trained model scores every held-out answer;
* chatrlhf: this script's hidden `--child` mode in the project venv, calling `chatrlhf.reward.train` on the
  20 rankings written as `{"prompt", "responses", "ranks"}` JSONL with the held-out rankings as data.eval.
  One optimizer step takes `--prompts-per-step` prompts (default 1) with all 6 pairs of each, InstructGPT's
  batching: each answer is forwarded once per step instead of once per pair (20 steps at the default).

The fp32 model folder both use is `bench/models/smollm2-135m` (git-ignored), made once by
`trl_baseline.py prepare`. Run from the repository root:

    .venv/bin/python bench/reward.py                       # TRL, then chatrlhf
    .venv/bin/python bench/reward.py --repeat 2 --out bench/out/reward.jsonl
    .venv/bin/python bench/reward.py --skip-trl --prompts-per-step 2
    .venv/bin/python bench/reward.py --seeds 1234,1,2,3          # each framework once per seed

Held-out accuracy on 72 pairs moves by a pair or two with the seed (the new head's draw), in both frameworks, so
`--seeds` runs each framework once per seed, and the goal compares mean accuracies over the same seeds on the
wide set, where one pair is 0.35% rather than 1.4%.

stdout gets one JSON line per framework run, a summary JSON line and a short table; logs go to stderr.
pairs/s = 120 / training wall time. A full run takes about 6-8 minutes on a 2-core host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also when loaded by path
import common  # noqa: E402

MODEL_DIR = common.MODEL_DIR
# WORKLOAD.md: rm_rankings.jsonl and rm_pairs.jsonl as `trl_baseline.py dump-data` writes them
RANKINGS_SHA256 = "f44905d9aae72fa88c2c5a1e851e0ed2abd07a944ef46936c9168373d3ed5c70"
PAIRS_SHA256 = "78bcba7fe3d1fe44232a73502bcc6063a9896f8a86cfab55db6285d7b54756cf"
N_TRAIN_PROMPTS = 20
N_ALL_PROMPTS = 32  # the anchor's first RM definition; prompts 21-32 are the held-out set
N_TOPICS = 32  # the anchor's topics: prompt p of the stream is about topic p mod 32 (in a seeded order)
N_WIDE_STREAM = 128  # the wide held-out set: prompts p < 128 whose topic is one of the 12 held-out ones
GOAL_PAIRS_RATIO = 5.0  # the target: >= 5x TRL's pairs/s at a held-out accuracy >= TRL's
NOTES = [
    "train_wall_s: chatrlhf = sum of timing/step over the optimizer steps (excludes model loading, the final "
    "held-out evaluation and the model export); TRL = trainer.train() wall (excludes setup, includes its "
    "per-step logging of reward min/mean/max, accuracy and margin)",
    "batching differs by design: TRL forwards both sequences of every pair (240 sequence forwards, 8 pairs = "
    "16 sequences per step, 15 optimizer steps); chatrlhf forwards each of a prompt's 4 answers once and "
    "takes all 6 pairs from them (80 sequence forwards; --prompts-per-step prompts per step, so 20 optimizer "
    "steps at the default 1). pairs/s counts the same 120 pairs for both",
    "train_tokens_per_s = non-pad tokens of the 240 pair sequences (WORKLOAD 4.2) / train wall, each in the "
    "framework's own tokenization (TRL's sequences end with the newline after <|im_end|>, chatrlhf's at "
    "<|im_end|>, one token shorter); forwarded_tokens_per_s counts the tokens actually forwarded",
    "held-out: prompts 21-32 of make_rm_data(n_prompts=32) (the 20 training prompts are its prefix), 12 "
    "prompts x 6 pairs = 72 pairs; each answer scored once, a pair is right when r_better > r_worse "
    "(ties count wrong); heldout_loss = mean -log sigmoid(r_better - r_worse)",
    "wide_*: the same metrics on 48 held-out prompts (288 pairs), every prompt p < 128 of "
    "make_rm_data(n_prompts=128) about one of the 12 held-out topics (p mod 32 >= 20); its first 12 are the "
    "held-out set above. The goal compares the mean wide accuracy",
    "scalar head init: TRL/transformers N(0, 0.02) after torch.manual_seed(seed); chatrlhf N(0, 1/sqrt(d+1)) "
    "after set_seed(seed); seed = the anchor's 1234 unless --seeds names others. Optimizer: TRL torch AdamW "
    "(for-each, as the anchor), chatrlhf fused AdamW",
    "peak_rss_mib = ru_maxrss of the framework's own process, read right after training (before the "
    "held-out scoring)",
]


# --------------------------------------------------------------------------------------------------
# data (standard library only: both children use it)


def rm_data(anchor) -> dict:
    """The 20 training rankings and their 120 pairs (checked against WORKLOAD.md), and the 12 held-out
    rankings: prompts 21-32 of the anchor's 32-prompt stream, whose first 20 prompts are the training ones."""
    train, pairs = anchor.make_rm_data()
    stream, _ = anchor.make_rm_data(n_prompts=N_ALL_PROMPTS)
    if len(train) != N_TRAIN_PROMPTS or stream[:N_TRAIN_PROMPTS] != train:
        sys.exit("make_rm_data(32) does not start with make_rm_data(): the held-out split is not valid")
    heldout = stream[N_TRAIN_PROMPTS:]
    wide_stream, _ = anchor.make_rm_data(n_prompts=N_WIDE_STREAM)
    if wide_stream[:N_ALL_PROMPTS] != stream:
        sys.exit("make_rm_data(128) does not start with make_rm_data(32): the wide held-out set is not valid")
    wide = [r for p, r in enumerate(wide_stream) if p >= N_TRAIN_PROMPTS and p % N_TOPICS >= N_TRAIN_PROMPTS]
    if {r["prompt"] for r in wide} & {r["prompt"] for r in train}:
        sys.exit("a held-out prompt also occurs in the training rankings")
    sha_ok = common.jsonl_sha256(train) == RANKINGS_SHA256 and common.jsonl_sha256(pairs) == PAIRS_SHA256
    return {"train": train, "pairs": pairs, "heldout": heldout, "wide": wide, "data_sha256_ok": sha_ok}


def conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def pairwise(scores: list[list[float]], prefix: str = "heldout") -> dict:
    """Held-out pair metrics from each prompt's scores, listed best to worst; keys start with `prefix`."""
    right = n = 0
    margin = loss = 0.0
    by_pair: dict[str, list[int]] = {}  # "i>j" (ranks, 0 best) -> [right, total]
    for s in scores:
        for i in range(len(s)):
            for j in range(i + 1, len(s)):
                d = s[i] - s[j]
                right += d > 0
                n += 1
                tally = by_pair.setdefault(f"{i}>{j}", [0, 0])
                tally[0] += d > 0
                tally[1] += 1
                margin += d
                loss += max(-d, 0.0) + math.log1p(math.exp(-abs(d)))  # -log sigmoid(d), stable
    return {
        f"{prefix}_accuracy": round(right / n, 4),
        f"{prefix}_margin": round(margin / n, 4),
        f"{prefix}_loss": round(loss / n, 4),
        f"{prefix}_pairs": n,
        f"{prefix}_accuracy_by_rank_pair": {k: round(r / t, 4) for k, (r, t) in by_pair.items()},
    }


def heldout_metrics(scores: list[list[float]]) -> dict:
    """The held-out metrics (the first 12 prompts of the wide set) and the wide ones (all 48)."""
    return {**pairwise(scores[: N_ALL_PROMPTS - N_TRAIN_PROMPTS]), **pairwise(scores, "wide")}


# --------------------------------------------------------------------------------------------------
# parent: run each framework in its own process


def run_trl(threads: int, seed: int) -> dict:
    flags = ["--trl-child", "--threads", str(threads), "--seed", str(seed)]
    return common.run_json_child(common.child_cmd(__file__, *flags, python=common.TRL_VENV.python()))


def run_chatrlhf(args, seed: int) -> dict:
    flags = ["--child", "--dtype", args.dtype, "--threads", str(args.threads), "--seed", str(seed)]
    flags += ["--prompts-per-step", str(args.prompts_per_step)]
    return common.run_json_child(common.child_cmd(__file__, *flags))


def aggregate(runs: list[dict]) -> dict | None:
    keys = ("pairs_per_s", "train_tokens_per_s", "train_wall_s", "peak_rss_mib", "heldout_accuracy")
    listed = ("pairs_per_s", "heldout_accuracy", "heldout_loss", "wide_accuracy", "wide_loss", "seed")
    agg = common.aggregate(runs, keys, 4, listed=listed)
    if agg:
        for key in ("heldout_accuracy", "heldout_loss", "wide_accuracy", "wide_loss"):
            agg[f"{key}_mean"] = round(statistics.mean(r[key] for r in runs), 4)
        agg["steps"] = runs[0]["steps"]
        agg["loss_last"] = [r["loss_last"] for r in runs]
    return agg


def summarize(results: dict[str, list[dict]], args) -> dict:
    chat, trl = aggregate(results["chatrlhf"]), aggregate(results["trl"])
    pairs_ratio = common.ratio(chat, trl, "pairs_per_s_median")
    goal = None
    if pairs_ratio is not None:
        accuracy_ok = chat["wide_accuracy_mean"] >= trl["wide_accuracy_mean"]
        goal = {
            "pairs_per_s_ratio_min": GOAL_PAIRS_RATIO,
            "pairs_per_s_ok": pairs_ratio >= GOAL_PAIRS_RATIO,
            "heldout_accuracy_ok": accuracy_ok,
            "met": pairs_ratio >= GOAL_PAIRS_RATIO and accuracy_ok,
        }
    return {
        "bench": "rm",
        "summary": True,
        "repeat": args.repeat,
        "seeds": args.seeds,
        "chatrlhf_dtype": args.dtype,
        "chatrlhf_prompts_per_step": args.prompts_per_step,
        "torch_threads": args.threads,
        "trl": trl,
        "chatrlhf": chat,
        "ratio_chatrlhf_over_trl": {
            "pairs_per_s": pairs_ratio,
            "train_tokens_per_s": common.ratio(chat, trl, "train_tokens_per_s_median"),
            "peak_rss_mib": common.ratio(chat, trl, "peak_rss_mib_median"),
        },
        "goal": goal,
        "notes": NOTES,
    }


def print_table(summary: dict) -> None:
    head = (
        "framework",
        "steps",
        "pairs/s",
        "tokens/s",
        "train s",
        "peak RSS MiB",
        "held-out acc",
        "held-out loss",
        "wide acc",
        "wide loss",
    )
    rows = [head]
    for name in ("trl", "chatrlhf"):
        agg = summary[name]
        if agg:
            rows.append(
                (
                    name,
                    str(agg["steps"]),
                    f"{agg['pairs_per_s_median']:.3f}",
                    f"{agg['train_tokens_per_s_median']:.1f}",
                    f"{agg['train_wall_s_median']:.1f}",
                    f"{agg['peak_rss_mib_median']:.0f}",
                    f"{agg['heldout_accuracy_mean']:.3f}",
                    f"{agg['heldout_loss_mean']:.3f}",
                    f"{agg['wide_accuracy_mean']:.4f}",
                    f"{agg['wide_loss_mean']:.3f}",
                )
            )
    r = summary["ratio_chatrlhf_over_trl"]
    if r["pairs_per_s"] is not None:
        rows.append(
            (
                "chatrlhf/TRL",
                "",
                f"{r['pairs_per_s']:.2f}x",
                f"{r['train_tokens_per_s']:.2f}x",
                "",
                f"{r['peak_rss_mib']:.2f}x",
                "",
                "",
                "",
                "",
            )
        )
    print(
        f"\nReward model, 120 pairs, {summary['repeat']} run(s) each at seeds {summary['seeds']}: speed and RSS "
        f"medians, held-out figures means (chatrlhf dtype {summary['chatrlhf_dtype']}, "
        f"{summary['chatrlhf_prompts_per_step']} prompt(s) per step); held-out = 12 prompts / 72 pairs, "
        "wide = 48 prompts / 288 pairs on the same unseen topics:"
    )
    common.print_rows(rows, 14, 14)
    target = ">= {pairs_per_s_ratio_min:.0f}x TRL's pairs/s, mean wide held-out accuracy >= TRL's"
    common.print_goal(summary["goal"], target)


def parent_main(args) -> None:
    shared = common.shared_bench_dir()
    if not args.skip_trl:
        common.TRL_VENV.ensure()
    common.ensure_model(shared, common.prepare_python())
    args.seeds = args.seeds or [common.load_anchor(shared).SEED]
    # run i of a framework uses seed i // repeat: --repeat runs per seed, seeds in the order given
    counts, runs_per_seed = {"trl": 0, "chatrlhf": 0}, args.repeat

    def seeded(name: str, launch):
        def go() -> dict:
            seed = args.seeds[counts[name] // runs_per_seed]
            counts[name] += 1
            return launch(seed)

        return go

    run = {
        "trl": seeded("trl", lambda seed: run_trl(args.threads, seed)),
        "chatrlhf": seeded("chatrlhf", lambda seed: run_chatrlhf(args, seed)),
    }
    args.repeat = runs_per_seed * len(args.seeds)
    common.run_comparison(args, run, summarize, print_table)


# --------------------------------------------------------------------------------------------------
# TRL child (run by .venv-trl's interpreter): RewardTrainer on the 120 pairs, then the held-out scores


def trl_child_main(args) -> None:
    import random

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from trl import RewardTrainer

    anchor = common.load_anchor(common.shared_bench_dir())
    w, seed = anchor.RM, args.seed if args.seed is not None else anchor.SEED
    data = rm_data(anchor)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    began = time.perf_counter()
    tokenizer, model = common.trl_reward_model(seed)
    train_set = Dataset.from_list(
        [
            {
                "chosen": conversation(p["prompt"], p["chosen"]),
                "rejected": conversation(p["prompt"], p["rejected"]),
            }
            for p in data["pairs"]
        ]
    )
    with tempfile.TemporaryDirectory(prefix="chatrlhf-bench-rm-trl-") as tmp:
        trainer, step_ends = common.trl_reward_trainer(
            model,
            tokenizer,
            train_set,
            tmp,
            pairs_per_step=w["batch_size_pairs"],
            epochs=w["epochs"],
            lr=w["learning_rate"],
            max_length=w["max_length"],
            seed=seed,
            pad_to_multiple_of=None,
        )
        setup_s = time.perf_counter() - began
        rss_before = common.peak_rss_mib()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result line
            trainer.train()
        wall = time.perf_counter() - t0
    peak_rss = common.peak_rss_mib()

    prepared = trainer.train_dataset
    pair_tokens = sum(len(x) for x in prepared["chosen_ids"]) + sum(len(x) for x in prepared["rejected_ids"])

    def ids(prompt: str, answer: str) -> list[int]:  # what RewardTrainer's tokenization does
        out = tokenizer.apply_chat_template(conversation(prompt, answer), tokenize=True, return_dict=True)
        return list(out["input_ids"])

    first = data["pairs"][0]
    same_tokens = ids(first["prompt"], first["chosen"]) == list(prepared[0]["chosen_ids"])
    seqs = [ids(r["prompt"], answer) for r in data["wide"] for answer in r["responses"]]
    flat = common.trained_reward_scores(trainer.model, seqs, tokenizer.pad_token_id)
    k = len(data["wide"][0]["responses"])
    scores = [flat[i : i + k] for i in range(0, len(flat), k)]

    times = [b - a for a, b in zip(step_ends, step_ends[1:])]
    hist = trainer.state.log_history
    losses = [h["loss"] for h in hist if "loss" in h]
    accuracies = [h["accuracy"] for h in hist if "accuracy" in h]
    n_pairs = len(data["pairs"])
    record = {
        "bench": "rm",
        "seed": seed,
        "framework": "trl",
        "trainer": f"{RewardTrainer.__module__}.{RewardTrainer.__name__}",
        "dtype": "fp32",
        "pairs": n_pairs,
        "pairs_trained": len(prepared),
        "steps": trainer.state.global_step,
        "pairs_per_step": w["batch_size_pairs"],
        "pairs_per_s": round(n_pairs / wall, 3),
        "train_tokens_per_s": round(pair_tokens / wall, 1),
        "forwarded_tokens_per_s": round(pair_tokens / wall, 1),
        "train_wall_s": round(wall, 2),
        "step_s": [round(t, 3) for t in times],
        **common.step_stats(times),
        "peak_rss_mib": peak_rss,
        "peak_rss_before_train_mib": rss_before,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "train_accuracy_last_step": accuracies[-1] if accuracies else None,
        **heldout_metrics(scores),
        "heldout_prompts": len(data["heldout"]),
        "wide_prompts": len(scores),
        "tokens_pair_sequences": pair_tokens,
        "tokens_forwarded": pair_tokens,
        "sequence_forwards": 2 * len(prepared),
        "setup_s": round(setup_s, 2),
        "tokenization_matches_trainer": same_tokens,
        "data_sha256_ok": data["data_sha256_ok"],
        "versions": common.versions(("trl", "transformers", "torch", "accelerate", "datasets")),
    }
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------------
# chatrlhf child: chatrlhf.reward.train on the 20 rankings, held-out rankings as data.eval


def write_rankings(rankings: list[dict], path: Path) -> None:
    """chatrlhf's rankings format: rank 1 best, the anchor lists the answers best first."""
    rows = [
        {"prompt": r["prompt"], "responses": r["responses"], "ranks": list(range(1, len(r["responses"]) + 1))}
        for r in rankings
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows), encoding="utf-8")


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from chatrlhf.chat_template import sequence_ids
    from chatrlhf.configs import RankingData, RewardConfig
    from chatrlhf.models import load_tokenizer
    from chatrlhf.preferences import load_rankings
    from chatrlhf.reward import score_rankings, train

    anchor = common.load_anchor(common.shared_bench_dir())
    w, seed = anchor.RM, args.seed if args.seed is not None else anchor.SEED
    data = rm_data(anchor)
    with tempfile.TemporaryDirectory(prefix="chatrlhf-bench-rm-") as tmp:
        train_file, heldout_file, wide_file, run_dir = (
            Path(tmp) / "train.jsonl",
            Path(tmp) / "heldout.jsonl",
            Path(tmp) / "wide.jsonl",
            Path(tmp) / "run",
        )
        write_rankings(data["train"], train_file)
        write_rankings(data["heldout"], heldout_file)
        write_rankings(data["wide"], wide_file)
        cfg = RewardConfig(
            model=str(MODEL_DIR),
            data=RankingData(
                train=str(train_file), eval=str(heldout_file), max_length=w["max_length"], shuffle=False
            ),
            output_dir=str(run_dir),
            epochs=w["epochs"],
            batch_size=args.prompts_per_step,
            grad_accum=1,
            lr=w["learning_rate"],
            warmup_ratio=0.0,
            lr_scheduler="linear",
            seed=seed,
            dtype=args.dtype,
            save_every=0,
            overwrite=True,
        )
        summary, seen, call_s = common.run_training(train, cfg)
        peak_rss = common.peak_rss_mib()
        # the public scoring API on the exported model: the wide set, and on its first 12 prompts a cross-check
        # of the trainer's own evaluation
        scores = score_rankings(str(run_dir), load_rankings(str(wide_file)))

    tokenizer = load_tokenizer(str(MODEL_DIR))
    lengths = [
        [len(sequence_ids(tokenizer, [{"role": "user", "content": r["prompt"]}], a)) for a in r["responses"]]
        for r in data["train"]
    ]
    forwarded = sum(sum(x) for x in lengths)
    pair_tokens = sum(s[i] + s[j] for s in lengths for i in range(len(s)) for j in range(i + 1, len(s)))

    times = [m["timing/step"] for _, m in seen]
    wall = sum(times)
    n_pairs = int(sum(m["train/pairs"] for _, m in seen))
    check = heldout_metrics(scores)
    record = {
        "bench": "rm",
        "seed": seed,
        "framework": "chatrlhf",
        "trainer": "chatrlhf.reward.train",
        "dtype": args.dtype,
        "pairs": n_pairs,
        "pairs_trained": n_pairs,
        "steps": len(seen),
        "prompts_per_step": args.prompts_per_step,
        "pairs_per_step": w["pairs_per_prompt"] * args.prompts_per_step,
        "pairs_per_s": round(n_pairs / wall, 3),
        "train_tokens_per_s": round(pair_tokens / wall, 1),
        "forwarded_tokens_per_s": round(forwarded / wall, 1),
        "train_wall_s": round(wall, 2),
        "step_s": [round(t, 3) for t in times],
        **common.step_stats(times),
        "peak_rss_mib": peak_rss,
        "loss_first": seen[0][1]["rm/loss"],
        "loss_last": seen[-1][1]["rm/loss"],
        "train_accuracy_last_step": seen[-1][1].get("rm/train_accuracy"),
        "heldout_accuracy": round(summary["rm/accuracy"], 4),
        "heldout_margin": round(summary["rm/margin"], 4),
        "heldout_loss": round(summary["rm/eval_loss"], 4),
        "heldout_pairs": check["heldout_pairs"],
        "heldout_prompts": len(data["heldout"]),
        **{k: v for k, v in check.items() if k.startswith("wide_")},
        "wide_prompts": len(scores),
        "score_rankings_check": {k: v for k, v in check.items() if k.startswith("heldout_")},
        "tokens_pair_sequences": pair_tokens,
        "tokens_forwarded": forwarded,
        "sequence_forwards": sum(len(x) for x in lengths),
        **common.loop_timing(seen, times, call_s),
        "data_sha256_ok": data["data_sha256_ok"],
        "versions": common.versions(common.CHATRLHF_PACKAGES),
    }
    print(json.dumps(record), flush=True)


def parse_args(argv=None):
    ap = common.comparison_parser(__doc__)
    ap.add_argument(
        "--prompts-per-step",
        type=int,
        default=1,
        help="chatrlhf prompts (each with its 4 answers and 6 pairs) per optimizer step (default 1)",
    )
    ap.add_argument(
        "--seeds",
        default="",
        help="comma-separated seeds; each framework runs --repeat times per seed (default: the anchor's 1234)",
    )
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # a child's seed
    args = common.parse_comparison(ap, argv)
    if args.prompts_per_step < 1:
        ap.error("--prompts-per-step must be at least 1")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else []
    except ValueError:
        ap.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.trl_child:
        trl_child_main(args)
    elif args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()

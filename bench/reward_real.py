"""Reward model on real human preferences: chatrlhf against TRL's RewardTrainer, held-out accuracy over seeds.

Data (from `<repo>/../shared/data/`; set CHATRLHF_SHARED_DATA to another data folder), `--dataset`:

* `openassistant`: the 100 OpenAssistant message trees, read with chatrlhf's OpenAssistant loader: every group
  of human-written, ranked sibling replies is one ranking, trained on and held out alike; split by tree.
* `qa-feedback`: 400 ASQA questions with 4 model answers each. Trained on each question's ranking (Copeland
  over its human pairwise labels, ties kept as ties; TRL gets the strict pairs it implies), held out as the
  strict human pairs themselves; split by question (the answers of one question are close paraphrases).

Answers whose conversation is longer than `--max-length` - 1 tokens are left out (TRL's rendering ends with one
token more, the newline after `<|im_end|>`, so neither trainer drops anything), and a ranking keeps going while
two distinct ranks remain. The groups are split once, `--split-seed` fixed, `--train-fraction` of them for
training, the rest held out.

Each framework trains in a fresh process, on the same model (SmolLM2-135M fp32 in bench/models/smollm2-135m,
made once by `trl_baseline.py prepare`), epochs, learning rate, schedule (linear decay, no warm-up) and max
length, data in file order; the seed draws the new score head and nothing else:

* TRL: this script's hidden `--trl-child` mode in `.venv-trl` (made by bench/common.py when missing):
  `trl.RewardTrainer` on the pairs the training rankings imply, 8 pairs per step;
* chatrlhf: the hidden `--child` mode in the project venv, `chatrlhf.reward.train` on the rankings (all
  pairs of a prompt in one step, each answer forwarded once), its own defaults otherwise; `--chatrlhf`
  passes it extra config overrides.

Then both models score every held-out answer and this script computes the same metrics for both: pairwise
accuracy (a pair is right when the better answer scores strictly higher), per-prompt accuracy by K, and how
often the model prefers the longer answer, beside "the longer answer wins"; then the per-seed difference,
chatrlhf's held-out accuracy minus TRL's at the same seed. Run from the repository root:

    .venv/bin/python bench/reward_real.py                                  # both datasets, seeds 1-4
    .venv/bin/python bench/reward_real.py --dataset qa-feedback --seeds 1
    .venv/bin/python bench/reward_real.py --seeds 1 --skip-chatrlhf --out bench/out/reward_real.jsonl
    .venv/bin/python bench/reward_real.py --skip-trl --chatrlhf "--batch_size 1"
    .venv/bin/python bench/reward_real.py --summarize bench/out/reward_real.jsonl   # table of saved runs

stdout gets one JSON line per run, a summary JSON line and a table; logs go to stderr. The 95% intervals are
over seeds (Student's t); they say how much the head's draw moves the result, not how much another held-out
set would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also when loaded by path
import common  # noqa: E402

MODEL_DIR = common.MODEL_DIR
DATA_DIR = Path(os.environ.get("CHATRLHF_SHARED_DATA") or common.REPO.parent / "shared" / "data")
TREES = DATA_DIR / "openassistant-oasst-en100" / "en_100_tree.jsonl"
QA_FEEDBACK = DATA_DIR / "qa-feedback"
BENCH = "rm_real"
GOAL_PAIRS_RATIO = 3.0  # the target: >= 3x TRL's pairs/s at a mean held-out accuracy >= TRL's
TRL_PAIRS_PER_STEP = 8
# Student's t, two-sided 95%, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


# --------------------------------------------------------------------------------------------------
# data: made once by the parent (chatrlhf's loader and tokenizer), written as files for both children


def heldout_pairs(row: dict) -> list[tuple[int, int]]:
    """A held-out row's (better, worse) pairs: its own human pairs where it has them, else its ranking's."""
    return [tuple(p) for p in row["pairs"]] if "pairs" in row else pairs_of(row["ranks"])


def pairs_of(ranks: list[int]) -> list[tuple[int, int]]:
    """(better, worse) indices of every pair of distinct ranks; rank 1 is best."""
    return [
        (i, j) if ranks[i] < ranks[j] else (j, i)
        for i in range(len(ranks))
        for j in range(i + 1, len(ranks))
        if ranks[i] != ranks[j]
    ]


def _ranked(r, lengths: list[int], kept: list[int], **extra) -> dict:
    return {
        "prompt": r.prompt,
        "responses": [r.responses[i] for i in kept],
        "ranks": [r.ranks[i] for i in kept],
        "lengths": [lengths[i] for i in kept],
        **extra,
    }


def _fitting(tokenizer, r, max_length: int) -> tuple[list[int], list[int]]:
    """Each answer's token count with the prompt, and the indices of those within max_length - 1."""
    from chatrlhf.chat_template import sequence_ids

    lengths = [len(sequence_ids(tokenizer, r.prompt, a)) for a in r.responses]
    return lengths, [i for i, n in enumerate(lengths) if n <= max_length - 1]


def openassistant_groups(tokenizer, max_length: int) -> tuple[dict[str, dict], int]:
    """Per message tree: its ranked sibling groups, for training and held out alike."""
    from chatrlhf.preferences import load_rankings

    groups: dict[str, dict] = {}
    dropped = 0
    for r in load_rankings(str(TREES)):
        lengths, kept = _fitting(tokenizer, r, max_length)
        dropped += len(r.responses) - len(kept)
        if len({r.ranks[i] for i in kept}) < 2:
            continue
        row = _ranked(r, lengths, kept)
        group = groups.setdefault(r.where.rsplit(":", 1)[1], {"train": [], "heldout": []})
        group["train"].append(row)
        group["heldout"].append(row)
    return groups, dropped


def qa_feedback_groups(tokenizer, max_length: int) -> tuple[dict[str, dict], int]:
    """Per question: trained on its ranking (Copeland over the human labels, ties kept), held out as its strict
    human pairs, each over the question's distinct answers (scored once each)."""
    from chatrlhf.preferences import load_rankings

    rankings = QA_FEEDBACK / "rankings.jsonl"
    ids = [
        json.loads(line)["question_id"] for line in rankings.read_text(encoding="utf-8").splitlines() if line
    ]
    human: dict[str, list[tuple[str, str]]] = {}
    for record in read_jsonl(QA_FEEDBACK / "human_pairs.jsonl"):
        human.setdefault(record["question_id"], []).append((record["chosen"], record["rejected"]))
    groups: dict[str, dict] = {}
    dropped = 0
    for qid, r in zip(ids, load_rankings(str(rankings)), strict=True):
        lengths, kept = _fitting(tokenizer, r, max_length)
        dropped += len(r.responses) - len(kept)
        answers = [r.responses[i] for i in kept]
        pairs = [
            [answers.index(c), answers.index(w)]
            for c, w in human.get(qid, [])
            if c in answers and w in answers
        ]
        if len({r.ranks[i] for i in kept}) < 2:  # the children read held-out files as rankings too
            continue
        groups[qid] = {
            "train": [_ranked(r, lengths, kept)],
            "heldout": [_ranked(r, lengths, kept, pairs=pairs)],
        }
    return groups, dropped


DATASETS = {
    # name: (groups, default share of the groups trained on, what a group is)
    "openassistant": (openassistant_groups, 0.4, "trees"),
    "qa-feedback": (qa_feedback_groups, 0.15, "questions"),
}


def make_split(dataset: str, max_length: int, train_fraction: float, split_seed: int) -> dict:
    """Train and held-out rows, split by group (tree, question), answers longer than max_length - 1 tokens
    left out."""
    import random

    from chatrlhf.models import load_tokenizer

    groups_of, _, _ = DATASETS[dataset]
    groups, dropped = groups_of(load_tokenizer(str(MODEL_DIR)), max_length)
    names = sorted(groups, key=lambda g: int(g.rsplit("-", 1)[-1]))
    random.Random(split_seed).shuffle(names)
    n_train = round(len(names) * train_fraction)
    by_file_order = sorted(range(len(names)), key=lambda i: int(names[i].rsplit("-", 1)[-1]))
    train = [row for i in by_file_order if i < n_train for row in groups[names[i]]["train"]]
    heldout = [row for i in by_file_order if i >= n_train for row in groups[names[i]]["heldout"]]
    return {
        "train": train,
        "heldout": heldout,
        "trees": [n_train, len(names) - n_train],
        "dropped_answers": dropped,
    }


def write_split(split: dict, folder: Path) -> None:
    """rankings (chatrlhf's format), the implied pairs (TRL's conversational format), held-out rankings."""

    def rankings(rows):
        return [{"prompt": r["prompt"], "responses": r["responses"], "ranks": r["ranks"]} for r in rows]

    def answer(r, i):
        return r["prompt"] + [{"role": "assistant", "content": r["responses"][i]}]

    pairs = [
        {"chosen": answer(r, w), "rejected": answer(r, lo)}
        for r in split["train"]
        for w, lo in pairs_of(r["ranks"])
    ]
    for name, rows in (
        ("train.jsonl", rankings(split["train"])),
        ("pairs.jsonl", pairs),
        ("heldout.jsonl", rankings(split["heldout"])),
    ):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# --------------------------------------------------------------------------------------------------
# metrics (the parent computes them from each child's held-out scores)


def heldout_metrics(scores: list[list[float]], heldout: list[dict], prefix: str = "heldout") -> dict:
    """Pairwise accuracy, margin and loss over every held-out pair; per-prompt accuracy by K; the share of
    pairs in which the model scores the longer answer higher."""
    right = n = longer = unequal = 0
    margin = loss = 0.0
    by_k: dict[int, list[float]] = {}
    for s, r in zip(scores, heldout, strict=True):
        pairs = heldout_pairs(r)
        hits = 0
        for w, lo in pairs:
            d = s[w] - s[lo]
            hits += d > 0
            margin += d
            loss += max(-d, 0.0) + math.log1p(math.exp(-abs(d)))  # -log sigmoid(d), stable
            if r["lengths"][w] != r["lengths"][lo]:
                unequal += 1
                long, short = (w, lo) if r["lengths"][w] > r["lengths"][lo] else (lo, w)
                longer += s[long] > s[short]
        right, n = right + hits, n + len(pairs)
        by_k.setdefault(len(r["ranks"]), []).append(hits / len(pairs))
    return {
        f"{prefix}_accuracy": round(right / n, 4),
        f"{prefix}_margin": round(margin / n, 4),
        f"{prefix}_loss": round(loss / n, 4),
        f"{prefix}_pairs": n,
        f"{prefix}_prompt_accuracy_by_k": {
            str(k): [round(statistics.mean(v), 4), len(v)] for k, v in sorted(by_k.items())
        },
        f"{prefix}_prefers_longer": round(longer / unequal, 4) if unequal else None,
    }


def longer_wins(heldout: list[dict]) -> float:
    """Held-out accuracy of "the longer answer is better" over pairs of unequal length."""
    right = n = 0
    for r in heldout:
        for w, lo in heldout_pairs(r):
            if r["lengths"][w] != r["lengths"][lo]:
                right += r["lengths"][w] > r["lengths"][lo]
                n += 1
    return round(right / n, 4)


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student's t interval (0 for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0
    t = T95.get(len(values) - 1, 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


# --------------------------------------------------------------------------------------------------
# parent


def run_trl(args, data: Path, seed: int) -> dict:
    flags = ["--trl-child", "--data", str(data), "--seed", str(seed)] + child_flags(args)
    return common.run_json_child(common.child_cmd(__file__, *flags, python=common.TRL_VENV.python()))


def run_chatrlhf(args, data: Path, seed: int) -> dict:
    flags = ["--child", "--data", str(data), "--seed", str(seed), "--dtype", args.dtype] + child_flags(args)
    flags += ["--before"] if args.before else []
    return common.run_json_child(common.child_cmd(__file__, *flags, f"--chatrlhf={args.chatrlhf}"))


def child_flags(args) -> list[str]:
    return [
        "--threads", str(args.threads), "--max-length", str(args.max_length), "--lr", str(args.lr),
        "--epochs", str(args.epochs),
    ]  # fmt: skip


def aggregate(runs: list[dict]) -> dict | None:
    if not runs:
        return None
    agg = common.aggregate(
        runs, ("pairs_per_s", "train_wall_s", "peak_rss_mib"), 3, ("seed", "heldout_accuracy")
    )
    for key in ("heldout_accuracy", "heldout_loss", "heldout_prefers_longer"):
        mean, half = interval([r[key] for r in runs])
        agg[f"{key}_mean"], agg[f"{key}_ci95"] = round(mean, 4), round(half, 4)
    if all(r.get("heldout_accuracy_before") is not None for r in runs):
        agg["heldout_accuracy_before_mean"] = round(
            statistics.mean(r["heldout_accuracy_before"] for r in runs), 4
        )
    by_k: dict[str, list[float]] = {}
    for r in runs:
        for k, (acc, _) in r["heldout_prompt_accuracy_by_k"].items():
            by_k.setdefault(k, []).append(acc)
    agg["heldout_prompt_accuracy_by_k_mean"] = {k: round(statistics.mean(v), 4) for k, v in by_k.items()}
    agg["steps"] = runs[0]["steps"]
    agg["pairs"] = runs[0]["pairs"]
    agg["settings"] = runs[0].get("settings")
    return agg


def summarize(results: dict[str, list[dict]], args) -> dict:
    chat, trl = aggregate(results["chatrlhf"]), aggregate(results["trl"])
    pairs_ratio = common.ratio(chat, trl, "pairs_per_s_median")
    goal = None
    if chat and trl:
        accuracy_ok = chat["heldout_accuracy_mean"] >= trl["heldout_accuracy_mean"]
        goal = {
            "pairs_per_s_ratio_min": GOAL_PAIRS_RATIO,
            "pairs_per_s_ok": pairs_ratio is not None and pairs_ratio >= GOAL_PAIRS_RATIO,
            "heldout_accuracy_ok": accuracy_ok,
            "met": accuracy_ok and pairs_ratio is not None and pairs_ratio >= GOAL_PAIRS_RATIO,
        }
    first = (results["chatrlhf"] or results["trl"])[0]
    paired = None
    trl_by_seed = {r["seed"]: r["heldout_accuracy"] for r in results["trl"]}
    diffs = [
        r["heldout_accuracy"] - trl_by_seed[r["seed"]]
        for r in results["chatrlhf"]
        if r["seed"] in trl_by_seed
    ]
    if diffs:
        mean, half = interval(diffs)
        paired = {
            "seeds": len(diffs),
            "mean": round(mean, 4),
            "ci95": round(half, 4),
            "chatrlhf_ahead": sum(d > 0 for d in diffs),
        }
    return {
        "bench": BENCH,
        "summary": True,
        "split": first["split"],
        "trl": trl,
        "chatrlhf": chat,
        "ratio_chatrlhf_over_trl": {
            "pairs_per_s": pairs_ratio,
            "peak_rss_mib": common.ratio(chat, trl, "peak_rss_mib_median"),
        },
        "paired_accuracy_chatrlhf_minus_trl": paired,
        "goal": goal,
    }


def print_table(summary: dict) -> None:
    split = summary["split"]
    dataset = split.get("dataset", "openassistant")
    groups = DATASETS[dataset][2]
    print(
        f"\nReward model on human preferences, {dataset}: {split['train_rankings']} training rankings "
        f"({split['train_pairs']} pairs, {split['trees'][0]} {groups}), {split['heldout_rankings']} held-out "
        f"rankings ({split['heldout_pairs']} pairs, {split['trees'][1]} {groups}), max length "
        f"{split['max_length']}; accuracy mean ± 95% interval over seeds, speed medians; "
        f"'longer answer wins' scores {split['heldout_longer_wins']:.3f} on held-out pairs of unequal length:"
    )
    rows = [
        (
            "framework",
            "seeds",
            "steps",
            "pairs/s",
            "peak RSS MiB",
            "acc before",
            "held-out acc",
            "prefers longer",
        )
    ]
    for name in ("trl", "chatrlhf"):
        agg = summary[name]
        if agg:
            before = agg.get("heldout_accuracy_before_mean")
            rows.append(
                (
                    name,
                    str(len(agg["seed_runs"])),
                    str(agg["steps"]),
                    f"{agg['pairs_per_s_median']:.3f}",
                    f"{agg['peak_rss_mib_median']:.0f}",
                    f"{before:.4f}" if before is not None else "-",
                    f"{agg['heldout_accuracy_mean']:.4f} ± {agg['heldout_accuracy_ci95']:.4f}",
                    f"{agg['heldout_prefers_longer_mean']:.3f}",
                )
            )
    if summary["ratio_chatrlhf_over_trl"]["pairs_per_s"] is not None:
        r = summary["ratio_chatrlhf_over_trl"]
        rows.append(
            ("chatrlhf/TRL", "", "", f"{r['pairs_per_s']:.2f}x", f"{r['peak_rss_mib']:.2f}x", "", "", "")
        )
    common.print_rows(rows, 14, 18)
    for name in ("trl", "chatrlhf"):
        if summary[name]:
            print(
                f"{name}: per seed {dict(zip(summary[name]['seed_runs'], summary[name]['heldout_accuracy_runs']))}; "
                f"per-prompt accuracy by K {summary[name]['heldout_prompt_accuracy_by_k_mean']}"
            )
    paired = summary.get("paired_accuracy_chatrlhf_minus_trl")
    if paired:
        print(
            f"paired over {paired['seeds']} seeds, chatrlhf - TRL held-out accuracy: {paired['mean']:+.4f} ± "
            f"{paired['ci95']:.4f} (chatrlhf ahead in {paired['chatrlhf_ahead']})"
        )
    target = ">= {pairs_per_s_ratio_min:.0f}x TRL's pairs/s, mean held-out accuracy >= TRL's"
    common.print_goal(summary["goal"], target)


def summarize_files(args) -> None:
    """The table of the runs saved in `args.summarize`, one per dataset."""
    by_dataset: dict[str, dict[str, list[dict]]] = {}
    for path in args.summarize:
        for record in read_jsonl(Path(path)):
            if record.get("bench") == BENCH and not record.get("summary"):
                dataset = record["split"].get("dataset", "openassistant")
                by_dataset.setdefault(dataset, {"trl": [], "chatrlhf": []})[record["framework"]].append(
                    record
                )
    for results in by_dataset.values():
        summary = summarize(results, args)
        common.emit(summary, None)
        print_table(summary)


def parent_main(args) -> None:
    if args.summarize:
        summarize_files(args)
        return
    if not args.skip_trl:
        common.TRL_VENV.ensure()
    common.ensure_model(common.shared_bench_dir(), common.prepare_python())
    datasets = list(DATASETS) if args.dataset == "all" else [args.dataset]
    for dataset in datasets:
        compare_on(dataset, args)


def compare_on(dataset: str, args) -> None:
    """Both frameworks on one dataset, every seed."""
    args = argparse.Namespace(**vars(args))
    train_fraction = args.train_fraction or DATASETS[dataset][1]
    split = make_split(dataset, args.max_length, train_fraction, args.split_seed)
    heldout = split["heldout"]
    split_info = {
        "dataset": dataset,
        "file": str(TREES if dataset == "openassistant" else QA_FEEDBACK),
        "split_seed": args.split_seed,
        "train_fraction": train_fraction,
        "max_length": args.max_length,
        "trees": split["trees"],
        "train_rankings": len(split["train"]),
        "train_pairs": sum(len(pairs_of(r["ranks"])) for r in split["train"]),
        "heldout_rankings": len(heldout),
        "heldout_pairs": sum(len(heldout_pairs(r)) for r in heldout),
        "answers_dropped_as_too_long": split["dropped_answers"],
        "heldout_longer_wins": longer_wins(heldout),
    }
    common.log(f"split: {json.dumps(split_info)}")
    # run i of a framework uses seed i // repeat: --repeat runs per seed, seeds in the order given
    counts, runs_per_seed = {"trl": 0, "chatrlhf": 0}, args.repeat

    with tempfile.TemporaryDirectory(prefix="chatrlhf-bench-rm-real-") as tmp:
        write_split(split, Path(tmp))

        def seeded(name: str, launch):
            def go() -> dict:
                seed = args.seeds[counts[name] // runs_per_seed]
                counts[name] += 1
                record = launch(args, Path(tmp), seed)
                scores = record.pop("heldout_scores")
                return {**record, **heldout_metrics(scores, heldout), "split": split_info}

            return go

        run = {"trl": seeded("trl", run_trl), "chatrlhf": seeded("chatrlhf", run_chatrlhf)}
        args.repeat = runs_per_seed * len(args.seeds)
        common.run_comparison(args, run, summarize, print_table)


# --------------------------------------------------------------------------------------------------
# TRL child (run by .venv-trl's interpreter): RewardTrainer on the implied pairs, then the held-out scores


def trl_child_main(args) -> None:
    import random

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from trl import RewardTrainer

    seed = args.seed
    pairs = read_jsonl(Path(args.data) / "pairs.jsonl")
    heldout = read_jsonl(Path(args.data) / "heldout.jsonl")
    random.seed(seed)
    np.random.seed(seed)
    tokenizer, model = common.trl_reward_model(seed)
    with tempfile.TemporaryDirectory(prefix="chatrlhf-bench-rm-real-trl-") as tmp:
        trainer, step_ends = common.trl_reward_trainer(
            model,
            tokenizer,
            Dataset.from_list(pairs),
            tmp,
            pairs_per_step=TRL_PAIRS_PER_STEP,
            epochs=args.epochs,
            lr=args.lr,
            max_length=args.max_length,
            seed=seed,
        )
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result line
            trainer.train()
        wall = time.perf_counter() - t0
    peak_rss = common.peak_rss_mib()
    trained = len(trainer.train_dataset)
    if trained != len(pairs):
        sys.exit(f"RewardTrainer kept {trained} of {len(pairs)} pairs: some are longer than --max-length")

    def ids(messages: list[dict], answer: str) -> list[int]:  # what RewardTrainer's tokenization does
        conversation = messages + [{"role": "assistant", "content": answer}]
        return list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])

    seqs = [ids(r["prompt"], a) for r in heldout for a in r["responses"]]
    flat = common.trained_reward_scores(trainer.model, seqs, tokenizer.pad_token_id)
    scores, at = [], 0
    for r in heldout:
        scores.append(flat[at : at + len(r["responses"])])
        at += len(r["responses"])
    times = [b - a for a, b in zip(step_ends, step_ends[1:])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record = {
        "bench": BENCH,
        "framework": "trl",
        "seed": seed,
        "trainer": f"{RewardTrainer.__module__}.{RewardTrainer.__name__}",
        "settings": {
            "pairs_per_step": TRL_PAIRS_PER_STEP,
            "lr": args.lr,
            "epochs": args.epochs,
            "schedule": "linear, no warm-up",
        },
        "pairs": len(pairs),
        "steps": trainer.state.global_step,
        "pairs_per_s": round(len(pairs) / wall, 3),
        "train_wall_s": round(wall, 2),
        **common.step_stats(times),
        "peak_rss_mib": peak_rss,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "versions": common.versions(("trl", "transformers", "torch", "accelerate", "datasets")),
        "heldout_scores": scores,
    }
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------------
# chatrlhf child: chatrlhf.reward.train on the rankings, the held-out rankings as data.eval


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from chatrlhf.configs import RewardConfig, load_config
    from chatrlhf.preferences import load_rankings
    from chatrlhf.reward import score_rankings, train

    data = Path(args.data)
    with tempfile.TemporaryDirectory(prefix="chatrlhf-bench-rm-real-") as tmp:
        run_dir = Path(tmp) / "run"
        overrides = [
            "--model", str(MODEL_DIR), "--data.train", str(data / "train.jsonl"),
            "--data.max_length", str(args.max_length), "--eval_fraction", "0",
            "--data.shuffle", "false", "--output_dir", str(run_dir), "--epochs", str(args.epochs),
            "--lr", str(args.lr), "--warmup_ratio", "0", "--lr_scheduler", "linear", "--seed", str(args.seed),
            "--dtype", args.dtype, "--save_every", "0", "--overwrite", "true",
        ]  # fmt: skip
        if args.before:  # the trainer's own evaluation, before and after training: two more held-out passes
            overrides += ["--data.eval", str(data / "heldout.jsonl")]
        cfg = load_config(RewardConfig, None, overrides + shlex.split(args.chatrlhf))
        summary, seen, call_s = common.run_training(train, cfg)
        peak_rss = common.peak_rss_mib()
        scores = score_rankings(str(run_dir), load_rankings(str(data / "heldout.jsonl")))

    times = [m["timing/step"] for _, m in seen]
    wall = sum(times)
    n_pairs = int(sum(m["train/pairs"] for _, m in seen))
    record = {
        "bench": BENCH,
        "framework": "chatrlhf",
        "seed": args.seed,
        "trainer": "chatrlhf.reward.train",
        "settings": {
            "overrides": args.chatrlhf,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "epochs": cfg.epochs,
            "schedule": f"{cfg.lr_scheduler}, warm-up ratio {cfg.warmup_ratio}",
            "dtype": args.dtype,
        },
        "pairs": n_pairs,
        "steps": len(seen),
        "pairs_per_s": round(n_pairs / wall, 3),
        "train_wall_s": round(wall, 2),
        **common.step_stats(times),
        **common.loop_timing(seen, times, call_s),
        "peak_rss_mib": peak_rss,
        "loss_first": seen[0][1]["rm/loss"],
        "loss_last": seen[-1][1]["rm/loss"],
        "heldout_accuracy_before": summary.get("rm/accuracy_before"),
        "heldout_accuracy_trainer": summary.get("rm/accuracy"),
        "versions": common.versions(common.CHATRLHF_PACKAGES),
        "heldout_scores": scores,
    }
    print(json.dumps(record), flush=True)


def parse_args(argv=None):
    ap = common.comparison_parser(__doc__)
    ap.add_argument("--seeds", default="1,2,3,4", help="comma-separated seeds (default 1,2,3,4)")
    ap.add_argument("--skip-chatrlhf", action="store_true", help="run only TRL")
    ap.add_argument("--max-length", type=int, default=384, help="tokens of prompt + answer (default 384)")
    ap.add_argument("--lr", type=float, default=1e-5, help="peak learning rate of both (default 1e-5)")
    ap.add_argument("--epochs", type=float, default=1.0, help="epochs of both (default 1)")
    ap.add_argument(
        "--dataset", choices=(*DATASETS, "all"), default="all", help="which human preferences (default all)"
    )
    ap.add_argument(
        "--train-fraction",
        type=float,
        help="share of the groups (trees, questions) trained on (default: openassistant 0.4, qa-feedback 0.15)",
    )
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the tree split (default 0)")
    ap.add_argument("--chatrlhf", default="", help='extra chatrlhf config overrides, e.g. "--batch_size 2"')
    ap.add_argument(
        "--before",
        action="store_true",
        help="chatrlhf also evaluates before training (the fresh head's accuracy)",
    )
    ap.add_argument("--summarize", nargs="+", metavar="FILE", help="summarize the runs saved in these files")
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)  # a child's data folder
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # a child's seed
    args = common.parse_comparison(ap, argv)
    try:
        args.seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    if args.train_fraction is not None and not 0 < args.train_fraction < 1:
        ap.error("--train-fraction must be between 0 and 1")
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

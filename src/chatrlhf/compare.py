"""`chatrlhf demo --compare true`: every optimiser from the same SFT model and the same rankings, side by side.

After the demo's loop, each optimiser runs one round from the demo's SFT model on round 1's rankings: PPO as
the demo runs it (leave-one-out advantages) and GRPO against round 1's reward model; GRPO rewarded by the
labelers' judge itself (RL from a verifier: what the reward model from rankings costs or gives); DPO,
Plackett-Luce DPO and LiPO-lambda DPO on the rankings themselves, with the adapters of the demo's PPO. Each
policy answers the held-out prompts and the eval's judge scores them (the rule judge in the demo), as the
pipeline's eval does. `compare/compare.md` (and a section of `report.md`) holds the table: held-out
every-constraint-met rate with its 95% interval, the paired difference from SFT, KL to the SFT model and wall
time; `compare/compare.png` the chart.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from chatrlhf.configs import DPOConfig, PipelineConfig, RankingData, Verifier
from chatrlhf.runs import PipelineRun, atomic_write_text, save_figure

ARMS = ("PPO (RLOO)", "GRPO", "GRPO from the judge", "DPO", "DPO, Plackett-Luce", "DPO, LiPO-λ")
DPO_FORMS = {"DPO": "off", "DPO, Plackett-Luce": "plackett_luce", "DPO, LiPO-λ": "lipo"}


def _train(arm: str, cfg: PipelineConfig, paths: PipelineRun, folder: Path) -> None:
    from chatrlhf import dpo, ppo

    sft = str(paths.sft)
    if arm in DPO_FORMS:
        dpo.train(
            DPOConfig(
                model=sft,
                data=RankingData(train=str(paths.rankings(1))),
                output_dir=str(folder),
                listwise=DPO_FORMS[arm],
                beta=0.1,
                epochs=2,
                batch_size=4,
                # with the demo's PPO adapters; chosen by held-out implicit-reward accuracy on the rankings'
                # own held-out prompts (docs/demo.md), never by the eval prompts
                lr=2e-3,
                lr_scheduler="constant",
                warmup_ratio=0.1,
                lora=cfg.ppo.lora,
                eval_fraction=0.15,
                seed=cfg.seed,
                save_every=0,
                overwrite=True,
            )
        )
        return
    estimator = "rloo" if arm == "PPO (RLOO)" else "grpo"
    verifier = arm == "GRPO from the judge"  # the labelers' judge itself as the reward: no rankings, no RM
    ppo.train(
        replace(
            cfg.ppo,
            model=sft,
            reference_model=sft,
            reward="judge" if verifier else "model",
            judge=Verifier(str(cfg.label.judge)) if verifier else cfg.ppo.judge,
            reward_model="" if verifier else str(paths.rm(1)),
            output_dir=str(folder),
            data=replace(cfg.ppo.data, train=cfg.prompts),
            advantage_estimator=estimator,
            samples_per_prompt=max(cfg.ppo.samples_per_prompt, 4),
            seed=cfg.seed,
            resume=False,
            overwrite=True,
        )
    )


def _policy(arm: str, cfg: PipelineConfig, paths: PipelineRun, folder: Path) -> tuple[Path, float]:
    """The arm's trained policy and the seconds its training took. The demo's own first-round PPO is already
    this arm when the demo runs PPO with leave-one-out advantages: it is read back, not trained again."""
    if arm == "PPO (RLOO)" and cfg.ppo.advantage_estimator == "rloo" and (paths.ppo(1) / "run.json").exists():
        stages = json.loads(paths.state.read_text())["stages"]
        return paths.ppo(1), float(stages["iter1/ppo"]["seconds"])
    began = time.perf_counter()
    _train(arm, cfg, paths, folder)
    return folder, time.perf_counter() - began


def _folder(arm: str) -> str:
    return (
        arm.lower()
        .replace(",", "")
        .replace(" ", "_")
        .replace("(", "")
        .replace(")", "")
        .replace("λ", "lambda")
    )


def run(cfg: PipelineConfig, console: Console) -> dict:
    """Train and evaluate every arm (a finished arm, its `result.json` written, is read back), then write
    compare.json, compare.md and compare.png and add the table to report.md."""
    from chatrlhf.eval import evaluate

    paths = PipelineRun(cfg.output_dir)
    out = paths.root / "compare"
    rows = []
    verifiable = str(cfg.label.judge) in Verifier.values()  # a model judge (rm, llm) is no verifier
    for arm in [a for a in ARMS if verifiable or a != "GRPO from the judge"]:
        folder = out / _folder(arm)
        done = folder / "result.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        console.rule(f"[bold]compare: {arm}")
        policy, seconds = _policy(arm, cfg, paths, folder)
        eval_cfg = replace(
            cfg.eval, policy=str(policy), baseline=str(paths.sft), prompts=cfg.eval_prompts, seed=cfg.seed
        )
        judge = eval_cfg.judge or cfg.label.judge  # as the pipeline's own eval
        result = evaluate(replace(eval_cfg, judge=judge))
        row = {
            "optimizer": arm,
            "success": result.success_rate["policy"],
            "success_ci": list(result.success_ci["policy"]),
            "sft_success": result.success_rate["baseline"],
            "diff_ci": list(result.success_diff_ci),
            "win_rate": result.win_rate,
            "kl": result.kl,
            "train_seconds": round(seconds, 1),
            "policy": str(policy),
        }
        atomic_write_text(done, json.dumps(row, indent=2) + "\n")
        rows.append(row)
    table = markdown(rows)
    atomic_write_text(out / "compare.json", json.dumps(rows, indent=2) + "\n")
    picture = chart(rows, out / "compare.png")
    atomic_write_text(out / "compare.md", table + "\n![optimisers](compare.png)\n")
    if paths.report.exists():
        report = paths.report.read_text().split("\n## Optimisers compared")[0].rstrip("\n")
        section = f"\n\n## Optimisers compared\n\n{table}\n![optimisers]({picture.relative_to(paths.root)})\n"
        atomic_write_text(paths.report, report + section)
    console.print(table)
    return {"compare": rows}


def markdown(rows: list[dict]) -> str:
    lines = [
        "One round each from the same SFT model on round 1's rankings (PPO and GRPO against round 1's reward "
        "model), the held-out prompts scored by the rule judge; 95% intervals over prompts.",
        "",
        "| optimiser | held-out, every constraint met | − SFT (paired 95% CI) | win-rate over SFT | KL to SFT | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["success_ci"]
        dlo, dhi = r["diff_ci"]
        diff = 100 * (r["success"] - r["sft_success"])
        lines.append(
            f"| {r['optimizer']} | {100 * r['success']:.1f}% ({100 * lo:.0f}-{100 * hi:.0f}%) | "
            f"{diff:+.1f} ({100 * dlo:+.1f}, {100 * dhi:+.1f}) | {100 * r['win_rate']:.1f}% | {r['kl']:.2f} | "
            f"{r['train_seconds']:.0f} |"
        )
    if rows:
        lines.append(f"| SFT (the start) | {100 * rows[0]['sft_success']:.1f}% | | | 0 | |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> Path:
    """Held-out success with its interval per optimiser, and KL to SFT beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    names = [r["optimizer"] for r in rows]
    ys = [r["success"] for r in rows]
    err = [
        [r["success"] - r["success_ci"][0] for r in rows],
        [r["success_ci"][1] - r["success"] for r in rows],
    ]
    left.bar(range(len(rows)), ys, yerr=err, capsize=3, color="tab:blue")
    if rows:
        left.axhline(rows[0]["sft_success"], color="grey", linestyle=":", label="SFT")
        left.legend(fontsize=8)
    left.set_xticks(range(len(rows)), names, fontsize=7, rotation=20)
    left.set_ylim(0, 1.05)
    left.set_ylabel("held-out, every constraint met")
    right.bar(range(len(rows)), [r["kl"] for r in rows], color="tab:orange")
    right.set_xticks(range(len(rows)), names, fontsize=7, rotation=20)
    right.set_ylabel("KL to SFT per answer (nats)")
    fig.suptitle("one round from the same SFT model and rankings (95% intervals over prompts)")
    fig.tight_layout()
    return save_figure(fig, path)

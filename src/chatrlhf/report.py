"""`report.md` of a pipeline run: each stage's figures, its plots, and the final evaluation.

The stage plots are the PNGs the stages wrote (`sft_curves.png`, `reward_curves.png`, `ppo_curves.png`);
the report adds `proxy_vs_gold.png`, the reward model's score of the PPO rollouts against the gold judge's
over all PPO steps (the over-optimisation picture of reward-model training).
"""

from __future__ import annotations

from pathlib import Path

from chatrlhf.eval import EvalResult, headline, summary_markdown
from chatrlhf.runs import PipelineRun, atomic_write_text, read_metrics, save_figure


def _fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def ppo_curves(paths: PipelineRun, iterations: int) -> tuple[list, list, list[int]]:
    """(step, mean proxy reward) and (step, mean gold score) of the PPO rollouts, the iterations end to end,
    and the last step of each iteration."""
    proxy, gold, offset, bounds = [], [], 0, []
    for it in range(1, iterations + 1):
        rows = read_metrics(paths.ppo(it))
        steps = [r for r in rows if "ppo/reward" in r]
        proxy += [(offset + r["step"], r["ppo/reward"]) for r in steps]
        gold += [(offset + r["step"], r["ppo/gold_reward"]) for r in steps if "ppo/gold_reward" in r]
        offset += max((r["step"] for r in steps), default=0)
        bounds.append(offset)
    return proxy, gold, bounds


def _first_and_last(curve: list, n: int = 3) -> tuple[float, float]:
    values = [v for _, v in curve]
    return sum(values[:n]) / len(values[:n]), sum(values[-n:]) / len(values[-n:])


def proxy_vs_gold_plot(paths: PipelineRun, proxy: list, gold: list, bounds: list[int]) -> Path | None:
    """Mean proxy (RM) and gold (judge) reward per PPO step (`ppo_curves`), the iterations end to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not gold:
        return None
    fig, left = plt.subplots(figsize=(7, 3.6))
    left.plot(*zip(*proxy), color="tab:blue", label="proxy: reward model score")
    left.set_xlabel("PPO step")
    left.set_ylabel("reward model score", color="tab:blue")
    right = left.twinx()
    right.plot(*zip(*gold), color="tab:orange", label="gold: judge score")
    right.set_ylabel("gold judge score", color="tab:orange")
    for b in bounds[:-1]:
        left.axvline(b, color="grey", linestyle=":", linewidth=1)
    fig.suptitle("proxy vs gold reward of the PPO rollouts")
    fig.tight_layout()
    return save_figure(fig, paths.root / "proxy_vs_gold.png")


MODELS = (
    ("base", "base model", "tab:grey"),
    ("baseline", "SFT", "tab:blue"),
    ("policy", "PPO", "tab:orange"),
)


def success_plot(out: Path, result: EvalResult) -> Path | None:
    """InstructGPT's Figure 1 at laptop scale: the every-constraint-met rate of the base, SFT and PPO models
    on the held-out prompts, overall and per kind of constraint, with 95% intervals over prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates, cis, kinds = result.success_rate, result.success_ci, result.by_constraints
    if not rates:
        return None
    groups = [("all held-out prompts", {n: (rates[n], cis[n]) for n in rates})]
    for kind, g in kinds.items():
        groups.append(
            (kind.replace(", ", "\n"), {n: (g[f"{n}_success"], g[f"{n}_success_ci"]) for n in rates})
        )
    shown = [m for m in MODELS if m[0] in rates]
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(groups)), 4))
    for k, (name, label, color) in enumerate(shown):
        xs = [g + (k - (len(shown) - 1) / 2) * width for g in range(len(groups))]
        ys = [values[name][0] for _, values in groups]
        lows = [values[name][0] - values[name][1][0] for _, values in groups]
        highs = [values[name][1][1] - values[name][0] for _, values in groups]
        ax.bar(xs, ys, width, label=label, color=color, yerr=[lows, highs], capsize=3)
    ax.set_xticks(range(len(groups)), [title for title, _ in groups], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("answers meeting every constraint")
    ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("held-out prompts: base model -> SFT -> PPO (95% intervals over prompts)")
    fig.tight_layout()
    return save_figure(fig, out / "success_by_model.png")


def _opening(paths: PipelineRun, cfg, result: EvalResult) -> list[str]:
    """The picture first: success of base, SFT and PPO, the headline figures, then proxy vs gold."""
    out = paths.root
    lines = []
    picture = success_plot(out, result)
    if picture is not None:
        lines += [f"![base -> SFT -> PPO]({picture.relative_to(out)})", ""]
    lines += [f"- {line}" for line in headline(result)]
    lines += [f"- KL(PPO ‖ SFT) per answer: {result.kl:.3f} nats", ""]
    proxy, gold, bounds = ppo_curves(paths, cfg.iterations)
    gold_plot = proxy_vs_gold_plot(paths, proxy, gold, bounds)
    if gold_plot is not None:
        (p0, p1), (g0, g1) = _first_and_last(proxy), _first_and_last(gold)
        lines += [
            "Proxy (reward model) against gold (judge) reward of the PPO rollouts, step by step: where the "
            "proxy rises and the gold does not, PPO is over-optimising the reward model. Mean of the first "
            f"three PPO steps -> the last three: gold {g0:.3f} -> {g1:.3f}, proxy {p0:.3f} -> {p1:.3f}.",
            "",
            f"![proxy vs gold]({gold_plot.relative_to(out)})",
            "",
        ]
    return lines


LOOPS = {
    "ppo": "reward model -> PPO",
    "grpo": "reward model -> GRPO",
    "rloo": "reward model -> RLOO",
    "dpo": "DPO",
}


def _dpo_row(it: int, dpo: dict) -> str:
    return (
        f"| iteration {it}: DPO | held-out implicit-reward accuracy {_fmt(dpo.get('dpo/accuracy'))}, "
        f"last step: loss {_fmt(dpo.get('dpo/loss'))}, train accuracy {_fmt(dpo.get('dpo/train_accuracy'))} |"
    )


def write_report(paths: PipelineRun, cfg, state: dict, result: EvalResult, eval_cfg) -> Path:
    """`report.md` of the pipeline run in `paths`, from its stage records (`state`) and the final evaluation."""
    out = paths.root
    stages = state["stages"]
    lines = [
        f"# chatrlhf pipeline report: {out}",
        "",
        f"Starting model: `{cfg.model or 'SmolLM2-135M-Instruct (default)'}`; {cfg.iterations} iteration(s) of "
        f"sample -> rank -> {LOOPS[cfg.optimizer]}; labeler: {cfg.labeler}"
        + (f" (judge `{cfg.label.judge}`, noise {cfg.label.noise})" if cfg.labeler == "auto" else "")
        + f"; seed {cfg.seed}.",
        "",
    ]
    lines += _opening(paths, cfg, result)
    lines += [
        "## Stages",
        "",
        "| stage | figures |",
        "|---|---|",
    ]
    sft = stages.get("sft", {})
    lines.append(f"| SFT | final train loss {_fmt(sft.get('train/loss'))} |")
    for it in range(1, cfg.iterations + 1):
        s, lab = stages.get(f"iter{it}/sample", {}), stages.get(f"iter{it}/label", {})
        rm, ppo = stages.get(f"iter{it}/rm", {}), stages.get(f"iter{it}/ppo", {})
        lines.append(
            f"| iteration {it}: sample | {s.get('tasks', '-')} ranking tasks from `{s.get('model', '-')}` |"
        )
        agreement = lab.get("agreement")
        lines.append(
            f"| iteration {it}: rank | {lab.get('ranked', '-')} tasks ranked; labeler agreement "
            f"{_fmt(agreement) if agreement is not None else 'n/a (one labeler per task)'} |"
        )
        if f"iter{it}/dpo" in stages:
            lines.append(_dpo_row(it, stages[f"iter{it}/dpo"]))
            continue
        lines.append(
            f"| iteration {it}: reward model | held-out accuracy {_fmt(rm.get('rm/accuracy'))}, "
            f"train accuracy {_fmt(rm.get('rm/train_accuracy'))} |"
        )
        gold = f", gold judge score {_fmt(ppo['ppo/gold_reward'])}" if "ppo/gold_reward" in ppo else ""
        lines.append(
            f"| iteration {it}: PPO | last step: reward {_fmt(ppo.get('ppo/reward'))}, "
            f"KL {_fmt(ppo.get('ppo/kl'))}{gold} |"
        )
    seconds = {name: record["seconds"] for name, record in stages.items() if "seconds" in record}
    if seconds:
        lines += [
            "",
            "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".",
        ]
    lines += ["", "## Plots", ""]
    plots = [("SFT", paths.sft / "sft_curves.png")]
    for it in range(1, cfg.iterations + 1):
        plots.append((f"reward model, iteration {it}", paths.rm(it) / "reward_curves.png"))
        plots.append((f"PPO, iteration {it}", paths.ppo(it) / "ppo_curves.png"))
        plots.append((f"DPO, iteration {it}", paths.dpo(it) / "dpo_curves.png"))
    for title, path in plots:
        if path.exists():
            lines += [f"### {title}", "", f"![{title}]({path.relative_to(out)})", ""]
    lines += [
        "## Evaluation: final policy vs the SFT model on held-out prompts",
        "",
        f"`chatrlhf eval --policy {eval_cfg.policy} --baseline {eval_cfg.baseline} --prompts {eval_cfg.prompts} "
        f"--judge {eval_cfg.judge}`",
        "",
    ]
    lines.append(summary_markdown(result, eval_cfg.judge, eval_cfg.show))
    atomic_write_text(paths.report, "\n".join(lines) + "\n")
    return paths.report

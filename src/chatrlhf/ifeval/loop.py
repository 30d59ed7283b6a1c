"""`chatrlhf demo --task ifeval`: the whole loop on the project's own instruction-following prompts, then IFEval.

The prompts (`ifeval.task`) carry IFEval's kinds of instruction on the demo's own topics; the rule judge scores an
answer by the share of them that lm-eval's checkers say it follows, and of naming the topic. Demonstrations are
the model's drafts to the bare requests, edited by code until the checkers pass them (`ifeval.edit`); the same
drafts, edited to follow all, some or none of a prompt's instructions, are ranking tasks written ahead, ranked
by the simulated labeler with the first round's sampled answers (checkers plus noise); the reward model learns
from the rankings alone; PPO runs in rounds as the built-in demo does. At the end the starting model, the SFT
model and the PPO policy answer IFEval's own prompts with the same greedy decoding, and `report.md` opens with
their accuracy per instruction type. The starting model's IFEval answers are cached by checkpoint hash, so a
second run skips them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console

from chatrlhf.configs import DemoConfig, IFEvalConfig, PipelineConfig, SamplingConfig
from chatrlhf.errors import UserError
from chatrlhf.ifeval.benchmark import METRICS, Answer, paired, score
from chatrlhf.ifeval.checkers import IFEvalItem, check, load_items
from chatrlhf.ifeval.task import conflicts, make_prompts, split_topics
from chatrlhf.runs import PipelineRun, atomic_write_jsonl, atomic_write_text, save_figure

SFT_PROMPTS, TRAIN_PROMPTS, HELD_OUT_PROMPTS = 320, 128, 96
DRAFT_TOKENS = 256  # a draft long enough for the longest length instruction the task draws (120 words)
# start -> SFT -> PPO, as the report names them
MODELS = (("start", "starting model", "tab:grey"), ("sft", "SFT", "tab:blue"), ("ppo", "PPO", "tab:orange"))
PAIRS = (("ppo", "start"), ("ppo", "sft"), ("sft", "start"))
LABELS = {"prompt_strict": "prompt-level strict", "prompt_loose": "prompt-level loose",
          "inst_strict": "instruction-level strict", "inst_loose": "instruction-level loose"}  # fmt: skip


def write_data(cfg: DemoConfig, data: Path) -> list[dict]:
    """prompts.jsonl (ranking and PPO) and eval_prompts.jsonl (held-out topics) in `data`; the SFT prompts."""
    train, held_out = split_topics()
    atomic_write_jsonl(data / "prompts.jsonl", make_prompts(train, TRAIN_PROMPTS, cfg.seed, "train"))
    atomic_write_jsonl(
        data / "eval_prompts.jsonl", make_prompts(held_out, HELD_OUT_PROMPTS, cfg.seed + 1, "held")
    )
    return make_prompts(train, SFT_PROMPTS, cfg.seed + 2, "sft")


def benchmark_config(cfg: DemoConfig) -> IFEvalConfig:
    return IFEvalConfig(
        prompts=cfg.ifeval_prompts,
        limit=cfg.ifeval_limit,
        sampling=SamplingConfig(max_new_tokens=cfg.ifeval_max_new_tokens),
        seed=cfg.seed,
    )


def checkpoint_hash(folder: Path) -> str:
    """sha256 over a checkpoint's weight and config files, names included."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("config.json")):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def answers_key(model_path: Path, items: list[IFEvalItem], bench: IFEvalConfig) -> str:
    """What an IFEval answer set depends on: the weights, the prompts, the decoding and the dtype it ran in."""
    from chatrlhf.models import resolve_dtype

    spec = {
        "weights": checkpoint_hash(model_path),
        "prompts": hashlib.sha256(json.dumps([[i.key, i.prompt] for i in items]).encode()).hexdigest(),
        "sampling": asdict(bench.sampling),
        "batch_size": bench.batch_size,
        "dtype": str(resolve_dtype(bench.dtype)),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def cached_answers(
    model: str, items: list[IFEvalItem], bench: IFEvalConfig, console: Console
) -> list[Answer]:
    """`model`'s answers to `items`, from the cache when this checkpoint answered them the same way before."""
    from chatrlhf.ifeval.benchmark import model_answers
    from chatrlhf.models import cache_dir, resolve_model

    path = cache_dir() / "ifeval_answers" / f"{answers_key(Path(resolve_model(model)), items, bench)}.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if [r["key"] for r in rows] == [i.key for i in items]:
            console.print(f"IFEval: {model or 'the default model'}'s answers from the cache ({path.name})")
            return [Answer(r["text"], r["tokens"], check(i, r["text"])) for r, i in zip(rows, items)]
    answers = model_answers(model, items, replace(bench, policy=model), console)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(
        path, [{"key": i.key, "text": a.text, "tokens": a.tokens} for i, a in zip(items, answers)]
    )
    return answers


def figures(items: list[IFEvalItem], answers: dict[str, list[Answer]], seed: int) -> dict:
    """Each model's scores and each pair's paired difference (first minus second), as ifeval.json holds them."""
    scored = {who: score(items, answers[who], seed) for who in answers}
    out: dict = {"prompts": len(items), "instructions": sum(len(i.instruction_ids) for i in items)}
    out["scores"] = {who: asdict(s) for who, (s, _) in scored.items()}
    out["differences"] = {}
    for a, b in PAIRS:
        means, intervals, by_type = paired(items, scored[a][1], scored[b][1], seed)
        out["differences"][f"{a}-{b}"] = {"mean": means, "ci": intervals, "by_type": by_type}
    return out


def fallen_types(result: dict) -> list[tuple[str, float, tuple[float, float]]]:
    """Instruction types whose loose accuracy fell from the starting model to PPO: (type, change, interval)."""
    by_type = result["differences"]["ppo-start"]["by_type"]
    return [(name, d["loose"], tuple(d["loose_ci"])) for name, d in by_type.items() if d["loose"] < 0]


def bar_chart(out: Path, result: dict) -> Path:
    """Loose accuracy of start, SFT and PPO: prompt- and instruction-level overall, then per instruction type,
    each with its 95% interval over prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = result["scores"]
    groups = [
        ("all prompts\n(prompt-level)", {w: (s["overall"]["prompt_loose"], s["overall_ci"]["prompt_loose"])
                                         for w, s in scores.items()}),
        ("all instructions", {w: (s["overall"]["inst_loose"], s["overall_ci"]["inst_loose"])
                              for w, s in scores.items()}),
    ]  # fmt: skip
    for name in scores["start"]["by_type"]:
        short = name.split(":", 1)[1].replace("_", " ")
        groups.append(
            (
                short,
                {w: (s["by_type"][name]["loose"], s["by_type"][name]["loose_ci"]) for w, s in scores.items()},
            )
        )
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(10, 0.62 * len(groups)), 4.6))
    for k, (who, label, color) in enumerate(MODELS):
        xs = [g + (k - 1) * width for g in range(len(groups))]
        ys = [values[who][0] for _, values in groups]
        lows = [max(0.0, values[who][0] - values[who][1][0]) for _, values in groups]
        highs = [max(0.0, values[who][1][1] - values[who][0]) for _, values in groups]
        ax.bar(xs, ys, width, label=label, color=color, yerr=[lows, highs], capsize=2, error_kw={"lw": 0.7})
    ax.set_xticks(range(len(groups)), [title for title, _ in groups], fontsize=7, rotation=60, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("loose accuracy")
    ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(
        f"IFEval ({result['prompts']} prompts, lm-eval's checkers): starting model -> SFT -> PPO, "
        "per instruction type (95% intervals over prompts)",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, out / "ifeval_by_type.png")


def _pct(value: float, ci, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{100 * value:{sign}.1f} ({100 * ci[0]:{sign}.1f} to {100 * ci[1]:{sign}.1f})"


def report_section(result: dict, chart: Path, root: Path, bench: IFEvalConfig, models: dict[str, str]) -> str:
    """The part of report.md that opens it: the chart, the four figures per model, the paired differences, and
    every instruction type that fell from the starting model to PPO."""
    scores, diffs = result["scores"], result["differences"]
    lines = [
        f"## IFEval: starting model -> SFT -> PPO ({result['prompts']} prompts, {result['instructions']} "
        f"instructions)",
        "",
        f"Every model answers IFEval's prompts ({bench.prompts}) greedily, at most "
        f"{bench.sampling.max_new_tokens} new tokens; lm-eval's checkers score the answers. Percent, with 95% "
        "bootstrap intervals over prompts; differences are paired over prompts.",
        "",
        f"![IFEval per instruction type]({chart.relative_to(root)})",
        "",
        "| metric | " + " | ".join(f"{label} (`{models[w]}`)" for w, label, _ in MODELS) + " | "
        + " | ".join(f"{a} - {b}" for a, b in PAIRS) + " |",
        "|---|" + "---|" * (len(MODELS) + len(PAIRS)),
    ]  # fmt: skip
    for m in METRICS:
        cells = [_pct(scores[w]["overall"][m], scores[w]["overall_ci"][m]) for w, _, _ in MODELS]
        cells += [
            _pct(diffs[f"{a}-{b}"]["mean"][m], diffs[f"{a}-{b}"]["ci"][m], signed=True) for a, b in PAIRS
        ]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    tokens = " | ".join(f"{scores[w]['mean_tokens']:.0f}" for w, _, _ in MODELS)
    lines += [f"| mean answer tokens | {tokens} |" + " |" * len(PAIRS), ""]
    fell = fallen_types(result)
    if fell:
        lines.append("Instruction types whose loose accuracy fell from the starting model to PPO:")
        lines.append("")
        for name, change, ci in fell:
            below = " — its interval is wholly below zero" if ci[1] < 0 else ""
            lines.append(f"- {name}: {_pct(change, ci, signed=True)}{below}")
    else:
        lines.append("No instruction type's loose accuracy fell from the starting model to PPO.")
    return "\n".join(lines) + "\n"


def score_models(cfg: DemoConfig, pipe_cfg: PipelineConfig, policy: str, console: Console) -> dict:
    """IFEval for the starting model, the SFT model and the PPO policy; each recorded as a pipeline stage, the
    figures in ifeval/ and the section that opens report.md."""
    from chatrlhf.pipeline import Pipeline

    pipe, paths = Pipeline(pipe_cfg, console), PipelineRun(pipe_cfg.output_dir)
    bench = benchmark_config(cfg)
    items = load_items(bench.prompts, bench.limit, bench.seed)
    models = {"start": cfg.model or "default", "sft": str(paths.sft), "ppo": policy}
    folder = paths.root / "ifeval"
    folder.mkdir(parents=True, exist_ok=True)
    answers: dict[str, list[Answer]] = {}
    for who, model in models.items():

        def answer_all(w=who, m=model) -> dict:
            got = answers[w] = cached_answers("" if m == "default" else m, items, bench, console)
            atomic_write_jsonl(folder / f"{w}.jsonl", [{"key": i.key, "text": a.text, "tokens": a.tokens}
                                                     for i, a in zip(items, got)])  # fmt: skip
            return {"model": m, "prompt_loose": sum(all(a.verdict.loose) for a in got) / len(got)}

        pipe.stage(f"ifeval/{who}", answer_all)
        if who not in answers:  # answered by an earlier run of this folder: its saved answers, checked again
            saved = (folder / f"{who}.jsonl").read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in saved]
            answers[who] = [Answer(r["text"], r["tokens"], check(i, r["text"])) for r, i in zip(rows, items)]
    result = figures(items, answers, cfg.seed)
    result["models"] = models
    atomic_write_text(folder / "ifeval.json", json.dumps(result, indent=2) + "\n")
    section = report_section(result, bar_chart(paths.root, result), paths.root, bench, models)
    report = paths.report.read_text(encoding="utf-8")
    title, intro, rest = report.split("\n\n", 2)
    atomic_write_text(paths.report, "\n\n".join([title, intro, section.rstrip("\n"), rest]))
    console.print(section, highlight=False, markup=False)
    return result


def run(cfg: DemoConfig) -> dict:
    from chatrlhf.demo_pipeline import data_dir, model_depth, pipeline_config
    from chatrlhf.ifeval.edit import demonstrations, drafts, ranking_tasks
    from chatrlhf.models import resolve_model
    from chatrlhf.pipeline import run as run_pipeline

    console = Console()
    bench = benchmark_config(cfg)
    # a bad or unreachable IFEval file stops here, before anything is trained or written
    load_items(bench.prompts, bench.limit, bench.seed)
    data = data_dir(cfg)
    sft_rows = write_data(cfg, data)
    demos, tasks = data / "demonstrations.jsonl", data / "ranking_tasks.jsonl"
    if not (cfg.resume and demos.exists() and tasks.exists()):
        console.rule("[bold]demonstrations: the model's drafts, edited to follow every instruction")
        texts = drafts(resolve_model(cfg.model), sft_rows, cfg.seed, DRAFT_TOKENS, console)
        rows = demonstrations(sft_rows, texts, cfg.seed)
        if not rows:
            raise UserError(
                f"demo --task ifeval: no draft of the {len(sft_rows)} SFT prompts could be edited to follow "
                "all its instructions (drafts that are too short, or a model that answers in another language)"
            )
        atomic_write_jsonl(tasks, ranking_tasks(sft_rows, texts, cfg.seed + 3, conflicts()))
        atomic_write_jsonl(demos, rows)
        console.print(
            f"{len(rows)}/{len(sft_rows)} drafts edited to follow every instruction (lm-eval's checkers)"
        )
    pipe_cfg = replace(pipeline_config(cfg, data, model_depth(cfg.model)), ranking_tasks=str(tasks))
    result = run_pipeline(pipe_cfg)
    if "waiting" in result:
        return result
    result["ifeval"] = score_models(cfg, pipe_cfg, result["policy"], console)
    return result

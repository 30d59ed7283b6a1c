"""`chatrlhf eval --benchmark ifeval`: IFEval's prompts answered by a model and scored by lm-eval's checkers.

    chatrlhf eval --benchmark ifeval --prompts ../shared/data/ifeval/input_data.jsonl --output runs/ifeval
    chatrlhf eval --benchmark ifeval --policy runs/x/ppo --baseline runs/x/sft --prompts ifeval.jsonl

Every record is checked before a token is generated. The model (the default one when `--policy` is empty)
answers each prompt once through the project's generation engine, greedy by default as lm-eval decodes, in
the measured dtype, with the chat template. lm-eval's strict and loose readings give four figures: the share
of prompts whose every instruction is followed (prompt-level) and the share of instructions followed
(instruction-level), each with a 95% bootstrap interval over prompts, then the same per instruction type.
With `--baseline` the second model answers too and each figure gets its paired difference and interval.
`--output DIR` keeps ifeval.json, ifeval.md and answers.jsonl (every answer with its verdicts).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from chatrlhf.configs import Benchmark, IFEvalConfig
from chatrlhf.errors import UserError
from chatrlhf.ifeval.checkers import PUNKT_INSTRUCTIONS, IFEvalItem, Verdict, check, load_items, punkt_source
from chatrlhf.runs import atomic_write_jsonl, atomic_write_text

METRICS = ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose")


@dataclass
class Answer:
    text: str
    tokens: int
    verdict: Verdict


@dataclass
class Scores:
    """One model's figures: each metric's mean and 95% interval, overall and per instruction type."""

    overall: dict[str, float]
    overall_ci: dict[str, tuple[float, float]]
    by_type: dict[str, dict]  # type -> {"instructions": n, "strict"/"loose": mean, "..._ci": (lo, hi)}
    mean_tokens: float


@dataclass
class IFEvalResult:
    prompts: int
    instructions: int
    punkt: str  # where nltk's punkt_tab came from
    punkt_prompts: int  # prompts with an instruction whose checker reads punkt_tab
    models: dict[str, str]  # "policy" / "baseline" -> what was loaded
    scores: dict[str, Scores]
    # with a baseline: policy minus baseline, paired over prompts
    difference: dict[str, float] = field(default_factory=dict)
    difference_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    difference_by_type: dict[str, dict] = field(default_factory=dict)


def check_config(cfg: IFEvalConfig) -> None:
    if cfg.benchmark != Benchmark.ifeval:
        raise UserError(f"benchmark: this command runs ifeval, not {cfg.benchmark}")
    if cfg.sampling.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.limit < 0:
        raise UserError(
            "eval --benchmark ifeval: max_new_tokens and batch_size must be at least 1, limit 0 or more"
        )
    if cfg.sampling.temperature < 0:
        raise UserError("eval --benchmark ifeval: sampling.temperature must be 0 (greedy) or more")


def bootstrap(outcomes_by_prompt: list[list[float]], seed: int, rounds: int = 2000) -> tuple[float, float]:
    """95% interval of the mean outcome when prompts are resampled (a prompt's outcomes stay together)."""
    if not outcomes_by_prompt:
        return float("nan"), float("nan")
    sums = np.array([sum(o) for o in outcomes_by_prompt], dtype=np.float64)
    counts = np.array([len(o) for o in outcomes_by_prompt], dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(sums), size=(rounds, len(sums)))
    means = np.sort(sums[picks].sum(1) / counts[picks].sum(1))
    return float(means[int(0.025 * rounds)]), float(means[int(0.975 * rounds) - 1])


def _per_prompt(verdicts: list[Verdict], metric: str) -> list[list[float]]:
    reading = "strict" if metric.endswith("strict") else "loose"
    if metric.startswith("prompt"):
        return [[float(all(getattr(v, reading)))] for v in verdicts]
    return [[float(x) for x in getattr(v, reading)] for v in verdicts]


def _by_type(items: list[IFEvalItem], per_prompt: dict[str, list[list[float]]], seed: int) -> dict[str, dict]:
    """Per instruction type: its instructions' outcomes (strict and loose), prompts resampled."""
    out: dict[str, dict] = {}
    for name in sorted({i for item in items for i in item.instruction_ids}):
        figures: dict = {}
        for reading in ("strict", "loose"):
            groups = [
                [o for o, iid in zip(per_prompt[f"inst_{reading}"][k], item.instruction_ids) if iid == name]
                for k, item in enumerate(items)
            ]
            groups = [g for g in groups if g]
            figures["instructions"] = count = sum(len(g) for g in groups)  # the same for both readings
            figures[reading] = sum(map(sum, groups)) / count
            figures[f"{reading}_ci"] = bootstrap(groups, seed)
        out[name] = figures
    return out


def score(items: list[IFEvalItem], answers: list[Answer], seed: int) -> tuple[Scores, dict[str, list]]:
    """A model's figures from its answers, and the per-prompt outcomes behind them (for paired differences)."""
    verdicts = [a.verdict for a in answers]
    per_prompt = {m: _per_prompt(verdicts, m) for m in METRICS}
    overall = {m: float(np.mean([o for g in per_prompt[m] for o in g])) for m in METRICS}
    scores = Scores(
        overall=overall,
        overall_ci={m: bootstrap(per_prompt[m], seed) for m in METRICS},
        by_type=_by_type(items, per_prompt, seed),
        mean_tokens=float(np.mean([a.tokens for a in answers])),
    )
    return scores, per_prompt


def paired(items: list[IFEvalItem], policy: dict[str, list], baseline: dict[str, list], seed: int):
    """Policy minus baseline per metric and per instruction type (loose), with paired 95% intervals."""
    diffs = {m: [[p - b for p, b in zip(gp, gb)] for gp, gb in zip(policy[m], baseline[m])] for m in METRICS}
    means = {m: float(np.mean([d for g in diffs[m] for d in g])) for m in METRICS}
    intervals = {m: bootstrap(diffs[m], seed) for m in METRICS}
    by_type = _by_type(items, {f"inst_{r}": diffs[f"inst_{r}"] for r in ("strict", "loose")}, seed)
    return means, intervals, by_type


def answer(
    model, tokenizer, items: list[IFEvalItem], cfg: IFEvalConfig, console: Console
) -> list[tuple[str, int]]:
    """(text, token count) of one answer per item, in item order, `batch_size` rows decoding at a time with
    continuous batching. Prompts start in order of length, so a prefill holds little padding; with greedy
    decoding the order does not change an answer."""
    from chatrlhf.chat_template import prompt_ids
    from chatrlhf.generation import generate_each

    rows = [prompt_ids(tokenizer, [{"role": "user", "content": item.prompt}]) for item in items]
    order = sorted(range(len(rows)), key=lambda k: len(rows[k]))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    step = max(1, len(rows) // 10)
    ended = []

    def progress(_index, _continuation) -> None:
        ended.append(1)
        if len(ended) % step == 0 or len(ended) == len(rows):
            console.print(f"  answered {len(ended)}/{len(rows)}", highlight=False)

    continuations = generate_each(model, [rows[k] for k in order], cfg.sampling, tokenizer.eos_token_id,
                                  tokenizer.pad_token_id, cfg.batch_size, generator, progress)  # fmt: skip
    out: list[tuple[str, int]] = [("", 0)] * len(rows)
    for k, cont in zip(order, continuations):
        out[k] = (tokenizer.decode(cont.ids, skip_special_tokens=True), len(cont.ids))
    return out


def model_answers(name: str, items: list[IFEvalItem], cfg: IFEvalConfig, console: Console) -> list[Answer]:
    """The answers of the model `name` (the default model when empty), each with lm-eval's verdicts."""
    from chatrlhf.harness import autocast
    from chatrlhf.models import load_causal_lm, load_tokenizer, pick_device, resolve_dtype, resolve_model

    device = pick_device()
    path = resolve_model(name)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer, device)
    console.print(f"IFEval: {name or 'the default model'} answers {len(items)} prompts")
    with autocast(device, resolve_dtype(cfg.dtype)):
        texts = answer(model, tokenizer, items, cfg, console)
    return [Answer(text, tokens, check(item, text)) for item, (text, tokens) in zip(items, texts)]


def evaluate(
    cfg: IFEvalConfig, answers: dict[str, list[Answer]] | None = None
) -> tuple[IFEvalResult, list[dict]]:
    """The figures and the rows of answers.jsonl. `answers` (per model) skips generation, as tests do."""
    check_config(cfg)
    console = Console()
    items = load_items(cfg.prompts, cfg.limit, cfg.seed)
    models = {"policy": cfg.policy or "default"} | ({"baseline": cfg.baseline} if cfg.baseline else {})
    if answers is None:
        answers = {who: model_answers(cfg.policy if who == "policy" else cfg.baseline, items, cfg, console)
                   for who in models}  # fmt: skip
    scored = {who: score(items, answers[who], cfg.seed) for who in models}
    result = IFEvalResult(
        prompts=len(items),
        instructions=sum(len(item.instruction_ids) for item in items),
        punkt=punkt_source(),
        punkt_prompts=sum(any(i in PUNKT_INSTRUCTIONS for i in item.instruction_ids) for item in items),
        models=models,
        scores={who: s for who, (s, _) in scored.items()},
    )
    if "baseline" in models:
        result.difference, result.difference_ci, result.difference_by_type = paired(
            items, scored["policy"][1], scored["baseline"][1], cfg.seed
        )
    rows = []
    for k, item in enumerate(items):
        row = {"key": item.key, "prompt": item.prompt, "instruction_id_list": item.instruction_ids}
        for who in models:
            a = answers[who][k]
            row[who] = {
                "answer": a.text,
                "tokens": a.tokens,
                "strict": a.verdict.strict,
                "loose": a.verdict.loose,
            }
        rows.append(row)
    return result, rows


def _pct(value: float, ci: tuple[float, float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{value:{sign}.1%} ({ci[0]:{sign}.1%} to {ci[1]:{sign}.1%})"


def report_markdown(result: IFEvalResult, rows: list[dict], show: int) -> str:
    """ifeval.md: the four figures per model (and their difference), per instruction type, some answers."""
    who = list(result.models)
    labels = {"prompt_strict": "prompt-level strict", "prompt_loose": "prompt-level loose",
              "inst_strict": "instruction-level strict", "inst_loose": "instruction-level loose"}  # fmt: skip
    head = [f"{w} ({result.models[w]})" for w in who] + (
        ["policy - baseline (paired)"] if result.difference else []
    )
    lines = [
        f"IFEval: {result.prompts} prompts, {result.instructions} instructions, scored by lm-eval's checkers "
        f"(95% bootstrap intervals over prompts).",
        "",
        "| metric | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(head),
    ]
    for m in METRICS:
        cells = [_pct(result.scores[w].overall[m], result.scores[w].overall_ci[m]) for w in who]
        if result.difference:
            cells.append(_pct(result.difference[m], result.difference_ci[m], signed=True))
        lines.append(f"| {labels[m]} | " + " | ".join(cells) + " |")
    tokens = " | ".join(f"{result.scores[w].mean_tokens:.0f}" for w in who)
    lines.append(f"| mean answer tokens | {tokens} |" + (" |" if result.difference else ""))
    lines += ["", "Instruction-level loose accuracy per instruction type:", ""]
    lines += [
        "| instruction type | instructions | " + " | ".join(head) + " |",
        "|---|---|" + "---|" * len(head),
    ]
    for name, figures in result.scores[who[0]].by_type.items():
        cells = [
            _pct(result.scores[w].by_type[name]["loose"], result.scores[w].by_type[name]["loose_ci"])
            for w in who
        ]
        if result.difference_by_type:
            d = result.difference_by_type[name]
            cells.append(_pct(d["loose"], d["loose_ci"], signed=True))
        lines.append(f"| {name} | {figures['instructions']} | " + " | ".join(cells) + " |")
    lines += ["", punkt_note(result)]
    for row in rows[:show]:
        lines += ["", f"**{row['key']}** ({', '.join(row['instruction_id_list'])}): {row['prompt']}"]
        for w in who:
            lines += [
                "",
                f"*{w}* (loose: {row[w]['loose']}):",
                "",
                "> " + row[w]["answer"].replace("\n", "\n> "),
            ]
    return "\n".join(lines) + "\n"


def punkt_note(result: IFEvalResult) -> str:
    source = {
        "nltk data": "nltk's punkt_tab from the local nltk data",
        "llama-index-core": "nltk's punkt_tab as the llama-index-core wheel ships it, the data lm-eval downloads",
    }.get(result.punkt)
    touched = f"{result.punkt_prompts} of the {result.prompts} prompts have an instruction that reads it"
    if source:
        return f"Sentence and capital-word counting used {source} ({touched})."
    return (
        f"nltk's punkt_tab was not found: sentence and capital-word counting used an untrained Punkt (its rules, "
        f"no English abbreviation list), so those checkers may split differently from lm-eval's ({touched})."
    )


def write(result: IFEvalResult, rows: list[dict], cfg: IFEvalConfig, folder: Path) -> None:
    figures = {"config": asdict(cfg), **asdict(result)}
    atomic_write_text(folder / "ifeval.json", json.dumps(figures, indent=2) + "\n")
    atomic_write_text(folder / "ifeval.md", report_markdown(result, rows, cfg.show))
    atomic_write_jsonl(folder / "answers.jsonl", rows)


def run(cfg: IFEvalConfig) -> IFEvalResult:
    console = Console()
    result, rows = evaluate(cfg)
    console.print(report_markdown(result, rows, cfg.show), highlight=False, markup=False)
    if cfg.output:
        write(result, rows, cfg, Path(cfg.output))
        console.print(f"written: {Path(cfg.output) / 'ifeval.md'}")
    return result

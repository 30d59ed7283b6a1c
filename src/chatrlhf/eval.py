"""`chatrlhf eval`: how a policy compares with a baseline on held-out prompts, by a judge.

    chatrlhf eval --policy runs/x/ppo --baseline runs/x/sft --prompts heldout.jsonl --judge rule

Both models answer every prompt (`samples` answers each, greedy by default); the judge scores each pair of
answers and the policy wins, ties (half a win) or loses: the win-rate comes with a 95% bootstrap interval
over prompts. Also reported: mean judge score, the share of answers meeting every stated constraint (rule
judge), mean reward-model score (with `--reward_model`), answer length in tokens, and KL(policy || baseline)
per answer, estimated on answers sampled from the policy at temperature 1 (sum over tokens of
log pi - log pi_base). A table of side-by-side answers closes the report; `--output DIR` keeps it as
eval.json, eval.md and samples.jsonl.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from chatrlhf.chat_template import prompt_ids
from chatrlhf.configs import EvalConfig, SamplingConfig
from chatrlhf.data import load_prompts
from chatrlhf.errors import UserError
from chatrlhf.forward import gather_logprobs, response_logits
from chatrlhf.generation import generate
from chatrlhf.judges import RuleJudge, constraints_of, make_judge, satisfies_all, unconstrained
from chatrlhf.records import Conversation
from chatrlhf.runs import atomic_write_jsonl, atomic_write_text


@dataclass
class EvalResult:
    prompts: int
    pairs: int
    win_rate: float
    win_rate_ci: tuple[float, float]
    wins: int
    ties: int
    losses: int
    judge_score: dict[str, float]  # "policy" / "baseline" (/ "base") -> mean judge score
    decisive_win_rate: float = float("nan")  # wins / (wins + losses): ties left out
    success_rate: dict[str, float] = field(default_factory=dict)  # rule judge: every constraint met
    success_ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95%, prompts resampled
    # paired bootstrap over prompts of the policy's minus the baseline's every-constraint-met rate
    success_diff_ci: tuple[float, float] = (float("nan"), float("nan"))
    rm_score: dict[str, float] = field(default_factory=dict)
    length: dict[str, float] = field(default_factory=dict)  # mean answer tokens
    kl: float = 0.0  # mean KL(policy || baseline) per answer, nats
    # rule judge: per kind of prompt (its constraints), win-rate and success (with 95% CI) of each model
    by_constraints: dict[str, dict[str, float]] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # side by side: prompt, answers, scores, outcome


def check_config(cfg: EvalConfig) -> None:
    for name in ("policy", "baseline", "prompts"):
        if not getattr(cfg, name):
            raise UserError(f"eval: say which {name} to use: --{name} ...")
    if cfg.samples < 1 or cfg.sampling.max_new_tokens < 1 or cfg.batch_size < 1:
        raise UserError("eval: --samples, --max_new_tokens and --batch_size must be at least 1")


def bootstrap_ci(outcomes_by_prompt: list[list[float]], seed: int, rounds: int = 2000) -> tuple[float, float]:
    """95% interval of the mean outcome, resampling prompts (a prompt's answers stay together)."""
    rng = random.Random(seed)
    n = len(outcomes_by_prompt)
    means = []
    for _ in range(rounds):
        picked = [o for _ in range(n) for o in outcomes_by_prompt[rng.randrange(n)]]
        means.append(sum(picked) / len(picked))
    means.sort()
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def _answers(model, tokenizer, conversations, cfg: EvalConfig, seed: int) -> list[tuple[str, int]]:
    """(text, token count) of `samples` answers per conversation, grouped by conversation."""
    sampling = cfg.sampling
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(conversations), cfg.batch_size):
        chunk = conversations[start : start + cfg.batch_size]
        rows = [prompt_ids(tokenizer, c.messages) for c in chunk for _ in range(cfg.samples)]
        generator = torch.Generator(device=device).manual_seed(seed * 7919 + start)
        gen = generate(model, rows, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
        for text, ids in zip(gen.texts(tokenizer), gen.token_lists(tokenizer.eos_token_id)):
            out.append((text.strip(), len(ids)))
    return out


@torch.no_grad()
def sequence_kl(policy, baseline, tokenizer, conversations, cfg: EvalConfig) -> float:
    """Mean over policy samples (temperature 1) of sum_t log pi(y_t) - log pi_base(y_t)."""
    device = next(policy.parameters()).device
    sampling = SamplingConfig(cfg.sampling.max_new_tokens, 1.0)
    total, count = 0.0, 0
    for start in range(0, len(conversations), cfg.batch_size):
        chunk = conversations[start : start + cfg.batch_size]
        rows = [prompt_ids(tokenizer, c.messages) for c in chunk]
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 104729 + start)
        gen = generate(policy, rows, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
        logits = response_logits(baseline, gen.sequences, gen.attention_mask, gen.prompt_width, 1.0)
        base_logprobs = gather_logprobs(logits, gen.response_ids) * gen.response_mask
        total += float((gen.logprobs - base_logprobs).sum())
        count += len(chunk)
    return total / count


def _load_answers(cfg: EvalConfig, conversations) -> tuple[dict[str, list[tuple[str, int]]], float]:
    """Each model's answers ("policy", "baseline", and "base" when asked) and KL(policy || baseline)."""
    from chatrlhf.harness import autocast
    from chatrlhf.models import load_causal_lm, load_tokenizer, pick_device, resolve_dtype, resolve_model

    device = pick_device()
    dtype = resolve_dtype("auto")
    tokenizer = load_tokenizer(resolve_model(cfg.policy))
    policy = load_causal_lm(resolve_model(cfg.policy), tokenizer, device)
    baseline = load_causal_lm(resolve_model(cfg.baseline), tokenizer, device)
    with autocast(device, dtype):
        answers = {
            "policy": _answers(policy, tokenizer, conversations, cfg, cfg.seed),
            "baseline": _answers(baseline, tokenizer, conversations, cfg, cfg.seed),
        }
        kl = sequence_kl(policy, baseline, tokenizer, conversations, cfg)
        del policy, baseline
        if cfg.base:
            base = load_causal_lm(resolve_model("" if cfg.base == "default" else cfg.base), tokenizer, device)
            answers["base"] = _answers(base, tokenizer, conversations, cfg, cfg.seed)
    return answers, kl


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _by_constraints(rows: list[dict], who: list[str], seed: int) -> dict[str, dict]:
    """Win-rate and every-constraint-met rate (95% CI over prompts) per kind of prompt."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        kind = ", ".join(c for c in row["constraints"] if not c.startswith("about ")) or "none"
        groups.setdefault(kind, {}).setdefault(row["prompt"], []).append(row)
    out = {}
    for kind, by_prompt in sorted(groups.items()):
        flat = [r for group in by_prompt.values() for r in group]
        figures: dict = {"pairs": len(flat), "win_rate": _mean(r["outcome"] for r in flat)}
        for name in who:
            met = [[float(r["met"][name]) for r in group] for group in by_prompt.values()]
            figures[f"{name}_success"] = _mean(m for group in met for m in group)
            figures[f"{name}_success_ci"] = bootstrap_ci(met, seed)
        out[kind] = figures
    return out


def evaluate(cfg: EvalConfig, judge=None, conversations: list[Conversation] | None = None) -> EvalResult:
    check_config(cfg)
    conversations = conversations or load_prompts(cfg.prompts)
    judge = judge or make_judge(cfg.judge or "rule", cfg.judge_model, cfg.llm_base_url, cfg.llm_api_key)
    if isinstance(judge, RuleJudge):
        empty = unconstrained([c.messages for c in conversations], [c.extra for c in conversations])
        if empty:
            Console(stderr=True).print(
                f"[yellow]eval: the rule judge finds no constraint in {empty} of {len(conversations)} prompts; "
                "every answer to them scores 0, so those pairs can only tie"
            )
    answers, kl = _load_answers(cfg, conversations)
    who = list(answers)
    rm = None
    if cfg.reward_model:
        from chatrlhf.judges import RewardModelJudge

        rm = RewardModelJudge(cfg.reward_model)

    rows, outcomes = [], []
    rule = isinstance(judge, RuleJudge)
    for i, conv in enumerate(conversations):
        meta = {**conv.extra, "where": conv.where}
        per_prompt = []
        for s in range(cfg.samples):
            texts = {name: answers[name][i * cfg.samples + s][0] for name in who}
            scored = dict(zip(who, judge.scores(conv.messages, list(texts.values()), meta)))
            p_score, b_score = scored["policy"], scored["baseline"]
            outcome = 1.0 if p_score > b_score else 0.5 if p_score == b_score else 0.0
            per_prompt.append(outcome)
            row = {"prompt": conv.messages[-1]["content"], **texts, "scores": scored}
            row.update(policy_score=p_score, baseline_score=b_score, outcome=outcome)
            if rule:
                row["met"] = {name: satisfies_all(conv.messages, t, meta) for name, t in texts.items()}
                row["constraints"] = [c.describe() for c in constraints_of(conv.messages, meta)]
            if rm is not None:
                row["rm_scores"] = dict(zip(who, rm.scores(conv.messages, list(texts.values()), meta)))
            rows.append(row)
        outcomes.append(per_prompt)
    flat = [o for group in outcomes for o in group]
    wins, losses = sum(o == 1.0 for o in flat), sum(o == 0.0 for o in flat)
    result = EvalResult(
        prompts=len(conversations),
        pairs=len(flat),
        win_rate=_mean(flat),
        win_rate_ci=bootstrap_ci(outcomes, cfg.seed),
        wins=wins,
        ties=len(flat) - wins - losses,
        losses=losses,
        decisive_win_rate=wins / (wins + losses) if wins + losses else float("nan"),
        judge_score={name: _mean(r["scores"][name] for r in rows) for name in who},
        rm_score={name: _mean(r["rm_scores"][name] for r in rows) for name in who} if rm else {},
        length={name: _mean(n for _, n in answers[name]) for name in who},
        kl=kl,
        rows=rows,
    )
    if rule:
        per = cfg.samples
        met = {name: [[float(r["met"][name]) for r in rows[k : k + per]] for k in range(0, len(rows), per)]
               for name in who}  # fmt: skip
        result.success_rate = {name: _mean(m for g in met[name] for m in g) for name in who}
        result.success_ci = {name: bootstrap_ci(met[name], cfg.seed) for name in who}
        diffs = [[p - b for p, b in zip(gp, gb)] for gp, gb in zip(met["policy"], met["baseline"])]
        result.success_diff_ci = bootstrap_ci(diffs, cfg.seed)
        result.by_constraints = _by_constraints(rows, who, cfg.seed)
    return result


def headline(result: EvalResult) -> list[str]:
    """The figures a reader needs first, as sentences (console summary and report)."""
    lo, hi = result.win_rate_ci
    lines = [
        f"win-rate {result.win_rate:.1%} (95% CI {lo:.1%}-{hi:.1%}, ties count half) over {result.pairs} "
        f"pairs: {result.wins} wins, {result.ties} ties, {result.losses} losses; decisive win-rate "
        f"{result.decisive_win_rate:.1%} (wins / (wins + losses))"
    ]
    if result.success_rate:
        sr, ci = result.success_rate, result.success_ci
        parts = [
            f"{name} {sr[name]:.1%} ({ci[name][0]:.1%}-{ci[name][1]:.1%})"
            for name in ("base", "baseline", "policy")
            if name in sr
        ]
        d_lo, d_hi = result.success_diff_ci
        lines.append(
            "every constraint met (95% CI): " + ", ".join(parts) + f"; policy - baseline "
            f"{sr['policy'] - sr['baseline']:+.1%} (paired 95% CI {d_lo:+.1%} to {d_hi:+.1%})"
        )
    return lines


def summary_markdown(result: EvalResult, judge: str, show: int = 8) -> str:
    """The headline, the figures as a markdown table, then `show` side-by-side answers."""
    who = [name for name in ("policy", "baseline", "base") if name in result.judge_score]
    lines = [f"- {line}" for line in headline(result)]
    lines += ["", "| metric | " + " | ".join(who) + " |", "|---|" + "---|" * len(who)]

    def row(label: str, values: dict, spec: str) -> None:
        lines.append(f"| {label} | " + " | ".join(format(values[n], spec) for n in who if n in values) + " |")

    row(f"mean {judge} judge score", result.judge_score, ".3f")
    if result.success_rate:
        row("every constraint met", result.success_rate, ".1%")
    if result.rm_score:
        row("mean reward-model score", result.rm_score, ".3f")
    row("mean answer length (tokens)", result.length, ".1f")
    lines.append(f"| KL(policy ‖ baseline) per answer (nats) | {result.kl:.3f} |" + " |" * (len(who) - 1))
    if result.by_constraints:
        lines += [
            "",
            "| constraints | pairs | win-rate | " + " | ".join(f"{n} meets them" for n in who) + " |",
        ]
        lines.append("|---|---|---|" + "---|" * len(who))
        for kind, g in result.by_constraints.items():
            cells = " | ".join(f"{g[f'{n}_success']:.1%}" for n in who if f"{n}_success" in g)
            lines.append(f"| {kind} | {g['pairs']} | {g['win_rate']:.1%} | {cells} |")
    lines += ["", "| prompt | policy | baseline | outcome |", "|---|---|---|---|"]
    for r in result.rows[:show]:
        cells = [r["prompt"], r["policy"], r["baseline"]]
        cells = [c.replace("|", "\\|").replace("\n", "<br>") for c in cells]
        outcome = {1.0: "win", 0.5: "tie", 0.0: "loss"}[r["outcome"]]
        lines.append(
            f"| {cells[0]} | {cells[1]} ({r['policy_score']:.2f}) | {cells[2]} ({r['baseline_score']:.2f}) "
            f"| {outcome} |"
        )
    return "\n".join(lines) + "\n"


def print_result(result: EvalResult, cfg: EvalConfig, console: Console) -> None:
    table = Table(title=f"{cfg.policy} vs {cfg.baseline}: side by side", show_lines=True)
    for column in ("prompt", "policy", "baseline", ""):
        table.add_column(column, overflow="fold")
    for row in result.rows[: cfg.show]:
        outcome = {1.0: "[green]win", 0.5: "tie", 0.0: "[red]loss"}[row["outcome"]]
        table.add_row(
            row["prompt"],
            f"{row['policy']} ({row['policy_score']:.2f})",
            f"{row['baseline']} ({row['baseline_score']:.2f})",
            outcome,
        )
    console.print(table)
    for line in headline(result):
        console.print(line)
    console.print(
        f"mean judge score: policy {result.judge_score['policy']:.3f}, baseline {result.judge_score['baseline']:.3f}"
        f"; KL(policy||baseline) {result.kl:.3f} nats/answer; length {result.length['policy']:.1f} vs "
        f"{result.length['baseline']:.1f} tokens"
    )


def write_result(result: EvalResult, cfg: EvalConfig, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    figures = {k: v for k, v in asdict(result).items() if k != "rows"}
    atomic_write_text(folder / "eval.json", json.dumps({"config": asdict(cfg), **figures}, indent=2) + "\n")
    atomic_write_text(folder / "eval.md", summary_markdown(result, cfg.judge, cfg.show))
    atomic_write_jsonl(folder / "samples.jsonl", result.rows)


def read_result(folder: Path) -> EvalResult:
    """The result `write_result` wrote into `folder`, rows included."""
    figures = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
    known = {f.name for f in fields(EvalResult)}
    kept = {k: v for k, v in figures.items() if k in known}
    rows_file = folder / "samples.jsonl"
    rows = (
        [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines()]
        if rows_file.exists()
        else []
    )
    result = EvalResult(**{**kept, "rows": rows})
    result.win_rate_ci, result.success_diff_ci = tuple(result.win_rate_ci), tuple(result.success_diff_ci)
    result.success_ci = {name: tuple(ci) for name, ci in result.success_ci.items()}
    return result


def run(cfg: EvalConfig) -> EvalResult:
    cfg = replace(cfg, judge=cfg.judge or "rule")
    console = Console()
    result = evaluate(cfg)
    print_result(result, cfg, console)
    if cfg.output:
        write_result(result, cfg, Path(cfg.output))
        console.print(f"written: {Path(cfg.output) / 'eval.md'}")
    return result

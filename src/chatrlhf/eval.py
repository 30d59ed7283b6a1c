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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from chatrlhf.chat import prompt_ids
from chatrlhf.config import help_field
from chatrlhf.data import Conversation, load_prompts
from chatrlhf.errors import UserError
from chatrlhf.generation import SamplingConfig, generate, response_token_lists
from chatrlhf.judges import RuleJudge, constraints_of, make_judge, satisfies_all
from chatrlhf.runs import atomic_write_jsonl, atomic_write_text


@dataclass
class EvalConfig:
    policy: str = help_field("", "the model being evaluated (a checkpoint folder or hub id)")
    baseline: str = help_field("", "the model it is compared with, e.g. the SFT checkpoint")
    prompts: str = help_field("", "held-out prompts file (extra fields such as `reference` reach the judge)")
    judge: str = help_field("rule", "rule | reference | rm | llm")
    judge_model: str = help_field("", "rm: the gold reward model; llm: the model name at the endpoint")
    llm_base_url: str = help_field("", "llm: OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    llm_api_key: str = help_field("", "llm: API key (default: $OPENAI_API_KEY)")
    reward_model: str = help_field("", "a reward model whose mean scores are reported too (optional)")
    samples: int = help_field(1, "answers per prompt from each model")
    max_new_tokens: int = help_field(128, "longest answer in tokens")
    temperature: float = help_field(0.0, "0 is greedy; above 0 samples")
    top_p: float = help_field(1.0, "nucleus sampling threshold when sampling")
    batch_size: int = help_field(16, "prompts per generation batch")
    seed: int = help_field(0, "random seed (sampling and the bootstrap)")
    output: str = help_field("", "folder for eval.json, eval.md and samples.jsonl; empty only prints")
    show: int = help_field(8, "side-by-side rows in the printed table")


@dataclass
class EvalResult:
    prompts: int
    pairs: int
    win_rate: float
    win_rate_ci: tuple[float, float]
    wins: int
    ties: int
    losses: int
    judge_score: dict[str, float]  # "policy" / "baseline" -> mean judge score
    success_rate: dict[str, float] = field(default_factory=dict)  # rule judge: every constraint met
    rm_score: dict[str, float] = field(default_factory=dict)
    length: dict[str, float] = field(default_factory=dict)  # mean answer tokens
    kl: float = 0.0  # mean KL(policy || baseline) per answer, nats
    # rule judge: per kind of prompt (its constraints), win-rate and success of each side
    by_constraints: dict[str, dict[str, float]] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # side by side: prompt, answers, scores, outcome


def check_config(cfg: EvalConfig) -> None:
    for name in ("policy", "baseline", "prompts"):
        if not getattr(cfg, name):
            raise UserError(f"eval: say which {name} to use: --{name} ...")
    if cfg.samples < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1:
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
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(conversations), cfg.batch_size):
        chunk = conversations[start : start + cfg.batch_size]
        rows = [prompt_ids(tokenizer, c.messages) for c in chunk for _ in range(cfg.samples)]
        generator = torch.Generator(device=device).manual_seed(seed * 7919 + start)
        gen = generate(model, rows, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
        for ids in response_token_lists(gen, tokenizer.eos_token_id):
            out.append((tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids)))
    return out


@torch.no_grad()
def sequence_kl(policy, baseline, tokenizer, conversations, cfg: EvalConfig) -> float:
    """Mean over policy samples (temperature 1) of sum_t log pi(y_t) - log pi_base(y_t)."""
    from chatrlhf.experience import gather_logprobs, response_logits

    device = next(policy.parameters()).device
    sampling = SamplingConfig(cfg.max_new_tokens, 1.0)
    total, count = 0.0, 0
    for start in range(0, len(conversations), cfg.batch_size):
        chunk = conversations[start : start + cfg.batch_size]
        rows = [prompt_ids(tokenizer, c.messages) for c in chunk]
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 104729 + start)
        gen = generate(policy, rows, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
        sequences = torch.cat([gen.prompt_ids, gen.response_ids], dim=1)
        mask = torch.cat([gen.prompt_mask, gen.response_mask], dim=1)
        logits = response_logits(baseline, sequences, mask, gen.prompt_ids.shape[1], 1.0)
        base_logprobs = gather_logprobs(logits, gen.response_ids) * gen.response_mask
        total += float((gen.logprobs - base_logprobs).sum())
        count += len(chunk)
    return total / count


def evaluate(cfg: EvalConfig, judge=None, conversations: list[Conversation] | None = None) -> EvalResult:
    from chatrlhf.models import load_causal_lm, load_tokenizer, pick_device, resolve_model

    check_config(cfg)
    conversations = conversations or load_prompts(cfg.prompts)
    judge = judge or make_judge(cfg.judge, cfg.judge_model, cfg.llm_base_url, cfg.llm_api_key)
    device = pick_device()
    tokenizer = load_tokenizer(resolve_model(cfg.policy))
    policy = load_causal_lm(resolve_model(cfg.policy), tokenizer, device)
    baseline = load_causal_lm(resolve_model(cfg.baseline), tokenizer, device)
    answers = {
        "policy": _answers(policy, tokenizer, conversations, cfg, cfg.seed),
        "baseline": _answers(baseline, tokenizer, conversations, cfg, cfg.seed),
    }
    kl = sequence_kl(policy, baseline, tokenizer, conversations, cfg)
    del policy, baseline
    rm = None
    if cfg.reward_model:
        from chatrlhf.judges import RewardModelJudge

        rm = RewardModelJudge(cfg.reward_model)

    rows, outcomes, scores = [], [], {"policy": [], "baseline": []}
    rm_scores, met = {"policy": [], "baseline": []}, {"policy": [], "baseline": []}
    rule = isinstance(judge, RuleJudge)
    for i, conv in enumerate(conversations):
        meta = {**conv.extra, "where": conv.where}
        per_prompt = []
        for s in range(cfg.samples):
            p_text, b_text = (
                answers["policy"][i * cfg.samples + s][0],
                answers["baseline"][i * cfg.samples + s][0],
            )
            p_score, b_score = judge.scores(conv.messages, [p_text, b_text], meta)
            outcome = 1.0 if p_score > b_score else 0.5 if p_score == b_score else 0.0
            per_prompt.append(outcome)
            scores["policy"].append(p_score)
            scores["baseline"].append(b_score)
            row = {"prompt": conv.messages[-1]["content"], "policy": p_text, "baseline": b_text}
            row.update(policy_score=p_score, baseline_score=b_score, outcome=outcome)
            if rule:
                for who, text in (("policy", p_text), ("baseline", b_text)):
                    met[who].append(satisfies_all(conv.messages, text, meta))
                row["constraints"] = [c.describe() for c in constraints_of(conv.messages, meta)]
            if rm is not None:
                p_rm, b_rm = rm.scores(conv.messages, [p_text, b_text], meta)
                rm_scores["policy"].append(p_rm)
                rm_scores["baseline"].append(b_rm)
            rows.append(row)
        outcomes.append(per_prompt)
    flat = [o for group in outcomes for o in group]

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    by_constraints: dict[str, dict[str, float]] = {}
    if rule:
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(", ".join(row["constraints"]) or "none", []).append(i)
        for kind, idx in sorted(groups.items()):
            by_constraints[kind] = {
                "pairs": len(idx),
                "win_rate": mean([rows[i]["outcome"] for i in idx]),
                "policy_success": mean([met["policy"][i] for i in idx]),
                "baseline_success": mean([met["baseline"][i] for i in idx]),
            }

    return EvalResult(
        prompts=len(conversations),
        pairs=len(flat),
        win_rate=mean(flat),
        win_rate_ci=bootstrap_ci(outcomes, cfg.seed),
        wins=sum(o == 1.0 for o in flat),
        ties=sum(o == 0.5 for o in flat),
        losses=sum(o == 0.0 for o in flat),
        judge_score={k: mean(v) for k, v in scores.items()},
        success_rate={k: mean(v) for k, v in met.items()} if rule else {},
        rm_score={k: mean(v) for k, v in rm_scores.items()} if rm is not None else {},
        length={k: mean([n for _, n in v]) for k, v in answers.items()},
        kl=kl,
        by_constraints=by_constraints,
        rows=rows,
    )


def summary_markdown(result: EvalResult, judge: str, show: int = 8) -> str:
    """The figures as a markdown table, then `show` side-by-side answers."""
    lo, hi = result.win_rate_ci
    lines = [
        "| metric | policy | baseline |",
        "|---|---|---|",
        f"| win-rate over baseline ({judge} judge, 95% CI) | {result.win_rate:.1%} [{lo:.1%}, {hi:.1%}] | |",
        f"| wins / ties / losses | {result.wins} / {result.ties} / {result.losses} | |",
        f"| mean {judge} judge score | {result.judge_score['policy']:.3f} | {result.judge_score['baseline']:.3f} |",
    ]
    if result.success_rate:
        sr = result.success_rate
        lines.append(f"| every constraint met | {sr['policy']:.1%} | {sr['baseline']:.1%} |")
    if result.rm_score:
        lines.append(
            f"| mean reward-model score | {result.rm_score['policy']:.3f} | {result.rm_score['baseline']:.3f} |"
        )
    lines.append(
        f"| mean answer length (tokens) | {result.length['policy']:.1f} | {result.length['baseline']:.1f} |"
    )
    lines.append(f"| KL(policy ‖ baseline) per answer (nats) | {result.kl:.3f} | |")
    if result.by_constraints:
        lines += ["", "| constraints | pairs | win-rate | policy meets them | baseline meets them |"]
        lines.append("|---|---|---|---|---|")
        for kind, g in result.by_constraints.items():
            lines.append(
                f"| {kind} | {g['pairs']} | {g['win_rate']:.1%} | {g['policy_success']:.1%} "
                f"| {g['baseline_success']:.1%} |"
            )
    lines += ["", "| prompt | policy | baseline | outcome |", "|---|---|---|---|"]
    for row in result.rows[:show]:
        cells = [row["prompt"], row["policy"], row["baseline"]]
        cells = [c.replace("|", "\\|").replace("\n", "<br>") for c in cells]
        outcome = {1.0: "win", 0.5: "tie", 0.0: "loss"}[row["outcome"]]
        lines.append(
            f"| {cells[0]} | {cells[1]} ({row['policy_score']:.2f}) | {cells[2]} ({row['baseline_score']:.2f}) "
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
    lo, hi = result.win_rate_ci
    console.print(
        f"win-rate {result.win_rate:.1%} (95% CI {lo:.1%}-{hi:.1%}) over {result.pairs} pairs: "
        f"{result.wins} wins, {result.ties} ties, {result.losses} losses"
    )
    if result.success_rate:
        sr = result.success_rate
        console.print(f"every constraint met: policy {sr['policy']:.1%}, baseline {sr['baseline']:.1%}")
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


def run(cfg: EvalConfig) -> EvalResult:
    console = Console()
    result = evaluate(cfg)
    print_result(result, cfg, console)
    if cfg.output:
        write_result(result, cfg, Path(cfg.output))
        console.print(f"written: {Path(cfg.output) / 'eval.md'}")
    return result

"""`chatrlhf label auto`: simulated labelers rank the open tasks in the labeling DB instead of people.

    chatrlhf label auto --db labels.db --judge rule --noise 0.1

Each simulated labeler (`auto-<judge>-1`, `-2`, ...) is an ordinary labeler in the DB: it asks for its next
task, ranks the answers by the judge's scores plus its own noise, and submits through the same store calls
the web app uses, so assignment, `labels_per_task` and agreement work exactly as for people. A labeler's
noise for a task depends only on (seed, labeler, task): a rerun gives the same rankings. A labeler that sees
no difference between a task's answers skips it; the command says how many and why.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from rich.console import Console

from chatrlhf.configs import LabelAutoConfig
from chatrlhf.errors import UserError
from chatrlhf.judges import make_judge, noisy_ranks, unconstrained

MAX_LABELERS = 64


@dataclass
class Labelled:
    """What the simulated labelers did."""

    submitted: dict[str, int] = field(default_factory=dict)  # labeler name -> rankings submitted
    tied: set[int] = field(default_factory=set)  # tasks skipped: every answer looked equally good
    judged: dict[int, tuple[list[dict], dict]] = field(default_factory=dict)  # task id -> (prompt, meta)


def label(store, judge, noise: float, labelers: int = 0, seed: int = 0, tie_margin: float = 0.0) -> Labelled:
    """Let simulated labelers rank every task still open to them. With `labelers` 0, labelers are added
    until one finds no task left (every task has its labels_per_task)."""
    from chatrlhf.labeling.store import AnswerLabel, SubmissionIn

    result = Labelled()
    done = result.submitted
    cache: dict[int, dict[str, float]] = {}  # the judge's scores of a task's answers, shared by the labelers
    for n in range(1, (labelers or MAX_LABELERS) + 1):
        name = f"auto-{judge.name}-{n}"
        if store.labeler(name) is None:
            store.add_labeler(name)
        labeler = store.labeler(name)
        done[name] = 0
        while (task := store.next_task(labeler.id)) is not None:
            answers = [text for _, text in task.answers]
            if task.task_id not in cache:
                cache[task.task_id] = dict(zip(answers, judge.scores(task.prompt, answers, task.meta)))
                result.judged[task.task_id] = (task.prompt, task.meta)
            scores = [cache[task.task_id][text] for text in answers]
            rng = random.Random(f"{seed}/{name}/{task.task_id}")
            ranks = noisy_ranks(scores, noise, rng, tie_margin)
            if len(set(ranks)) < 2:
                store.skip(labeler.id, task.task_id)  # the judge sees no difference: nothing to learn from
                result.tied.add(task.task_id)
                continue
            labels = [AnswerLabel(answer_id, rank) for (answer_id, _), rank in zip(task.answers, ranks)]
            store.submit(labeler.id, task.task_id, SubmissionIn(labels))
            done[name] += 1
        if not labelers and done[name] == 0:
            break
    return result


def run(cfg: LabelAutoConfig) -> dict:
    from chatrlhf.labeling.store import Store

    console = Console()
    if cfg.noise < 0 or cfg.tie_margin < 0:
        raise UserError("label auto: --noise and --tie_margin must be 0 or more")
    judge = make_judge(cfg.judge, cfg.judge_model, cfg.llm_base_url, cfg.llm_api_key)
    store = Store(cfg.db)
    result = label(store, judge, cfg.noise, cfg.labelers, cfg.seed, cfg.tie_margin)
    progress = store.progress()
    for name, count in result.submitted.items():
        if count:
            console.print(f"{name}: ranked {count} tasks")
    _report_undone(console, cfg, judge, result)
    agreement = progress.get("agreement")
    console.print(
        f"{progress['complete']}/{progress['tasks']} tasks fully labelled; agreement between labelers "
        + (f"{agreement:.3f}" if agreement is not None else "n/a (no task has two labelers)")
    )
    if getattr(judge, "unparsed", 0):
        console.print(f"[yellow]llm judge: {judge.unparsed} replies held no rating 1-10 and counted as 1")
    return progress


def _report_undone(console: Console, cfg: LabelAutoConfig, judge, result: Labelled) -> None:
    """Say which tasks stayed unranked and why, and what would rank them."""
    if result.tied:
        if cfg.noise == 0:
            why = (
                f"the {judge.name} judge scored all their answers the same and noise 0 keeps exact ties; "
                "--noise 0.1 (say) makes the simulated labelers choose between equal answers, as people would"
            )
        else:
            why = (
                f"every answer's noisy score lay within --tie_margin {cfg.tie_margin} of the next better one; "
                "a smaller --tie_margin makes the simulated labelers order them"
            )
        console.print(f"[yellow]{len(result.tied)} tasks skipped, every answer tied: {why}")
    if judge.name == "rule" and result.judged:
        prompts, metas = zip(*result.judged.values())
        empty = unconstrained(list(prompts), list(metas))
        if empty:
            console.print(
                f"[yellow]warning: the rule judge finds no constraint in {empty} of {len(prompts)} prompts, so it "
                'scores every answer to them 0; state one in the prompt ("in at most 15 words", "end with a '
                'question") or give the record a `constraints` list'
            )

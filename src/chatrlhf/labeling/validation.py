"""What the labeling store accepts: the records callers pass in (a task, a labeler's submission), the limits
they keep, and the checks that turn them into database rows or refuse them (`UserError` for a task file,
`Rejected` with an HTTP status for a submission)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from chatrlhf.errors import UserError
from chatrlhf.labeling.schema import RankRow, ResponseRow, TaskRow
from chatrlhf.records import DataError, check_messages

FLAGS = ("fails_instruction", "false_information", "harmful", "other")
SCORE_RANGE = (1, 7)
MAX_NOTE = 10_000


@dataclass
class TaskIn:
    prompt: list[dict[str, str]]  # messages ending in a user turn
    responses: list[str]  # K >= 2 distinct answers
    meta: dict = field(default_factory=dict)  # free JSON: model, seeds, sampling, extra prompt-record fields
    labels_per_task: int = 1  # distinct labelers wanted for this task


@dataclass
class AnswerLabel:
    id: int  # response id, as in TaskView.answers
    rank: int  # 1 is best; equal ranks tie
    score: int | None = None  # optional 1..7 quality score
    flags: list[str] = field(default_factory=list)  # subset of FLAGS


@dataclass
class SubmissionIn:
    answers: list[AnswerLabel]
    note: str = ""


class Rejected(Exception):
    """A submission or request the store refuses; `status` is the HTTP status that says why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _task_row(task: TaskIn, index: int) -> TaskRow:
    where = f"task {index}"
    try:
        prompt = check_messages(task.prompt, where, "prompt", last_role="user")
    except DataError as e:
        raise UserError(str(e)) from None
    responses = task.responses
    if not isinstance(responses, list) or len(responses) < 2:
        raise UserError(f"{where}: `responses` needs at least 2 answers")
    if not all(isinstance(r, str) and r.strip() for r in responses):
        raise UserError(f"{where}: every response must be non-empty text")
    if len(set(responses)) != len(responses):
        raise UserError(f"{where}: the responses must be distinct (a labeler cannot rank two copies)")
    if not isinstance(task.labels_per_task, int) or task.labels_per_task < 1:
        raise UserError(f"{where}: `labels_per_task` must be at least 1, got {task.labels_per_task!r}")
    try:
        json.dumps(task.meta)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: `meta` must be JSON data: {e}") from None
    if not isinstance(task.meta, dict):
        raise UserError(f"{where}: `meta` must be a mapping")
    return TaskRow(
        prompt=prompt,
        meta=task.meta,
        labels_per_task=task.labels_per_task,
        responses=[ResponseRow(position=i, text=text) for i, text in enumerate(responses)],
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked(task: TaskRow, submission: SubmissionIn) -> list[RankRow]:
    """The submission's rank rows, or Rejected(400) saying what is wrong with it."""
    ids = [r.id for r in task.responses]
    k = len(ids)
    answers = submission.answers
    if len(answers) != k:
        raise Rejected(400, f"task {task.id} has {k} answers; the submission ranks {len(answers)}")
    seen = set()
    rows = []
    for a in answers:
        if a.id not in ids:
            raise Rejected(400, f"answer {a.id} is not one of task {task.id}'s answers")
        if a.id in seen:
            raise Rejected(400, f"answer {a.id} appears twice; rank every answer once")
        seen.add(a.id)
        if not _is_int(a.rank) or not 1 <= a.rank <= k:
            raise Rejected(
                400, f"answer {a.id}: rank must be an integer from 1 (best) to {k}, got {a.rank!r}"
            )
        low, high = SCORE_RANGE
        if a.score is not None and (not _is_int(a.score) or not low <= a.score <= high):
            raise Rejected(
                400, f"answer {a.id}: score must be an integer from {low} to {high}, got {a.score!r}"
            )
        if not isinstance(a.flags, (list, tuple)):
            raise Rejected(400, f"answer {a.id}: flags must be a list, got {a.flags!r}")
        flags = list(a.flags)
        unknown = [f for f in flags if f not in FLAGS]
        if unknown:
            raise Rejected(400, f"answer {a.id}: unknown flag {unknown[0]!r} (known: {', '.join(FLAGS)})")
        rows.append(RankRow(response_id=a.id, rank=a.rank, score=a.score, flags=sorted(set(flags))))
    if not isinstance(submission.note, str) or len(submission.note) > MAX_NOTE:
        raise Rejected(400, f"the note must be text of at most {MAX_NOTE} characters")
    return rows

"""What the labeling store gives back: a labeler, a task as a labeler sees it (in their own stable shuffle of
its answers), one of their submissions, and an exported rankings record."""

from __future__ import annotations

import random
from dataclasses import dataclass

from sqlalchemy.orm import Session

from chatrlhf.labeling.schema import SubmissionRow, TaskRow


@dataclass
class LabelerInfo:
    id: int
    name: str
    admin: bool


@dataclass
class TaskView:
    task_id: int
    prompt: list[dict]
    answers: list[tuple[int, str]]  # (response id, text) in this labeler's own, stable random order
    meta: dict


def answer_order(labeler_id: int, task_id: int, response_ids: list[int]) -> list[int]:
    """The labeler's own shuffle of a task's answers: random, but the same on every visit."""
    order = list(response_ids)
    random.Random(f"{task_id}/{labeler_id}").shuffle(order)
    return order


def _view(task: TaskRow, labeler_id: int) -> TaskView:
    texts = {r.id: r.text for r in task.responses}
    order = answer_order(labeler_id, task.id, list(texts))
    return TaskView(task.id, task.prompt, [(i, texts[i]) for i in order], task.meta)


def _submission_view(session: Session, row: SubmissionRow) -> dict:
    task = session.get(TaskRow, row.task_id)
    texts = {r.id: r.text for r in task.responses}
    by_response = {r.response_id: r for r in row.ranks}
    return {
        "submission_id": row.id,
        "task_id": row.task_id,
        "prompt": task.prompt,
        "answers": [
            {
                "id": i,
                "text": texts[i],
                "rank": by_response[i].rank,
                "score": by_response[i].score,
                "flags": by_response[i].flags,
            }
            for i in answer_order(row.labeler_id, task.id, list(texts))
        ],
        "note": row.note,
        "created_at": row.created_at.isoformat() + "Z",
        "updated_at": row.updated_at.isoformat() + "Z",
    }


def _record(task: TaskRow, ranks: list[int], labels: int) -> dict | None:
    if len(set(ranks)) < 2:
        return None  # all answers tie: no preference to learn
    return {
        "prompt": task.prompt,
        "responses": [r.text for r in task.responses],
        "ranks": ranks,
        "task_id": task.id,
        "labels": labels,
        "meta": task.meta,
    }

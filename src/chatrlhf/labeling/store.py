"""The labeling store: tasks (a prompt with K answers), labelers, assignments and submitted rankings.

The tables and the connection are `schema`'s; what callers pass in is checked by `validation`, what they get
back is built by `views`, and labeler agreement is computed by `agreement`. Every query uses bound parameters.

Assignment hands each task to `labels_per_task` distinct labelers: a labeler holds a task under a lease (30
minutes by default) so that concurrent labelers are not handed the same task, gets the same task back until
they submit or skip it (a reload or a server restart resumes where they were), and is never offered a task
they skipped. Deciding who gets a task runs one decision at a time (SQLite: writers take the lock up front
with `BEGIN IMMEDIATE`; PostgreSQL: a transaction-level advisory lock); a submission under a live lease needs
no such wait, because a unique (task, labeler) constraint makes a double submit impossible and the task's
label count is incremented in SQL.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, inspect, or_, select, update
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, aliased

from chatrlhf.errors import UserError
from chatrlhf.labeling.agreement import _agreement_counts, _ratio, aggregate_ranks, pairwise_agreement
from chatrlhf.labeling.schema import (
    MAX_NAME,
    AssignmentRow,
    Base,
    LabelerRow,
    SubmissionRow,
    TaskRow,
    _engine,
    _now,
    _shown,
)
from chatrlhf.labeling.validation import AnswerLabel as AnswerLabel  # re-exported for the store's callers
from chatrlhf.labeling.validation import Rejected, SubmissionIn, TaskIn, _checked, _task_row
from chatrlhf.labeling.views import LabelerInfo, TaskView, _record, _submission_view, _view
from chatrlhf.labeling.views import answer_order as answer_order  # re-exported for the store's callers

# any fixed 64-bit number: the key of PostgreSQL's advisory lock around assignment and submission
ASSIGN_LOCK_KEY = 0x6C6162656C73


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# the store


class Store:
    def __init__(self, url: str, lease_minutes: float = 30.0, create: bool = True):
        """Open the database at `url`, making its tables if missing (`create=False`: it must exist)."""
        self.url = url
        self.lease = timedelta(minutes=lease_minutes)
        if not create and "://" not in url and not Path(url).expanduser().is_file():
            raise UserError(f"--db {url}: no such labeling database file")
        self.engine = _engine(url)
        self.postgres = self.engine.dialect.name == "postgresql"
        self._writer = self.engine.execution_options(writer=True)
        self._labelers: dict[str, LabelerInfo] = {}  # token hash -> labeler; a labeler never changes
        try:
            if create:
                Base.metadata.create_all(self.engine)
            elif not inspect(self.engine).has_table(TaskRow.__tablename__):
                raise UserError(f"--db {_shown(url)}: holds no labeling tasks (no `tasks` table)")
        except (OperationalError, DatabaseError) as e:
            self.engine.dispose()
            reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
            raise UserError(f"cannot open the labeling database {_shown(url)}: {reason}") from None

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def _write(self, serial: bool = False) -> Iterator[Session]:
        """A write transaction; `serial` ones (assignment) run one at a time across processes."""
        with Session(self._writer, expire_on_commit=False) as session, session.begin():
            if serial:
                self._serialize(session)
            yield session

    def _serialize(self, session: Session) -> None:
        """Wait until no other transaction decides assignments (SQLite's writers are serial already)."""
        if self.postgres:
            session.execute(select(func.pg_advisory_xact_lock(ASSIGN_LOCK_KEY)))

    # ---- tasks and labelers

    def add_tasks(self, tasks: Iterable[TaskIn]) -> list[int]:
        rows = [_task_row(task, i) for i, task in enumerate(tasks)]
        with self._write() as session:
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]

    def task_ids(self, **meta: Any) -> list[int]:
        """Ids of the tasks whose meta holds every given key and value, e.g. `task_ids(iteration=2)`."""
        with self._read() as session:
            rows = session.execute(select(TaskRow.id, TaskRow.meta)).tuples().all()
        return [i for i, m in rows if all((m or {}).get(k) == v for k, v in meta.items())]

    def add_labeler(self, name: str, admin: bool = False) -> str:
        """Register a labeler and return their token; only its hash is stored, so it is shown once."""
        name = name.strip()
        if not name or len(name) > MAX_NAME:
            raise UserError(f"a labeler needs a name of 1 to {MAX_NAME} characters, got {name!r}")
        token = secrets.token_urlsafe(32)
        try:
            with self._write() as session:
                if session.scalar(select(LabelerRow.id).where(LabelerRow.name == name)) is not None:
                    raise UserError(f"a labeler named {name!r} already exists")
                session.add(LabelerRow(name=name, token_hash=token_hash(token), admin=admin))
        except IntegrityError:
            raise UserError(f"a labeler named {name!r} already exists") from None
        return token

    def labeler(self, name: str) -> LabelerInfo | None:
        with self._read() as session:
            row = session.scalar(select(LabelerRow).where(LabelerRow.name == name))
            return LabelerInfo(row.id, row.name, row.admin) if row else None

    def authenticate(self, token: str) -> LabelerInfo | None:
        if not token:
            return None
        digest = token_hash(token)
        if digest in self._labelers:
            return self._labelers[digest]
        with self._read() as session:
            row = session.scalar(select(LabelerRow).where(LabelerRow.token_hash == digest))
            if row is None or not hmac.compare_digest(row.token_hash, digest):
                return None
            info = self._labelers[digest] = LabelerInfo(row.id, row.name, row.admin)
            return info

    # ---- assignment

    def next_task(self, labeler_id: int) -> TaskView | None:
        """The labeler's open assignment if its lease holds, else the oldest task that still needs labels."""
        now = _now()
        with self._write(serial=True) as session:
            mine = session.scalar(
                select(AssignmentRow)
                .where(
                    AssignmentRow.labeler_id == labeler_id,
                    AssignmentRow.status == "open",
                    AssignmentRow.leased_until > now,
                )
                .order_by(AssignmentRow.id)
                .limit(1)
            )
            if mine is not None:
                mine.leased_until = now + self.lease
                return _view(session.get(TaskRow, mine.task_id), labeler_id)
            # the oldest task with a free slot that this labeler has not submitted or skipped; their own
            # lapsed lease (outer-joined) is taken up again
            row = session.execute(
                select(TaskRow, AssignmentRow)
                .outerjoin(
                    AssignmentRow,
                    and_(AssignmentRow.task_id == TaskRow.id, AssignmentRow.labeler_id == labeler_id),
                )
                .where(
                    TaskRow.complete.is_(False),
                    or_(AssignmentRow.id.is_(None), AssignmentRow.status == "open"),
                    TaskRow.labels + _held_by_others(labeler_id, now) < TaskRow.labels_per_task,
                )
                .order_by(TaskRow.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            task, own = row
            if own is None:
                session.add(
                    AssignmentRow(
                        task_id=task.id, labeler_id=labeler_id, status="open", leased_until=now + self.lease
                    )
                )
            else:
                own.leased_until = now + self.lease
            return _view(task, labeler_id)

    def skip(self, labeler_id: int, task_id: int) -> None:
        """Never offer this task to this labeler again."""
        try:
            with self._write() as session:
                if session.get(TaskRow, task_id) is None:
                    raise Rejected(404, f"no task {task_id}")
                own = _assignment(session, task_id, labeler_id)
                if own is not None and own.status == "submitted":
                    raise Rejected(409, f"task {task_id} is already submitted; it cannot be skipped")
                if own is None:
                    session.add(
                        AssignmentRow(
                            task_id=task_id, labeler_id=labeler_id, status="skipped", leased_until=_now()
                        )
                    )
                else:
                    own.status = "skipped"
        except IntegrityError:  # the task was being assigned to this labeler at the same instant
            raise Rejected(409, f"task {task_id} changed meanwhile; skip it again") from None

    # ---- submissions

    def submit(self, labeler_id: int, task_id: int, submission: SubmissionIn) -> int:
        """Store one labeler's ranking of a task assigned to them; returns the submission id."""
        now = _now()
        try:
            with self._write() as session:
                task = session.get(TaskRow, task_id)
                if task is None:
                    raise Rejected(404, f"no task {task_id}")
                own = _assignment(session, task_id, labeler_id)
                if own is not None and own.status == "submitted":
                    previous = session.scalar(
                        select(SubmissionRow.id).where(
                            SubmissionRow.task_id == task_id, SubmissionRow.labeler_id == labeler_id
                        )
                    )
                    raise Rejected(
                        409,
                        f"task {task_id} is already submitted (submission {previous}); "
                        f"change it with PUT /api/submissions/{previous}",
                    )
                if own is None or own.status != "open":
                    why = "you skipped it" if own is not None else "ask for it with GET /api/tasks/next"
                    raise Rejected(409, f"task {task_id} is not assigned to you ({why})")
                if own.leased_until <= now:
                    # a lapsed lease counts only if nobody took the slot meanwhile; that is decided like an
                    # assignment, one at a time
                    self._serialize(session)
                    labels = session.scalar(select(TaskRow.labels).where(TaskRow.id == task_id))
                    held = session.scalar(select(_held_by_others(labeler_id, now, task_id)))
                    if labels + held >= task.labels_per_task:
                        raise Rejected(
                            409, f"your lease on task {task_id} expired and other labelers have taken it"
                        )
                row = SubmissionRow(
                    task_id=task_id,
                    labeler_id=labeler_id,
                    note=submission.note,
                    ranks=_checked(task, submission),
                )
                session.add(row)
                own.status = "submitted"
                session.flush()
                # counted in SQL, so that concurrent submissions to one task cannot lose a count
                session.execute(
                    update(TaskRow)
                    .where(TaskRow.id == task_id)
                    .values(labels=TaskRow.labels + 1, complete=TaskRow.labels + 1 >= TaskRow.labels_per_task)
                )
                return row.id
        except IntegrityError:
            # two submissions of one task by one labeler raced; the unique constraint let one through
            raise Rejected(409, f"task {task_id} is already submitted") from None

    def update_submission(self, labeler_id: int, submission_id: int, submission: SubmissionIn) -> None:
        """Replace the labels of one of the labeler's own submissions."""
        with self._write() as session:
            row = _own_submission(session, labeler_id, submission_id)
            task = session.get(TaskRow, row.task_id)
            row.ranks = _checked(task, submission)
            row.note = submission.note
            row.updated_at = _now()

    def submissions(self, labeler_id: int) -> list[dict]:
        """The labeler's own submissions, newest first."""
        with self._read() as session:
            rows = session.scalars(
                select(SubmissionRow)
                .where(SubmissionRow.labeler_id == labeler_id)
                .order_by(SubmissionRow.id.desc())
            ).all()
            return [_submission_view(session, row) for row in rows]

    def submission(self, labeler_id: int, submission_id: int) -> dict:
        with self._read() as session:
            return _submission_view(session, _own_submission(session, labeler_id, submission_id))

    # ---- export and statistics

    @staticmethod
    def _all_labels(
        session: Session,
    ) -> tuple[dict[int, dict[int, list[int]]], dict[int, TaskRow], list[SubmissionRow]]:
        """labels[task_id][labeler_id] = ranks in the task's stored response order, with tasks and submissions."""
        submissions = session.scalars(select(SubmissionRow).order_by(SubmissionRow.id)).all()
        task_ids = sorted({s.task_id for s in submissions})
        tasks = {t.id: t for t in session.scalars(select(TaskRow).where(TaskRow.id.in_(task_ids)))}
        labels: dict[int, dict[int, list[int]]] = {}
        for s in submissions:
            by_response = {r.response_id: r.rank for r in s.ranks}
            labels.setdefault(s.task_id, {})[s.labeler_id] = [
                by_response[r.id] for r in tasks[s.task_id].responses
            ]
        return labels, tasks, list(submissions)

    def rankings(self, per_labeler: bool = False, min_labels: int = 1) -> list[dict]:
        """Export records in the reward stage's rankings format (see module `chatrlhf.preferences`)."""
        with self._read() as session:
            labels, tasks, submissions = self._all_labels(session)
            names = dict(session.execute(select(LabelerRow.id, LabelerRow.name)).tuples().all())
        records = []
        if per_labeler:
            for s in submissions:
                if len(labels[s.task_id]) < min_labels:
                    continue
                task = tasks[s.task_id]
                by_response = {r.response_id: r for r in s.ranks}
                ranked = [by_response[r.id] for r in task.responses]
                record = _record(task, [r.rank for r in ranked], 1)
                if record:
                    record.update(
                        labeler=names[s.labeler_id],
                        scores=[r.score for r in ranked],
                        flags=[r.flags for r in ranked],
                        note=s.note,
                    )
                    records.append(record)
            return records
        for task_id, by_labeler in labels.items():
            if len(by_labeler) >= min_labels:
                record = _record(tasks[task_id], aggregate_ranks(list(by_labeler.values())), len(by_labeler))
                if record:
                    records.append(record)
        return records

    def progress(self) -> dict[str, Any]:
        with self._read() as session:
            labels, _, _ = self._all_labels(session)
            count = session.scalar  # a count query's single value
            submitted = dict(
                session.execute(
                    select(SubmissionRow.labeler_id, func.count()).group_by(SubmissionRow.labeler_id)
                )
                .tuples()
                .all()
            )
            skipped = dict(
                session.execute(
                    select(AssignmentRow.labeler_id, func.count())
                    .where(AssignmentRow.status == "skipped")
                    .group_by(AssignmentRow.labeler_id)
                )
                .tuples()
                .all()
            )
            labelers = session.scalars(select(LabelerRow).order_by(LabelerRow.id)).all()
            summary = {
                "tasks": count(select(func.count()).select_from(TaskRow)),
                "complete": count(select(func.count()).select_from(TaskRow).where(TaskRow.complete)),
                "submissions": count(select(func.count()).select_from(SubmissionRow)),
                "skips": count(
                    select(func.count()).select_from(AssignmentRow).where(AssignmentRow.status == "skipped")
                ),
                "in_progress": count(
                    select(func.count())
                    .select_from(AssignmentRow)
                    .where(AssignmentRow.status == "open", AssignmentRow.leased_until > _now())
                ),
            }
        summary["labelers"] = [
            {
                "name": row.name,
                "admin": row.admin,
                "submitted": submitted.get(row.id, 0),
                "skipped": skipped.get(row.id, 0),
                "agreement": _ratio(*_agreement_counts(labels, only=row.id)),
            }
            for row in labelers
        ]
        summary["agreement"] = pairwise_agreement(labels)
        return summary


# --------------------------------------------------------------------------------------------------
# helpers


def _held_by_others(labeler_id: int, now: datetime, task_id: Any = TaskRow.id):
    """Count of a task's unexpired open leases held by other labelers (correlated with TaskRow by default)."""
    held = aliased(AssignmentRow)
    return (
        select(func.count())
        .select_from(held)
        .where(
            held.task_id == task_id,
            held.labeler_id != labeler_id,
            held.status == "open",
            held.leased_until > now,
        )
        .correlate(TaskRow)
        .scalar_subquery()
    )


def _assignment(session: Session, task_id: int, labeler_id: int) -> AssignmentRow | None:
    return session.scalar(
        select(AssignmentRow).where(AssignmentRow.task_id == task_id, AssignmentRow.labeler_id == labeler_id)
    )


def _own_submission(session: Session, labeler_id: int, submission_id: int) -> SubmissionRow:
    row = session.get(SubmissionRow, submission_id)
    if row is None or row.labeler_id != labeler_id:  # another labeler's looks exactly like a missing one
        raise Rejected(404, f"no submission {submission_id} of yours")
    return row

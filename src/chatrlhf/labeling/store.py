"""The labeling database: tasks (a prompt with K answers), labelers, assignments and submitted rankings.

SQLAlchemy ORM over a SQLite file (the default) or PostgreSQL (`postgresql://user@host:port/db`). Every query
uses bound parameters. Assignment hands each task to `labels_per_task` distinct labelers: a labeler holds a
task under a lease (30 minutes by default) so that concurrent labelers are not handed the same task, gets the
same task back until they submit or skip it (a reload or a server restart resumes where they were), and is
never offered a task they skipped. Deciding who gets a task runs one decision at a time (SQLite: writers
take the lock up front with `BEGIN IMMEDIATE`; PostgreSQL: a transaction-level advisory lock); a submission
under a live lease needs no such wait, because a unique (task, labeler) constraint makes a double submit
impossible and the task's label count is incremented in SQL.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column, relationship

from chatrlhf.errors import UserError
from chatrlhf.records import DataError, check_messages

FLAGS = ("fails_instruction", "false_information", "harmful", "other")
SCORE_RANGE = (1, 7)
MAX_NOTE = 10_000
MAX_NAME = 100
# any fixed 64-bit number: the key of PostgreSQL's advisory lock around assignment and submission
ASSIGN_LOCK_KEY = 0x6C6162656C73


# --------------------------------------------------------------------------------------------------
# the records callers pass in and get back


@dataclass
class TaskIn:
    prompt: list[dict[str, str]]  # messages ending in a user turn
    responses: list[str]  # K >= 2 distinct answers
    meta: dict = field(default_factory=dict)  # free JSON: model, seeds, sampling, extra prompt-record fields
    labels_per_task: int = 1  # distinct labelers wanted for this task


@dataclass
class LabelerInfo:
    id: int
    name: str
    admin: bool


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


@dataclass
class TaskView:
    task_id: int
    prompt: list[dict]
    answers: list[tuple[int, str]]  # (response id, text) in this labeler's own, stable random order
    meta: dict


class Rejected(Exception):
    """A submission or request the store refuses; `status` is the HTTP status that says why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


# --------------------------------------------------------------------------------------------------
# tables


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(
        tzinfo=None
    )  # naive UTC: compares alike on SQLite and PostgreSQL


class TaskRow(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt: Mapped[list] = mapped_column(JSON)
    meta: Mapped[dict] = mapped_column(JSON)
    labels_per_task: Mapped[int]
    labels: Mapped[int] = mapped_column(default=0)  # submissions so far, kept in the submitting transaction
    complete: Mapped[bool] = mapped_column(default=False, index=True)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    responses: Mapped[list[ResponseRow]] = relationship(order_by="ResponseRow.position", lazy="selectin")


class ResponseRow(Base):
    __tablename__ = "responses"
    __table_args__ = (UniqueConstraint("task_id", "position"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    position: Mapped[int]  # order as stored, which exported ranks follow
    text: Mapped[str] = mapped_column(Text)


class LabelerRow(Base):
    __tablename__ = "labelers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME), unique=True)
    token_hash: Mapped[str] = mapped_column(
        String(64), unique=True
    )  # sha256 hex; the token itself is not kept
    admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=_now)


class AssignmentRow(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("task_id", "labeler_id"),
        Index("ix_assignments_labeler_status", "labeler_id", "status"),
        Index("ix_assignments_task_status", "task_id", "status"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"))
    status: Mapped[str] = mapped_column(String(10))  # open | submitted | skipped
    leased_until: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=_now)


class SubmissionRow(Base):
    __tablename__ = "submissions"
    __table_args__ = (UniqueConstraint("task_id", "labeler_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now)
    ranks: Mapped[list[RankRow]] = relationship(cascade="all, delete-orphan", lazy="selectin")


class RankRow(Base):
    __tablename__ = "ranks"
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"), primary_key=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"), primary_key=True)
    rank: Mapped[int]
    score: Mapped[int | None]
    flags: Mapped[list] = mapped_column(JSON)


# --------------------------------------------------------------------------------------------------
# opening the database


def database_url(url: str) -> str:
    """A plain path is a SQLite file; `postgresql://` uses the psycopg 3 driver."""
    if "://" not in url:
        return "sqlite:///" + str(Path(url).expanduser().resolve())
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def _engine(url: str) -> Engine:
    full = database_url(url)
    try:
        parsed = make_url(full)
    except (ArgumentError, ValueError):
        raise UserError(
            f"--db {_shown(url)}: not a database URL or path (e.g. labels.db, postgresql://user@host:5432/db)"
        ) from None
    if parsed.get_backend_name() != "sqlite":
        try:
            return create_engine(full, pool_pre_ping=True)
        except (NoSuchModuleError, ArgumentError, ImportError) as e:
            raise UserError(f"--db {_shown(url)}: no database driver for this URL ({e})") from None
    if not parsed.database or parsed.database == ":memory:":
        raise UserError(f"--db {url!r}: give a file; an in-memory database would lose every label")
    try:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--db {url!r}: cannot create the folder for the database: {e.strerror}") from None
    engine = create_engine(full, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged submission survives a power cut
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # a writer takes the write lock up front, so its reads and writes form one atomic step
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("writer") else "BEGIN")

    return engine


def _shown(url: str) -> str:
    try:
        return make_url(database_url(url)).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def answer_order(labeler_id: int, task_id: int, response_ids: list[int]) -> list[int]:
    """The labeler's own shuffle of a task's answers: random, but the same on every visit."""
    order = list(response_ids)
    random.Random(f"{task_id}/{labeler_id}").shuffle(order)
    return order


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


def _view(task: TaskRow, labeler_id: int) -> TaskView:
    texts = {r.id: r.text for r in task.responses}
    order = answer_order(labeler_id, task.id, list(texts))
    return TaskView(task.id, task.prompt, [(i, texts[i]) for i in order], task.meta)


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


def _own_submission(session: Session, labeler_id: int, submission_id: int) -> SubmissionRow:
    row = session.get(SubmissionRow, submission_id)
    if row is None or row.labeler_id != labeler_id:  # another labeler's looks exactly like a missing one
        raise Rejected(404, f"no submission {submission_id} of yours")
    return row


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


def aggregate_ranks(rankings: list[list[int]]) -> list[int]:
    """Mean rank per response across labelers, re-ranked densely (1 = best mean; equal means tie)."""
    # every response has the same number of labels, so comparing sums compares means exactly
    sums = [sum(column) for column in zip(*rankings)]
    dense = {s: i + 1 for i, s in enumerate(sorted(set(sums)))}
    return [dense[s] for s in sums]


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


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def _agreement_counts(labels: dict[int, dict[int, list[int]]], only: int | None = None) -> tuple[int, int]:
    """(agreeing, total) relations over labeler pairs and response pairs; `only`: pairs with that labeler."""
    agree = total = 0
    for by_labeler in labels.values():
        for a, b in combinations(sorted(by_labeler), 2):
            if only is not None and only not in (a, b):
                continue
            ra, rb = by_labeler[a], by_labeler[b]
            for i, j in combinations(range(len(ra)), 2):
                total += 1
                agree += _sign(ra[i] - ra[j]) == _sign(rb[i] - rb[j])
    return agree, total


def _ratio(agree: int, total: int) -> float | None:
    return agree / total if total else None


def pairwise_agreement(labels: dict[int, dict[int, list[int]]]) -> float | None:
    """Fraction of (task, labeler pair, response pair) where both labelers give the same relation.

    labels[task_id][labeler_id] = ranks aligned to the task's stored response order; the relation of responses
    i < j is "i better", "j better" or "tie". None when no task has two labelers.
    """
    return _ratio(*_agreement_counts(labels))

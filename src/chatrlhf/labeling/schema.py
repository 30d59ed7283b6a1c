"""The labeling database's tables (tasks, responses, labelers, assignments, submissions, ranks) and opening
it: SQLAlchemy ORM over a SQLite file (the default) or PostgreSQL (`postgresql://user@host:port/db`).

On SQLite a writer takes the lock up front with `BEGIN IMMEDIATE` (a connection executing with the `writer`
option), so that its reads and writes form one atomic step; every write is synced to disk.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint, create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from chatrlhf.errors import UserError

MAX_NAME = 100


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

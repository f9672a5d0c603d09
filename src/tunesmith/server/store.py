"""The job store: API keys, files, fine-tuning jobs and their events, in any database SQLAlchemy
reaches. SQLite (a file in the storage root) by default: no server to run; a PostgreSQL URL for a
deployment several servers share. The schema is Alembic's (``migrations/``), brought up to date when
the server starts, so an upgraded tunesmith migrates an existing store instead of failing on it.

Every read of a user's rows goes through ``owned`` (the key's id in the query): another key's ids are
not found, never "forbidden", so that they cannot be told apart from ids that do not exist.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, create_engine, event, false, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

KEY_PREFIX = "tsk-"  # what a tunesmith API key starts with (the rest: 32 random bytes, URL-safe)
MIGRATIONS = Path(__file__).with_name("migrations")


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    """A key: only its SHA-256 is stored (keys are 256 random bits: a slow hash would add nothing)."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[int] = mapped_column(Integer)
    revoked_at: Mapped[int | None] = mapped_column(Integer, nullable=True)


class File(Base):
    """An uploaded file: its bytes live at ``storage.Storage.file_path(id)``; ``filename`` is the
    client's name, shown back and never used as a path."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(40))
    bytes: Mapped[int] = mapped_column(Integer)
    rows: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(40))  # supervised | preference (what the rows are)
    created_at: Mapped[int] = mapped_column(Integer)


class Job(Base):
    """A fine-tuning job. ``request`` is the create request as OpenAI's fields (plus tunesmith's);
    ``config`` the resolved training config tree it runs with."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), index=True)  # validating_files queued running succeeded ...
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(Integer, index=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300), nullable=True, unique=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    model_deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The training process of the current launch: where it runs, to wait for it after a restart.
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid_started: Mapped[float | None] = mapped_column(Float, nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    launches: Mapped[int] = mapped_column(Integer, default=0)
    # The server that runs the job (queue.server_id) and when it last said it still does; servers sharing the
    # store take a job only by claiming it, and a running job only from a server that has gone.
    claimed_by: Mapped[str | None] = mapped_column(String(300), nullable=True)
    heartbeat: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class JobEvent(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(48), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(10))
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(10))  # message | metrics
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


def new_id(prefix: str) -> str:
    """An unguessable id: ``prefix`` and 24 hex digits (96 random bits)."""
    return f"{prefix}{secrets.token_hex(12)}"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def now() -> int:
    return int(time.time())


def migrate(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (Alembic's ``upgrade head``)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (requests) do not wait for the queue's writes
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class Store:
    """The database: sessions, and the few queries more than one module needs."""

    def __init__(self, url: str):
        migrate(url)
        self.url = url
        self.engine: Engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed at the end of the block (rolled back on an error)."""
        with self._sessions() as session, session.begin():
            yield session

    def create_key(self, name: str) -> tuple[str, str]:
        """A new API key: (its id, the key itself: shown once, stored only as its digest)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        ident = new_id("key-")
        with self.session() as session:
            session.add(ApiKey(id=ident, name=name, digest=digest(key), created_at=now()))
        return ident, key

    def key_owner(self, key: str) -> str | None:
        """The id of the live key ``key``, or None."""
        with self.session() as session:
            found = session.scalar(select(ApiKey).where(ApiKey.digest == digest(key), ApiKey.revoked_at.is_(None)))
            return found.id if found is not None else None

    def keys(self) -> list[ApiKey]:
        with self.session() as session:
            return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    def revoke_key(self, ident: str) -> bool:
        with self.session() as session:
            found = session.get(ApiKey, ident)
            if found is None or found.revoked_at is not None:
                return False
            found.revoked_at = now()
            return True

    def add_event(self, session: Session, job_id: str, message: str, level: str = "info", kind: str = "message",
                  data: dict[str, Any] | None = None) -> None:
        session.add(JobEvent(id=new_id("ftevent-"), job_id=job_id, created_at=now(), level=level, message=message,
                             type=kind, data=data))


Row = TypeVar("Row", File, Job)


def owned(session: Session, table: type[Row], ident: str, owner: str) -> Row | None:
    """The row ``ident`` of ``table`` if it belongs to ``owner``; None for another key's row too."""
    return session.scalar(select(table).where(table.id == ident, table.owner == owner))

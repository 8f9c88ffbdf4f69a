"""Database models and sessions (SQLAlchemy 2; SQLite by default, any URL accepted)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    BigInteger,
    Engine,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
UNFINISHED = (QUEUED, RUNNING)


class Base(DeclarativeBase):
    pass


class CheckpointRow(Base):
    """One user's view of a stored checkpoint; the file is shared by content (sha256)."""

    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    format: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    n_layers: Mapped[int] = mapped_column(Integer)
    skipped_json: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class ActivationsRow(Base):
    """Feature maps a user uploaded for one of their checkpoints (file shared by sha256)."""

    __tablename__ = "activations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    checkpoint_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    n_layers: Mapped[int] = mapped_column(Integer)
    n_samples: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class BlobRow(Base):
    """A stored file by content (``kind``: checkpoints or activations).

    Its row is the lock that every upload and every removal of those bytes takes in its
    transaction (:mod:`service.store.blobs`); it is kept when the file goes.
    """

    __tablename__ = "blobs"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    touched_at: Mapped[float] = mapped_column(Float, default=0.0)


class LoginRow(Base):
    """A dashboard login (:mod:`service.store.logins`): the cookie holds a random id, this row its
    sha256 (a copy of the database gives no usable cookie); deleting the row revokes it."""

    __tablename__ = "logins"

    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(String(200), index=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    checkpoint_id: Mapped[str] = mapped_column(String(64), index=True)
    request_json: Mapped[str] = mapped_column(Text)
    summary_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    """methods, target, plan_method: what a job list shows, without reading the request"""
    status: Mapped[str] = mapped_column(String(16), default=QUEUED, index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    report_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    plan_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    runner: Mapped[str | None] = mapped_column(String(32), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0, index=True)
    cache_hits: Mapped[int] = mapped_column(Integer, default=0)
    cache_misses: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets a busy timeout and WAL so processes can share it."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    return engine


def init_db(url: str) -> tuple[Engine, sessionmaker[Session]]:
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)


def _add_missing_columns(engine: Engine) -> None:
    """Bring a database made by an earlier version up to date.

    Every column added since the first version is nullable or has a default, so adding it is
    the whole migration (no Alembic needed yet; a change of that kind would need one).
    """
    inspector = inspect(engine)
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            ddl = column.type.compile(dialect=engine.dialect)
            default = getattr(column.default, "arg", None)
            clause = f" DEFAULT {default!r}" if isinstance(default, (int, float)) else ""
            with engine.begin() as conn:
                conn.execute(
                    text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {ddl}{clause}")
                )

"""Shared files by content, reference-counted by database rows, without losing a file to a race.

A checkpoint (or activations file) is stored once per sha256 and referenced by one row per user
(:class:`service.store.db.CheckpointRow`, :class:`service.store.db.ActivationsRow`). Adding a
reference and removing the file when the last one goes both take the lock of the file's
:class:`service.store.db.BlobRow` inside their database transaction, so they are serialised across
threads, processes and replicas that share the database:

* :func:`add` locks, inserts the caller's rows, then makes sure the file is there (moving the
  upload's temp file in place when it is missing, e.g. removed a moment ago), and commits.
* :func:`release` runs after the transaction that deleted the caller's rows has committed; it
  locks, counts the rows still referring to the bytes and removes the file only when none does.

The lock is a row lock taken by an ``UPDATE`` of the blob's row: on PostgreSQL that row only, on
SQLite the database's write lock (SQLite has one writer at a time); both are held until the
transaction ends. A file is therefore never removed while a row refers to it, and a row is never
committed without its file. A crash between the two steps of a delete leaves an unreferenced file
behind (never a row without a file); :func:`release` of those bytes later removes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import insert, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.store.db import BlobRow

T = TypeVar("T")


def lock(s: Session, kind: str, sha256: str) -> None:
    """Take the lock of the blob ``(kind, sha256)`` in ``s``'s transaction (until it ends)."""
    values = {"kind": kind, "sha256": sha256, "touched_at": time.time()}
    dialect = s.get_bind().dialect.name
    if dialect == "sqlite":
        s.execute(sqlite.insert(BlobRow).values(**values).on_conflict_do_nothing())
    elif dialect == "postgresql":
        s.execute(postgresql.insert(BlobRow).values(**values).on_conflict_do_nothing())
    else:  # any other database: insert in a savepoint, a duplicate is fine
        try:
            with s.begin_nested():
                s.execute(insert(BlobRow).values(**values))
        except IntegrityError:
            pass
    s.execute(
        update(BlobRow)
        .where(BlobRow.kind == kind, BlobRow.sha256 == sha256)
        .values(touched_at=values["touched_at"])
    )


def add(
    sessions: sessionmaker[Session],
    kind: str,
    sha256: str,
    rows: Callable[[Session], T],
    place: Callable[[], None],
) -> T:
    """Add references to a file and make sure it is stored, atomically w.r.t. :func:`release`.

    Args:
        rows: inserts the caller's rows in the transaction (and may raise to refuse, e.g. a
            quota); its result is returned.
        place: puts the file at its content address when it is missing (else drops the
            caller's copy); runs under the lock, after ``rows``.
    """
    with sessions.begin() as s:
        lock(s, kind, sha256)
        result = rows(s)
        place()
    return result


def release(
    sessions: sessionmaker[Session],
    kind: str,
    sha256: str,
    in_use: Callable[[Session], bool],
    remove: Callable[[], None],
) -> bool:
    """Remove the file when no row refers to it any more; True when it was removed.

    Call it after the transaction that deleted the caller's rows has committed.
    """
    with sessions.begin() as s:
        lock(s, kind, sha256)
        if in_use(s):
            return False
        remove()
    return True

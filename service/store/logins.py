"""Dashboard logins: a random session id in the cookie, never the API token.

``POST /login`` checks the token once and sets the cookie :data:`SESSION_COOKIE` to a fresh
random id (256 bits); the database keeps only its sha256, the user and an expiry
(``PRUNEGRAPH_SESSION_TTL_S``). A session is valid while its row exists, has not expired and its
user still has a token in the server's configuration: ``POST /logout`` deletes the row, removing
a user's tokens ends their sessions, and an operator can revoke any session by deleting rows of
the ``logins`` table (all of a user's: :func:`end_all`). Expired rows are removed at each login.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Container

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from service.store.db import LoginRow

SESSION_COOKIE = "prunegraph_session"
_MAX_ID = 128  # longer cookie values are not ours: refused without hashing


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def start(sessions: sessionmaker[Session], user: str, ttl_s: float) -> str:
    """A new session of ``user`` lasting ``ttl_s`` seconds; its id (the cookie's value)."""
    session_id = secrets.token_urlsafe(32)
    now = time.time()
    with sessions.begin() as s:
        s.execute(delete(LoginRow).where(LoginRow.expires_at < now))
        s.add(LoginRow(id_sha256=_key(session_id), user=user, created_at=now,
                       expires_at=now + ttl_s))  # fmt: skip
    return session_id


def user_of(sessions: sessionmaker[Session], session_id: str, users: Container[str]) -> str | None:
    """The user of a valid session (known, not expired, user still in ``users``), else None."""
    if not session_id or len(session_id) > _MAX_ID:
        return None
    with sessions() as s:
        row = s.get(LoginRow, _key(session_id))
        if row is None or row.expires_at <= time.time() or row.user not in users:
            return None
        return row.user


def end(sessions: sessionmaker[Session], session_id: str) -> None:
    """Revoke one session (logout); nothing happens for an unknown id."""
    if session_id and len(session_id) <= _MAX_ID:
        with sessions.begin() as s:
            s.execute(delete(LoginRow).where(LoginRow.id_sha256 == _key(session_id)))


def end_all(sessions: sessionmaker[Session], user: str) -> int:
    """Revoke every session of ``user``; how many there were."""
    with sessions.begin() as s:
        result = s.execute(delete(LoginRow).where(LoginRow.user == user))
        return int(result.rowcount)  # type: ignore[attr-defined]

"""Cursor pagination of list endpoints: newest first, ``limit`` items a page, opaque cursors.

A cursor names the last item of a page by ``(created_at, id)``; the next page holds the items
strictly older in that order, so items added meanwhile never shift a page (they appear on the
first one).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from sqlalchemy import and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from service.api.errors import ApiError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def encode(created_at: float, ident: str) -> str:
    raw = json.dumps([created_at, ident], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str) -> tuple[float, str]:
    """The ``(created_at, id)`` of a cursor; 400 when it is not one this server gave."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, ident = json.loads(raw)
        if not isinstance(created_at, (int, float)) or not isinstance(ident, str):
            raise ValueError(cursor)
        if not ident.isascii() or not ident.isprintable():
            raise ValueError(cursor)
        return float(created_at), ident
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise ApiError(
            400,
            "the cursor is not one this server gave",
            "Pass the next_cursor of the previous page unchanged, or no cursor for the first page.",
        ) from None


def page(
    query: Any,
    created: InstrumentedAttribute[float],
    ident: InstrumentedAttribute[str],
    limit: int,
    cursor: str | None,
) -> Any:
    """The select ``query`` ordered newest first, after ``cursor``, one more row than ``limit``."""
    if cursor:
        at, key = decode(cursor)
        query = query.where(or_(created < at, and_(created == at, ident < key)))
    return query.order_by(created.desc(), ident.desc()).limit(limit + 1)

"""Rate limits (per user, and per client address for failed authentications) and quotas.

Rates are token buckets: a key may make ``per_minute`` requests at once and then one more every
``60 / per_minute`` seconds. The clock is injected, so tests step it instead of sleeping. Limits
are kept per process: each replica of a deployment limits on its own.

Quotas are read from the database in the transaction that adds what they bound: stored bytes
(checkpoints and activations as uploaded, one user's view: bytes shared with another user count
for both) and unfinished (queued + running) jobs. Every refusal is a 429 with ``Retry-After``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.api.errors import ApiError
from service.store.db import UNFINISHED, ActivationsRow, CheckpointRow, JobRow

Clock = Callable[[], float]
MAX_KEYS = 10_000
"""keys kept before idle (full) buckets are forgotten"""
QUOTA_RETRY_S = 60
"""Retry-After of a quota refusal: it frees when a job ends or the user deletes something"""


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets of ``per_minute`` tokens per key; ``per_minute == 0`` never limits."""

    def __init__(self, per_minute: int, clock: Clock) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, key: str) -> _Bucket:
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= MAX_KEYS:
                self._forget_idle(now)
            b = self._buckets[key] = _Bucket(self.capacity, now)
        else:
            b.tokens = min(self.capacity, b.tokens + max(0.0, now - b.at) * self.rate)
            b.at = now
        return b

    def _forget_idle(self, now: float) -> None:
        rate, cap = self.rate, self.capacity
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.at) * rate >= cap]
        for k in full:
            del self._buckets[k]

    def _wait(self, b: _Bucket) -> int:
        return max(1, math.ceil((1.0 - b.tokens) / self.rate))

    def take(self, key: str) -> int | None:
        """Spend one token of ``key``: None when allowed, else the seconds until one is."""
        if self.capacity <= 0:
            return None
        with self._lock:
            b = self._bucket(key)
            if b.tokens < 1.0:
                return self._wait(b)
            b.tokens -= 1.0
            return None

    def blocked(self, key: str) -> int | None:
        """Like :meth:`take` without spending: the seconds to wait when ``key`` has no token."""
        if self.capacity <= 0:
            return None
        with self._lock:
            b = self._bucket(key)
            return self._wait(b) if b.tokens < 1.0 else None


def too_many(message: str, hint: str, retry_after: int) -> ApiError:
    return ApiError(429, message, hint, headers={"Retry-After": str(retry_after)})


def rate_limited(retry_after: int) -> ApiError:
    return too_many(
        "too many requests for this token",
        f"Wait {retry_after} s (Retry-After) and poll less often; the server's limit is "
        "PRUNEGRAPH_RATE_LIMIT requests per minute per user.",
        retry_after,
    )


def auth_blocked(retry_after: int) -> ApiError:
    return too_many(
        "too many failed authentications from this address",
        f"Wait {retry_after} s (Retry-After) and send a valid token: "
        "'Authorization: Bearer <token>'.",
        retry_after,
    )


def stored_bytes(s: Session, user: str) -> int:
    """Bytes the user stores (their checkpoints and activations, as uploaded)."""
    ckpt = s.scalar(select(func.coalesce(func.sum(CheckpointRow.size_bytes), 0)).where(
        CheckpointRow.owner == user))  # fmt: skip
    acts = s.scalar(select(func.coalesce(func.sum(ActivationsRow.size_bytes), 0)).where(
        ActivationsRow.owner == user))  # fmt: skip
    return int(ckpt or 0) + int(acts or 0)


def check_bytes(s: Session, user: str, adding: int, quota: int) -> None:
    """Refuse (429) when ``adding`` more bytes would take the user past ``quota`` (0: none)."""
    if quota and stored_bytes(s, user) + adding > quota:
        raise too_many(
            f"storing {adding:,} more bytes would pass this user's quota of {quota:,} bytes",
            "Delete checkpoints you no longer need (DELETE /v1/checkpoints/{id}), or ask for a "
            "larger PRUNEGRAPH_QUOTA_BYTES.",
            QUOTA_RETRY_S,
        )


def check_jobs(s: Session, user: str, quota: int) -> None:
    """Refuse (429) a new job when the user has ``quota`` queued or running jobs (0: none)."""
    if not quota:
        return
    n = s.scalar(select(func.count()).where(JobRow.owner == user, JobRow.status.in_(UNFINISHED)))
    if (n or 0) >= quota:
        raise too_many(
            f"this user has {n} queued or running jobs, the quota is {quota}",
            "Wait for a job to finish (GET /v1/jobs/{id}) and submit again, or ask for a "
            "larger PRUNEGRAPH_QUOTA_JOBS.",
            QUOTA_RETRY_S,
        )

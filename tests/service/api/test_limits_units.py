"""Unit details of the limits: a limiter that is off, the defaults, stale temp files."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from service.api.limits import RateLimiter
from service.settings import Settings
from service.store.files import STALE_GRACE_S, clean_stale


def test_limits_off_and_defaults(tmp_path: Path) -> None:
    off = RateLimiter(0, lambda: 0.0)
    assert all(off.take("u") is None and off.blocked("u") is None for _ in range(100))
    default = Settings(data_dir=tmp_path)
    assert default.rate_limit >= 1000 and default.quota_jobs >= 50
    assert default.quota_bytes >= 10 * default.max_upload_bytes
    assert default.max_json_bytes >= 1 << 20


def test_stale_temp_files_go_and_uploads_in_progress_stay(tmp_path: Path) -> None:
    old = time.time() - 10 * STALE_GRACE_S
    stale, busy, fresh = (tmp_path / f"upload-{n}" for n in ("stale", "busy", "fresh"))
    for p in (stale, busy, fresh):
        p.write_bytes(b"partial")
    for p in (stale, busy):
        os.utime(p, (old, old))
    (tmp_path / "other").write_bytes(b"not ours")
    with busy.open("rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # an upload another process is writing
        assert clean_stale(tmp_path) == 1
    assert not stale.exists() and busy.exists() and fresh.exists()
    assert (tmp_path / "other").exists()
    assert clean_stale(tmp_path, now=time.time() + 10 * STALE_GRACE_S) == 2


def test_the_limiter_refills_per_key_and_forgets_idle_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.api.limits

    now = [0.0]
    limiter = RateLimiter(7, lambda: now[0])
    assert [limiter.take("a") for _ in range(8)] == [None] * 7 + [9]  # 60/7 s, rounded up
    assert limiter.blocked("a") == 9 and limiter.take("b") is None  # keys apart
    now[0] += 60 / 7
    assert limiter.take("a") is None and limiter.take("a") is not None
    monkeypatch.setattr(service.api.limits, "MAX_KEYS", 3)
    limiter.take("c")
    now[0] += 60.0  # every bucket full again: idle keys are forgotten when a new key comes
    limiter.take("d")
    assert set(limiter._buckets) == {"d"}


@pytest.mark.parametrize(
    "payload",
    [
        b"[" + b"9" * 400 + b', "a"]',  # a float() overflow
        b'[1.5, "a\\u0000b"]',  # a NUL in the id (PostgreSQL refuses it)
        b'["x", "a"]',
        b"not json",
    ],
)
def test_forged_cursors_are_a_400_not_a_500(payload: bytes) -> None:
    import base64

    from service.api.errors import ApiError
    from service.api.pagination import decode, encode

    assert decode(encode(1.5, "abc")) == (1.5, "abc")
    with pytest.raises(ApiError) as err:
        decode(base64.urlsafe_b64encode(payload).decode().rstrip("="))
    assert err.value.status == 400

"""Content-addressed cache of per-group results (design §5, caching).

The costly part of analysing or planning a group — its null-calibrated similarity graph, its hsc
clustering, each method's result — depends only on the group's filter vectors, its name (the
group's seed is derived from it), the method's parameters and the seed. A key is the sha256 of
exactly these, so an entry can never be stale for changed weights, and two checkpoints that
share a layer share its entry. A re-plan for another target, or a report with other methods,
reuses what an earlier job computed.

``graphs`` does no IO: a cache is any object with ``get(key) -> bytes | None`` and
``put(key, value)``. :class:`MemoryCache` keeps entries in a dict (tests, one process); the
service stores them as files shared by its worker processes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

CACHE_VERSION = "1"
"""Part of every key; bump it when a change to the methods changes their results."""


class Cache(Protocol):
    """Byte values by string key; a missing key gives None."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...


@dataclass
class MemoryCache:
    """A dict-backed cache that counts its hits and misses."""

    entries: dict[str, bytes] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def get(self, key: str) -> bytes | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: bytes) -> None:
        self.entries[key] = value


def vectors_digest(X: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (C order)."""
    A = np.ascontiguousarray(X)
    h = hashlib.sha256(f"{A.dtype.str}{A.shape}".encode())
    h.update(A.data)
    return h.hexdigest()


def cache_key(kind: str, digest: str, **parameters: float | int | str | None) -> str:
    """The key of one artifact: its kind, the vectors' digest and every parameter it depends on."""
    payload = {"v": CACHE_VERSION, "kind": kind, "x": digest, **parameters}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

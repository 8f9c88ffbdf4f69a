"""The service's file cache: atomic entries shared by processes, namespaced by code version."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphs.cache import cache_key
from service.store.cache import FileCache, code_namespace


def test_file_cache_round_trip_and_counts(tmp_path: Path) -> None:
    cache = FileCache(tmp_path)
    key = cache_key("graph", "digest", alpha=0.05)
    assert cache.get(key) is None and cache.misses == 1
    cache.put(key, b"value")
    cache.put(key, b"value")  # a second writer of the same entry is harmless
    assert FileCache(tmp_path).get(key) == b"value"  # another process sees it
    assert cache.get(key) == b"value" and cache.hits == 1
    assert [p.name for p in (tmp_path / code_namespace()).rglob("*") if p.is_file()] == [key]


def test_keys_cannot_escape_the_cache_directory(tmp_path: Path) -> None:
    cache = FileCache(tmp_path)
    for bad in ("../../etc/passwd", "a" * 63, "G" * 64):
        with pytest.raises(ValueError, match="not a cache key"):
            cache.get(bad)


def test_namespace_depends_on_the_code(tmp_path: Path) -> None:
    ns = code_namespace()
    assert ns == code_namespace() and len(ns) == 16
    key = cache_key("graph", "digest")
    FileCache(tmp_path, namespace=ns).put(key, b"old code's entry")
    assert FileCache(tmp_path, namespace="other-version").get(key) is None

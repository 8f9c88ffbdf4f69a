"""The service's result cache: :mod:`graphs.cache` entries as files, shared by worker processes.

Entries live in ``data_dir/cache/<namespace>/<key[:2]>/<key>``. The namespace is a digest of
the analysis code (every module of ``graphs``) and of the numeric libraries' versions, so an
upgrade never serves results computed by other code; old namespaces can simply be deleted.
Writes go to a temp file and are renamed into place: readers never see half an entry, and two
processes computing the same entry at once both succeed (the last rename wins; both are equal).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib import metadata
from pathlib import Path

import graphs

_LIBRARIES = ("numpy", "scipy", "igraph", "leidenalg")


def graphs_sources() -> list[Path]:
    """Every source file of ``graphs``, its subpackages included, in a fixed order."""
    root = Path(graphs.__file__).parent
    return sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix())


def code_namespace() -> str:
    """Digest of the ``graphs`` sources and the numeric libraries' versions (16 hex digits)."""
    h = hashlib.sha256()
    root = Path(graphs.__file__).parent
    for path in graphs_sources():
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    for lib in _LIBRARIES:
        try:
            h.update(f"{lib}={metadata.version(lib)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{lib}=?".encode())
    return h.hexdigest()[:16]


class FileCache:
    """A :class:`graphs.cache.Cache` over files; counts its hits and misses."""

    def __init__(self, root: Path, namespace: str | None = None) -> None:
        self.root = root / (namespace or code_namespace())
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.root / key[:2] / key

    def get(self, key: str) -> bytes | None:
        try:
            value = self._path(key).read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, value)


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temp file in the same folder and a rename: readers see
    the old file or the whole new one, never a part (the temp file goes when writing fails)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

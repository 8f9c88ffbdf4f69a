"""Error messages without the server's absolute paths.

A message that reaches a client (an HTTP error, a failed job's ``error``) may quote an
exception from the OS or a library, and those name files by their absolute path
(``[Errno 2] No such file or directory: '/srv/prunegraph/checkpoints/ab12...'``). Such a path
tells a client how the server is laid out; :func:`redact` replaces every path under the server's
own folders (its data dir, temp dir, home, working dir and Python installation) by the file's
name alone. The rest of the text is unchanged: URL paths such as ``/docs`` are not under those
folders.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

_TAIL = r"""(?:/[^\s'",;:()\[\]{}<>]*)?"""  # the rest of a path below a root


def server_roots(*dirs: str | os.PathLike[str] | None) -> tuple[str, ...]:
    """The folders whose paths :func:`redact` hides: ``dirs`` (the data dir, ...) and the
    process's temp dir, home, working dir and Python prefixes, each as given and resolved."""
    found: set[str] = set()
    candidates: list[str | os.PathLike[str] | None] = [*dirs, tempfile.gettempdir(), sys.prefix]
    candidates += [sys.base_prefix, sys.exec_prefix]
    for get in (Path.home, Path.cwd):
        with contextlib.suppress(OSError, RuntimeError):  # no home, or the cwd was removed
            candidates.append(get())
    for d in candidates:
        if d is None:
            continue
        for form in (os.path.abspath(d), os.path.realpath(d)):
            form = form.rstrip("/")
            if len(form) > 1:  # never "/" itself
                found.add(form)
    return tuple(sorted(found, key=len, reverse=True))


def redact(text: str, roots: Iterable[str]) -> str:
    """``text`` with every path under one of ``roots`` replaced by its last component."""
    for root in roots:
        pattern = re.compile(re.escape(root) + r"(?![\w.-])" + _TAIL)
        text = pattern.sub(lambda m: _name(m.group(0)), text)
    return text


def _name(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name or "(a server folder)"

"""What every benchmark records beside its numbers: when, where and how it was run, how busy
the machine was; and its JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def command() -> str:
    """The command line that ran this process: ``python -m benchmarks.speed --out x.json`` for a
    module run with ``-m``, else ``python`` and ``sys.argv``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name != "__main__":
        return " ".join(["python -m", spec.name.removesuffix(".__main__"), *sys.argv[1:]])
    return "python " + " ".join(sys.argv)


def run_meta() -> dict[str, str]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "command": command(),
    }


def machine_busy(seconds: float = 2.0) -> float | None:
    """Fraction of all cores busy over ``seconds`` while the caller sleeps (from /proc/stat).

    On a shared machine this is the load others put on it: record it beside timings taken
    there. None where /proc/stat is unavailable.
    """

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # user..steal; guest time is already in user

    first = sample()
    time.sleep(seconds)
    last = sample()
    if first is None or last is None or last[0] == first[0]:
        return None
    total, idle = last[0] - first[0], last[1] - first[1]
    return round(1.0 - idle / total, 3)


def load_avg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to 0.01."""
    return [round(x, 2) for x in os.getloadavg()]


def write_json(path: Path, data: Any, *, indent: int | None = 2, default: Any = None) -> None:
    """``data`` as JSON (``indent``, ``default`` as for :func:`json.dumps`) and a final newline."""
    path.write_text(json.dumps(data, indent=indent, default=default) + "\n")

"""What every benchmark records beside its numbers: when, where and how it was run."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime


def run_meta() -> dict[str, str]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "command": "python " + " ".join(sys.argv),
    }


def machine_busy(seconds: float = 2.0) -> float | None:
    """Fraction of all cores busy over ``seconds`` while the caller sleeps (from /proc/stat).

    On a shared machine this is the load others put on it: record it beside timings taken
    there. None where /proc/stat is unavailable.
    """
    import time

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

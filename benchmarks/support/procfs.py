"""Resident memory of processes: the peak from ``getrusage`` and the current values from
``/proc/<pid>/status`` (Linux), and a thread that samples other processes' peaks."""

from __future__ import annotations

import os
import re
import resource
import threading
from pathlib import Path

STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def mb(kib: float) -> float:
    """KiB (as /proc and ``ru_maxrss`` give them) to MiB, rounded to 0.1."""
    return round(kib / 1024.0, 1)


def peak_rss_kib() -> int:
    """This process's peak resident set so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB, unrounded."""
    return peak_rss_kib() / 1024.0


def proc_status(pid: int) -> dict[str, float] | None:
    """VmRSS, RssAnon, RssFile and VmHWM of process ``pid`` in MiB (rounded to 0.1; the fields
    the kernel reports), or None when /proc has no such process."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for key in STATUS_FIELDS:
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        if m:
            out[key] = mb(float(m.group(1)))
    return out


def current_rss_mb() -> float:
    """This process's current resident set in MiB (rounded to 0.1): a fresh child's baseline
    (``ru_maxrss`` of a child of a large parent starts at the parent's peak); the rounded
    ``ru_maxrss`` where /proc is unavailable."""
    st = proc_status(os.getpid())
    return st["VmRSS"] if st and "VmRSS" in st else mb(peak_rss_kib())


class Sampler(threading.Thread):
    """Peak VmRSS / RssAnon / RssFile of named processes, from /proc every ``every`` seconds.

    Put ``name → pid`` into ``pids`` (and take it out) while it runs; ``stop.set()`` ends it;
    ``peaks`` holds ``name → {field: MiB}``.
    """

    def __init__(self, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pids: dict[str, int] = {}
        self.peaks: dict[str, dict[str, float]] = {}
        self.every = every
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name, pid in list(self.pids.items()):
                st = proc_status(pid)
                if st is None:
                    continue
                peak = self.peaks.setdefault(name, {})
                for k, v in st.items():
                    peak[k] = max(peak.get(k, 0.0), v)
            self.stop.wait(self.every)

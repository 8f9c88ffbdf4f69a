"""Where benchmarks find the repository and the real checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
BENCHMARKS = ROOT / "benchmarks"


def realdata_dir() -> Path:
    """The real checkpoints and data (``$PRUNEGRAPH_REALDATA``, default
    ``~/.cache/prunegraph-realdata``; ``make realdata`` fills it)."""
    return Path(
        os.environ.get("PRUNEGRAPH_REALDATA", Path.home() / ".cache" / "prunegraph-realdata")
    )

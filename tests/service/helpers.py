"""What the service's end-to-end tests share: tokens, a small checkpoint, app settings, waiting
for a job."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient

from service.settings import Settings

ALICE = {"Authorization": "Bearer secret1"}
BOB = {"Authorization": "Bearer secret2"}
TOKENS = "alice:secret1,bob:secret2"


def model_bytes(seed: int = 0) -> bytes:
    """A small conv net's state_dict as .pt bytes; conv2 has near-duplicate filters."""
    g = torch.Generator().manual_seed(seed)
    conv2 = torch.randn(32, 16, 3, 3, generator=g)
    conv2[16:] = conv2[:16] + 0.01 * torch.randn(16, 16, 3, 3, generator=g)  # near-duplicates
    sd = {
        "conv1.weight": torch.randn(16, 3, 3, 3, generator=g),
        "conv2.weight": conv2,
        "conv3.weight": torch.randn(32, 32, 3, 3, generator=g),
        "fc.weight": torch.randn(10, 32, generator=g),
        "fc.bias": torch.zeros(10),
    }
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def wait_for_job(c: TestClient, job_id: str, headers: dict[str, str] = ALICE) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job: dict[str, Any] = c.get(f"/v1/jobs/{job_id}", headers=headers).json()
        assert 0.0 <= job["progress"] <= 1.0
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in 60 s")


def app_settings(data_dir: Path, **kw: Any) -> Settings:
    """Settings with the two tokens and 2 workers (``kw`` wins)."""
    return Settings(data_dir=data_dir, tokens=TOKENS, **{"workers": 2, **kw})

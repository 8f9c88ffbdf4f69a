"""The dashboard's browser tests' site: a real ``prunegraph serve`` with two users, what the
tests send to it and how they read the pages (Playwright, Debian's chromium)."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_process import Server

ROOT = Path(__file__).resolve().parents[3]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
ALICE, BOB = "alice-dashboard-secret", "bob-dashboard-secret"
RED = ("mrp", "srr", "hsc")
try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - the skip below says why
    sync_playwright = None
BROWSER_MARKS = (
    pytest.mark.slow,
    pytest.mark.real,
    pytest.mark.skipif(
        sync_playwright is None, reason="playwright is not installed (pip install playwright)"
    ),
    pytest.mark.skipif(
        not CHROMIUM.is_file(), reason="Debian's chromium is not at /usr/bin/chromium"
    ),
)


def browser_test(test: Any) -> Any:
    """Marks of a test that drives the real browser against the real service."""
    for mark in BROWSER_MARKS:
        test = mark(test)
    return test


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(server: Server, data: bytes, name: str) -> str:
    r = httpx.post(
        f"{server.url}/v1/checkpoints",
        files={"file": (name, data)},
        headers=bearer(ALICE),
        timeout=60,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def submit(server: Server, **body: Any) -> str:
    r = httpx.post(f"{server.url}/v1/jobs", json=body, headers=bearer(ALICE), timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def wait_done(server: Server, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(
            f"{server.url}/v1/jobs/{job_id}", headers=bearer(ALICE), timeout=10
        ).json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def api_get(server: Server, path: str) -> Any:
    r = httpx.get(f"{server.url}{path}", headers=bearer(ALICE), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def second_epoch(path: Path) -> bytes:
    """The digit CNN after "another epoch": 32 of conv_layers.6's 128 filters become noisy copies
    of 32 others (redundancy goes up by about 32/128), and the last layer is gone."""
    import torch

    sd = torch.load(path, weights_only=True)
    w = sd["conv_layers.6.weight"].clone()
    g = torch.Generator().manual_seed(0)
    w[96:] = w[:32] * 1.5 + 0.01 * w[:32].std() * torch.randn(w[:32].shape, generator=g)
    sd["conv_layers.6.weight"] = w
    for key in [k for k in sd if k.startswith("fc_layers.2.")]:
        del sd[key]
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def session_id(server: Server, token: str) -> str:
    """The session id that POST /login puts in the dashboard's cookie for ``token``."""
    r = httpx.post(f"{server.url}/login", data={"token": token, "next": "/"}, timeout=30)
    return str(r.cookies["prunegraph_session"])


def screenshot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def data_attributes(page: Page, selector: str) -> list[dict[str, str]]:
    """The data-* attributes of every element matching ``selector``."""
    return page.eval_on_selector_all(selector, "els => els.map(e => Object.assign({}, e.dataset))")

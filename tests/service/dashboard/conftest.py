"""Fixtures of the dashboard's browser tests: the service with its jobs, a browser, a logged-in
page (module-scoped: started once per test module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.server_process import Server
from tests.service.dashboard.site import (
    ALICE,
    ARTIFACTS,
    BOB,
    CHROMIUM,
    second_epoch,
    session_id,
    submit,
    sync_playwright,
    upload,
    wait_done,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, realdata: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("dashboard")
    s = Server(
        root / "data",
        env={"PRUNEGRAPH_TOKENS": f"alice:{ALICE},bob:{BOB}"},
        log=root / "serve.log",
    )
    s.start()
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture(scope="module")
def jobs(server: Server, realdata: Path) -> dict[str, str]:
    """Job ids: a (digit CNN, manifest, plan), b (its second epoch), failed."""
    import torch

    from clients import build_manifest
    from tests.clients import models

    model = models.digit_cnn()
    model.load_state_dict(torch.load(realdata / "digit_cnn.pth", weights_only=True))
    manifest = build_manifest(model.eval(), torch.zeros(1, 1, 28, 28)).model_dump(mode="json")
    first = upload(server, (realdata / "digit_cnn.pth").read_bytes(), "digit_cnn.pth")
    second = upload(server, second_epoch(realdata / "digit_cnn.pth"), "epoch2.pth")
    ids = {
        "a": submit(server, checkpoint_id=first, manifest=manifest, target={"flops": 0.5}),
        "b": submit(server, checkpoint_id=second),
        # a FLOPs target needs a manifest: the worker refuses it, so the job fails
        "failed": submit(server, checkpoint_id=first, target={"flops": 0.5}),
    }
    for name, job_id in ids.items():
        assert wait_done(server, job_id)["status"] == ("failed" if name == "failed" else "done")
    return ids


@pytest.fixture(scope="module")
def browser(server: Server) -> Iterator[Browser]:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:  # type: ignore[misc]
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    """A page of a browser that logged in as alice (a session id in the dashboard's cookie)."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.add_cookies(
        [
            {
                "name": "prunegraph_session",
                "value": session_id(server, ALICE),
                "url": server.url,
                "httpOnly": True,
                "sameSite": "Strict",
            }
        ]
    )
    try:
        yield context.new_page()
    finally:
        context.close()

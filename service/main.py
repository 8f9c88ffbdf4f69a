"""The HTTP service (design §5), put together: ``create_app(settings)`` builds it; nothing runs
at import.

Run with ``uvicorn --factory service.main:main``; settings come from ``PRUNEGRAPH_*``. The app is
the API (:mod:`service.api.routes`) and the dashboard (:mod:`service.dashboard.routes`) over one
:class:`~service.api.deps.State`, built in the lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from service.api import errors, jobs, limits, routes
from service.api.bodies import BodyLimits
from service.api.deps import State
from service.dashboard import routes as dashboard
from service.settings import Settings
from service.store.files import clean_stale


async def _clean_temp_files(state: State) -> None:
    """Remove the temp files of crashed uploads now and every few minutes (any replica's)."""
    while True:
        await run_in_threadpool(clean_stale, state.store.tmp)
        await asyncio.sleep(max(state.settings.upload_idle_s, 60.0))


def create_app(settings: Settings | None = None, clock: limits.Clock = time.monotonic) -> FastAPI:
    """The app; ``clock`` (seconds) drives the rate limits (tests step a fake one)."""
    cfg = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = State(cfg, clock)
        app.state.pg = state
        clean_stale(state.store.tmp)
        cleaner = asyncio.get_running_loop().create_task(_clean_temp_files(state))
        state.runner.start()
        # the first upload needs torch to validate a .pt file: import it now, in the background,
        # so the server answers at once and that upload does not wait for the import
        threading.Thread(
            target=importlib.import_module, args=("service.ingest.checkpoint",), daemon=True
        ).start()
        try:
            yield
        finally:
            cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleaner
            state.runner.shutdown()
            state.engine.dispose()

    # /docs and /openapi.json: offline and behind the auth setting (service.api.apidocs)
    app = FastAPI(
        title="prunegraph",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    errors.install(app)
    app.add_middleware(BodyLimits, max_json_bytes=cfg.max_json_bytes, idle_s=cfg.upload_idle_s)
    app.include_router(routes.router)
    jobs.document_job_body(app)
    dashboard.install(app)
    return app


def main() -> FastAPI:
    """Factory for ``uvicorn --factory service.main:main``."""
    return create_app(Settings())


__all__ = ["create_app", "main"]

"""``prunegraph serve``: the HTTP service (needs the ``server`` extra: ``prunegraph[server]``).

The base install is what a training job needs (the CLI's embedded and ``--server`` modes, the
client); the web stack comes with the extra, and ``serve`` without it exits 2 saying how to
install it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError

from graphs import InvalidInputError, PruneGraphError
from prunegraph.cli.console import fail, make_console

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings

SERVER_PACKAGES = frozenset({
    "fastapi", "fastapi_offline", "starlette", "uvicorn", "sqlalchemy", "multipart",
    "python_multipart", "jinja2", "pydantic_settings", "dask", "distributed",
})  # fmt: skip
"""Import names of the ``server`` extra's packages (pyproject.toml) and what they bring."""
INSTALL_HINT = "Install the service with: pip install 'prunegraph[server]'."


def server_stack(
    overrides: dict[str, object],
) -> tuple[Settings, Callable[[Settings], FastAPI], Callable[..., None]]:
    """Settings from PRUNEGRAPH_* and the flags, ``create_app`` and uvicorn; a missing package
    of the ``server`` extra is a usage error that says how to install it."""
    try:
        import uvicorn

        from service.main import create_app
        from service.settings import Settings
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in SERVER_PACKAGES:
            raise
        raise PruneGraphError(
            f"prunegraph serve needs the server extra, which is not installed "
            f"(no module named {e.name!r})",
            hint=INSTALL_HINT,
        ) from None
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
        settings.token_users()  # a malformed token list is a usage error, before listening
    except (ValidationError, ValueError) as e:
        raise InvalidInputError(
            str(e), hint="Check PRUNEGRAPH_* and the command's options."
        ) from None
    return settings, create_app, uvicorn.run


def serve_cmd(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on", min=1, max=65535)] = 8000,
    data_dir: Annotated[
        Path | None, typer.Option(help="checkpoints and the SQLite database (PRUNEGRAPH_DATA_DIR)")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="analysis worker processes (PRUNEGRAPH_WORKERS)", min=1)
    ] = None,
    dask_scheduler: Annotated[
        str | None,
        typer.Option(
            help="run the per-layer analysis on this Dask cluster, e.g. tcp://127.0.0.1:8786; "
            "its workers must share the data dir (PRUNEGRAPH_DASK_SCHEDULER)",
            show_default=False,
        ),
    ] = None,
    demo: Annotated[
        Path | None,
        typer.Option(help="once serving, upload this checkpoint and analyse it as a demo job"),
    ] = None,
) -> None:
    """Run the HTTP service; settings come from PRUNEGRAPH_* and these flags."""
    overrides: dict[str, object] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if workers is not None:
        overrides["workers"] = workers
    if dask_scheduler is not None:
        overrides["dask_scheduler"] = dask_scheduler
    err = make_console(stderr=True)
    try:
        settings, create_app, run = server_stack(overrides)
    except PruneGraphError as e:
        raise fail(err, e) from None
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    err.print(f"prunegraph serving on {url} (API docs at {url}/docs)", highlight=False)
    if settings.dask_scheduler:
        err.print(f"per-layer analysis runs on the Dask cluster {settings.dask_scheduler}",
                  highlight=False)  # fmt: skip
    if demo is not None and not demo.is_file():
        err.print(f"[yellow]demo skipped:[/] {demo} not found", highlight=False)
    elif demo is not None:
        from prunegraph.cli.demo import start_demo

        start_demo(url, demo, next(iter(settings.token_users()), None), err)
    run(create_app(settings), host=host, port=port, log_level="warning")

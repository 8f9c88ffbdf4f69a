"""The CLI's ``--server`` mode: the same report or plan, computed by a prunegraph service.

The client (:class:`clients.PruneGraphClient`) uploads the checkpoint (content-addressed: a
known file is stored once) and the activations, submits a job with the same methods, parameters,
seed, manifest and constraints as the embedded command would use, waits for it and returns the
result as the same model; the command then prints it exactly as in embedded mode. Client errors
become :class:`graphs.PruneGraphError` with what to do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from clients import (
    AuthenticationError,
    ConnectionFailedError,
    InvalidRequestError,
    JobFailedError,
    JobTimeoutError,
    PruneGraphClient,
    PruneGraphClientError,
    PruneGraphHTTPError,
)
from graphs import AnalysisOptions, PruneGraphError, Report
from graphs.manifest import Manifest
from graphs.plan import Constraints, PruningPlan, Target


@contextmanager
def translated(server: str) -> Iterator[None]:
    """The client's errors as :class:`graphs.PruneGraphError` with what to do."""
    try:
        yield
    except AuthenticationError as e:
        raise PruneGraphError(
            f"the server {server} refused the token: {e.error}",
            hint="Pass --token (or PRUNEGRAPH_TOKEN) with a token the server knows.",
        ) from None
    except InvalidRequestError as e:  # refused by the client's check or by the server
        raise PruneGraphError(f"the request is invalid: {e.error}", hint=e.hint) from None
    except PruneGraphHTTPError as e:
        raise PruneGraphError(f"the server said: {e.error}", hint=e.hint) from None
    except ConnectionFailedError as e:
        raise PruneGraphError(
            str(e), hint="Check --server, or start one with `prunegraph serve`."
        ) from None
    except JobFailedError as e:
        raise PruneGraphError(
            f"the job failed on the server: {e.reason}", hint="Fix the input named above."
        ) from None
    except JobTimeoutError as e:
        raise PruneGraphError(str(e), hint="Raise --timeout, or try again later.") from None
    except PruneGraphClientError as e:  # any other client error
        raise PruneGraphError(str(e), hint="See the server's /docs.") from None


def remote_report(
    server: str,
    token: str | None,
    checkpoint: Path,
    *,
    methods: Sequence[str],
    seed: int,
    options: AnalysisOptions,
    manifest: Manifest | None,
    activations: Path | None = None,
    timeout: float = 3600.0,
    progress: bool = False,
    input_shape: list[list[int]] | None = None,
    epsilon: float | None = None,
    crossfit: bool = True,
) -> Report:
    """The report of ``checkpoint`` computed by the service at ``server`` (``crossfit=False``
    is sent; True is the service's default and left out, so older services are served)."""
    with translated(server), PruneGraphClient(server, token=token) as client:
        return client.analyze(
            checkpoint, methods=methods, seed=seed, options=options, manifest=manifest,
            activations=activations, timeout=timeout, progress=progress,
            input_shape=input_shape, epsilon=epsilon, crossfit=None if crossfit else False,
        )  # fmt: skip


def remote_plan(
    server: str,
    token: str | None,
    checkpoint: Path,
    *,
    method: str,
    target: Target,
    seed: int,
    step: float,
    constraints: Constraints,
    options: AnalysisOptions,
    manifest: Manifest | None,
    activations: Path | None = None,
    timeout: float = 3600.0,
    progress: bool = False,
    input_shape: list[list[int]] | None = None,
    compensation: bool | None = None,
    allocation: str | None = None,
    epsilon: float | None = None,
    crossfit: bool = True,
) -> PruningPlan:
    """The plan of ``checkpoint`` computed by the service at ``server`` (a compensated plan
    with its sidecar, fetched and checked against the sha256 the plan pins; ``crossfit`` as in
    :func:`remote_report`)."""
    with translated(server), PruneGraphClient(server, token=token) as client:
        return client.plan_for(
            checkpoint, target=target.model_dump(exclude_none=True), method=method,
            manifest=manifest, seed=seed, options=options, constraints=constraints, step=step,
            activations=activations, timeout=timeout, progress=progress,
            compensation=compensation, allocation=allocation, epsilon=epsilon,
            input_shape=input_shape, crossfit=None if crossfit else False,
        )  # fmt: skip

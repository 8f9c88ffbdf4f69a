"""Analysis jobs: the worker function (:mod:`service.jobs.worker` runs it).

The worker runs in a separate process: it opens its own database session from the URL, claims the
job (queued -> running, atomically, so a job never runs twice in one deployment), reads the
checkpoint, analyses it with progress per group, plans when the job has a target, and stores the
JSON in the database. Every failure is stored on the job with its reason; nothing escapes the
worker, and a crashed worker process fails only its own job.

The per-group analysis is one task per group
(:func:`service.jobs.executors.local.analyze_group_task`), run by an executor: in this process one
after the other, or on a Dask cluster when the service has a scheduler
(:mod:`service.jobs.executors.dask`). Either way the tasks read their own group's tensors (a
safetensors checkpoint is never read whole into memory), write their artifacts into the shared
result cache and return their results; the report is assembled from those by the library's own code
(:func:`graphs.analyze.assemble_report`: the embedded report, byte for byte, without reading a
weight again), and planning reads the tasks' graphs and clusterings from the cache
(:func:`analyze_on`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import TypeAdapter
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from graphs.analyze import assemble_report, group_layers
from graphs.contracts.jobs import JobRequest
from graphs.errors import PruneGraphError
from graphs.features import Activations
from graphs.layers import LayerWeights
from graphs.manifest import Manifest
from graphs.options import AnalysisOptions, check_inputs
from graphs.planner import plan_layers
from graphs.report import CheckpointInfo, MethodResult, Report, SkippedLayer
from graphs.strategies import GRAPH_METHODS
from service.jobs.compensation import store_sidecar, used_holdout, with_figures
from service.jobs.executors.local import (
    Executor,
    GroupTask,
    LocalExecutor,
    OnDone,
    analyze_group_task,
)
from service.jobs.inputs import load_job_inputs
from service.store.cache import FileCache, code_namespace
from service.store.db import DONE, FAILED, QUEUED, RUNNING, JobRow, make_engine

log = logging.getLogger(__name__)


def make_executor(dask_scheduler: str | None, job_id: str) -> Executor:
    """The Dask executor when a scheduler is configured, else the local one."""
    if not dask_scheduler:
        return LocalExecutor()
    from service.jobs.executors.dask import DaskExecutor

    return DaskExecutor(dask_scheduler, job_id)


def _set(sessions: sessionmaker[Session], job_id: str, **values: Any) -> int:
    with sessions.begin() as s:
        result = s.execute(
            update(JobRow).where(JobRow.id == job_id).values(updated_at=time.time(), **values)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def warm_up(threads: int) -> None:
    """Set up a worker process: ``threads`` BLAS/torch threads (the cores shared out among the
    workers, so concurrent jobs do not oversubscribe them), and the imports jobs need, so the
    first job does not pay for them."""
    import torch
    from threadpoolctl import threadpool_limits

    import service.ingest.checkpoint  # noqa: F401

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)


def _hide_paths(error: str, checkpoint_path: str) -> str:
    """``error`` without the server's paths (a client reads it): its data dir and the rest."""
    from service.jobs.redact import redact, server_roots

    return redact(error, server_roots(Path(checkpoint_path).parent.parent))


@contextmanager
def _heartbeat(sessions: sessionmaker[Session], job_id: str, lease_s: float) -> Iterator[None]:
    """Renew the job's lease every third of it while the body runs (a thread of the worker)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(lease_s / 3):
            with sessions.begin() as s:
                s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.status == RUNNING)
                    .values(lease_until=time.time() + lease_s)
                )

    thread = threading.Thread(target=beat, name=f"lease-{job_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_job(
    database_url: str,
    checkpoint_path: str,
    job_id: str,
    cache_dir: str | None,
    lease_s: float,
    activations_dir: str = "",
    dask_scheduler: str | None = None,
    sidecar_dir: str = "",
) -> str:
    """Run one job to done or failed (in a worker process); returns the final status.

    The job is claimed atomically (queued -> running), so it never runs twice at once; its lease
    is renewed while it runs (see :mod:`service.jobs.worker`). ``cache_dir`` holds the per-group
    result cache (:mod:`service.store.cache`); None disables it. ``dask_scheduler`` (an address such
    as ``tcp://host:8786``) runs the per-group tasks on that Dask cluster instead of here.
    """
    engine = make_engine(database_url)
    sessions = sessionmaker(engine)
    try:
        with sessions.begin() as s:
            claimed = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == QUEUED)
                .values(
                    status=RUNNING,
                    progress=0.0,
                    updated_at=time.time(),
                    lease_until=time.time() + lease_s,
                )
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return "skipped"
            row = s.get(JobRow, job_id)
            assert row is not None
            request = JobRequest.model_validate_json(row.request_json)
        try:
            with _heartbeat(sessions, job_id, lease_s):
                aid = request.activations_id
                acts = Path(activations_dir) / aid if aid else None
                executor = make_executor(dask_scheduler, job_id)
                result = _compute(request, Path(checkpoint_path), sessions, job_id, cache_dir,
                                  acts, executor, sidecar_dir)  # fmt: skip
        except PruneGraphError as e:
            error = f"{e.message} {e.hint}"
            _set(sessions, job_id, status=FAILED, error=_hide_paths(error, checkpoint_path))
            return FAILED
        except Exception as e:  # a bug or a resource problem: still only this job fails
            log.exception("job %s failed", job_id)
            error = f"internal error: {type(e).__name__}: {e}"
            _set(sessions, job_id, status=FAILED, error=_hide_paths(error, checkpoint_path))
            return FAILED
        _set(
            sessions,
            job_id,
            status=DONE,
            progress=1.0,
            report_json=result.report_json,
            plan_json=result.plan_json,
            cache_hits=result.hits,
            cache_misses=result.misses,
        )
        return DONE
    finally:
        engine.dispose()


@dataclass(frozen=True)
class _Result:
    report_json: str
    plan_json: str | None
    hits: int
    misses: int


def _compute(
    request: JobRequest,
    path: Path,
    sessions: sessionmaker[Session],
    job_id: str,
    cache_dir: str | None,
    activations_path: Path | None,
    executor: Executor,
    sidecar_dir: str = "",
) -> _Result:
    """Read the checkpoint, run one task per group on ``executor``, assemble the report, plan."""
    inputs = load_job_inputs(request, path, activations_path)
    parsed, manifest, notes = inputs.checkpoint, inputs.manifest, inputs.notes
    acts, stats = inputs.maps, inputs.stats

    def progress(done: int, total: int) -> None:
        _set(sessions, job_id, progress=round(0.9 * done / max(total, 1), 4))

    namespace = code_namespace()
    plan_method = request.plan_method if request.target is not None else None
    report, hits, misses = analyze_on(
        executor,
        parsed.layers,
        checkpoint=parsed.info,
        skipped=parsed.skipped,
        methods=request.methods,
        seed=request.seed,
        options=request.options,
        manifest=manifest,
        activations=acts,
        cache_dir=cache_dir,
        namespace=namespace,
        plan_method=plan_method,
        progress=progress,
        job_id=job_id,
    )
    if notes:
        report = report.model_copy(update={"notes": notes})
    holdout = used_holdout(inputs, crossfit=request.crossfit)
    report = with_figures(report, parsed.layers, manifest, stats, request.epsilon, holdout)
    plan_json = None
    if request.target is not None:
        cache = FileCache(Path(cache_dir), namespace) if cache_dir is not None else None
        plan = plan_layers(
            parsed.layers,
            method=request.plan_method,
            target=request.target,
            params_total=parsed.info.n_params,
            manifest=manifest,
            constraints=request.constraints,
            options=request.options,
            step=request.step,
            seed=request.seed,
            checkpoint_sha256=parsed.info.sha256,
            cache=cache,
            activations=acts,
            stats=stats if manifest is not None else None,  # statistics need the manifest
            compensation=request.compensation,
            allocation=request.allocation,
            epsilon=request.epsilon,
            holdout_stats=holdout,
        )
        store_sidecar(sidecar_dir, plan)
        plan_json = plan.to_json()
        if cache is not None:
            hits, misses = hits + cache.hits, misses + cache.misses
    return _Result(report_json=report.to_json(), plan_json=plan_json, hits=hits, misses=misses)


class Analysis(NamedTuple):
    report: Report
    hits: int
    """the result cache's hits (the tasks')"""
    misses: int


_RESULT: TypeAdapter[MethodResult] = TypeAdapter(MethodResult)


def analyze_on(
    executor: Executor,
    layers: Sequence[LayerWeights],
    *,
    checkpoint: CheckpointInfo,
    skipped: Sequence[SkippedLayer],
    methods: Sequence[str],
    seed: int,
    options: AnalysisOptions,
    manifest: Manifest | None,
    activations: Activations | None,
    cache_dir: str | None,
    namespace: str,
    plan_method: str | None = None,
    progress: OnDone | None = None,
    job_id: str = "",
) -> Analysis:
    """:func:`graphs.analyze` with the per-group work done by ``executor``'s tasks.

    The groups are made from the layers' names and shapes (no weight is read here); each task
    reads its group's tensors, computes its results (and writes them into the cache in
    ``cache_dir``) and returns them; the report is then assembled from them by
    :func:`graphs.analyze.assemble_report`, so it is the library's, byte for byte, and nothing
    is computed or read twice.
    """
    chosen, opts = check_inputs(methods, seed, options, activations)
    grouping = group_layers(
        layers, checkpoint=checkpoint, skipped=skipped, manifest=manifest, activations=activations
    )
    warm = (
        plan_method if plan_method in (*GRAPH_METHODS, "ci") and plan_method not in chosen else None
    )
    tasks = [
        GroupTask.of(
            g,
            methods=chosen,
            options=opts,
            seed=seed,
            activations=activations,
            cache_dir=cache_dir,
            namespace=namespace,
            warm=warm,
        )
        for g in grouping.groups
    ]
    outcomes = executor.map_groups(analyze_group_task, tasks, progress or (lambda d, n: None))
    results = [{m: _RESULT.validate_json(o.results[m]) for m in chosen} for o in outcomes]
    report = assemble_report(
        grouping, results, checkpoint=checkpoint, methods=chosen, seed=seed, options=opts
    )
    log.debug("job %s: report assembled from %d tasks", job_id, len(tasks))
    return Analysis(report, sum(o.hits for o in outcomes), sum(o.misses for o in outcomes))

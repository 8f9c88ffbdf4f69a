"""The executor of jobs: a process pool, with leases so that replicas can share one database.

A job runs in the pool from start to end (claim, heartbeat, reading, report, plan); its
per-group analysis runs there too, or as tasks on a Dask cluster when ``dask_scheduler`` is set
(:mod:`service.jobs.executors.local`, :mod:`service.jobs.executors.dask`).

Every unfinished job carries a lease (``lease_until``) and the replica holding it (``runner``).
A replica renews the leases of the jobs queued in its own pool; a worker renews its running
job's lease from a heartbeat thread (:func:`service.jobs.tasks.run_job`). A sweeper thread in every
replica takes over jobs whose lease ran out — their replica was killed, crashed or lost its
database connection — by an atomic compare-and-set on the lease, so exactly one replica gets each
job, and re-queues them in its own pool. A restarted replica is one more such replica: after a
``kill -9`` its jobs are re-run once their leases expire, and the jobs of replicas still alive
are never touched. Workers end when their replica dies (:mod:`service.jobs.lifeline`): a killed
replica leaves no orphan holding memory. A job runs at most once at a time (the claim queued ->
running is atomic); the only case where it can run twice is a worker stalled for a whole lease,
and then both runs compute the same deterministic result.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.jobs.lifeline import exit_with_parent
from service.jobs.tasks import run_job, warm_up
from service.store.db import FAILED, QUEUED, UNFINISHED, JobRow

log = logging.getLogger(__name__)


class JobRunner:
    """Submits jobs to a process pool and keeps their leases; owned by the app's lifespan.

    Args:
        database_url: the jobs' database (workers open their own connections).
        sessions: sessions of the serving process.
        workers: worker processes.
        cache_dir: the per-group result cache, or None.
        lease_s: seconds a job stays claimed by this replica without a renewal.
        path_of: checkpoint id -> the stored file's path.
        activations_dir: where uploaded activations are stored (by sha256).
        dask_scheduler: a Dask scheduler's address: each job's per-group tasks run on that
            cluster (the job itself, with its lease, still runs in this pool); None runs them
            in the job's own worker process (:mod:`service.jobs.executors.local`).
        sidecar_dir: where compensated plans' sidecars are stored (by sha256).
    """

    def __init__(
        self,
        database_url: str,
        sessions: sessionmaker[Session],
        workers: int,
        cache_dir: Path | None,
        lease_s: float,
        path_of: Callable[[str], Path],
        activations_dir: Path,
        dask_scheduler: str | None = None,
        *,
        sidecar_dir: Path | None = None,
    ) -> None:
        self.activations_dir = str(activations_dir)
        self.sidecar_dir = str(sidecar_dir) if sidecar_dir is not None else ""
        self.dask_scheduler = dask_scheduler
        self.database_url = database_url
        self.sessions = sessions
        self.workers = workers
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.lease_s = lease_s
        self.path_of = path_of
        self.replica = uuid.uuid4().hex
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        # Pools are started from this one thread, which lives as long as the runner: a worker's
        # PR_SET_PDEATHSIG fires when the thread that forked it ends (service.jobs.lifeline), and
        # request threads come and go.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool-spawner")
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return self._spawner.submit(self._start_pool).result()

    def _start_pool(self) -> ProcessPoolExecutor:
        # spawn: the server process has threads (event loop, thread pool); fork could deadlock.
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=ctx,
            initializer=init_worker,
            initargs=(os.getpid(), threads),
        )
        for _ in range(self.workers):  # start the workers now (from this thread), not later
            pool.submit(time.sleep, 0)
        return pool

    def lease(self) -> dict[str, object]:
        """Column values that give a new job to this replica."""
        return {"runner": self.replica, "lease_until": time.time() + self.lease_s}

    def submit(self, job_id: str, checkpoint_id: str) -> None:
        """Run a job this replica holds the lease of."""
        args = (self.database_url, str(self.path_of(checkpoint_id)), job_id, self.cache_dir)
        with self._lock:
            self._pending.add(job_id)
        rest = (self.lease_s, self.activations_dir, self.dask_scheduler, self.sidecar_dir)
        try:
            future = self._pool.submit(run_job, *args, *rest)
        except BrokenProcessPool:  # a worker died earlier: replace the pool, keep serving
            self._pool.shutdown(wait=False, cancel_futures=False)
            self._pool = self._new_pool()
            future = self._pool.submit(run_job, *args, *rest)
        future.add_done_callback(lambda f: self._finished(job_id, f))

    def _finished(self, job_id: str, future: Future[str]) -> None:
        with self._lock:
            self._pending.discard(job_id)
        exc = None if future.cancelled() else future.exception()
        if exc is not None and not self._stop.is_set():  # the worker process died
            with self.sessions.begin() as s:
                s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.status.in_(UNFINISHED))
                    .values(
                        status=FAILED,
                        error=f"the worker running this job stopped: {type(exc).__name__}",
                        updated_at=time.time(),
                    )
                )

    def sweep(self) -> list[str]:
        """Renew this replica's queued leases; take over expired jobs. Returns the taken ids."""
        now = time.time()
        with self._lock:
            mine = list(self._pending)
        taken: list[tuple[str, str]] = []
        with self.sessions.begin() as s:
            if mine:
                s.execute(
                    update(JobRow)
                    .where(JobRow.id.in_(mine), JobRow.status == QUEUED)
                    .values(lease_until=now + self.lease_s, runner=self.replica)
                )
            expired = s.execute(
                select(JobRow.id, JobRow.checkpoint_id).where(
                    JobRow.status.in_(UNFINISHED), JobRow.lease_until < now
                )
            ).all()
            for job_id, checkpoint_id in expired:
                won = s.execute(
                    update(JobRow)
                    .where(
                        JobRow.id == job_id,
                        JobRow.status.in_(UNFINISHED),
                        JobRow.lease_until < now,
                    )
                    .values(status=QUEUED, progress=0.0, updated_at=now, **self.lease())
                )
                if won.rowcount == 1:  # type: ignore[attr-defined]
                    taken.append((job_id, checkpoint_id))
        for job_id, checkpoint_id in taken:
            log.warning("job %s: its lease expired; re-running it here", job_id)
            self.submit(job_id, checkpoint_id)
        return [j for j, _ in taken]

    def start(self) -> None:
        """Take over expired jobs now, then keep sweeping every third of a lease."""
        self.sweep()

        def loop() -> None:
            while not self._stop.wait(self.lease_s / 3):
                try:
                    self.sweep()
                except Exception:  # the database is away for a moment: try again next time
                    log.exception("lease sweep failed")

        self._sweeper = threading.Thread(target=loop, name="lease-sweeper", daemon=True)
        self._sweeper.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._spawner.shutdown(wait=True)


def init_worker(parent_pid: int, threads: int) -> None:
    """A pool worker's set-up: end with the server (:func:`service.jobs.lifeline.exit_with_parent`),
    then :func:`service.jobs.tasks.warm_up`."""
    exit_with_parent(parent_pid)
    warm_up(threads)

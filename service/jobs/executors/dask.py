"""The Dask executor: a job's group tasks run on a Dask cluster (``PRUNEGRAPH_DASK_SCHEDULER``).

The job's driver (:func:`service.jobs.tasks.run_job`, in one of the service's worker processes,
where it keeps the job's lease) connects to the scheduler with a :class:`distributed.Client` (one
per process, reused by its later jobs), submits one task per group and waits for them; each
completion moves the job's progress. A task holds references to its group's tensors, not the
tensors (:mod:`service.jobs.executors.local`), and the tasks are submitted the largest group first
(vertices × vector length: a model's FFNs before its attention), at most :data:`PER_THREAD` per
worker thread at a time (a completion submits the next): neither the driver nor the scheduler
ever holds more than a few small tasks, and the longest tasks do not end up last. Failures:

- a worker that dies (killed, out of memory, its machine lost) while it runs a task: the
  scheduler runs the task again on another worker; when the workers running one task died
  ``distributed.scheduler.allowed-failures`` + 1 times (4 by default) the job fails, naming the
  layer.
- a task that raises: retried :data:`RETRIES` times (a full disk, a flaky shared filesystem),
  then the job fails with the error. Bad input (a :class:`~graphs.errors.PruneGraphError`) is
  returned by the task instead, never retried, and fails the job with its own message.
- no scheduler at the address, or no worker for :data:`NO_WORKERS_S`: the job fails saying so.

When a job fails or its driver stops, its unfinished tasks are cancelled, so the cluster does
not keep computing for nobody.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError

from distributed import Client, Future, KilledWorker

from service.jobs.executors.local import GroupOutcome, GroupTask, OnDone, TaskFailedError

log = logging.getLogger(__name__)

RETRIES = 2
"""Extra runs of a task that raised, before its job fails."""
CONNECT_S = 20.0
"""Seconds to wait for the scheduler to answer."""
NO_WORKERS_S = 120.0
"""A job fails when its scheduler has had no worker for this long (nothing could run it)."""
POLL_S = 2.0
PER_THREAD = 2
"""Tasks in flight per worker thread of the cluster (at least :data:`PER_THREAD` in all)."""

_clients: dict[str, Client] = {}
_lock = threading.Lock()


def client_for(address: str) -> Client:
    """This process's client of the scheduler at ``address`` (connected once, then reused)."""
    with _lock:
        client = _clients.get(address)
        if client is not None and client.status == "running":
            return client
        if client is not None:  # the connection broke for good: start over
            _clients.pop(address, None)
            try:
                client.close(timeout=5)
            except Exception:  # it is gone either way
                log.debug("closing a broken Dask client failed", exc_info=True)
        try:
            client = Client(address, timeout=CONNECT_S, set_as_default=False)
        except (OSError, ValueError) as e:
            raise TaskFailedError(
                f"cannot reach the Dask scheduler at {address}: {e}",
                hint="Start it (dask scheduler) or correct PRUNEGRAPH_DASK_SCHEDULER / "
                "prunegraph serve --dask-scheduler.",
            ) from None
        _clients[address] = client
        return client


class DaskExecutor:
    """Runs a job's group tasks on the Dask cluster of ``address`` (``tcp://host:8786``)."""

    def __init__(self, address: str, job_id: str) -> None:
        self.address = address
        self.job_id = job_id

    def map_groups(
        self,
        fn: Callable[[GroupTask], GroupOutcome],
        tasks: Sequence[GroupTask],
        on_done: OnDone,
    ) -> list[GroupOutcome]:
        if not tasks:
            return []
        client = client_for(self.address)
        run = uuid.uuid4().hex[:8]  # a re-run of the job (lease taken over) gets new keys
        waiting = deque(sorted(range(len(tasks)), key=lambda i: (-tasks[i].cost, i)))
        running: dict[str, tuple[int, Future[GroupOutcome]]] = {}
        finished: queue.Queue[Future[GroupOutcome]] = queue.Queue()
        outcomes: list[GroupOutcome | None] = [None] * len(tasks)
        done = 0
        no_workers_since: float | None = None
        try:
            self._submit(client, fn, tasks, waiting, running, finished, run)
            while done < len(tasks):
                try:
                    future = finished.get(timeout=POLL_S)
                except queue.Empty:
                    no_workers_since = self._check_workers(client, no_workers_since)
                    self._submit(client, fn, tasks, waiting, running, finished, run)  # new workers
                    continue
                i, _ = running.pop(str(future.key))
                outcome = self._outcome(future, tasks[i].name)
                future.release()
                if outcome.error is not None:
                    raise outcome.error
                outcomes[i] = outcome
                done += 1
                on_done(done, len(tasks))
                self._submit(client, fn, tasks, waiting, running, finished, run)
        finally:
            unfinished = [f for _, f in running.values() if not f.done()]
            if unfinished:
                try:
                    client.cancel(unfinished)
                except Exception:  # the scheduler is gone: nothing runs for us there either
                    log.debug("cancelling the tasks of job %s failed", self.job_id, exc_info=True)
            for _, f in running.values():
                f.release()
        workers = sorted({o.worker for o in outcomes if o is not None})
        log.info("job %s: %d groups ran on Dask workers %s", self.job_id, len(tasks), workers)
        return [o for o in outcomes if o is not None]

    def _submit(
        self,
        client: Client,
        fn: Callable[[GroupTask], GroupOutcome],
        tasks: Sequence[GroupTask],
        waiting: deque[int],
        running: dict[str, tuple[int, Future[GroupOutcome]]],
        finished: queue.Queue[Future[GroupOutcome]],
        run: str,
    ) -> None:
        """Submit waiting tasks, largest first, up to :data:`PER_THREAD` per worker thread
        (as many as there are now: workers may come and go)."""
        if not waiting:
            return
        try:
            threads = sum(client.nthreads().values())
        except Exception:  # the scheduler is away: the running futures will say so
            threads = 0
        while waiting and len(running) < PER_THREAD * max(threads, 1):
            i = waiting.popleft()
            key = f"prunegraph-group-{self.job_id}-{i:04d}-{run}"
            future: Future[GroupOutcome] = client.submit(fn, tasks[i], key=key, retries=RETRIES)
            running[key] = (i, future)
            future.add_done_callback(finished.put)  # on done, error or cancel (client's thread)

    def _outcome(self, future: Future[GroupOutcome], layer: str) -> GroupOutcome:
        try:
            return future.result()
        except KilledWorker:
            raise TaskFailedError(
                f"the Dask workers running this job's layer {layer} died repeatedly"
            ) from None
        except CancelledError:
            raise self._lost() from None
        except Exception as e:
            raise TaskFailedError(
                f"layer {layer} failed on the Dask workers {RETRIES + 1} times: "
                f"{type(e).__name__}: {e}"
            ) from e

    def _lost(self) -> TaskFailedError:
        return TaskFailedError(
            f"this job's Dask tasks were cancelled: the connection to the scheduler at "
            f"{self.address} was lost, or the scheduler restarted",
            hint="Check the scheduler; the job can be submitted again.",
        )

    def _check_workers(self, client: Client, since: float | None) -> float | None:
        """Fail the job once the scheduler has had no worker for :data:`NO_WORKERS_S`."""
        try:
            n = len(client.nthreads())
        except Exception:  # the scheduler is away: the futures will say so
            return since
        if n:
            return None
        now = time.monotonic()
        if since is None:
            return now
        if now - since > NO_WORKERS_S:
            raise TaskFailedError(
                f"the Dask scheduler at {self.address} has had no worker for "
                f"{NO_WORKERS_S:.0f} s: nothing can run this job",
                hint="Start workers: dask worker " + self.address,
            )
        return since

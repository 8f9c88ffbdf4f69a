"""Where a job's per-group analysis runs: in the job's own process, or as Dask tasks.

A job (:func:`service.jobs.run_job`) reads its checkpoint once, builds the groups, and hands one
:class:`GroupTask` per group to an :class:`Executor`. Each task is :func:`analyze_group_task`:
it computes the group's method results with :class:`graphs.work.GroupWork`, writes every
artifact into the content-addressed result cache (:class:`service.cache.FileCache`), so that the
job's planning, which runs after the tasks in the job's process, finds them there, and returns
its results' cache entries, from which :func:`graphs.analyze` builds the report
(:func:`service.jobs.analyze_on`). The job logic is the same whichever executor runs the tasks:

- :class:`LocalExecutor` (the default): the tasks run one after the other in the job's worker
  process, as they always did.
- :class:`service.dask_executor.DaskExecutor` (``PRUNEGRAPH_DASK_SCHEDULER``): the tasks are
  submitted to a Dask cluster, one per group; progress follows their completion, and Dask re-runs
  the task of a worker that died on another worker.

A task carries everything it needs (the group's weights, its feature maps, the options) and the
cache's directory. The report never depends on the cache, but Dask workers should see the
service's data directory at the same path: then the cache is shared, planning reuses the
workers' graphs and later jobs reuse everything (otherwise each worker keeps a cache of its own
and planning recomputes what it needs, with the same result).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

import graphs
from graphs.errors import PruneGraphError
from graphs.layers import LayerGroup
from graphs.options import AnalysisOptions
from graphs.work import GroupWork
from service.cache import FileCache, code_namespace

OnDone = Callable[[int, int], None]
"""Called as ``on_done(done, total)`` each time a group's task completes."""


class TaskFailedError(PruneGraphError):
    """A group's task could not be run: its workers died, or it kept raising."""

    default_hint = (
        "Check the Dask workers' logs and memory (a worker killed for memory dies again on "
        "the same layer); the job can be submitted again once they are healthy."
    )


@dataclass(frozen=True)
class GroupTask:
    """One group's analysis, as sent to wherever it runs (small: the group's own arrays).

    Attributes:
        group: the group, with its members' weights.
        methods: the methods whose results the job reports.
        options: method parameters.
        seed: the job's seed.
        features: the group's feature maps, for ``ci`` and data-aware graphs.
        cache_dir: the result cache's directory (shared with the job), or None for no cache.
        namespace: the job's code namespace (:func:`service.cache.code_namespace`): a task
            refuses to run on a worker whose analysis code or numeric libraries differ.
        warm: the plan method, when the job plans with a graph method it does not report: its
            graph or clustering is computed too, so planning finds it in the cache.
    """

    group: LayerGroup
    methods: tuple[str, ...]
    options: AnalysisOptions
    seed: int
    features: np.ndarray | None
    cache_dir: str | None
    namespace: str
    warm: str | None = None

    @property
    def name(self) -> str:
        return self.group.name


@dataclass
class GroupOutcome:
    """What a task returns: the group's result entries, or the error that explains why not.

    ``entries`` are the result cache's entries of the group's method results (key -> the
    result's JSON, small): the job hands them to :func:`graphs.analyze` as a cache, so that the
    report is built by the library's own code from the tasks' results, computing nothing.
    """

    entries: dict[str, bytes] = field(default_factory=dict)
    error: PruneGraphError | None = None
    hits: int = 0
    misses: int = 0
    worker: str = "local"


class _Recorder:
    """A cache that passes through to ``backing`` (if any) and remembers what it saw."""

    def __init__(self, backing: FileCache | None) -> None:
        self.backing = backing
        self.seen: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        value = self.backing.get(key) if self.backing is not None else None
        if value is not None:
            self.seen[key] = value
        return value

    def put(self, key: str, value: bytes) -> None:
        self.seen[key] = value
        if self.backing is not None:
            self.backing.put(key, value)


_namespaces: dict[tuple[tuple[str, int, int], ...], str] = {}


def _namespace() -> str:
    """:func:`service.cache.code_namespace` as the sources are now (recomputed when a file of
    ``graphs`` changed since the last task, like the job's own, which reads them per job)."""
    files = sorted(Path(graphs.__file__).parent.glob("*.py"))
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    if stamp not in _namespaces:
        _namespaces.clear()
        _namespaces[stamp] = code_namespace()
    return _namespaces[stamp]


def _worker_name() -> str:
    if "distributed" not in sys.modules:  # not on a Dask worker (and no need to import it)
        return "local"
    from distributed import get_worker

    try:
        return str(get_worker().name)
    except ValueError:  # not inside a Dask worker
        return "local"


def analyze_group_task(task: GroupTask) -> GroupOutcome:
    """Analyse one group (in the job's process or on a Dask worker).

    A :class:`~graphs.errors.PruneGraphError` (bad input: it would fail again) is returned, not
    raised, so that Dask does not retry it; anything else raises and is retried.
    """
    worker = _worker_name()
    namespace = _namespace() if worker != "local" else task.namespace  # the job's own code
    if task.namespace != namespace:
        return GroupOutcome(
            error=TaskFailedError(
                f"the Dask worker {worker} runs other analysis code or numeric libraries than "
                f"the service (code namespace {namespace}, the service's {task.namespace})",
                hint="Run the workers from the same image or environment as the service.",
            ),
            worker=worker,
        )
    cache = FileCache(Path(task.cache_dir), task.namespace) if task.cache_dir else None
    recorder = _Recorder(cache)
    try:
        work = GroupWork(
            task.group, seed=task.seed, options=task.options, cache=recorder, features=task.features
        )
        results = [work.result(method).model_dump_json().encode() for method in task.methods]
        if task.warm is not None and cache is not None:
            _warm(work, task.warm)
    except PruneGraphError as e:
        return GroupOutcome(error=e, worker=worker)
    # a result's entry holds exactly its JSON (graphs.work), however it was obtained
    entries = {k: v for k, v in recorder.seen.items() if v in results}
    hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
    return GroupOutcome(entries=entries, hits=hits, misses=misses, worker=worker)


def _warm(work: GroupWork, method: str) -> None:
    """Compute what planning with ``method`` reads from the cache (best effort: planning
    computes it itself, and reports any error, when this cannot)."""
    try:
        if method in ("mrp", "srr") and work.V.shape[0] >= 2:
            work.graph()
        elif method == "hsc":
            work.hsc()
        elif method == "ci":
            work.ci()
    except PruneGraphError:
        pass


class Executor(Protocol):
    """Runs a job's group tasks and returns their outcomes in the tasks' order."""

    def map_groups(
        self,
        fn: Callable[[GroupTask], GroupOutcome],
        tasks: Sequence[GroupTask],
        on_done: OnDone,
    ) -> list[GroupOutcome]:
        """Run ``fn`` on every task; ``on_done`` after each completion.

        Raises:
            PruneGraphError: the first error a task returned, or why a task could not run.
        """
        ...


class LocalExecutor:
    """The tasks run one after the other in the calling process (the job's worker)."""

    def map_groups(
        self,
        fn: Callable[[GroupTask], GroupOutcome],
        tasks: Sequence[GroupTask],
        on_done: OnDone,
    ) -> list[GroupOutcome]:
        outcomes: list[GroupOutcome] = []
        for task in tasks:
            outcome = fn(task)
            if outcome.error is not None:
                raise outcome.error
            outcomes.append(outcome)
            on_done(len(outcomes), len(tasks))
        return outcomes


def make_executor(dask_scheduler: str | None, job_id: str) -> Executor:
    """The Dask executor when a scheduler is configured, else the local one."""
    if not dask_scheduler:
        return LocalExecutor()
    from service.dask_executor import DaskExecutor

    return DaskExecutor(dask_scheduler, job_id)

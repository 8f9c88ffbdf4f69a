"""Where a job's per-group analysis runs: in the job's own process, or as Dask tasks.

A job (:func:`service.jobs.tasks.run_job`) reads its checkpoint (lazily: a safetensors checkpoint's
tensors stay in the file, see :mod:`service.ingest.safetensors_file`), groups its layers from their
names and shapes, and hands one :class:`GroupTask` per group to an :class:`Executor`. Each task
is :func:`analyze_group_task`: it reads its group's tensors, computes the group's method results
with :class:`graphs.work.GroupWork`, writes every artifact into the content-addressed result
cache (:class:`service.store.cache.FileCache`), so that the job's planning, which runs after the
tasks in the job's process, finds them there, and returns the results' JSON, from which the job
assembles the report (:func:`graphs.analyze.assemble_report`, in
:func:`service.jobs.tasks.analyze_on`) without reading any weight again. The job logic is the same
whichever executor runs the tasks:

- :class:`LocalExecutor` (the default): the tasks run one after the other in the job's worker
  process, as they always did.
- :class:`service.jobs.executors.dask.DaskExecutor` (``PRUNEGRAPH_DASK_SCHEDULER``): the tasks are
  submitted to a Dask cluster, the largest groups first and only a few per worker at a time;
  progress follows their completion, and Dask re-runs the task of a worker that died on another
  worker.

A task is small whatever its group's size: a tensor of a safetensors checkpoint (a single file
or a sharded folder) travels as a :class:`~service.ingest.safetensors_file.TensorRef` (its file's
path, offset, dtype and shape), and the task maps it again where it runs, reading only its own
group's tensors. So do feature maps (an activations file is safetensors): a task carries
references to its group's captured arrays and builds the group's float64 maps itself. Only
tensors that are not in a safetensors file travel inline (``.pt``/``.pth`` and ONNX
checkpoints, which their readers load whole anyway, and arrays built in memory). Hence **Dask
workers must see the service's data directory at the same path as the service**: a task that
cannot read its file fails its job with an error that says so. The shared directory also shares
the result cache, so planning reuses the workers' graphs and later jobs reuse everything.
"""

from __future__ import annotations

import dataclasses
import mmap
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from graphs.errors import PruneGraphError
from graphs.features import Activations, group_features, group_maps
from graphs.layers import LayerGroup, LayerWeights
from graphs.options import AnalysisOptions
from graphs.work import GroupWork
from service.ingest.safetensors_file import TensorRef, open_tensor, tensor_ref
from service.store.cache import FileCache, code_namespace, graphs_sources

OnDone = Callable[[int, int], None]
"""Called as ``on_done(done, total)`` each time a group's task completes."""


class TaskFailedError(PruneGraphError):
    """A group's task could not be run: its workers died, or it kept raising."""

    default_hint = (
        "Check the Dask workers' logs and memory (a worker killed for memory dies again on "
        "the same layer); the job can be submitted again once they are healthy."
    )


Array = np.ndarray | TensorRef
"""A tensor as a task carries it: a reference into a safetensors file, or the array itself."""

_LAYER_ARRAYS = ("weight", "bias")


def _by_ref(arr: np.ndarray) -> Array:
    return tensor_ref(arr) or arr


@dataclass(frozen=True)
class GroupSpec:
    """A :class:`~graphs.layers.LayerGroup` as a task carries it: the group's fields, and its
    members' fields with their weights and biases as :data:`Array` (references where they can
    be)."""

    fields: dict[str, Any]
    members: tuple[dict[str, Any], ...]

    @classmethod
    def of(cls, group: LayerGroup) -> GroupSpec:
        members = tuple(
            {
                f.name: _by_ref(v) if f.name in _LAYER_ARRAYS and v is not None else v
                for f in dataclasses.fields(m)
                for v in [getattr(m, f.name)]
            }
            for m in group.members
        )
        fields = {
            f.name: getattr(group, f.name) for f in dataclasses.fields(group) if f.name != "members"
        }
        return cls(fields=fields, members=members)

    @property
    def name(self) -> str:
        return str(self.fields["name"])

    def refs(self) -> list[TensorRef]:
        """The tensors of the group that are read from files."""
        return [v for m in self.members for v in m.values() if isinstance(v, TensorRef)]

    def load(self, maps: dict[str, mmap.mmap]) -> LayerGroup:
        """The group, its referenced tensors mapped again (``maps``: path -> mapping, shared);
        nothing is read until the group's vectors are built.

        Raises:
            OSError: a referenced file cannot be read.
        """
        members = tuple(
            LayerWeights(**{k: _open(v, maps) for k, v in m.items()}) for m in self.members
        )
        return LayerGroup(members=members, **self.fields)


def _open(value: Any, maps: dict[str, mmap.mmap]) -> Any:
    return open_tensor(value, maps) if isinstance(value, TensorRef) else value


@dataclass(frozen=True)
class GroupTask:
    """One group's analysis, as sent to wherever it runs (small: references to its tensors).

    Attributes:
        group: the group, its tensors as references into their files (or inline, see the
            module docstring).
        methods: the methods whose results the job reports.
        options: method parameters.
        seed: the job's seed.
        features: the captured feature maps the group's maps are built from (member name ->
            :data:`Array`), for ``ci`` and data-aware graphs; None without activations.
        cache_dir: the result cache's directory (shared with the job), or None for no cache.
        namespace: the job's code namespace (:func:`service.store.cache.code_namespace`): a task
            refuses to run on a worker whose analysis code or numeric libraries differ.
        warm: the plan method, when the job plans with a graph method it does not report: its
            graph or clustering is computed too, so planning finds it in the cache.
        cost: the group's vertices × their vectors' length (executors run the largest first).
    """

    group: GroupSpec
    methods: tuple[str, ...]
    options: AnalysisOptions
    seed: int
    features: dict[str, Array] | None
    cache_dir: str | None
    namespace: str
    warm: str | None = None
    cost: int = 0

    @property
    def name(self) -> str:
        return self.group.name

    @classmethod
    def of(
        cls,
        group: LayerGroup,
        *,
        methods: Sequence[str],
        options: AnalysisOptions,
        seed: int,
        activations: Activations | None,
        cache_dir: str | None,
        namespace: str,
        warm: str | None = None,
    ) -> GroupTask:
        """The task of ``group`` (reads none of its tensors).

        Raises:
            InvalidInputError: ``activations`` lack the group's maps, or do not fit it.
        """
        maps = group_maps(group, activations) if activations is not None else None
        return cls(
            group=GroupSpec.of(group),
            methods=tuple(methods),
            options=options,
            seed=seed,
            features={k: _by_ref(v) for k, v in maps.items()} if maps is not None else None,
            cache_dir=cache_dir,
            namespace=namespace,
            warm=warm,
            cost=group.n_filters * group.fan_in,
        )


@dataclass
class GroupOutcome:
    """What a task returns: the group's results, or the error that explains why not.

    ``results`` are the JSON of the group's method results (method -> bytes, small: exactly what
    the result cache stores for them); the job assembles the report from them.
    """

    results: dict[str, bytes] = field(default_factory=dict)
    error: PruneGraphError | None = None
    hits: int = 0
    misses: int = 0
    worker: str = "local"


_namespaces: dict[tuple[tuple[str, int, int], ...], str] = {}


def _namespace() -> str:
    """:func:`service.store.cache.code_namespace` as the sources are now (recomputed when a file of
    ``graphs`` changed since the last task, like the job's own, which reads them per job)."""
    stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in graphs_sources())
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

    A :class:`~graphs.errors.PruneGraphError` (bad input, or a file this process cannot read:
    it would fail again) is returned, not raised, so that Dask does not retry it; anything else
    raises and is retried.
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
    try:
        group, features = _load(task, worker)
        work = GroupWork(
            group, seed=task.seed, options=task.options, cache=cache, features=features
        )
        results = {m: work.result(m).model_dump_json().encode() for m in task.methods}
        if task.warm is not None and cache is not None:
            _warm(work, task.warm)
    except PruneGraphError as e:
        return GroupOutcome(error=e, worker=worker)
    hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
    return GroupOutcome(results=results, hits=hits, misses=misses, worker=worker)


def _load(task: GroupTask, worker: str) -> tuple[LayerGroup, np.ndarray | None]:
    """The task's group and feature maps, its referenced tensors mapped again here.

    Raises:
        TaskFailedError: a referenced file cannot be read here.
    """
    maps: dict[str, mmap.mmap] = {}
    features = task.features or {}
    refs = [*task.group.refs(), *(v for v in features.values() if isinstance(v, TensorRef))]
    for ref in refs:  # every file is opened (and its size checked) before anything is read
        try:
            open_tensor(ref, maps)
        except OSError as e:
            raise _unreadable(ref.path, e, worker) from None
    group = task.group.load(maps)
    if task.features is None:
        return group, None
    opened: dict[TensorRef, np.ndarray] = {}  # members that share a capture share its array
    acts: dict[str, np.ndarray] = {}
    for name, value in features.items():
        if isinstance(value, TensorRef):
            if value not in opened:
                opened[value] = open_tensor(value, maps)
            acts[name] = opened[value]
        else:
            acts[name] = value
    return group, group_features(group, acts)


def _unreadable(path: str, e: OSError, worker: str) -> TaskFailedError:
    why = e.strerror or str(e)
    if worker == "local":
        return TaskFailedError(
            f"the job cannot read {path} any more: {why}",
            hint="The file was removed or replaced while the job ran; submit the job again.",
        )
    return TaskFailedError(
        f"the Dask worker {worker} cannot read {path} ({why}): Dask workers read each group's "
        "tensors from the service's data directory, so they must share it at the same path as "
        "the service",
        hint="Mount the service's data directory on every Dask worker at the same path (as "
        "docker/compose.yaml does with one volume at /data), then submit the job again.",
    )


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

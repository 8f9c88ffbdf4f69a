"""The Dask side of the scale benchmark's part ``dask`` (:mod:`benchmarks.scale_dask`): a real
``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, the driver process that analyses
the checkpoint on them the way a service job does (then plans from the cache the workers
filled), and the reference task without Dask."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.support.paths import ROOT
from benchmarks.support.ports import free_port
from benchmarks.support.procfs import Sampler, current_rss_mb, mb, peak_rss_kib, proc_status

BIN = Path(sys.executable).parent
ONE_BLAS_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Cluster:
    address: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)


@contextmanager
def dask_cluster(n_workers: int, tmp: Path, sampler: Sampler) -> Iterator[Cluster]:
    """A real ``dask scheduler`` and ``n_workers`` ``dask worker`` processes on 127.0.0.1."""
    from distributed import Client

    port = free_port()
    c = Cluster(f"tcp://127.0.0.1:{port}")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        **ONE_BLAS_THREAD,
        "DASK_TEMPORARY_DIRECTORY": str(tmp),
    }
    common = ["--host", "127.0.0.1", "--dashboard-address", ":0"]

    def start(name: str, *cmd: str) -> None:
        with (tmp / f"{name}.log").open("wb") as log:
            c.procs[name] = subprocess.Popen(
                [str(BIN / "dask"), *cmd, *common],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        sampler.pids[name] = c.procs[name].pid

    try:
        start("scheduler", "scheduler", "--port", str(port))
        for k in range(1, n_workers + 1):
            start(
                f"w{k}",
                "worker",
                c.address,
                "--name",
                f"w{k}",
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--no-nanny",
                "--local-directory",
                str(tmp / f"w{k}"),
            )
        with Client(c.address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(n_workers, timeout=120)
        yield c
    finally:
        for name, proc in reversed(c.procs.items()):
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=30)
            sampler.pids.pop(name, None)


def dask_driver(address: str, ckpt: str, methods: list[str], cache_dir: str, out: str) -> None:
    """The job's side, in a fresh process: read lazily, one Dask task per group (analyze_on),
    then plan in the driver; writes the measurements to ``out`` (JSON)."""
    os.environ.update(ONE_BLAS_THREAD)
    import logging
    import warnings

    from distributed import get_task_stream

    from graphs.options import AnalysisOptions
    from service.ingest.checkpoint import read_checkpoint
    from service.jobs.executors.dask import DaskExecutor, client_for
    from service.jobs.tasks import analyze_on
    from service.store.cache import code_namespace

    logging.basicConfig(level=logging.WARNING)
    client = client_for(address)
    n_workers = len(client.nthreads())

    def warm() -> float:  # a service worker is warm before its first job: so are these
        import re
        from pathlib import Path

        import service.jobs.executors.local  # noqa: F401

        text = Path("/proc/self/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        return float(m.group(1)) if m else float("nan")

    workers_base = client.run(warm)
    namespace = code_namespace()
    base = current_rss_mb()
    t0 = time.perf_counter()
    parsed = read_checkpoint(ckpt)
    t_read = time.perf_counter() - t0
    rss_after_read = current_rss_mb()
    with get_task_stream(client=client) as ts, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t1, wall1 = time.perf_counter(), time.time()
        analysis = analyze_on(
            DaskExecutor(address, "scale"),
            parsed.layers,
            checkpoint=parsed.info,
            skipped=parsed.skipped,
            methods=methods,
            seed=0,
            options=AnalysisOptions(),
            manifest=None,
            activations=None,
            cache_dir=cache_dir,
            namespace=namespace,
            job_id="scale",
        )
        t_tasks = time.perf_counter() - t1
    t_total = time.perf_counter() - t0
    plan = plan_in_driver(parsed, cache_dir, namespace)
    workers_peak = client.run(peak_rss_kib)
    scheduler_peak = client.run_on_scheduler(peak_rss_kib)
    names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    report = analysis.report

    def by_name(rss: dict[str, float]) -> dict[str, float]:
        return {
            names.get(a, a): mb(v)
            for a, v in sorted(rss.items(), key=lambda kv: str(names.get(kv[0], kv[0])))
        }

    result = {
        "n_workers": n_workers,
        "methods": methods,
        "groups": len(report.layers),
        "skipped": [s.name for s in report.skipped],
        "read_s": round(t_read, 3),
        "tasks_s": round(t_tasks, 3),
        "total_s": round(t_total, 3),
        "driver_rss_after_imports_mb": base,
        "driver_rss_after_read_mb": rss_after_read,
        "driver_peak_rss_mb": mb(peak_rss_kib()),
        "workers_rss_after_imports_mb": by_name(workers_base),
        "workers_peak_rss_mb": by_name(workers_peak),
        "scheduler_peak_rss_mb": mb(scheduler_peak),
        "cache_misses": analysis.misses,
        "plan": plan,
        "warnings": dict(Counter(str(w.message).splitlines()[0] for w in caught)),
        "redundancy": {
            m: report.summary.methods[m].redundancy_params_weighted
            for m in methods
            if report.summary.methods[m].redundancy_params_weighted is not None
        },
        "tasks": task_rows(ts.data, report, wall1, names),
        "report_sha256": hashlib.sha256(report.to_json().encode()).hexdigest(),
    }
    Path(out).write_text(json.dumps(result, indent=2))


def plan_in_driver(parsed: Any, cache_dir: str, namespace: str) -> dict[str, Any]:
    """Planning, as a job does after its tasks: mrp for 30 % of the params, in the driver, from
    the cache the workers filled (the planner holds one group's float64 vectors at a time); its
    time and the driver's VmHWM before and after."""
    from graphs.plan import Target
    from graphs.planner import plan_layers
    from service.store.cache import FileCache

    st = proc_status(os.getpid()) or {}
    plan_hwm_before = st.get("VmHWM", float("nan"))
    cache = FileCache(Path(cache_dir), namespace)
    t2 = time.perf_counter()
    plan = plan_layers(
        parsed.layers, method="mrp", target=Target(params=0.3),
        params_total=parsed.info.n_params, checkpoint_sha256=parsed.info.sha256, cache=cache,
    )  # fmt: skip
    t_plan = time.perf_counter() - t2
    st = proc_status(os.getpid()) or {}
    return {
        "method": "mrp",
        "target_params": 0.3,
        "seconds": round(t_plan, 3),
        "achieved": plan.achieved,
        "rule": plan.rule,
        "cache_misses": cache.misses,
        "driver_hwm_before_mb": plan_hwm_before,
        "driver_hwm_after_mb": st.get("VmHWM", float("nan")),
    }


def task_rows(
    records: list[dict[str, Any]], report: Any, wall1: float, names: dict[str, str]
) -> list[dict[str, Any]]:
    """One row per analysis task of the scheduler's task stream: its group, worker, when its
    compute started and stopped (seconds after submission, ``wall1``) and each phase's time."""
    tasks = []
    for rec in records:
        m = re.search(r"-(\d{4})-[0-9a-f]{8}$", str(rec["key"]))
        if not m:
            continue
        layer = report.layers[int(m.group(1))]
        phases: dict[str, float] = {}
        for s in rec["startstops"]:
            phases[s["action"]] = phases.get(s["action"], 0.0) + s["stop"] - s["start"]
        compute = [s for s in rec["startstops"] if s["action"] == "compute"]
        tasks.append(
            {
                "group": layer.name,
                "start_at_s": round(compute[0]["start"] - wall1, 3) if compute else None,
                "stop_at_s": round(compute[-1]["stop"] - wall1, 3) if compute else None,
                "kind": layer.kind,
                "n": layer.n_filters,
                "fan_in": layer.fan_in,
                "worker": names.get(rec["worker"], rec["worker"]),
                **{f"{k}_s": round(v, 3) for k, v in phases.items()},
            }
        )
    return sorted(tasks, key=lambda t: (t["group"], t["worker"]))


def local_task(ckpt: str, methods: list[str], index: int) -> dict[str, Any]:
    """Reference without Dask, in a fresh process with 1 BLAS thread: group ``index``'s task
    (:func:`service.jobs.executors.local.analyze_group_task`, no cache) on the lazily read
    checkpoint."""
    from threadpoolctl import threadpool_limits

    from graphs.grouping import build_groups
    from graphs.options import AnalysisOptions
    from service.ingest.checkpoint import read_checkpoint
    from service.jobs.executors.local import GroupTask, analyze_group_task
    from service.store.cache import code_namespace

    threadpool_limits(limits=1)
    parsed = read_checkpoint(ckpt)
    groups, _ = build_groups(parsed.layers)
    group = groups[index]
    task = GroupTask.of(
        group,
        methods=methods,
        options=AnalysisOptions(),
        seed=0,
        activations=None,
        cache_dir=None,
        namespace=code_namespace(),
    )
    base = current_rss_mb()
    t0 = time.perf_counter()
    outcome = analyze_group_task(task)
    seconds = time.perf_counter() - t0
    if outcome.error is not None:
        raise outcome.error
    return {
        "group": group.name,
        "unit": group.unit,
        "n": group.n_filters,
        "fan_in": group.fan_in,
        "seconds": round(seconds, 3),
        "rss_before_mb": base,
        "peak_rss_mb": mb(peak_rss_kib()),
    }

"""Per-group analysis on a real Dask cluster (service.jobs.executors.dask): a ``dask scheduler``,
two ``dask worker``s (w1, w2; no nanny, so that a killed worker stays dead) and a ``prunegraph
serve`` pointed at the scheduler with ``--dask-scheduler``, all on 127.0.0.1. Which worker ran
which task is read from the scheduler's own task stream, not from anything prunegraph reports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from graphs.analyze import analyze
from graphs.options import AnalysisOptions
from service.jobs.executors.local import (
    GroupOutcome,
    GroupTask,
    LocalExecutor,
    TaskFailedError,
    analyze_group_task,
)
from service.jobs.tasks import analyze_on
from service.store.cache import code_namespace
from tests.server_process import Server, free_port, wait_job
from tests.service.jobs.helpers import group_tasks, llama_checkpoint, random_layers

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


# --- real processes: a scheduler, two workers, a service ----------------------------------


def _raise(task: GroupTask) -> GroupOutcome:
    """A task that always fails on the worker (retried, then the map fails)."""
    raise RuntimeError(f"no luck with {task.name}")


@dataclass
class Cluster:
    address: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from distributed import Client

    tmp = tmp_path_factory.mktemp("dask")
    port = free_port()
    c = Cluster(f"tcp://127.0.0.1:{port}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "DASK_TEMPORARY_DIRECTORY": str(tmp)}  # fmt: skip
    common = ["--host", "127.0.0.1", "--dashboard-address", ":0"]

    def start(name: str, *cmd: str) -> None:
        log = (tmp / f"{name}.log").open("wb")
        c.procs[name] = subprocess.Popen(
            [str(BIN / "dask"), *cmd, *common], cwd=ROOT, env=env, stdout=log, stderr=log,
            start_new_session=True,
        )  # fmt: skip
        log.close()

    try:
        start("scheduler", "scheduler", "--port", str(port))
        for name in ("w1", "w2"):
            start(name, "worker", c.address, "--name", name, "--nthreads", "1", "--nworkers",
                  "1", "--no-nanny", "--local-directory", str(tmp / name))  # fmt: skip
        with Client(c.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            client.get_task_stream()  # installs the scheduler's task-stream recorder
        yield c
    finally:
        for name in ("w1", "w2", "scheduler"):
            if name in c.procs:
                c.kill(name)


def _ran_on(cluster: Cluster, job: str) -> dict[str, list[str]]:
    """Worker name -> keys of this job's tasks that completed there (the scheduler's record)."""
    from distributed import Client

    with Client(cluster.address, timeout=30, set_as_default=False) as client:
        names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        stream = client.get_task_stream()
    ran: dict[str, list[str]] = {}
    for record in stream:
        if job in str(record["key"]) and record.get("status") == "OK":
            ran.setdefault(names.get(record["worker"], record["worker"]), []).append(
                str(record["key"])
            )
    return ran


@pytest.fixture(scope="module")
def server(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("serve") / "data"
    s = Server(data, args=("--dask-scheduler", cluster.address), log=data.parent / "serve.log")
    try:
        s.start()
        yield s
    finally:
        s.kill()


@pytest.fixture(scope="module")
def mobilenet(server: Server, realdata: Path) -> str:
    with (realdata / "mobilenet_v2_imagenet.pth").open("rb") as f:
        up = httpx.post(f"{server.url}/v1/checkpoints", files={"file": f}, timeout=120)
    assert up.status_code == 201, up.text
    return str(up.json()["id"])


@pytest.mark.real
@pytest.mark.slow
def test_a_job_runs_on_both_workers_with_the_embedded_report_and_plan(
    cluster: Cluster, server: Server, mobilenet: str, realdata: Path
) -> None:
    from graphs.plan import Target
    from graphs.planner import plan_layers
    from service.ingest.checkpoint import read_checkpoint

    req = {"checkpoint_id": mobilenet, "seed": 0, "target": {"params": 0.3}}
    job = httpx.post(f"{server.url}/v1/jobs", json=req, timeout=30).json()["id"]
    body = wait_job(server.url, job, {"done", "failed"}, poll=0.05)
    assert body["status"] == "done", body
    ran = _ran_on(cluster, job)
    assert set(ran) == {"w1", "w2"}, ran  # the scheduler saw tasks of this job on both
    assert sum(len(k) for k in ran.values()) == 36  # one task per group, none twice
    # byte for byte what the embedded library computes, without any cache
    ckpt = read_checkpoint(realdata / "mobilenet_v2_imagenet.pth")
    want = analyze(ckpt.layers, checkpoint=ckpt.info, skipped=ckpt.skipped, seed=0)
    assert httpx.get(f"{server.url}/v1/jobs/{job}/report").text == want.to_json()
    plan = plan_layers(
        ckpt.layers, method="mrp", target=Target(params=0.3), params_total=ckpt.info.n_params,
        checkpoint_sha256=ckpt.info.sha256,
    )  # fmt: skip
    assert httpx.get(f"{server.url}/v1/jobs/{job}/plan").text == plan.to_json()
    # the workers wrote every artifact into the shared cache: a re-plan computes nothing
    again = {**req, "target": {"params": 0.5}}
    job2 = httpx.post(f"{server.url}/v1/jobs", json=again, timeout=30).json()["id"]
    body2 = wait_job(server.url, job2, {"done", "failed"}, poll=0.05)
    assert body2["status"] == "done" and body2["cache_misses"] == 0 and body2["cache_hits"] > 0


@pytest.mark.real
@pytest.mark.slow
def test_tasks_that_keep_failing_fail_the_map_with_the_reason(cluster: Cluster) -> None:
    from service.jobs.executors.dask import DaskExecutor

    tasks = group_tasks(random_layers(0)[:1], ("l1",))
    with pytest.raises(TaskFailedError, match="failed on the Dask workers 3 times: RuntimeError"):
        DaskExecutor(cluster.address, "failing").map_groups(_raise, tasks, lambda d, n: None)
    assert sum(map(len, _ran_on(cluster, "failing").values())) == 0  # no task ever succeeded


class _Recording:
    """An executor that keeps the tasks it is given."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.tasks = inner, []

    def map_groups(self, fn: Any, tasks: Any, on_done: Any) -> list[GroupOutcome]:
        self.tasks = list(tasks)
        return self.inner.map_groups(fn, tasks, on_done)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_a_sharded_safetensors_job_on_dask_reads_the_shared_files(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The workers map the checkpoint's shards themselves: small tasks, the local report."""
    import pickle
    from dataclasses import replace

    from service.ingest.checkpoint import read_checkpoint
    from service.jobs.executors.dask import DaskExecutor

    folder = llama_checkpoint(tmp_path / "ckpt", 128, 512, blocks=3)
    ckpt = read_checkpoint(folder)
    kw: dict[str, Any] = {"checkpoint": ckpt.info, "skipped": ckpt.skipped, "seed": 0,
                          "methods": ["mrp", "hsc", "l1"], "options": AnalysisOptions(),
                          "manifest": None, "activations": None,
                          "namespace": code_namespace()}  # fmt: skip
    want = analyze_on(LocalExecutor(), ckpt.layers, cache_dir=None, **kw).report.to_json()
    dask = _Recording(DaskExecutor(cluster.address, "sharded"))
    got = analyze_on(dask, ckpt.layers, cache_dir=str(tmp_path / "cache"), job_id="sharded", **kw)
    assert got.report.to_json() == want and got.misses > 0
    assert len(dask.tasks) == 6 and max(len(pickle.dumps(t)) for t in dask.tasks) < 4096
    ran = _ran_on(cluster, "sharded")
    assert sum(map(len, ran.values())) == 6 and set(ran) <= {"w1", "w2"}, ran
    # a worker that does not see the file at the job's path: the job fails saying why
    task = dask.tasks[0]
    gone = str(tmp_path / "not-shared" / "model-00001-of-00003.safetensors")
    members = tuple({k: replace(v, path=gone) if hasattr(v, "path") else v for k, v in m.items()}
                    for m in task.group.members)  # fmt: skip
    moved = replace(task, group=replace(task.group, members=members))
    with pytest.raises(TaskFailedError, match="must share it at the same path") as e:
        DaskExecutor(cluster.address, "unshared").map_groups(
            analyze_group_task, [moved], lambda d, n: None
        )
    assert "cannot read " + gone in e.value.message and "Dask worker w" in e.value.message


@pytest.mark.real
@pytest.mark.slow
def test_a_worker_killed_mid_job_the_job_still_completes(
    cluster: Cluster, server: Server, mobilenet: str
) -> None:
    """Runs last: w1 stays dead."""
    from distributed import Client

    req = {"checkpoint_id": mobilenet, "seed": 1, "methods": ["mrp", "srr", "hsc", "l1"]}
    job = httpx.post(f"{server.url}/v1/jobs", json=req, timeout=30).json()["id"]
    victim: list[str] = []
    with Client(cluster.address, timeout=30, set_as_default=False) as client:
        addr = {w["name"]: a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        deadline = time.monotonic() + 60
        while not victim and time.monotonic() < deadline:
            victim = [str(k) for k in client.processing([addr["w1"]])[addr["w1"]] if job in str(k)]
            time.sleep(0.01)
    assert victim, "w1 never got a task of the job"
    cluster.kill("w1")
    at_kill = httpx.get(f"{server.url}/v1/jobs/{job}", timeout=10).json()
    assert at_kill["status"] == "running" and at_kill["progress"] < 0.9, at_kill
    done = wait_job(server.url, job, {"done", "failed"}, poll=0.05)
    assert done["status"] == "done", done
    ran = _ran_on(cluster, job)
    lost = [k for k in victim if k not in ran.get("w1", [])]  # w1 had not finished them
    assert lost, "w1 finished its tasks before the kill: nothing was tested"
    assert set(lost) <= set(ran["w2"]), (lost, ran)  # Dask re-ran them on w2
    assert len({k for keys in ran.values() for k in keys}) == 36
    report = httpx.get(f"{server.url}/v1/jobs/{job}/report").json()
    assert report["summary"]["n_layers"] == 36 and report["seed"] == 1

"""Per-group analysis as Dask tasks (service.executor, service.dask_executor).

The slow tests run real processes on 127.0.0.1: a ``dask scheduler``, two ``dask worker``s
(w1, w2; no nanny, so that a killed worker stays dead) and a ``prunegraph serve`` pointed at the
scheduler with ``--dask-scheduler``. Which worker ran which task is read from the scheduler's own
task stream, not from anything prunegraph reports.
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
import numpy as np
import pytest

from graphs.analyze import analyze
from graphs.errors import InvalidInputError
from graphs.grouping import build_groups
from graphs.layers import LayerWeights
from graphs.options import AnalysisOptions
from graphs.report import CheckpointInfo
from service.cache import code_namespace
from service.executor import (
    GroupOutcome,
    GroupTask,
    LocalExecutor,
    TaskFailedError,
    analyze_group_task,
    make_executor,
)
from service.jobs import analyze_on
from service.settings import Settings
from tests.server_process import Server, _free_port, wait_job

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# --- the job logic without Dask: one code path, the same report as graphs.analyze ----------


def _layers(seed: int) -> list[LayerWeights]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(6, 27))
    w1 = np.concatenate([base, base + 0.01 * rng.normal(size=(6, 27))]).reshape(12, 3, 3, 3)
    return [
        LayerWeights("conv1", "conv2d", w1.astype(np.float32), bn="bn1", extra_params=24),
        LayerWeights("dw", "conv2d", rng.normal(size=(12, 1, 3, 3)), groups=12),
        LayerWeights("conv2", "conv2d", rng.normal(size=(16, 12, 1, 1))),
        LayerWeights("fc", "linear", rng.normal(size=(1, 16))),  # one filter: every method says so
    ]


def _tasks(layers: list[LayerWeights], methods: tuple[str, ...], **kw: Any) -> list[GroupTask]:
    groups, _ = build_groups(layers)
    base: dict[str, Any] = {
        "methods": methods,
        "options": AnalysisOptions(),
        "seed": 3,
        "features": None,
        "cache_dir": None,
        "namespace": code_namespace(),
    }
    return [GroupTask(group=g, **{**base, **kw}) for g in groups]


INFO = CheckpointInfo(sha256="ab" * 32, format="pytorch", size_bytes=1, n_tensors=5,
                      n_params=999)  # fmt: skip


@pytest.mark.parametrize("methods", [("mrp", "srr", "hsc", "l1", "fpgm"), ("l1",)])
def test_local_tasks_give_the_library_report_byte_for_byte(
    methods: tuple[str, ...], tmp_path: Path
) -> None:
    layers = _layers(0)[:3]
    want = analyze(layers, checkpoint=INFO, methods=methods, seed=3).to_json()
    seen: list[tuple[int, int]] = []
    kw: dict[str, Any] = {"checkpoint": INFO, "skipped": [], "methods": methods, "seed": 3,
                          "options": AnalysisOptions(), "manifest": None, "activations": None,
                          "cache_dir": str(tmp_path), "namespace": code_namespace()}  # fmt: skip
    local = make_executor(None, "job")
    first = analyze_on(local, layers, progress=lambda d, n: seen.append((d, n)), **kw)
    assert first.report.to_json() == want
    assert seen == [(1, 2), (2, 2)]  # progress: completed groups / groups
    assert first.elsewhere == 0 and first.misses > 0 and any(tmp_path.rglob("*"))
    again = analyze_on(LocalExecutor(), layers, **kw)  # every artifact from the cache now
    assert again.report.to_json() == want and again.misses == 0 and again.elsewhere == 0
    no_cache = analyze_on(LocalExecutor(), layers, **{**kw, "cache_dir": None})
    assert no_cache.report.to_json() == want and no_cache.elsewhere == 0


@pytest.mark.real
def test_local_tasks_with_a_manifest_and_feature_maps_give_the_library_report(
    realdata: Path, tmp_path: Path
) -> None:
    """The real digit CNN with its manifest (coupled groups, FLOPs) and real MNIST maps (ci)."""
    import torch

    from clients import build_manifest
    from clients.activations import capture_activations
    from service.activations import read_activations
    from service.ingest import read_checkpoint
    from tests.clients import models
    from tests.mnist import load_mnist

    net = models.digit_cnn()
    net.load_state_dict(torch.load(realdata / "digit_cnn.pth", weights_only=True))
    net.eval()
    manifest = build_manifest(net, torch.zeros(1, 1, 28, 28))
    digits = load_mnist(realdata)[0][:16]
    capture_activations(net, [digits], max_pixels=64).save(tmp_path / "a.safetensors")
    acts = read_activations(tmp_path / "a.safetensors")
    ckpt = read_checkpoint(realdata / "digit_cnn.pth")
    common: dict[str, Any] = {"checkpoint": ckpt.info, "skipped": ckpt.skipped, "seed": 2,
                              "methods": ["mrp", "l1", "ci"], "options": AnalysisOptions(),
                              "manifest": manifest, "activations": acts}  # fmt: skip
    want = analyze(ckpt.layers, **common).to_json()
    assert '"flops": null' not in want and '"ci": {' in want
    got = analyze_on(LocalExecutor(), ckpt.layers, cache_dir=str(tmp_path / "cache"),
                     namespace=code_namespace(), plan_method="srr", **common)  # fmt: skip
    assert got.report.to_json() == want and got.elsewhere == 0


def test_a_task_error_fails_the_map_with_its_own_message(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = _tasks(_layers(1), ("mrp",))
    outcome = analyze_group_task(tasks[-1])  # fc has one filter
    assert isinstance(outcome.error, InvalidInputError) and not outcome.entries
    with pytest.raises(InvalidInputError):
        LocalExecutor().map_groups(analyze_group_task, tasks, lambda d, n: None)
    import service.executor as ex

    monkeypatch.setattr(ex, "_worker_name", lambda: "w9")  # as if on a Dask worker
    other = analyze_group_task(_tasks(_layers(1), ("l1",), namespace="0" * 16)[0])
    assert isinstance(other.error, TaskFailedError)
    assert "worker w9 runs other analysis code" in other.error.message


def test_the_scheduler_setting_and_flag() -> None:
    assert Settings(dask_scheduler="").dask_scheduler is None
    assert Settings(dask_scheduler="10.0.0.5:8786").dask_scheduler == "tcp://10.0.0.5:8786"
    assert Settings(dask_scheduler="tls://h:8786").dask_scheduler == "tls://h:8786"
    with pytest.raises(ValueError, match="not an address"):
        Settings(dask_scheduler="tcp://")
    from typer.testing import CliRunner

    from prunegraph.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--dask-scheduler" in out


def test_killed_workers_and_lost_schedulers_are_named() -> None:
    from concurrent.futures import CancelledError

    from distributed import KilledWorker

    from service.dask_executor import DaskExecutor

    class Dead:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def result(self) -> GroupOutcome:
            raise self.exc

    ex = DaskExecutor("tcp://127.0.0.1:1", "job")
    killed = KilledWorker("k", "tcp://127.0.0.1:2", allowed_failures=3)
    with pytest.raises(TaskFailedError, match=r"layer features\.3 died repeatedly"):
        ex._outcome(Dead(killed), "features.3")  # type: ignore[arg-type]
    with pytest.raises(TaskFailedError, match="connection to the scheduler"):
        ex._outcome(Dead(CancelledError()), "x")  # type: ignore[arg-type]
    with pytest.raises(TaskFailedError, match="failed on the Dask workers 3 times: OSError"):
        ex._outcome(Dead(OSError("disk full")), "x")  # type: ignore[arg-type]


def test_no_scheduler_at_the_address_fails_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.dask_executor as dx

    monkeypatch.setattr(dx, "CONNECT_S", 1.0)
    tasks = _tasks(_layers(0)[:1], ("l1",))
    with pytest.raises(TaskFailedError, match="cannot reach the Dask scheduler"):
        dx.DaskExecutor(f"tcp://127.0.0.1:{_free_port()}", "j").map_groups(
            analyze_group_task, tasks, lambda d, n: None
        )


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
    port = _free_port()
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
    from service.ingest import read_checkpoint

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
    from service.dask_executor import DaskExecutor

    tasks = _tasks(_layers(0)[:1], ("l1",))
    with pytest.raises(TaskFailedError, match="failed on the Dask workers 3 times: RuntimeError"):
        DaskExecutor(cluster.address, "failing").map_groups(_raise, tasks, lambda d, n: None)
    assert sum(map(len, _ran_on(cluster, "failing").values())) == 0  # no task ever succeeded


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

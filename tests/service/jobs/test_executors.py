"""Per-group analysis as tasks (service.jobs.executors.local, the Dask executor's scheduling
without a cluster): the library's report byte for byte, tasks that carry references to their
tensors, errors named; a real cluster is tests/service/jobs/test_executors_dask.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from graphs.analyze import analyze
from graphs.errors import InvalidInputError
from graphs.grouping import build_groups
from graphs.layers import LayerWeights
from graphs.options import AnalysisOptions
from graphs.report import CheckpointInfo
from service.jobs.executors.local import (
    GroupOutcome,
    GroupTask,
    LocalExecutor,
    TaskFailedError,
    analyze_group_task,
)
from service.jobs.tasks import analyze_on, make_executor
from service.settings import Settings
from service.store.cache import code_namespace
from tests.server_process import free_port
from tests.service.jobs.helpers import group_tasks, llama_checkpoint, random_layers

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


# --- the job logic without Dask: one code path, the same report as graphs.analyze ----------


INFO = CheckpointInfo(sha256="ab" * 32, format="pytorch", size_bytes=1, n_tensors=5,
                      n_params=999)  # fmt: skip


@pytest.mark.parametrize("methods", [("mrp", "srr", "hsc", "l1", "fpgm"), ("l1",)])
def test_local_tasks_give_the_library_report_byte_for_byte(
    methods: tuple[str, ...], tmp_path: Path
) -> None:
    layers = random_layers(0)[:3]
    want = analyze(layers, checkpoint=INFO, methods=methods, seed=3).to_json()
    seen: list[tuple[int, int]] = []
    kw: dict[str, Any] = {"checkpoint": INFO, "skipped": [], "methods": methods, "seed": 3,
                          "options": AnalysisOptions(), "manifest": None, "activations": None,
                          "cache_dir": str(tmp_path), "namespace": code_namespace()}  # fmt: skip
    local = make_executor(None, "job")
    first = analyze_on(local, layers, progress=lambda d, n: seen.append((d, n)), **kw)
    assert first.report.to_json() == want
    assert seen == [(1, 2), (2, 2)]  # progress: completed groups / groups
    assert first.misses > 0 and any(tmp_path.rglob("*"))
    again = analyze_on(LocalExecutor(), layers, **kw)  # every artifact from the cache now
    assert again.report.to_json() == want and again.misses == 0 and again.hits > 0
    no_cache = analyze_on(LocalExecutor(), layers, **{**kw, "cache_dir": None})
    assert no_cache.report.to_json() == want


@pytest.mark.real
def test_local_tasks_with_a_manifest_and_feature_maps_give_the_library_report(
    realdata: Path, tmp_path: Path
) -> None:
    """The real digit CNN with its manifest (coupled groups, FLOPs) and real MNIST maps (ci)."""
    import torch

    from clients import build_manifest
    from clients.activations import capture_activations
    from service.ingest.activations import read_activations
    from service.ingest.checkpoint import read_checkpoint
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
    assert got.report.to_json() == want


def test_a_task_error_fails_the_map_with_its_own_message(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = group_tasks(random_layers(1), ("mrp",))
    outcome = analyze_group_task(tasks[-1])  # fc has one filter
    assert isinstance(outcome.error, InvalidInputError) and not outcome.results
    with pytest.raises(InvalidInputError):
        LocalExecutor().map_groups(analyze_group_task, tasks, lambda d, n: None)
    import service.jobs.executors.local as ex

    monkeypatch.setattr(ex, "_worker_name", lambda: "w9")  # as if on a Dask worker
    other = analyze_group_task(group_tasks(random_layers(1), ("l1",), namespace="0" * 16)[0])
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

    from service.jobs.executors.dask import DaskExecutor

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
    import service.jobs.executors.dask as dx

    monkeypatch.setattr(dx, "CONNECT_S", 1.0)
    tasks = group_tasks(random_layers(0)[:1], ("l1",))
    with pytest.raises(TaskFailedError, match="cannot reach the Dask scheduler"):
        dx.DaskExecutor(f"tcp://127.0.0.1:{free_port()}", "j").map_groups(
            analyze_group_task, tasks, lambda d, n: None
        )


# --- tasks carry references to their tensors, not the tensors -----------------------------


def _job_tasks(folder: Path, **kw: Any) -> tuple[Any, list[GroupTask]]:
    from service.ingest.checkpoint import read_checkpoint

    ckpt = read_checkpoint(folder)
    groups, _ = build_groups(ckpt.layers)
    base: dict[str, Any] = {"methods": ("mrp", "l1"), "options": AnalysisOptions(), "seed": 0,
                            "activations": None, "cache_dir": None,
                            "namespace": code_namespace()}  # fmt: skip
    return ckpt, [GroupTask.of(g, **{**base, **kw}) for g in groups]


def test_safetensors_tasks_carry_references_of_a_size_independent_of_the_layers(
    tmp_path: Path,
) -> None:
    import pickle

    from service.ingest.safetensors_file import TensorRef

    _, small = _job_tasks(llama_checkpoint(tmp_path / "small", 16, 32))
    ckpt, large = _job_tasks(llama_checkpoint(tmp_path / "large", 128, 512))
    assert [t.name for t in large] == [t.name for t in small]  # FFNs and attention, 2 blocks
    assert {t.group.fields["unit"] for t in large} == {"neurons", "heads"}
    tensor_bytes = [sum(r.nbytes for r in t.group.refs()) for t in large]
    assert min(tensor_bytes) >= 4 * 128 * 128 * 4 and all(
        len(t.group.refs()) in (3, 4) for t in large
    )
    sizes = [len(pickle.dumps(t)) for t in large]
    assert max(sizes) < 4096, sizes  # vs 256-786 KB of tensors each
    assert all(abs(a - len(pickle.dumps(b))) < 64 for a, b in zip(sizes, small, strict=True))
    assert all(isinstance(v["weight"], TensorRef) for t in large for v in t.group.members)
    assert [t.cost for t in large] == [512 * 3 * 128, 4 * 4 * 128 * 32] * 2  # FFN first
    # the job on these tasks gives the library's report, byte for byte
    want = analyze(ckpt.layers, checkpoint=ckpt.info, skipped=ckpt.skipped, methods=["mrp", "l1"])
    kw: dict[str, Any] = {"checkpoint": ckpt.info, "skipped": ckpt.skipped, "seed": 0,
                          "methods": ["mrp", "l1"], "options": AnalysisOptions(), "manifest": None,
                          "activations": None, "cache_dir": None,
                          "namespace": code_namespace()}  # fmt: skip
    assert analyze_on(LocalExecutor(), ckpt.layers, **kw).report.to_json() == want.to_json()


def test_in_memory_layers_travel_inline() -> None:
    task = group_tasks(random_layers(0), ("l1",))[0]
    assert not task.group.refs()
    assert task.group.members[0]["weight"].shape == (12, 3, 3, 3)


def test_feature_maps_travel_as_references_and_give_the_library_report(tmp_path: Path) -> None:
    import json

    from safetensors.numpy import save_file

    from service.ingest.activations import read_activations
    from service.ingest.checkpoint import read_checkpoint
    from service.ingest.safetensors_file import TensorRef

    rng = np.random.default_rng(5)
    layers = random_layers(0)[:3]  # conv1 (with its depthwise dw: one group), conv2
    save_file({layer.name + ".weight": np.ascontiguousarray(layer.weight, dtype=np.float32)
               for layer in layers}, str(tmp_path / "m.safetensors"))  # fmt: skip
    ckpt = read_checkpoint(tmp_path / "m.safetensors")
    maps = {"c1": rng.standard_normal((4, 12, 9)), "c2": rng.standard_normal((4, 16, 9))}
    meta = {"format": "prunegraph-activations",
            "layers": json.dumps({"conv1": "c1", "dw": "c1", "conv2": "c2"})}  # fmt: skip
    save_file(maps, str(tmp_path / "a.safetensors"), metadata=meta)
    acts = read_activations(tmp_path / "a.safetensors")
    _, tasks = _job_tasks(tmp_path / "m.safetensors", activations=acts, methods=("ci",))
    assert all(isinstance(v, TensorRef) for t in tasks for v in (t.features or {}).values())
    common: dict[str, Any] = {"checkpoint": ckpt.info, "skipped": ckpt.skipped, "seed": 0,
                              "methods": ["mrp", "ci"], "options": AnalysisOptions(),
                              "manifest": None, "activations": acts}  # fmt: skip
    want = analyze(ckpt.layers, **common).to_json()
    assert '"ci": {' in want
    got = analyze_on(LocalExecutor(), ckpt.layers, cache_dir=None, namespace=code_namespace(),
                     **common)  # fmt: skip
    assert got.report.to_json() == want


def test_a_task_whose_file_is_not_there_says_the_workers_must_share_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tasks = _job_tasks(llama_checkpoint(tmp_path / "ckpt", 16, 32))
    (tmp_path / "ckpt").rename(tmp_path / "elsewhere")
    here = analyze_group_task(tasks[0])  # in the job's own process: the file went away
    assert isinstance(here.error, TaskFailedError) and "cannot read" in here.error.message
    assert str(tmp_path / "ckpt" / "model-00001-of-00002.safetensors") in here.error.message
    import service.jobs.executors.local as ex

    monkeypatch.setattr(ex, "_worker_name", lambda: "w9")  # as if on a Dask worker
    there = analyze_group_task(tasks[0])
    assert isinstance(there.error, TaskFailedError) and not there.results
    assert "the Dask worker w9 cannot read" in there.error.message
    assert "must share it at the same path as the service" in there.error.message
    assert "data directory" in there.error.hint
    (tmp_path / "elsewhere").rename(tmp_path / "ckpt")  # the same path again, but other bytes
    shard = tmp_path / "ckpt" / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes() + b"more")
    assert "has " in str(analyze_group_task(tasks[0]).error)


def test_the_dask_executor_submits_the_largest_first_and_a_bounded_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stand-in client: each submitted task completes when the executor asks for it."""
    import service.jobs.executors.dask as dx

    class FakeFuture:
        def __init__(self, key: str, run: Any) -> None:
            self.key, self.run = key, run

        def add_done_callback(self, cb: Any) -> None:
            cb(self)

        def result(self) -> GroupOutcome:
            return self.run()  # type: ignore[no-any-return]

        def done(self) -> bool:
            return True

        def release(self) -> None:
            client.released += 1

    class FakeClient:
        def __init__(self) -> None:
            self.submitted: list[str] = []
            self.released = self.peak = 0

        def nthreads(self) -> dict[str, int]:
            return {"w1": 1, "w2": 1}

        def submit(self, fn: Any, task: GroupTask, key: str, retries: int) -> FakeFuture:
            self.submitted.append(task.name)
            self.peak = max(self.peak, len(self.submitted) - self.released)
            return FakeFuture(key, lambda: fn(task))

    client = FakeClient()
    monkeypatch.setattr(dx, "client_for", lambda address: client)
    layers = [LayerWeights(f"l{i}", "linear", np.eye(n + 2)[: n + 2]) for i, n in
              enumerate([3, 9, 1, 7, 5, 8, 2, 6, 4, 10])]  # fmt: skip
    tasks = group_tasks(layers, ("l1",))
    seen: list[tuple[int, int]] = []
    out = dx.DaskExecutor("tcp://x:1", "j").map_groups(
        analyze_group_task, tasks, lambda d, n: seen.append((d, n))
    )
    assert client.submitted == [t.name for t in sorted(tasks, key=lambda t: -t.cost)]
    assert client.peak <= 4 and len(out) == 10 and seen[-1] == (10, 10)
    assert [o.results["l1"] for o in out] == [analyze_group_task(t).results["l1"] for t in tasks]

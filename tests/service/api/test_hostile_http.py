"""Hostile uploads through the HTTP API: refused with a 4xx JSON body, fast, in bounded memory.

Every file here is crafted in the test (no GBs are ever held: the 2 GiB zip bomb is 2 MB of
repeated deflate blocks). After each upload nothing may be left in ``data_dir/tmp`` or stored,
the server's peak memory may not have grown by anything near a declared size, and the server
keeps serving: a good upload still succeeds, and at the end a job on it runs to done.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save as save_safetensors

from service.main import create_app
from service.settings import Settings
from tests.service.api.hostile_files import HOSTILE
from tests.service.helpers import model_bytes

ALICE = {"Authorization": "Bearer secret1"}
MiB = 1 << 20
MAX_GROWTH = 256 * MiB  # peak RSS growth allowed for one upload (declared sizes: GiB to TiB)
MAX_SECONDS = 10.0  # per upload, on 2 slow cores


# ---------------------------------------------------------------------------- the server


def _rss() -> int:
    """Resident bytes of this process (the TestClient runs the server in it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _peak_growth() -> Iterator[list[int]]:
    """Yields a list that holds, on exit, the peak RSS growth seen while the block ran.

    A thread samples /proc/self/statm every 2 ms; reading or zero-filling even 1 GB takes
    far longer than that, so an allocation of a declared size cannot slip between samples.
    Without /proc (not Linux) it falls back to ru_maxrss, which only ever grows.
    """
    out = [0]
    if not os.path.exists("/proc/self/statm"):
        scale = 1 if sys.platform == "darwin" else 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        yield out
        out[0] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * scale
        return
    start, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()
        out[0] = max(peak[0], _rss()) - start


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def client(data_dir: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=data_dir, tokens="alice:secret1", workers=1, max_upload_bytes=8 * MiB
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert _upload(c, model_bytes()).status_code == 201  # imports torch first
        yield c


def _upload(c: TestClient, data: bytes, name: str = "model.pt") -> Any:
    return c.post("/v1/checkpoints", files={"file": (name, data)}, headers=ALICE)


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [pytest.param(make, status, words, id=ident) for ident, make, status, words in HOSTILE],
)
def test_hostile_upload_is_refused(
    client: TestClient,
    data_dir: Path,
    make: Callable[[], bytes],
    status: int,
    words: str,
) -> None:
    data = make()
    assert len(data) < 8 * MiB
    stored = sorted((data_dir / "checkpoints").iterdir())
    start = time.monotonic()
    with _peak_growth() as growth:
        r = _upload(client, data)
    elapsed = time.monotonic() - start
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "hint"} and body["hint"], body
    assert words in body["error"], body
    assert "trusted source" not in r.text and "to `False`" not in r.text  # torch's advice
    assert elapsed < MAX_SECONDS, f"{elapsed:.1f} s"
    assert list((data_dir / "tmp").iterdir()) == []
    assert sorted((data_dir / "checkpoints").iterdir()) == stored
    assert growth[0] < MAX_GROWTH, f"peak RSS grew by {growth[0] / MiB:.0f} MiB"
    assert _upload(client, model_bytes()).status_code == 201  # still serving


def _prefix_bomb() -> bytes:
    """Valid layers whose names repeat the DataParallel prefix 150,000 times (1 MB each)."""
    deep = "module." * 150_000
    buf = io.BytesIO()
    torch.save(
        {f"{deep}conv.weight": torch.randn(8, 3, 3, 3), f"{deep}fc.weight": torch.randn(4, 8)}, buf
    )
    return buf.getvalue()


def _onnx_shared_bn_bomb() -> bytes:
    """2000 BatchNormalization nodes naming the same 4 MiB of parameters: 32 GB if copied."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.ones(MiB // 4, np.float32), f"bn.{k}") for k in "wbmv"]
    inits.append(
        numpy_helper.from_array(rng.standard_normal((8, 3, 1, 1)).astype(np.float32), "c.weight")
    )
    nodes = [helper.make_node("Conv", ["x", "c.weight"], ["y"], name="c")]
    nodes += [
        helper.make_node("BatchNormalization", ["y", "bn.w", "bn.b", "bn.m", "bn.v"], [f"z{i}"])
        for i in range(2000)
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits)).SerializeToString()


def _onnx_identity_chain() -> bytes:
    """30,000 unused constants each renamed by an Identity node (quadratic alias lookups)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.ones((1, 1), np.float32), f"w{i}") for i in range(30_000)]
    inits.append(
        numpy_helper.from_array(rng.standard_normal((8, 3, 1, 1)).astype(np.float32), "c.weight")
    )
    nodes = [helper.make_node("Conv", ["x", "c.weight"], ["y"], name="c")]
    nodes += [helper.make_node("Identity", [f"w{i}"], [f"a{i}"]) for i in range(30_000)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits)).SerializeToString()


@pytest.mark.parametrize(
    ("make", "name"),
    [
        pytest.param(_prefix_bomb, "model.pt", id="pt-1MB-of-module-prefixes"),
        pytest.param(_onnx_shared_bn_bomb, "model.onnx", id="onnx-2000-bn-nodes-sharing-4MiB"),
        pytest.param(_onnx_identity_chain, "model.onnx", id="onnx-30000-identity-aliases"),
    ],
)
def test_pathological_valid_files_are_read_quickly(
    client: TestClient, data_dir: Path, make: Callable[[], bytes], name: str
) -> None:
    data = make()
    start = time.monotonic()
    with _peak_growth() as growth:
        r = _upload(client, data, name)
    elapsed = time.monotonic() - start
    assert r.status_code == 201, r.text
    assert elapsed < MAX_SECONDS, f"{elapsed:.1f} s"
    assert list((data_dir / "tmp").iterdir()) == []
    assert growth[0] < MAX_GROWTH, f"peak RSS grew by {growth[0] / MiB:.0f} MiB"


def _depthwise_safetensors(n: int) -> bytes:
    rng = np.random.default_rng(n)
    weights = {f"l{i}.weight": rng.standard_normal((4, 1, 3, 3), np.float32) for i in range(n)}
    return save_safetensors(weights)


def test_many_depthwise_layers_scale_linearly(client: TestClient) -> None:
    seconds = []
    for n in (800, 3200):
        data = _depthwise_safetensors(n)
        start = time.monotonic()
        r = _upload(client, data, "dw.safetensors")
        seconds.append(time.monotonic() - start)
        assert r.status_code == 201, r.text
    assert seconds[1] < 8 * seconds[0] + 0.5, f"4x the layers took {seconds[1] / seconds[0]:.1f}x"


def test_after_all_that_a_good_job_still_runs(client: TestClient) -> None:
    ckpt = _upload(client, model_bytes(3)).json()["id"]
    r = client.post("/v1/jobs", json={"checkpoint_id": ckpt, "methods": ["l1"]}, headers=ALICE)
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{r.json()['id']}", headers=ALICE).json()
        if job["status"] in ("done", "failed"):
            break
        time.sleep(0.1)
    assert job["status"] == "done", job

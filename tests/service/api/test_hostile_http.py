"""Hostile uploads through the HTTP API: refused with a 4xx JSON body, fast, in bounded memory.

Every file here is crafted in the test (no GBs are ever held: the 2 GiB zip bomb is 2 MB of
repeated deflate blocks). After each upload nothing may be left in ``data_dir/tmp`` or stored,
the server's peak memory may not have grown by anything near a declared size, and the server
keeps serving: a good upload still succeeds, and at the end a job on it runs to done.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import os
import pickle
import resource
import struct
import sys
import threading
import time
import zipfile
import zlib
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
from tests.service.helpers import model_bytes

ALICE = {"Authorization": "Bearer secret1"}
MiB = 1 << 20
MAX_GROWTH = 256 * MiB  # peak RSS growth allowed for one upload (declared sizes: GiB to TiB)
MAX_SECONDS = 10.0  # per upload, on 2 slow cores


# ---------------------------------------------------------------------------- crafted files


def _deflated_zeros(n_mib: int) -> bytes:
    """A raw deflate stream of ``n_mib`` MiB of zeros, about 1 KB per MiB.

    One MiB is deflated and fully flushed (byte aligned, no back-references across the flush),
    so the same bytes can be repeated; ``03 00`` is an empty final block.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * n_mib + b"\x03\x00"


@functools.cache
def _crc_of_zeros(n_mib: int) -> int:
    crc, zeros = 0, bytes(MiB)
    for _ in range(n_mib):
        crc = zlib.crc32(zeros, crc)
    return crc


Member = tuple[str, int, bytes, int, int]  # name, method, stored bytes, crc, declared size


def _zip(members: list[Member]) -> bytes:
    """A zip archive written by hand, so that sizes and methods can be anything."""
    out, central = io.BytesIO(), []
    for name, method, data, crc, size in members:
        offset, raw = out.tell(), name.encode()
        sizes = (crc, len(data), size, len(raw))
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, *sizes, 0))
        out.write(raw + data)
        central.append(
            struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, *sizes,
                        0, 0, 0, 0, 0, offset)
            + raw
        )  # fmt: skip
    directory = b"".join(central)
    start = out.tell()
    out.write(directory)
    n = len(members)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(directory), start, 0))
    return out.getvalue()


def _stored(name: str, data: bytes) -> Member:
    return (name, zipfile.ZIP_STORED, data, zlib.crc32(data), len(data))


def _torch_members(obj: object) -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(buf) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def _zip_bomb(target: str, n_mib: int = 2048, honest: bool = True) -> bytes:
    """A torch zip where ``target`` (``data.pkl`` or a ``data/N`` record) is ``n_mib`` of zeros
    deflated; ``honest`` declares the real size, else the size of the original member."""
    members: list[Member] = []
    for name, data in _torch_members({"fc.weight": torch.randn(4, 4)}):
        if name.endswith(target):
            declared = n_mib * MiB if honest else len(data)
            crc = _crc_of_zeros(n_mib) if honest else zlib.crc32(bytes(len(data)))
            members.append((name, zipfile.ZIP_DEFLATED, _deflated_zeros(n_mib), crc, declared))
        else:
            members.append(_stored(name, data))
    if target == "data/1":  # an extra record that nothing references
        crc = _crc_of_zeros(n_mib)
        members.append(("archive/data/1", zipfile.ZIP_DEFLATED, _deflated_zeros(n_mib), crc,
                        n_mib * MiB))  # fmt: skip
    return _zip(members)


class _Storage:
    pass


class _ViewOf:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, 0, size, stride)``."""

    def __init__(self, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.size, self.stride = size, stride

    def __reduce__(self) -> tuple[Any, ...]:
        hooks: collections.OrderedDict[str, Any] = collections.OrderedDict()
        args = (_Storage(), 0, self.size, self.stride, False, hooks)
        return (torch._utils._rebuild_tensor_v2, args)


def _tensor_pickle(
    numel: int, size: tuple[int, ...], stride: tuple[int, ...], legacy: bool
) -> bytes:
    """A state-dict pickle whose one tensor views a float storage declaring ``numel`` elements."""
    buf = io.BytesIO()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if not isinstance(obj, _Storage):
                return None
            pid = ("storage", torch.FloatStorage, "0", "cpu", numel)
            return (*pid, None) if legacy else pid

    Pickler(buf, protocol=2).dump({"fc.weight": _ViewOf(size, stride)})
    return buf.getvalue()


def _pt_zip_declaring(numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """A torch zip whose pickle declares ``numel`` float elements; the record holds 16."""
    members = []
    for name, data in _torch_members({"fc.weight": torch.randn(4, 4)}):
        if name.endswith("data.pkl"):
            data = _tensor_pickle(numel, size, stride, legacy=False)
        members.append(_stored(name, data))
    return _zip(members)


def _pt_legacy_declaring(numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """A legacy torch.save file whose storage declares ``numel`` floats; 64 bytes follow."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}  # fmt: skip
    parts = [MAGIC_NUMBER, PROTOCOL_VERSION, info]
    head = b"".join(pickle.dumps(p, protocol=2) for p in parts)
    body = _tensor_pickle(numel, size, stride, legacy=True) + pickle.dumps(["0"], protocol=2)
    return head + body + struct.pack("<q", numel) + bytes(64)


def _safetensors(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _huge_safetensors() -> bytes:
    entry = {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 64]}
    return _safetensors({"fc.weight": entry}, bytes(64))


def _overlapping_safetensors() -> bytes:
    """1000 tensors that all name the same 1 MiB: 1 GB if each were read on its own."""
    entry = {"dtype": "F32", "shape": [512, 512], "data_offsets": [0, MiB]}
    return _safetensors({f"l{i}.weight": entry for i in range(1000)}, os.urandom(MiB))


def _sparse_pt() -> bytes:
    idx, val = torch.tensor([[0], [0]]), torch.tensor([1.0])
    buf = io.BytesIO()
    torch.save(
        {"fc.weight": torch.sparse_coo_tensor(idx, val, (2**15, 2**15), check_invariants=True)}, buf
    )
    return buf.getvalue()


def _shared_dict_bomb(n: int = 200) -> bytes:
    """A few KB whose nested dicts all reference one dict: n**4 paths to walk."""
    level: dict[str, Any] = {f"k{i}": torch.ones(2, 2) for i in range(n)}
    for _ in range(3):
        level = {f"k{i}": level for i in range(n)}
    buf = io.BytesIO()
    torch.save(level, buf)
    return buf.getvalue()


def _onnx_model() -> bytes:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "c.weight")
    node = helper.make_node("Conv", ["x", "c.weight"], ["y"], name="c")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph([node], "g", [x], [y], [w])).SerializeToString()


def _legacy_pt() -> bytes:
    buf = io.BytesIO()
    torch.save({"fc.weight": torch.randn(64, 64)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _random_after(prefix: bytes) -> Callable[[], bytes]:
    def make() -> bytes:
        rng = np.random.default_rng(len(prefix))
        return prefix + rng.bytes(64 * 1024)

    return make


def _safetensors_model() -> bytes:
    rng = np.random.default_rng(0)
    return save_safetensors({"fc.weight": rng.standard_normal((64, 64)).astype(np.float32)})


# (id, payload factory, expected status, words the error must contain)
HOSTILE: list[tuple[str, Callable[[], bytes], int, str]] = [
    # (a) compression bombs
    ("zip-bomb-record", lambda: _zip_bomb("data/1"), 422, "compression bomb"),
    ("zip-bomb-data-pkl", lambda: _zip_bomb("data.pkl"), 422, "compression bomb"),
    ("zip-bomb-forged-size", lambda: _zip_bomb("data/0", honest=False), 422, "declares 64 bytes"),
    # (b) huge declared tensors
    ("safetensors-2**40-elements", _huge_safetensors, 422, "has 64 bytes for shape"),
    ("safetensors-overlapping", _overlapping_safetensors, 422, "share bytes"),
    (
        "pt-storage-2**38",
        lambda: _pt_zip_declaring(2**38, (2**19, 2**19), (2**19, 1)),
        422,
        "record size",
    ),
    (
        "pt-stride-0-view-2**40",
        lambda: _pt_zip_declaring(16, (2**20, 2**20), (0, 0)),
        422,
        "once dense",
    ),
    (
        "pt-legacy-storage-2**38",
        lambda: _pt_legacy_declaring(2**38, (2**19, 2**19), (2**19, 1)),
        422,
        "truncated or corrupt",
    ),
    (
        "pt-legacy-storage-8GiB",
        lambda: _pt_legacy_declaring(2**31, (2**16, 2**15), (2**15, 1)),
        422,
        "truncated or corrupt",
    ),
    ("pt-sparse-4GiB-dense", _sparse_pt, 422, "once dense"),
    ("pt-shared-dict-bomb", _shared_dict_bomb, 422, "no conv or linear layer"),
    # (c) random and truncated bytes
    ("random", _random_after(b""), 415, "not a PyTorch"),
    ("random-after-zip-magic", _random_after(b"PK\x03\x04"), 422, "corrupt"),
    ("random-after-pickle-magic", _random_after(b"\x80\x02"), 422, "corrupt"),
    ("random-after-onnx-magic", _random_after(b"\x08\x07"), 422, "corrupt"),
    ("truncated-pt", lambda: _half(model_bytes()), 422, "corrupt"),
    ("truncated-legacy-pt", lambda: _half(_legacy_pt()), 422, "corrupt"),
    ("truncated-safetensors", lambda: _half(_safetensors_model()), 422, "corrupt"),
    ("truncated-onnx", lambda: _half(_onnx_model()), 422, "corrupt"),
]


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

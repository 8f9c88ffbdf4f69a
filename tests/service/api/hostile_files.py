"""Hostile files for the upload tests, crafted in memory (no GBs are ever held: the 2 GiB zip
bomb is 2 MB of repeated deflate blocks): compression bombs, huge declared tensors, random and
truncated bytes, and pathological but valid files."""

from __future__ import annotations

import collections
import functools
import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save as save_safetensors

from tests.service.helpers import model_bytes

MiB = 1 << 20


# ---------------------------------------------------------------------------- crafted files


def deflated_zeros(n_mib: int) -> bytes:
    """A raw deflate stream of ``n_mib`` MiB of zeros, about 1 KB per MiB.

    One MiB is deflated and fully flushed (byte aligned, no back-references across the flush),
    so the same bytes can be repeated; ``03 00`` is an empty final block.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * n_mib + b"\x03\x00"


@functools.cache
def crc_of_zeros(n_mib: int) -> int:
    crc, zeros = 0, bytes(MiB)
    for _ in range(n_mib):
        crc = zlib.crc32(zeros, crc)
    return crc


Member = tuple[str, int, bytes, int, int]  # name, method, stored bytes, crc, declared size


def zip(members: list[Member]) -> bytes:
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


def stored(name: str, data: bytes) -> Member:
    return (name, zipfile.ZIP_STORED, data, zlib.crc32(data), len(data))


def torch_members(obj: object) -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(buf) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def zip_bomb(target: str, n_mib: int = 2048, honest: bool = True) -> bytes:
    """A torch zip where ``target`` (``data.pkl`` or a ``data/N`` record) is ``n_mib`` of zeros
    deflated; ``honest`` declares the real size, else the size of the original member."""
    members: list[Member] = []
    for name, data in torch_members({"fc.weight": torch.randn(4, 4)}):
        if name.endswith(target):
            declared = n_mib * MiB if honest else len(data)
            crc = crc_of_zeros(n_mib) if honest else zlib.crc32(bytes(len(data)))
            members.append((name, zipfile.ZIP_DEFLATED, deflated_zeros(n_mib), crc, declared))
        else:
            members.append(stored(name, data))
    if target == "data/1":  # an extra record that nothing references
        crc = crc_of_zeros(n_mib)
        members.append(("archive/data/1", zipfile.ZIP_DEFLATED, deflated_zeros(n_mib), crc,
                        n_mib * MiB))  # fmt: skip
    return zip(members)


class FakeStorage:
    pass


class ViewOf:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, 0, size, stride)``."""

    def __init__(self, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.size, self.stride = size, stride

    def __reduce__(self) -> tuple[Any, ...]:
        hooks: collections.OrderedDict[str, Any] = collections.OrderedDict()
        args = (FakeStorage(), 0, self.size, self.stride, False, hooks)
        return (torch._utils._rebuild_tensor_v2, args)


def tensor_pickle(
    numel: int, size: tuple[int, ...], stride: tuple[int, ...], legacy: bool
) -> bytes:
    """A state-dict pickle whose one tensor views a float storage declaring ``numel`` elements."""
    buf = io.BytesIO()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if not isinstance(obj, FakeStorage):
                return None
            pid = ("storage", torch.FloatStorage, "0", "cpu", numel)
            return (*pid, None) if legacy else pid

    Pickler(buf, protocol=2).dump({"fc.weight": ViewOf(size, stride)})
    return buf.getvalue()


def pt_zip_declaring(numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """A torch zip whose pickle declares ``numel`` float elements; the record holds 16."""
    members = []
    for name, data in torch_members({"fc.weight": torch.randn(4, 4)}):
        if name.endswith("data.pkl"):
            data = tensor_pickle(numel, size, stride, legacy=False)
        members.append(stored(name, data))
    return zip(members)


def pt_legacy_declaring(numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """A legacy torch.save file whose storage declares ``numel`` floats; 64 bytes follow."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}  # fmt: skip
    parts = [MAGIC_NUMBER, PROTOCOL_VERSION, info]
    head = b"".join(pickle.dumps(p, protocol=2) for p in parts)
    body = tensor_pickle(numel, size, stride, legacy=True) + pickle.dumps(["0"], protocol=2)
    return head + body + struct.pack("<q", numel) + bytes(64)


def safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def huge_safetensors() -> bytes:
    entry = {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 64]}
    return safetensors_bytes({"fc.weight": entry}, bytes(64))


def overlapping_safetensors() -> bytes:
    """1000 tensors that all name the same 1 MiB: 1 GB if each were read on its own."""
    entry = {"dtype": "F32", "shape": [512, 512], "data_offsets": [0, MiB]}
    return safetensors_bytes({f"l{i}.weight": entry for i in range(1000)}, os.urandom(MiB))


def sparse_pt() -> bytes:
    idx, val = torch.tensor([[0], [0]]), torch.tensor([1.0])
    buf = io.BytesIO()
    torch.save(
        {"fc.weight": torch.sparse_coo_tensor(idx, val, (2**15, 2**15), check_invariants=True)}, buf
    )
    return buf.getvalue()


def shared_dict_bomb(n: int = 200) -> bytes:
    """A few KB whose nested dicts all reference one dict: n**4 paths to walk."""
    level: dict[str, Any] = {f"k{i}": torch.ones(2, 2) for i in range(n)}
    for _ in range(3):
        level = {f"k{i}": level for i in range(n)}
    buf = io.BytesIO()
    torch.save(level, buf)
    return buf.getvalue()


def onnx_model() -> bytes:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "c.weight")
    node = helper.make_node("Conv", ["x", "c.weight"], ["y"], name="c")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph([node], "g", [x], [y], [w])).SerializeToString()


def legacy_pt() -> bytes:
    buf = io.BytesIO()
    torch.save({"fc.weight": torch.randn(64, 64)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def random_after(prefix: bytes) -> Callable[[], bytes]:
    def make() -> bytes:
        rng = np.random.default_rng(len(prefix))
        return prefix + rng.bytes(64 * 1024)

    return make


def safetensors_model() -> bytes:
    rng = np.random.default_rng(0)
    return save_safetensors({"fc.weight": rng.standard_normal((64, 64)).astype(np.float32)})


# (id, payload factory, expected status, words the error must contain)
HOSTILE: list[tuple[str, Callable[[], bytes], int, str]] = [
    # (a) compression bombs
    ("zip-bomb-record", lambda: zip_bomb("data/1"), 422, "compression bomb"),
    ("zip-bomb-data-pkl", lambda: zip_bomb("data.pkl"), 422, "compression bomb"),
    ("zip-bomb-forged-size", lambda: zip_bomb("data/0", honest=False), 422, "declares 64 bytes"),
    # (b) huge declared tensors
    ("safetensors-2**40-elements", huge_safetensors, 422, "has 64 bytes for shape"),
    ("safetensors-overlapping", overlapping_safetensors, 422, "share bytes"),
    (
        "pt-storage-2**38",
        lambda: pt_zip_declaring(2**38, (2**19, 2**19), (2**19, 1)),
        422,
        "record size",
    ),
    (
        "pt-stride-0-view-2**40",
        lambda: pt_zip_declaring(16, (2**20, 2**20), (0, 0)),
        422,
        "once dense",
    ),
    (
        "pt-legacy-storage-2**38",
        lambda: pt_legacy_declaring(2**38, (2**19, 2**19), (2**19, 1)),
        422,
        "truncated or corrupt",
    ),
    (
        "pt-legacy-storage-8GiB",
        lambda: pt_legacy_declaring(2**31, (2**16, 2**15), (2**15, 1)),
        422,
        "truncated or corrupt",
    ),
    ("pt-sparse-4GiB-dense", sparse_pt, 422, "once dense"),
    ("pt-shared-dict-bomb", shared_dict_bomb, 422, "no conv or linear layer"),
    # (c) random and truncated bytes
    ("random", random_after(b""), 415, "not a PyTorch"),
    ("random-after-zip-magic", random_after(b"PK\x03\x04"), 422, "corrupt"),
    ("random-after-pickle-magic", random_after(b"\x80\x02"), 422, "corrupt"),
    ("random-after-onnx-magic", random_after(b"\x08\x07"), 422, "corrupt"),
    ("truncated-pt", lambda: half(model_bytes()), 422, "corrupt"),
    ("truncated-legacy-pt", lambda: half(legacy_pt()), 422, "corrupt"),
    ("truncated-safetensors", lambda: half(safetensors_model()), 422, "corrupt"),
    ("truncated-onnx", lambda: half(onnx_model()), 422, "corrupt"),
]

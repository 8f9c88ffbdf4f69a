"""safetensors checkpoints, single files and sharded folders, read lazily through ``mmap``.

Every file's header is parsed and validated before any tensor is touched: JSON object, entries
with a known layout, dimensions in [0, 2**40] and at most 2**40 elements (zero dimensions left
out, even for an empty tensor), ``data_offsets`` inside the data section and exactly as long as
the shape needs (all sizes in exact integer arithmetic, before any allocation), no two tensors
sharing bytes. Then each file's data section is memory-mapped read-only and every tensor becomes
a read-only numpy view of it (bf16 as an ``ml_dtypes.bfloat16`` view): nothing is read until a
layer is analysed, and :func:`graphs.layers.release` drops a layer's pages from the process's
resident memory once its float64 vectors exist. Peak memory is therefore about the largest
group's vectors in float64 (plus its similarity graph), whatever the size of the checkpoint.

A sharded checkpoint is a folder with ``model.safetensors.index.json`` (``{"weight_map":
{tensor: shard file}}``, as written by ``transformers``' ``save_pretrained``). Each shard is
validated like a single file; shard names must be plain names inside the folder (no absolute
paths, no ``..``), every shard must exist, every tensor of the weight map must be in its shard,
and no tensor may appear in two shards.

A tensor read here can be sent elsewhere by reference instead of by value (a Dask task, see
:mod:`service.jobs.executors.local`): :func:`tensor_ref` gives the file, offset, dtype and shape of
a mapped tensor (a few hundred bytes, whatever its size), and :func:`open_tensor` maps it again,
lazily, in another process that sees the file at the same path.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from graphs.contracts.safetensors import decode_header
from graphs.errors import CheckpointError, UnsupportedFormatError, corrupt
from graphs.report import SkippedLayer
from service.ingest.detect import (
    RawCheckpoint,
    count_params,
    layer_name,
    natural_key,
    strip_wrapper_prefixes,
)

try:  # a dependency of onnx; without it bf16 tensors are converted to float32 when read
    import ml_dtypes

    _BF16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None

INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 * 1024 * 1024
MAX_HEADER = 100 * 1024 * 1024
MAX_SHARDS = 512  # each mapped shard keeps a file descriptor while its tensors are alive
_ST_MAX_DIM = 2**40
_ST_MAX_ELEMENTS = 2**40  # of a tensor, its zero dimensions left out
_ST_MAX_NDIM = 32
_ST_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}
Entry = tuple[str, list[int], int, int]  # dtype, shape, begin, end (within the data section)
_MAPPED: weakref.WeakKeyDictionary[mmap.mmap, tuple[str, int]] = weakref.WeakKeyDictionary()
"""Every mapping made here -> (the file's absolute path, its size), for :func:`tensor_ref`."""


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor of a safetensors file lies, to map it again in another process.

    Attributes:
        path: the file's absolute path (a shard of a sharded checkpoint).
        size: the file's size when it was read (a file of another size is refused).
        offset: the tensor's first byte in the file.
        dtype: ``BF16`` or a numpy dtype string (``<f4``, ...).
        shape: the tensor's shape.
    """

    path: str
    size: int
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _dtype(self.dtype).itemsize


def _dtype(code: str) -> np.dtype:
    if code == "BF16":
        if _BF16 is None:  # pragma: no cover
            raise CheckpointError("bf16 tensors need ml_dtypes, which is not installed")
        return _BF16
    return np.dtype(code)


def tensor_ref(arr: np.ndarray) -> TensorRef | None:
    """The reference of ``arr`` when it is a whole contiguous view of a file mapped here (every
    tensor this module read, or a reshape of one); None for any other array."""
    base: object = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if not isinstance(base, memoryview) or not isinstance(base.obj, mmap.mmap):
        return None
    where = _MAPPED.get(base.obj)
    if where is None or not arr.flags.c_contiguous or arr.size == 0:
        return None
    start = arr.__array_interface__["data"][0] - np.frombuffer(base, np.uint8).ctypes.data
    code = "BF16" if _BF16 is not None and arr.dtype == _BF16 else arr.dtype.str
    path, size = where
    return TensorRef(path, size, start, code, tuple(int(d) for d in arr.shape))


def open_tensor(ref: TensorRef, maps: dict[str, mmap.mmap] | None = None) -> np.ndarray:
    """``ref``'s tensor, a read-only view of its file mapped again (nothing is read yet).

    ``maps`` (path -> mapping) lets several tensors of one file share one mapping.

    Raises:
        OSError: the file cannot be opened (missing, not readable), or it is not the file
            that was read (another size).
    """
    mm = maps.get(ref.path) if maps is not None else None
    if mm is None:
        with open(ref.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != ref.size or ref.offset + ref.nbytes > size:
                raise OSError(f"{ref.path} has {size} bytes, not the {ref.size} that were read")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        _MAPPED[mm] = (ref.path, size)
        if maps is not None:
            maps[ref.path] = mm
    dtype = _dtype(ref.dtype)
    return np.frombuffer(mm, dtype, math.prod(ref.shape), ref.offset).reshape(ref.shape)


def read_safetensors(path: Path, display: str) -> RawCheckpoint:
    """One safetensors file: tensors in natural name order (writers sort them by name, so the
    state-dict order is lost: ``ordered=False``), as lazy read-only views of the mapped file."""
    tensors, skipped, keys = _read_file(path, display)
    return _raw(
        dict(sorted(tensors.items(), key=lambda kv: natural_key(kv[0]))), skipped, len(keys)
    )


def find_index(path: Path) -> Path | None:
    """The index of a sharded checkpoint: ``path`` itself when it is a JSON object with a
    ``weight_map`` (by content), or for a folder its ``model.safetensors.index.json`` (else its
    only ``*.safetensors.index.json``); None otherwise."""
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return path / INDEX_NAME
        found = sorted(path.glob("*.safetensors.index.json"))
        return found[0] if len(found) == 1 else None
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if not head.startswith(b"{") or path.stat().st_size > MAX_INDEX_BYTES:
        return None  # a safetensors file starts with its 8-byte header length
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        return None
    return path if isinstance(data, dict) and "weight_map" in data else None


def read_sharded(index: Path, display: str) -> tuple[RawCheckpoint, list[Path]]:
    """A sharded checkpoint from its index file; returns the tensors and the shard files in
    name order (what the checkpoint's digest covers)."""
    folder = index.parent
    weight_map = _weight_map(index, display)
    shards = sorted(set(weight_map.values()), key=natural_key)
    if len(shards) > MAX_SHARDS:
        raise CheckpointError(
            f"{display} names {len(shards)} shards; prunegraph reads at most {MAX_SHARDS}."
        )
    files = [_shard_path(folder, name, display) for name in shards]
    tensors: dict[str, np.ndarray] = {}
    skipped: list[SkippedLayer] = []
    owner: dict[str, str] = {}
    for name, file in zip(shards, files, strict=True):
        part, part_skipped, keys = _read_file(file, f"{display}: shard {name}")
        skipped += part_skipped
        for key in keys:
            if key in owner:
                raise corrupt(display, f"tensor {key!r} is in both {owner[key]} and {name}")
            owner[key] = name
        tensors.update(part)
    absent = sorted(k for k, shard in weight_map.items() if owner.get(k) != shard)
    if absent:
        k = absent[0]
        raise corrupt(display, f"its weight_map puts {k!r} in {weight_map[k]}, which lacks it")
    ordered = dict(sorted(tensors.items(), key=lambda kv: natural_key(kv[0])))
    return _raw(ordered, skipped, len(owner)), files


def _raw(tensors: dict[str, np.ndarray], skipped: list[SkippedLayer], n: int) -> RawCheckpoint:
    tensors = strip_wrapper_prefixes(tensors)
    return RawCheckpoint(
        "safetensors", tensors, n, count_params(tensors), skipped=skipped, ordered=False
    )


def _weight_map(index: Path, display: str) -> dict[str, str]:
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise corrupt(display, f"its index is larger than {MAX_INDEX_BYTES} bytes")
    try:
        data = json.loads(index.read_bytes())
    except (ValueError, RecursionError):
        raise corrupt(display, f"{index.name} is not valid JSON") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise corrupt(display, f"{index.name} has no weight_map object of tensor -> shard file")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise corrupt(display, f"{index.name}: weight_map entries must be strings")
    return dict(wm)


def _shard_path(folder: Path, name: str, display: str) -> Path:
    """``folder / name`` for a plain relative name inside the folder; refuses anything else."""
    parts = PurePosixPath(name).parts
    if (
        not name
        or "\x00" in name
        or PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
        or "\\" in name
        or ".." in parts
        or re.match(r"^[A-Za-z]:", name)
    ):
        raise CheckpointError(
            f"{display} names the shard {name!r}, which is not a file inside its folder; shard "
            "names must be relative paths without '..'.",
            hint="Fix the index's weight_map (transformers writes plain file names).",
        )
    path = folder.joinpath(*parts)
    if not path.is_file():  # the folder is not named: on a server it is the server's own path
        raise CheckpointError(
            f"{display} names the shard {name!r}, which is missing from the index's folder.",
            hint="Download every shard the index lists into the same folder.",
        )
    return path


def refuse_index(path: Path, display: str) -> None:
    """Refuse a sharded checkpoint's index given as a single file (an upload to the service).

    Its shards would be looked up next to it, in a folder the uploader does not own (the
    server's temp or storage folder, holding other users' files).

    Raises:
        UnsupportedFormatError: ``path`` is an index (a JSON object with a ``weight_map``).
    """
    if not path.is_dir() and find_index(path) is not None:
        raise UnsupportedFormatError(
            f"{display} is the index of a sharded safetensors checkpoint; the service reads "
            "single files only.",
            hint="Upload one file: save the model with save_pretrained(..., "
            "max_shard_size='1000GB') or safetensors.torch.save_file, or analyse the folder "
            "locally with `prunegraph analyze FOLDER`.",
        )


def _read_file(
    path: Path, display: str
) -> tuple[dict[str, np.ndarray], list[SkippedLayer], list[str]]:
    """A file's tensors as views of its mapping, unreadable dtypes' layers, all tensor names."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 2 <= n <= min(size - 8, MAX_HEADER):
            raise corrupt(display, f"its safetensors header length {n} does not fit {size} bytes")
        header = decode_header(f.read(n), display=display)
        start, data_len = 8 + n, size - 8 - n
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        checked = {k: _st_entry(display, k, v, data_len) for k, v in entries.items()}
        _st_no_overlap(display, checked)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if data_len else None
    if mm is not None:
        _MAPPED[mm] = (os.path.abspath(path), size)
    tensors: dict[str, np.ndarray] = {}
    skipped: list[SkippedLayer] = []
    for key, (dtype, shape, begin, end) in checked.items():
        if dtype not in _ST_DTYPES:
            if len(shape) >= 2:
                reason = f"has dtype {dtype}, which prunegraph cannot read"
                skipped.append(SkippedLayer(name=layer_name(key), reason=reason))
            continue
        np_dtype = np.dtype(_ST_DTYPES[dtype])
        if dtype == "BF16" and _BF16 is not None:
            np_dtype = _BF16
        if end == begin or mm is None:
            arr = np.zeros(shape, dtype=np_dtype)
        else:
            arr = np.frombuffer(mm, np_dtype, math.prod(shape), start + begin).reshape(shape)
        if dtype == "BF16" and _BF16 is None:  # pragma: no cover
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = arr
    return tensors, skipped, list(entries)


def _st_no_overlap(display: str, entries: Mapping[str, Entry]) -> None:
    """Refuse tensors that share bytes of the data section.

    Writers lay tensors end to end; overlapping ranges would let a small file name its data
    thousands of times, each read (and allocated) on its own.
    """
    spans = sorted((begin, end, key) for key, (_, _, begin, end) in entries.items() if end > begin)
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise corrupt(
                display, f"tensors {a!r} and {b!r} share bytes of the safetensors data section"
            )


def _st_entry(display: str, key: str, entry: object, data_len: int) -> Entry:
    """Validated (dtype, shape, begin, end) of one header entry; offsets within the data.

    Every dimension lies in [0, 2**40], so does the product of the non-zero ones (an empty
    tensor of shape ``[2**40, 2**40, 2**40, 0]`` would make numpy refuse even to create it), and,
    for a dtype prunegraph reads, the entry's byte range holds exactly ``prod(shape) * itemsize``
    bytes. Sizes are computed with Python integers, before anything is allocated.
    """
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        not isinstance(dtype, str)
        or not isinstance(shape, list)
        or len(shape) > _ST_MAX_NDIM
        or not all(type(d) is int and 0 <= d <= _ST_MAX_DIM for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise corrupt(display, f"the safetensors header entry for {key!r} is malformed")
    begin, end = offsets
    extent = math.prod(d for d in shape if d)  # exact (Python ints): no overflow, no allocation
    if extent > _ST_MAX_ELEMENTS:
        raise corrupt(
            display,
            f"tensor {key!r} declares shape {shape}, more than 2**40 elements even leaving "
            "out its zero dimensions",
        )
    if end > data_len:
        raise corrupt(
            display, f"tensor {key!r} ends at byte {end} of a {data_len}-byte data section"
        )
    if dtype in _ST_DTYPES:
        expected = math.prod(shape) * np.dtype(_ST_DTYPES[dtype]).itemsize
        if end - begin != expected:
            raise corrupt(display, f"tensor {key!r} has {end - begin} bytes for shape {shape}")
    return dtype, shape, begin, end

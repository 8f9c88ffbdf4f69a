"""Raw checkpoint formats: detection from content, shared helpers and the safetensors reader.

Every reader turns a file into a :class:`RawCheckpoint`: an ordered mapping ``name -> numpy array``
that :func:`service.layers_from_tensors.extract_layers` understands, plus counts and the tensors
that the reader itself already knows cannot be analysed. Formats are recognised from the file's
bytes, never its name:

- PyTorch zip (``PK`` magic with a ``*/data.pkl`` member) or legacy PyTorch pickle (``0x80``
  protocol 2-5): read by :mod:`service.torch_reader` with ``torch.load(weights_only=True)`` only.
  The zip directory is checked here first: TorchScript archives are refused with advice, and so is
  any member whose declared size could not fit in the archive as written by ``torch.save``
  (which stores members uncompressed), so a compression bomb is never inflated, and any member
  that stores more bytes than it declares (a forged directory).
- safetensors (8-byte little-endian header length, then a JSON header starting with ``{``): the
  header is parsed and validated here (shapes, dtypes, offsets within the file) and tensors are
  read with numpy.
- ONNX (protobuf ``ModelProto`` starting with its ``ir_version`` field): :mod:`service.onnx_reader`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import numpy as np

from graphs.errors import CheckpointError, UnsafeCheckpointError, UnsupportedFormatError
from graphs.report import SkippedLayer

Format = Literal["pytorch", "safetensors", "onnx"]

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
RECURRENT_REASON = "recurrent/attention weights are not analysed yet"
EMBEDDING_REASON = "embedding table: its rows are token vectors, not filters; not analysed"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_WRAPPERS = 16  # passes of prefix stripping; real wrappers nest 3 deep at most
CHUNK = 1 << 20

_ST_MAX_HEADER = 100 * 1024 * 1024
_ST_MAX_DIM = 2**40
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
_TORCHSCRIPT = (
    "is a TorchScript archive (torch.jit.save), which prunegraph does not read; save "
    "model.state_dict() with torch.save, or export to ONNX/safetensors."
)


@dataclass
class RawCheckpoint:
    """What a reader found: tensors in checkpoint order and what it already knows about them.

    Attributes:
        format: the detected format.
        tensors: ``name -> array``; floating arrays are float32 or float64.
        n_tensors: number of tensors read from the file.
        n_params: elements of floating tensors that are not BatchNorm buffers.
        groups: conv ``groups`` known from the file itself (ONNX ``group`` attributes).
        skipped: layer-like tensors the reader could not turn into a usable weight.
        producers: depthwise conv -> the layer whose outputs it filters, known from the file
            itself (the ONNX graph); None where the graph shows no single such layer.
        ordered: whether ``tensors`` is in the model's data-flow order (state-dict or graph
            order). safetensors writers sort tensors by name, so their order is not known.
    """

    format: Format
    tensors: dict[str, np.ndarray]
    n_tensors: int
    n_params: int
    groups: dict[str, int] = field(default_factory=dict)
    skipped: list[SkippedLayer] = field(default_factory=list)
    producers: dict[str, str | None] = field(default_factory=dict)
    ordered: bool = True


def layer_name(key: str) -> str:
    """The layer (module) name of a weight key: ``a.b.weight -> a.b``, bare ``weight -> ""``."""
    if key == "weight":
        return ""
    return key[: -len(".weight")] if key.endswith(".weight") else key


def count_params(tensors: Mapping[str, np.ndarray]) -> int:
    """Elements of floating tensors, BatchNorm buffers excluded."""
    return sum(
        int(a.size)
        for k, a in tensors.items()
        if a.dtype.kind == "f" and not k.endswith(BUFFER_SUFFIXES)
    )


def strip_wrapper_prefixes(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Remove ``module.`` (DataParallel, AveragedModel) and ``_orig_mod.`` (torch.compile).

    A prefix is removed, repeatedly, when every key that holds a weight (an array of 2 or more
    dimensions; every key when there is none) carries it. Keys without it, such as
    AveragedModel's scalar ``n_averaged``, keep their names. A real submodule called ``module``
    next to other top-level layers keeps its name, and nothing is renamed onto an existing key.
    At most :data:`MAX_WRAPPERS` levels are removed (each pass copies every key, and a hostile
    file can repeat ``module.`` a million times in a few MB).
    """
    changed = True
    rounds = 0
    while changed and tensors and rounds < MAX_WRAPPERS:
        changed = False
        rounds += 1
        for prefix in WRAPPER_PREFIXES:
            weights = [k for k, a in tensors.items() if a.ndim >= 2] or list(tensors)
            if not all(k.startswith(prefix) for k in weights):
                continue
            renamed = {
                (k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in tensors.items()
            }
            if len(renamed) == len(tensors):
                tensors, changed = renamed, True
    return tensors


def natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that orders ``features.2`` before ``features.10``."""
    return tuple(
        (0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p
    )


def as_float(arr: np.ndarray) -> np.ndarray:
    """Float16/bfloat16/float8 to float32; float32, float64 and non-float arrays unchanged."""
    if arr.dtype.kind == "f" and arr.dtype.itemsize >= 4:
        return arr
    if arr.dtype.kind == "f" or "float" in str(arr.dtype):  # ml_dtypes bfloat16/float8 are kind V
        return np.asarray(arr, dtype=np.float32)
    return arr


def corrupt(display: str, what: str) -> CheckpointError:
    """The error for a file of a known format whose content is damaged."""
    return CheckpointError(f"{display} is truncated or corrupt: {what}.")


def not_supported(display: str, head: bytes) -> UnsupportedFormatError:
    """The error for a file that is none of the three formats, describing what it looks like."""
    text = head.decode("utf-8", errors="replace")
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        looks = f"it looks like a text file starting with {text[:24]!r}"
    else:
        looks = f"it starts with the bytes {head[:8].hex(' ')}"
    return UnsupportedFormatError(
        f"{display} is not a PyTorch, safetensors or ONNX file ({looks})."
    )


# --------------------------------------------------------------------------------------------
# detection


def detect_format(path: Path, display: str, size: int) -> Format:
    """The format of ``path`` from its first bytes; raises for anything unreadable."""
    if size == 0:
        raise UnsupportedFormatError(f"{display} is empty (0 bytes).")
    with open(path, "rb") as f:
        head = f.read(32)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        check_torch_zip(path, display, size)
        return "pytorch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pytorch"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= _ST_MAX_HEADER:
            if 8 + n > size:
                raise corrupt(
                    display, f"its safetensors header needs {8 + n} bytes, file has {size}"
                )
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] <= 15:
        return "onnx"
    raise not_supported(display, head)


def check_torch_zip(path: Path, display: str, size: int) -> None:
    """Refuse TorchScript archives and compression bombs; stream data.pkl to check its CRC.

    ``torch.save`` stores members uncompressed, so no member can be larger than the archive and
    all of them together cannot be either; a little slack (2x) is left for archives re-zipped with
    deflate. Nothing larger than one chunk is ever held in memory here.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if any(_is_torchscript_member(i.filename) for i in infos):
                raise UnsupportedFormatError(f"{display} {_TORCHSCRIPT}")
            pkl = [i for i in infos if i.filename.endswith("/data.pkl")]
            if not pkl:
                raise UnsupportedFormatError(
                    f"{display} is not a PyTorch, safetensors or ONNX file (it is a zip archive "
                    "without the data.pkl member of a torch.save file)."
                )
            big = max(infos, key=lambda i: i.file_size)
            if big.file_size > size or sum(i.file_size for i in infos) > 2 * size:
                raise UnsafeCheckpointError(
                    f"{display} looks like a compression bomb: its member {big.filename!r} "
                    f"declares {big.file_size} bytes inside a {size}-byte archive; it was refused "
                    "without being unpacked.",
                    hint="torch.save writes members uncompressed; upload the file torch.save "
                    "wrote, not a recompressed archive.",
                )
            forged = next(
                (i for i in infos if i.compress_size > _deflated_bound(i.file_size)), None
            )
            if forged is not None:
                raise corrupt(
                    display,
                    f"its zip member {forged.filename!r} declares {forged.file_size} bytes but "
                    f"stores {forged.compress_size}, more than any compression of them needs",
                )
            with zf.open(pkl[0]) as member:
                _drain(member)  # zipfile checks the CRC at the end of the stream
    except (
        zipfile.BadZipFile,
        EOFError,
        ValueError,
        OSError,
        NotImplementedError,
        RuntimeError,
    ) as e:
        raise corrupt(display, f"the zip archive cannot be read ({e})") from e


def _deflated_bound(n: int) -> int:
    """Most bytes that ``n`` bytes take once stored or deflated (deflate's worst case, slack)."""
    return n + n // 100 + 1024


def _is_torchscript_member(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 2 and (parts[1] == "constants.pkl" or parts[1] == "code")


def _drain(stream: IO[bytes]) -> None:
    while stream.read(CHUNK):
        pass


# --------------------------------------------------------------------------------------------
# safetensors


def read_safetensors(path: Path, display: str) -> RawCheckpoint:
    """Parse and validate the JSON header, then read each tensor with numpy (bf16 -> float32).

    safetensors writers sort tensors by name, so the state-dict order is lost: tensors are
    returned in natural name order (``features.2`` before ``features.10``) with ``ordered=False``.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = _st_header(display, f.read(n))
        start, data_len = 8 + n, size - 8 - n
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        checked = {k: _st_entry(display, k, v, data_len) for k, v in entries.items()}
        _st_no_overlap(display, checked)
        tensors: dict[str, np.ndarray] = {}
        skipped: list[SkippedLayer] = []
        for key in sorted(entries, key=natural_key):
            dtype, shape, begin, end = checked[key]
            if dtype not in _ST_DTYPES:
                if len(shape) >= 2:
                    reason = f"has dtype {dtype}, which prunegraph cannot read"
                    skipped.append(SkippedLayer(name=layer_name(key), reason=reason))
                continue
            np_dtype = np.dtype(_ST_DTYPES[dtype])
            f.seek(start + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != len(buf):
                raise corrupt(display, f"tensor {key!r} runs past the end of the file")
            try:
                arr = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
            except ValueError as e:
                raise corrupt(display, f"tensor {key!r} cannot have shape {shape} ({e})") from e
            arr = arr.astype(np_dtype.newbyteorder("="), copy=False)
            if dtype == "BF16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            tensors[key] = as_float(arr)
    tensors = strip_wrapper_prefixes(tensors)
    return RawCheckpoint(
        "safetensors",
        tensors,
        len(entries),
        count_params(tensors),
        skipped=skipped,
        ordered=False,
    )


def _st_header(display: str, raw: bytes) -> dict[str, object]:
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError, MemoryError) as e:  # JSONDecodeError, UnicodeDecodeError
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise corrupt(display, f"its safetensors header is not valid JSON ({what})") from None
    if not isinstance(header, dict):
        raise corrupt(display, "its safetensors header is not a JSON object")
    return header


def _st_no_overlap(display: str, entries: Mapping[str, tuple[str, list[int], int, int]]) -> None:
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


def _st_entry(
    display: str, key: str, entry: object, data_len: int
) -> tuple[str, list[int], int, int]:
    """Validated (dtype, shape, begin, end) of one header entry; offsets within the data.

    Every dimension lies in [0, 2**40] and, for a dtype prunegraph reads, the entry's byte range
    holds exactly ``prod(shape) * itemsize`` bytes.
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
    if end > data_len:
        raise corrupt(
            display, f"tensor {key!r} ends at byte {end} of a {data_len}-byte data section"
        )
    if dtype in _ST_DTYPES:
        expected = math.prod(shape) * np.dtype(_ST_DTYPES[dtype]).itemsize
        if end - begin != expected:
            raise corrupt(display, f"tensor {key!r} has {end - begin} bytes for shape {shape}")
    return dtype, shape, begin, end

"""Raw checkpoint formats: detection from content, shared helpers and the safetensors reader.

Every reader turns a file into a :class:`RawCheckpoint`: an ordered mapping ``name -> numpy array``
that :func:`service.ingest.layers.extract_layers` understands, plus counts and the tensors
that the reader itself already knows cannot be analysed. Formats are recognised from the file's
bytes, never its name:

- PyTorch zip (``PK`` magic with a ``*/data.pkl`` member) or legacy PyTorch pickle (``0x80``
  protocol 2-5): read by :mod:`service.ingest.torch_file` with ``torch.load(weights_only=True)``
  only. The zip directory is checked here first: TorchScript archives are refused with advice, and
  so is any member whose declared size could not fit in the archive as written by ``torch.save``
  (which stores members uncompressed), so a compression bomb is never inflated, and any member
  that stores more bytes than it declares (a forged directory).
- safetensors (8-byte little-endian header length, then a JSON header starting with ``{``): the
  header is parsed and validated (shapes, dtypes, offsets within the file) and tensors are
  memory-mapped, read lazily (:mod:`service.ingest.safetensors_file`, also for sharded folders).
- ONNX (protobuf ``ModelProto`` starting with its ``ir_version`` field):
:mod:`service.ingest.onnx_file`.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import numpy as np

from graphs.errors import UnsafeCheckpointError, UnsupportedFormatError, corrupt
from graphs.report import SkippedLayer

Format = Literal["pytorch", "safetensors", "onnx"]

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
RECURRENT_REASON = "recurrent/attention weights are not analysed yet"
EMBEDDING_REASON = "embedding table: its rows are token vectors, not filters; not analysed"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_WRAPPERS = 16  # passes of prefix stripping; real wrappers nest 3 deep at most
CHUNK = 1 << 20

_ST_MAX_HEADER = 100 * 1024 * 1024
_TORCHSCRIPT = (
    "is a TorchScript archive (torch.jit.save), which prunegraph does not read; save "
    "model.state_dict() with torch.save, or export to ONNX/safetensors."
)


@dataclass
class RawCheckpoint:
    """What a reader found: tensors in checkpoint order and what it already knows about them.

    Attributes:
        format: the detected format.
        tensors: ``name -> array``; floating arrays are float32 or float64, except for
            safetensors, whose tensors are read-only views of the mapped file in the file's own
            dtype (float16, ``ml_dtypes.bfloat16``, ...): see :func:`is_float`.
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


def is_float(arr: np.ndarray) -> bool:
    """A floating-point array: numpy floats and ml_dtypes' bfloat16/float8 (numpy kind ``V``)."""
    return arr.dtype.kind == "f" or "float" in arr.dtype.name


def count_params(tensors: Mapping[str, np.ndarray]) -> int:
    """Elements of floating tensors, BatchNorm buffers excluded."""
    return sum(
        int(a.size) for k, a in tensors.items() if is_float(a) and not k.endswith(BUFFER_SUFFIXES)
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
    # safetensors before pickle: a header of 640, 896, 1152 or 1408 bytes starts with the bytes
    # of a pickle's protocol mark (0x80, 2..5); a pickle never has "{" at byte 8
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= _ST_MAX_HEADER:
            if 8 + n > size:
                raise corrupt(
                    display, f"its safetensors header needs {8 + n} bytes, file has {size}"
                )
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pytorch"
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

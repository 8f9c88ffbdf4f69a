"""PyTorch checkpoints: ``torch.load(weights_only=True, map_location="cpu")`` only (design §5).

torch is imported lazily, inside :func:`read_torch`, so reading safetensors or ONNX never imports
it. The loaded object may be a state dict or a training checkpoint that nests one
(``{"model": state_dict, "best_acc": tensor(0.93), ...}``): see :func:`find_state_dict`.
Errors never pass on torch's advice to load with ``weights_only`` turned off.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import numpy as np

from graphs.errors import CheckpointError, UnsafeCheckpointError, UnsupportedFormatError, corrupt
from graphs.report import SkippedLayer
from service.ingest.detect import (
    RawCheckpoint,
    count_params,
    layer_name,
    strip_wrapper_prefixes,
)

if TYPE_CHECKING:
    import torch

STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "network",
    "module",
    "params",
    "weights",
    "ema",
    "model_ema",
    "state_dict_ema",
    "ema_state_dict",
    "generator",
    "student",
)
MAX_NESTING = 3
# Tensors become dense float32 arrays. All of them together may need at most this many times the
# file's size (half precision doubles, int8-quantized quadruples) plus the slack; a tensor past
# that (a sparse or stride-0 tensor declaring terabytes, one storage viewed by thousands of
# tensors) is skipped with its reason instead of being allocated.
MAX_EXPANSION = 4
EXPANSION_SLACK = 64 << 20

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_PICKLE_LINE = 1 << 16
_NOT_KNOWN = len(STATE_DICT_KEYS)
_PICKLE_OPCODES = frozenset(op.code for op in pickletools.opcodes)
_ADVICE = re.compile(r"weights_only|trusted source|arbitrary code", re.IGNORECASE)


def read_torch(path: Path, display: str) -> RawCheckpoint:
    """Load with ``torch.load(weights_only=True, map_location="cpu")`` and find the state dict."""
    import torch

    try:
        obj = torch.load(os.fspath(path), weights_only=True, map_location="cpu")
    except Exception as e:  # RuntimeError, UnpicklingError, EOFError, MemoryError, RecursionError
        raise _torch_load_error(path, display, e) from None
    sd = find_state_dict(obj, torch)
    if sd is None:
        return RawCheckpoint("pytorch", {}, 1 if isinstance(obj, torch.Tensor) else 0, 0)
    tensors: dict[str, np.ndarray] = {}
    skipped: list[SkippedLayer] = []
    size = path.stat().st_size
    budget = MAX_EXPANSION * size + EXPANSION_SLACK
    for key, t in sd.items():
        need = _dense_bytes(t)
        if need > budget:
            if t.dim() >= 2:
                skipped.append(SkippedLayer(name=layer_name(key), reason=_too_big(need, size)))
            continue
        budget -= need
        try:
            tensors[key] = _tensor_to_numpy(t, torch)
        except (RuntimeError, TypeError, ValueError) as e:
            if t.dim() >= 2:
                skipped.append(SkippedLayer(name=layer_name(key), reason=f"unreadable: {e}"))
    tensors = strip_wrapper_prefixes(tensors)
    return RawCheckpoint("pytorch", tensors, len(sd), count_params(tensors), skipped=skipped)


def _dense_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` once converted: dense, floating types as float32 (float64 kept)."""
    itemsize = t.element_size()
    if t.is_floating_point() or t.is_quantized:
        itemsize = max(itemsize, 4)
    return int(t.numel()) * itemsize


def _too_big(need: int, size: int) -> str:
    return (
        f"needs {need:,} bytes once dense, more than a {size:,}-byte file can hold (a sparse or "
        "expanded tensor, or many tensors sharing one storage); not read. Save each weight as "
        "its own dense tensor, e.g. t.to_dense().contiguous().clone()"
    )


def _tensor_to_numpy(t: torch.Tensor, torch_mod: Any) -> np.ndarray:
    t = t.detach()
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch_mod.strided:
        t = t.to_dense()
    if t.is_floating_point() and t.dtype not in (torch_mod.float32, torch_mod.float64):
        t = t.float()
    return np.asarray(t.numpy())


def find_state_dict(obj: object, torch_mod: Any) -> dict[str, torch.Tensor] | None:
    """The state dict inside a loaded object, searched at most ``MAX_NESTING`` levels deep.

    Candidates are the top level's tensors and every nested mapping whose values are mostly
    tensors (entries whose key mentions ``optim`` are not searched). The winner holds weights
    (tensors of 2 or more dimensions) if any candidate does; then one reached through a known key
    (``state_dict``, ``model_state_dict``, ``model``, ... in :data:`STATE_DICT_KEYS` order of
    the outermost known key on its path); then the one with the most elements in such tensors.
    """
    found: list[tuple[bool, int, int, int, dict[str, torch.Tensor]]] = []
    # A pickle can reference one mapping from many places (``{k: d for k in ...}`` at every level
    # is a few KB that unfolds to n**4 paths); each mapping is looked at once per (depth, rank).
    seen: set[tuple[int, int, int]] = set()

    def walk(node: object, depth: int, rank: int) -> None:
        if not isinstance(node, Mapping) or depth > MAX_NESTING:
            return
        if (id(node), depth, rank) in seen:
            return
        seen.add((id(node), depth, rank))
        tensors = {
            k: v for k, v in node.items() if isinstance(k, str) and isinstance(v, torch_mod.Tensor)
        }
        if tensors and (depth == 0 or 2 * len(tensors) >= len(node)):
            n2d = sum(int(v.numel()) for v in tensors.values() if v.dim() >= 2)
            found.append((n2d == 0, rank, -n2d, len(found), tensors))
        for k, v in node.items():
            if isinstance(k, str) and isinstance(v, Mapping) and "optim" not in k.lower():
                known = STATE_DICT_KEYS.index(k) if k in STATE_DICT_KEYS else _NOT_KNOWN
                walk(v, depth + 1, rank if rank < _NOT_KNOWN else known)

    walk(obj, 0, _NOT_KNOWN)
    return min(found, key=lambda c: c[:4])[4] if found else None


def _torch_load_error(path: Path, display: str, e: Exception) -> CheckpointError:
    msg = str(e)
    if _legacy_pickles_truncated(path):
        return corrupt(display, "the pickle stream ends early or declares more bytes than it has")
    if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in msg.lower():
        op = re.search(r"Unsupported operand (\d+)", msg)
        if op and chr(int(op.group(1)) % 256) not in _PICKLE_OPCODES:
            return corrupt(
                display,
                f"its pickle holds the byte {int(op.group(1)) % 256:#04x}, "
                "which is no pickle instruction",
            )
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        what = f" ({m.group(1)})" if m else ""
        return UnsafeCheckpointError(
            f"{display} holds Python objects other than tensors{what} that could run code when "
            "unpickled; it was refused and nothing in it was executed."
        )
    if "invalid magic number" in msg.lower():
        return UnsupportedFormatError(
            f"{display} is not a PyTorch, safetensors or ONNX file (it is a Python pickle that "
            "torch.save did not write)."
        )
    if isinstance(e, RecursionError):
        return corrupt(display, "its pickle is nested too deeply")
    if isinstance(e, MemoryError):
        return corrupt(display, "it declares more data than can be loaded")
    return corrupt(display, _without_advice(msg) or type(e).__name__)


def _without_advice(msg: str) -> str:
    """torch's first message sentences, minus any advice about ``weights_only`` (never ours)."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(msg.split()))
    kept = [s for s in sentences if s and not _ADVICE.search(s)]
    return " ".join(kept)[:300].rstrip(". ")


class _BoundedReader:
    """A file view for :mod:`pickletools` that never reads (or allocates) past the file's end.

    A declared length larger than what is left raises ValueError (truncated or corrupt) instead
    of asking the file for that many bytes; lines are at most 64 KiB.
    """

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f = f
        self._size = size

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._f.tell()
        if n < 0:
            n = left
        if n > left:
            raise ValueError(f"{n} bytes declared, {left} left in the file")
        return self._f.read(n)

    def readline(self, limit: int = -1) -> bytes:
        left = self._size - self._f.tell()
        cap = min(left, _MAX_PICKLE_LINE) if limit < 0 else min(left, limit)
        return self._f.readline(cap)


def _legacy_pickles_truncated(path: Path) -> bool:
    """True when a legacy torch.save file's five pickles end early or declare too many bytes.

    Scanning with :mod:`pickletools` reads opcodes and never executes them; every read is capped
    at the bytes left in the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as raw:
            if raw.read(1) != b"\x80":
                return False
            raw.seek(0)
            f = cast(IO[bytes], _BoundedReader(raw, size))  # genops needs read/readline/tell
            first = [arg for _, arg, _ in pickletools.genops(f)]
            if _TORCH_LEGACY_MAGIC not in first:
                return False
            for _ in range(4):
                for _op in pickletools.genops(f):
                    pass
    except (ValueError, EOFError, OSError, MemoryError, OverflowError, RecursionError):
        return True
    return False

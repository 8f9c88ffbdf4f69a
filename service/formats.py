"""Raw checkpoint readers: format detection from content and one reader per format (design §5).

Every reader turns a file into a :class:`RawCheckpoint`: an ordered mapping ``name -> numpy array``
that :func:`service.ingest.extract_layers` understands, plus counts and the tensors that the reader
itself already knows cannot be analysed. Formats are recognised from the file's bytes, never its
name:

- PyTorch zip (``PK`` magic with a ``*/data.pkl`` member) or legacy PyTorch pickle (``0x80``
  protocol 2-5): ``torch.load(weights_only=True, map_location="cpu")`` only. torch is imported
  lazily, inside :func:`read_torch`.
- safetensors (8-byte little-endian header length, then a JSON header starting with ``{``): the
  header is parsed here and tensors are read with numpy, offsets checked against the file size.
- ONNX (protobuf ``ModelProto`` starting with its ``ir_version`` field): ``onnx.load`` without
  external data; weights are initializers or ``Constant`` node outputs, oriented and named from the
  Conv / Gemm / MatMul / BatchNormalization nodes that use them.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from graphs.errors import CheckpointError, UnsafeCheckpointError, UnsupportedFormatError
from graphs.report import SkippedLayer

if TYPE_CHECKING:
    import torch

Format = Literal["pytorch", "safetensors", "onnx"]

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
RECURRENT_REASON = "recurrent/attention weights are not analysed yet"
EMBEDDING_REASON = "embedding table: its rows are token vectors, not filters; not analysed"
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
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_NESTING = 3

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ST_MAX_HEADER = 100 * 1024 * 1024
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
# ONNX TensorProto.DataType codes of floating types: FLOAT, FLOAT16, DOUBLE, BFLOAT16, FLOAT8*.
_ONNX_FLOAT_TYPES = frozenset({1, 10, 11, 16, 17, 18, 19, 20})
_ONNX_RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention"})


@dataclass
class RawCheckpoint:
    """What a reader found: tensors in checkpoint order and what it already knows about them.

    Attributes:
        format: the detected format.
        tensors: ordered ``name -> array``; floating arrays are float32 or float64.
        n_tensors: number of tensors read from the file.
        n_params: elements of floating tensors that are not BatchNorm buffers.
        groups: conv ``groups`` known from the file itself (ONNX ``group`` attributes).
        skipped: layer-like tensors the reader could not turn into a usable weight.
    """

    format: Format
    tensors: dict[str, np.ndarray]
    n_tensors: int
    n_params: int
    groups: dict[str, int] = field(default_factory=dict)
    skipped: list[SkippedLayer] = field(default_factory=list)


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
    """Remove ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes.

    A prefix is removed, repeatedly, only when every key carries it, so a real submodule that
    happens to be called ``module`` next to other top-level modules keeps its name.
    """
    changed = True
    while changed and tensors:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
                changed = True
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


# --------------------------------------------------------------------------------------------
# detection


def _corrupt(display: str, what: str) -> CheckpointError:
    return CheckpointError(f"{display} is truncated or corrupt: {what}.")


def _not_supported(display: str, head: bytes) -> UnsupportedFormatError:
    text = head.decode("utf-8", errors="replace")
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        looks = f"it looks like a text file starting with {text[:24]!r}"
    else:
        looks = f"it starts with the bytes {head[:8].hex(' ')}"
    return UnsupportedFormatError(
        f"{display} is not a PyTorch, safetensors or ONNX file ({looks})."
    )


def detect_format(path: Path, display: str, size: int) -> Format:
    """The format of ``path`` from its first bytes; raises for anything unreadable."""
    if size == 0:
        raise UnsupportedFormatError(f"{display} is empty (0 bytes).")
    with open(path, "rb") as f:
        head = f.read(32)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        _check_torch_zip(path, display)
        return "pytorch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pytorch"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= _ST_MAX_HEADER:
            if 8 + n > size:
                raise _corrupt(
                    display, f"its safetensors header needs {8 + n} bytes, file has {size}"
                )
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] <= 15:
        return "onnx"
    raise _not_supported(display, head)


def _check_torch_zip(path: Path, display: str) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
            if not pkl:
                raise UnsupportedFormatError(
                    f"{display} is not a PyTorch, safetensors or ONNX file (it is a zip archive "
                    "without the data.pkl member of a torch.save file)."
                )
            zf.read(pkl[0])  # checks the CRC of the pickle
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise _corrupt(display, f"the zip archive cannot be read ({e})") from e


# --------------------------------------------------------------------------------------------
# PyTorch


def read_torch(path: Path, display: str) -> RawCheckpoint:
    """Load with ``torch.load(weights_only=True, map_location="cpu")`` and find the state dict."""
    import torch

    try:
        obj = torch.load(os.fspath(path), weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ValueError...
        raise _torch_load_error(path, display, e) from None
    sd = _find_state_dict(obj, torch, 0)
    if sd is None:
        return RawCheckpoint("pytorch", {}, 1 if isinstance(obj, torch.Tensor) else 0, 0)
    tensors: dict[str, np.ndarray] = {}
    skipped: list[SkippedLayer] = []
    for key, t in sd.items():
        try:
            tensors[key] = _tensor_to_numpy(t, torch)
        except (RuntimeError, TypeError, ValueError) as e:
            if t.dim() >= 2:
                skipped.append(SkippedLayer(name=layer_name(key), reason=f"unreadable: {e}"))
    tensors = strip_wrapper_prefixes(tensors)
    return RawCheckpoint("pytorch", tensors, len(sd), count_params(tensors), skipped=skipped)


def _tensor_to_numpy(t: torch.Tensor, torch_mod: Any) -> np.ndarray:
    t = t.detach()
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch_mod.strided:
        t = t.to_dense()
    if t.is_floating_point() and t.dtype not in (torch_mod.float32, torch_mod.float64):
        t = t.float()
    return np.asarray(t.numpy())


def _find_state_dict(obj: object, torch_mod: Any, depth: int) -> dict[str, torch.Tensor] | None:
    """The first mapping whose values are mostly tensors: known keys first, at most 3 deep.

    When nothing qualifies, the top level's own tensors (if any) are the state dict.
    """
    if not isinstance(obj, Mapping) or depth > MAX_NESTING:
        return None
    tensors = {
        k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch_mod.Tensor)
    }
    if tensors and 2 * len(tensors) >= len(obj):
        return tensors
    keys = [k for k in STATE_DICT_KEYS if k in obj]
    keys += [k for k in obj if isinstance(k, str) and k not in keys and "optim" not in k.lower()]
    for k in keys:
        found = _find_state_dict(obj[k], torch_mod, depth + 1)
        if found:
            return found
    return tensors if depth == 0 and tensors else None


def _torch_load_error(path: Path, display: str, e: Exception) -> CheckpointError:
    msg = str(e)
    if _legacy_pickles_truncated(path):
        return _corrupt(display, "the pickle stream ends early")
    if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in msg.lower():
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
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return _corrupt(display, first[:300])


def _legacy_pickles_truncated(path: Path) -> bool:
    """True when a legacy torch.save file's five pickles end before their STOP opcodes.

    Scanning with :mod:`pickletools` reads opcodes and never executes them.
    """
    try:
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":
                return False
            f.seek(0)
            first = [arg for _, arg, _ in pickletools.genops(f)]
            if _TORCH_LEGACY_MAGIC not in first:
                return False
            for _ in range(4):
                for _op in pickletools.genops(f):
                    pass
    except (ValueError, EOFError, OSError):
        return True
    return False


# --------------------------------------------------------------------------------------------
# safetensors


def read_safetensors(path: Path, display: str) -> RawCheckpoint:
    """Parse the JSON header and read each tensor with numpy (bf16 widened to float32).

    safetensors writers sort tensors by dtype and name, so the state-dict order is lost; tensors
    are returned in natural name order (``features.2`` before ``features.10``) instead.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(display, f"its safetensors header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise _corrupt(display, "its safetensors header is not a JSON object")
        start, data_len = 8 + n, size - 8 - n
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        tensors: dict[str, np.ndarray] = {}
        skipped: list[SkippedLayer] = []
        for key in sorted(entries, key=natural_key):
            dtype, shape, begin, end = _st_entry(display, key, entries[key], data_len)
            if dtype not in _ST_DTYPES:
                if len(shape) >= 2:
                    reason = f"has dtype {dtype}, which prunegraph cannot read"
                    skipped.append(SkippedLayer(name=layer_name(key), reason=reason))
                continue
            np_dtype = np.dtype(_ST_DTYPES[dtype])
            if end - begin != math.prod(shape) * np_dtype.itemsize:
                raise _corrupt(display, f"tensor {key!r} has {end - begin} bytes for shape {shape}")
            f.seek(start + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != len(buf):
                raise _corrupt(display, f"tensor {key!r} runs past the end of the file")
            arr = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
            arr = arr.astype(np_dtype.newbyteorder("="), copy=False)
            if dtype == "BF16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            tensors[key] = as_float(arr)
    tensors = strip_wrapper_prefixes(tensors)
    return RawCheckpoint(
        "safetensors", tensors, len(entries), count_params(tensors), skipped=skipped
    )


def _st_entry(
    display: str, key: str, entry: object, data_len: int
) -> tuple[str, list[int], int, int]:
    """Validated (dtype, shape, begin, end) of one header entry; offsets within the data."""
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        not isinstance(dtype, str)
        or not isinstance(shape, list)
        or not all(type(d) is int and d >= 0 for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(display, f"the safetensors header entry for {key!r} is malformed")
    begin, end = offsets
    if end > data_len:
        raise _corrupt(
            display, f"tensor {key!r} ends at byte {end} of a {data_len}-byte data section"
        )
    return dtype, shape, begin, end


# --------------------------------------------------------------------------------------------
# ONNX


def read_onnx(path: Path, display: str) -> RawCheckpoint:
    """Weights of Conv/Gemm/MatMul nodes as ``{layer}.weight`` arrays of shape (out, in, ...).

    Layer names: the weight tensor's name without ``.weight`` when it ends so, else the node name.
    Gemm weights follow ``transB`` (and ``alpha``); a MatMul's constant right operand (in, out) is
    transposed. BatchNormalization parameters become ``{bn}.weight/.bias/.running_mean/...``.
    """
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise _corrupt(display, f"it starts like an ONNX model but cannot be parsed ({e})") from e
    if not model.HasField("graph"):
        with open(path, "rb") as f:
            raise _not_supported(display, f.read(32))
    return _OnnxReader(model.graph, display).read()


class _OnnxReader:
    def __init__(self, graph: Any, display: str) -> None:
        import onnx

        self.onnx = onnx
        self.graph = graph
        self.display = display
        self.protos: dict[str, Any] = {i.name: i for i in graph.initializer}
        self.alias: dict[str, str] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.protos[node.output[0]] = a.t
            elif node.op_type == "Identity" and node.input and self._const(node.input[0]):
                self.alias[node.output[0]] = self._resolve(node.input[0])
        self.tensors: dict[str, np.ndarray] = {}
        self.groups: dict[str, int] = {}
        self.used: set[str] = set()
        self.buffers: set[str] = set()
        self.names: set[str] = set()

    def read(self) -> RawCheckpoint:
        for node in self.graph.node:
            handler = getattr(self, f"_on_{node.op_type.lower()}", None)
            if handler is not None:
                handler(node)
        skipped = self._leftovers()
        n_params = sum(
            math.prod(p.dims)
            for n, p in self.protos.items()
            if p.data_type in _ONNX_FLOAT_TYPES and n not in self.buffers
        )
        return RawCheckpoint("onnx", self.tensors, len(self.protos), n_params, self.groups, skipped)

    def _resolve(self, name: str) -> str:
        return self.alias.get(name, name)

    def _const(self, name: str) -> bool:
        return bool(name) and self._resolve(name) in self.protos

    def _array(self, name: str) -> np.ndarray:
        proto = self.protos[self._resolve(name)]
        if proto.data_location == self.onnx.TensorProto.EXTERNAL:
            raise CheckpointError(
                f"{self.display} keeps tensor {proto.name!r} in an external data file; upload a "
                "single-file model (onnx.save(model, path, save_as_external_data=False))."
            )
        try:
            arr = self.onnx.numpy_helper.to_array(proto)
        except Exception as e:
            raise _corrupt(self.display, f"tensor {proto.name!r} cannot be decoded ({e})") from e
        return as_float(np.asarray(arr))

    def _name(self, weight: str, node: Any) -> str:
        weight = self._resolve(weight)
        base = weight[: -len(".weight")] if weight.endswith(".weight") else node.name or weight
        name, i = base, 2
        while name in self.names:
            name, i = f"{base}#{i}", i + 1
        self.names.add(name)
        return name

    def _attr(self, node: Any, name: str, default: float) -> float:
        for a in node.attribute:
            if a.name == name:
                return float(self.onnx.helper.get_attribute_value(a))
        return default

    def _add_layer(
        self, node: Any, weight_input: str, w: np.ndarray, bias: np.ndarray | None
    ) -> str:
        name = self._name(weight_input, node)
        self.used.add(self._resolve(weight_input))
        self.tensors[f"{name}.weight"] = w
        if bias is not None and bias.size == w.shape[0] and bias.dtype.kind == "f":
            self.tensors[f"{name}.bias"] = bias.reshape(-1)
        return name

    def _on_conv(self, node: Any) -> None:
        if len(node.input) < 2 or not self._const(node.input[1]):
            return
        if self._resolve(node.input[1]) in self.used:
            return
        w = self._array(node.input[1])
        if w.ndim not in (3, 4, 5):
            return
        bias = (
            self._array(node.input[2])
            if len(node.input) > 2 and self._const(node.input[2])
            else None
        )
        name = self._add_layer(node, node.input[1], w, bias)
        self.groups[name] = int(self._attr(node, "group", 1))

    def _on_gemm(self, node: Any) -> None:
        if len(node.input) < 2 or not self._const(node.input[1]):
            return
        if self._resolve(node.input[1]) in self.used:
            return
        b = self._array(node.input[1])
        if b.ndim != 2:
            return
        w = b if self._attr(node, "transB", 0) else b.T
        alpha, beta = self._attr(node, "alpha", 1.0), self._attr(node, "beta", 1.0)
        w = w * np.asarray(alpha, dtype=w.dtype) if alpha != 1.0 else w
        bias = None
        if len(node.input) > 2 and self._const(node.input[2]):
            c = self._array(node.input[2])
            bias = c * np.asarray(beta, dtype=c.dtype) if beta != 1.0 else c
        self._add_layer(node, node.input[1], np.ascontiguousarray(w), bias)

    def _on_matmul(self, node: Any) -> None:
        if len(node.input) < 2 or not self._const(node.input[1]) or self._const(node.input[0]):
            return
        if self._resolve(node.input[1]) in self.used:
            return
        b = self._array(node.input[1])
        if b.ndim != 2:
            return
        bias = None
        adds = self.consumers.get(node.output[0], [])
        if len(adds) == 1 and adds[0].op_type == "Add":
            other = [i for i in adds[0].input if i != node.output[0]]
            if len(other) == 1 and self._const(other[0]):
                bias = self._array(other[0])
        self._add_layer(node, node.input[1], np.ascontiguousarray(b.T), bias)

    def _on_batchnormalization(self, node: Any) -> None:
        if len(node.input) < 5 or not all(self._const(i) for i in node.input[1:5]):
            return
        bn = self._name(node.input[1], node)
        for suffix, name in zip(
            ("weight", "bias", "running_mean", "running_var"), node.input[1:5], strict=True
        ):
            self.tensors[f"{bn}.{suffix}"] = self._array(name)
        self.buffers.update(self._resolve(i) for i in node.input[3:5])

    def _leftovers(self) -> list[SkippedLayer]:
        """Floating constants of 2+ dimensions that no Conv/Gemm/MatMul uses as a weight."""
        skipped = []
        for name, proto in self.protos.items():
            if name in self.used or proto.data_type not in _ONNX_FLOAT_TYPES or len(proto.dims) < 2:
                continue
            ops = sorted({n.op_type for n in self._users(name)})
            if _ONNX_RECURRENT_OPS.intersection(ops):
                reason = RECURRENT_REASON
            elif "Gather" in ops:
                reason = EMBEDDING_REASON
            elif "ConvTranspose" in ops:
                reason = "transposed convolution weights are not analysed yet"
            elif ops:
                reason = (
                    f"used by {', '.join(ops)} in a way that is not analysed (layers are Conv "
                    "weights, Gemm B operands and 2-D right-hand MatMul operands)"
                )
            else:
                reason = "not used by any node of the graph"
            skipped.append(SkippedLayer(name=layer_name(name), reason=reason))
        return skipped

    def _users(self, name: str) -> Iterable[Any]:
        names = [name, *(a for a, target in self.alias.items() if target == name)]
        return [
            node for n in names for node in self.consumers.get(n, []) if node.op_type != "Identity"
        ]

"""The fold contract: how a plan's compensation rewrites a consumer's weights (design §8).

Removing channel set R of a group and keeping K, at a channel-mixing consumer (a conv or linear
layer that reads the group's channels) with input X (rows × c), the removed channels' role is
taken over by an affine map of the kept ones::

    X_R ≈ X_K Bᵀ + 1 bᵀ        B: (|R|, |K|),  b: (|R|,)

and the consumer's weight W, shape (out, c / conv_groups, *taps), becomes for every tap t::

    W[:, K, t] += W[:, R, t] @ B        bias += Σ_t W[:, R, t] @ b   (a bias is created if none)

after which the columns R are removed as usual. A linear layer after a flatten of C×H×W
(``per_channel`` = H·W) is viewed as (out, C, H·W) and folded the same way for every position.

A plan that carries compensation (:class:`Compensation`) lists one :class:`ConsumerFold` per
(pruned group, mixing consumer). The matrices themselves live in a *sidecar*: a safetensors file
of float64 arrays with deterministic bytes (sorted keys, no metadata), written next to the plan
as ``<plan stem>.fold.safetensors`` and pinned by the plan through its sha256.
:func:`encode_sidecar` / :func:`decode_sidecar` read and write it with numpy only, and
:func:`fold_weight` is the numpy reference of the rewrite (``clients.apply_plan`` does the same
on live tensors).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from graphs._frozen import Frozen
from graphs.errors import InvalidInputError

SIDECAR_SUFFIX = ".fold.safetensors"
FoldKind = Literal["least_squares", "mean", "merge"]
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
}
_MAX_HEADER = 100 * 1024 * 1024


class ConsumerFold(Frozen):
    """The compensation of one channel-mixing consumer for one pruned group."""

    group: int = Field(ge=0, description="the plan group id whose removed channels this reads")
    consumer: str = Field(description="module name (model.named_modules()) of the conv/linear")
    weight: str = Field(description="the consumer's weight parameter name")
    bias: str | None = Field(
        description="the consumer's bias parameter name; null when it has none (apply creates one)"
    )
    per_channel: int = Field(1, ge=1, description="H·W for a linear layer after a flatten")
    kept: list[int] = Field(description="sorted ORIGINAL indices of the kept channels")
    removed: list[int] = Field(description="sorted ORIGINAL indices of the removed channels")
    matrix: str = Field(description="sidecar key of B, shape (len(removed), len(kept))")
    shift: str = Field(description="sidecar key of b, shape (len(removed),)")
    predicted_error: float = Field(
        ge=0, description="relative consumer-output error predicted from the statistics"
    )
    kind: FoldKind = Field(
        description="least_squares: from activation statistics; mean: data-free expected output "
        "(B = 0); merge: weight-space merge into a representative"
    )

    @model_validator(mode="after")
    def _check(self) -> ConsumerFold:
        for name, idx in (("kept", self.kept), ("removed", self.removed)):
            if sorted(set(idx)) != idx or (idx and idx[0] < 0):
                raise ValueError(f"fold {self.consumer}: {name} must be sorted, unique and >= 0")
        if set(self.kept) & set(self.removed):
            raise ValueError(f"fold {self.consumer}: kept and removed channels overlap")
        if self.matrix == self.shift:
            raise ValueError(f"fold {self.consumer}: matrix and shift need different keys")
        return self


class Compensation(Frozen):
    """Every fold of a plan, and the sidecar holding their matrices (pinned by sha256)."""

    sidecar_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    sidecar_bytes: int = Field(ge=0)
    folds: list[ConsumerFold]

    @model_validator(mode="after")
    def _check(self) -> Compensation:
        keys = [k for f in self.folds for k in (f.matrix, f.shift)]
        if len(set(keys)) != len(keys):
            raise ValueError("compensation: every fold needs its own sidecar keys")
        pairs = [(f.group, f.consumer) for f in self.folds]
        if len(set(pairs)) != len(pairs):
            raise ValueError("compensation: one fold per (group, consumer)")
        return self


def fold_keys(group: int, consumer: str) -> tuple[str, str]:
    """The conventional sidecar keys (matrix, shift) of one fold."""
    return f"fold/{group}/{consumer}/matrix", f"fold/{group}/{consumer}/shift"


def sidecar_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_sidecar(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialize float arrays as safetensors bytes, deterministically.

    Every array is stored as little-endian float64 (``F64``), keys sorted, no ``__metadata__``,
    the JSON header compact and space-padded to a multiple of 8 bytes. The same arrays always
    give the same bytes; ``safetensors.numpy.load`` reads them.
    """
    header: dict[str, dict[str, object]] = {}
    blobs: list[bytes] = []
    offset = 0
    for key in sorted(arrays):
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise InvalidInputError(f"sidecar key {key!r} is not a usable tensor name")
        a = np.asarray(arrays[key])
        if a.dtype.kind not in "fiub":
            raise InvalidInputError(f"sidecar array {key!r} has dtype {a.dtype}, not numeric")
        data = np.ascontiguousarray(a, dtype="<f8")
        if not np.all(np.isfinite(data)):
            raise InvalidInputError(f"sidecar array {key!r} holds NaN or infinite values")
        blob = data.tobytes()
        header[key] = {
            "dtype": "F64",
            "shape": [int(s) for s in data.shape],
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def decode_sidecar(data: bytes) -> dict[str, np.ndarray]:
    """Read safetensors bytes into float64 arrays (read-only copies are not made: arrays own
    their memory). Raises :class:`InvalidInputError` on anything malformed."""
    hint = "Use the .fold.safetensors file written next to the plan, unmodified."
    if len(data) < 8:
        raise InvalidInputError("the sidecar is shorter than a safetensors header", hint=hint)
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise InvalidInputError("the sidecar's header length is out of range", hint=hint)
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"the sidecar's header is not JSON ({e})", hint=hint) from e
    if not isinstance(header, dict):
        raise InvalidInputError("the sidecar's header is not a JSON object", hint=hint)
    body = memoryview(data)[8 + n :]
    out: dict[str, np.ndarray] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            start, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInputError(f"sidecar tensor {key!r}: bad header entry", hint=hint) from e
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if min(shape, default=0) < 0 or not 0 <= start <= end <= len(body):
            raise InvalidInputError(f"sidecar tensor {key!r}: offsets out of range", hint=hint)
        if end - start != count * dtype.itemsize:
            raise InvalidInputError(f"sidecar tensor {key!r}: size does not match", hint=hint)
        arr = np.frombuffer(body[start:end], dtype=dtype).reshape(shape).astype(np.float64)
        out[key] = arr
    return out


def _dense(weight: np.ndarray, groups: int) -> np.ndarray:
    """(out, c/groups, T) → block-diagonal (out, c, T)."""
    out, cin, t = weight.shape
    full = np.zeros((out, cin * groups, t), dtype=np.float64)
    per_out = out // groups
    for g in range(groups):
        rows = slice(g * per_out, (g + 1) * per_out)
        full[rows, g * cin : (g + 1) * cin] = weight[rows]
    return full


def fold_weight(
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    kept: list[int],
    removed: list[int],
    matrix: np.ndarray,
    shift: np.ndarray,
    per_channel: int = 1,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Numpy reference of one fold: the consumer's weight and bias after compensation.

    ``weight``: (out, c·per_channel / groups, *taps); ``bias``: (out,) or None;
    ``matrix`` B: (len(removed), len(kept)); ``shift`` b: (len(removed),). Returns the weight
    with the same shape (columns of removed channels left in place, to be removed afterwards)
    and the bias (out,). For a grouped conv, B must be zero between different conv groups.
    """
    w = np.asarray(weight, dtype=np.float64)
    out = w.shape[0]
    if w.ndim < 2 or out % groups or (w.ndim > 2 and per_channel != 1):
        raise InvalidInputError(f"weight of shape {w.shape} cannot be folded (groups={groups})")
    taps = int(np.prod(w.shape[2:], dtype=np.int64)) if w.ndim > 2 else 1
    if per_channel > 1:
        if w.shape[1] % per_channel:
            raise InvalidInputError(f"{w.shape[1]} inputs are not a multiple of {per_channel}")
        w3 = w.reshape(out, w.shape[1] // per_channel, per_channel)
    else:
        w3 = w.reshape(out, w.shape[1], taps)
    full = _dense(w3, groups)
    B = np.asarray(matrix, dtype=np.float64)
    b = np.asarray(shift, dtype=np.float64)
    if B.shape != (len(removed), len(kept)) or b.shape != (len(removed),):
        raise InvalidInputError(
            f"fold shapes {B.shape}, {b.shape} do not match {len(removed)} removed and "
            f"{len(kept)} kept channels"
        )
    wr = full[:, removed, :]  # (out, |R|, T)
    full[:, kept, :] += np.einsum("ort,rk->okt", wr, B)
    new_bias = np.zeros(out) if bias is None else np.asarray(bias, dtype=np.float64).copy()
    new_bias += np.einsum("ort,r->o", wr, b)
    cin = w3.shape[1]
    per_out = out // groups
    back = np.empty_like(w3)
    for g in range(groups):
        rows = slice(g * per_out, (g + 1) * per_out)
        back[rows] = full[rows, g * cin : (g + 1) * cin]
    return back.reshape(w.shape), new_bias

"""Checkpoint ingestion: any supported file -> prunable layers (design §2, §5).

:func:`read_checkpoint` detects the format from the file's content (see :mod:`service.formats`),
reads its tensors, and :func:`extract_layers` turns the ordered ``name -> array`` mapping into
:class:`~graphs.layers.LayerWeights` (conv1d/2d/3d and linear) plus a reason for every layer-like
tensor that cannot be analysed.

Conv ``groups`` cannot be read from a state dict. They come, in this order of precedence, from the
``groups`` argument (a user manifest), from the file (ONNX ``group`` attributes), or are inferred
conservatively from the nearest preceding conv/linear layer in checkpoint order ("prev"):

- depthwise: weight (C, 1, *k) with C > 1 and prev outputs exactly C channels -> groups = C (a
  regular conv with ONE input channel cannot follow a layer with C > 1 outputs);
- other grouped convs are never inferred: a (C, c, *k) conv after a layer with C = g*c outputs is
  ResNeXt's grouped conv, but equally HRNet's fuse conv (256, 128, 3, 3) after a 256-output conv,
  or a ResNet shortcut (4C, C, 1, 1) after a 4C-output conv; a manifest or ONNX says which;
- otherwise (first layer, different widths) groups = 1, ``groups_source="default"``.

Transposed convolutions cannot be told apart from convs in a state dict (their weight is
(in, out/groups, *k)); send a manifest or an ONNX model for such models.
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphs.errors import CheckpointError, InvalidInputError, NoPrunableLayersError
from graphs.layers import GroupsSource, LayerKind, LayerWeights
from graphs.report import CheckpointInfo, SkippedLayer
from service import formats
from service.formats import EMBEDDING_REASON, RECURRENT_REASON, layer_name

__all__ = ["ParsedCheckpoint", "extract_layers", "read_checkpoint", "sha256_file"]

NAN_REASON = (
    "weights contain NaN or Inf values; fix the checkpoint (e.g. re-export from a healthy step)"
)
ONE_FILTER_REASON = "has 1 filter: redundancy needs at least 2"
DEAD_REASON = "all filters are zero (the layer is dead)"
OTHER_TENSOR_REASON = "not the .weight of a conv or linear layer; not analysed"
WEIGHT_NORM_REASON = "weight-normalised (weight_g/weight_v); remove weight norm before saving"
_KINDS: dict[int, LayerKind] = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}
_RECURRENT_KEY = re.compile(r"(^|\.)(weight_[ih]h(_l\d+)?(_reverse)?|[qkv]?_?(in_)?proj_weight)$")
_EMBEDDING_NAMES = frozenset({"wte", "wpe", "emb"})
_NORM_PREFIX = re.compile(r"^(batch_?norm|bn|norm)")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ParsedCheckpoint:
    """A checkpoint read from disk.

    Attributes:
        info: sha256 of the file bytes, format, size, number of tensors and parameters.
        layers: prunable layers in checkpoint order (state-dict order, ONNX graph order; natural
            name order for safetensors, whose writers sort tensors by dtype and name).
        skipped: every layer-like weight that is not analysed, with a reason a user understands.
    """

    info: CheckpointInfo
    layers: tuple[LayerWeights, ...]
    skipped: tuple[SkippedLayer, ...]


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    groups: Mapping[str, int] | None = None,
    name: str | None = None,
) -> ParsedCheckpoint:
    """Read a PyTorch, safetensors or ONNX checkpoint (format detected from content).

    Args:
        path: the file.
        groups: layer name -> conv groups (from a user manifest); wins over ONNX and inference.
        name: how the file is called in error messages (default: ``path``), e.g. an upload's name.

    Raises:
        CheckpointError: missing, unreadable, truncated or corrupt file.
        UnsupportedFormatError: empty file or not one of the three formats.
        UnsafeCheckpointError: a pickle that would run code (refused, never executed).
        NoPrunableLayersError: no conv or linear layer can be analysed.
        InvalidInputError: ``groups`` gives a value that does not fit a layer.
    """
    p = Path(path)
    display = name or os.fspath(path)
    if not p.exists():
        raise CheckpointError(
            f"{display} does not exist.", hint="Check the path of the checkpoint."
        )
    if not p.is_file():
        raise CheckpointError(f"{display} is not a regular file.")
    try:
        size, digest = sha256_file(p)
        fmt = formats.detect_format(p, display, size)
        reader = {
            "pytorch": formats.read_torch,
            "safetensors": formats.read_safetensors,
            "onnx": formats.read_onnx,
        }[fmt]
        raw = reader(p, display)
    except OSError as e:
        raise CheckpointError(f"{display} cannot be read: {e.strerror or e}.") from e
    layers, skipped = extract_layers(raw.tensors, groups=groups, known_groups=raw.groups)
    skipped = [*raw.skipped, *skipped]
    if raw.n_tensors == 0:
        where = (
            f" (it looks at the top level and in entries such as "
            f"{', '.join(formats.STATE_DICT_KEYS[:4])}, up to {formats.MAX_NESTING} levels deep)"
            if fmt == "pytorch"
            else ""
        )
        raise NoPrunableLayersError(f"{display} holds no tensors prunegraph could find{where}.")
    if not layers:
        why = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5])
        more = f" (skipped: {why}{'; ...' if len(skipped) > 5 else ''})" if skipped else ""
        raise NoPrunableLayersError(
            f"{display} holds no conv or linear layer that can be analysed{more}."
        )
    info = CheckpointInfo(
        sha256=digest,
        format=fmt,
        size_bytes=size,
        n_tensors=raw.n_tensors,
        n_params=raw.n_params,
    )
    return ParsedCheckpoint(info=info, layers=tuple(layers), skipped=tuple(skipped))


def sha256_file(path: Path) -> tuple[int, str]:
    """(size in bytes, hex sha256) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


@dataclass
class _Candidate:
    name: str
    kind: LayerKind
    weight: np.ndarray
    position: int
    groups: int = 1
    groups_source: GroupsSource = "default"
    problem: str | None = None
    bn: str | None = None
    extra_params: int = 0

    @property
    def out(self) -> int:
        return int(self.weight.shape[0])


def extract_layers(
    tensors: Mapping[str, np.ndarray],
    *,
    groups: Mapping[str, int] | None = None,
    known_groups: Mapping[str, int] | None = None,
) -> tuple[list[LayerWeights], list[SkippedLayer]]:
    """Prunable layers and skipped layer-like tensors of an ordered ``name -> array`` mapping.

    ``*.weight`` arrays with 2/3/4/5 dimensions are linear/conv1d/conv2d/conv3d layers (2-D
    embedding tables excepted); ``{name}.bias`` of shape (out,) is the bias. 1-D tensors are not
    layers and are not listed. Layers with NaN/Inf, a single filter or only zero filters are
    skipped with a reason. ``groups`` (manifest) wins over ``known_groups`` (from the file), which
    wins over inference (see the module docstring). A BatchNorm (a prefix with ``running_mean``)
    is paired by name first (``x.bn1`` <-> ``x.conv1``, ``seq.1`` <-> ``seq.0``), else with the
    most recent preceding layer of the same width that has no BN yet.
    """
    groups, known_groups = groups or {}, known_groups or {}
    events: list[_Candidate | SkippedLayer] = []
    chain: list[_Candidate] = []
    bns: list[tuple[str, int, int]] = []  # (prefix, size, position)
    for pos, (key, arr) in enumerate(tensors.items()):
        if key.endswith("running_mean") and arr.ndim == 1:
            bns.append((key[: -len("running_mean")].rstrip("."), int(arr.shape[0]), pos))
            continue
        if arr.ndim < 2 or (arr.dtype.kind != "f" and not _is_weight_key(key)):
            continue
        reason = _not_a_layer(key, arr)
        if reason is not None:
            if reason:
                name = key[: -len(".weight_v")] if key.endswith(".weight_v") else layer_name(key)
                events.append(SkippedLayer(name=name, reason=reason))
            continue
        cand = _Candidate(layer_name(key), _KINDS[arr.ndim], arr, pos)
        cand.problem = _value_problem(arr)
        _set_groups(cand, groups, known_groups, chain[-1] if chain else None)
        chain.append(cand)
        events.append(cand)
    _pair_batchnorms(chain, bns, tensors)
    layers: list[LayerWeights] = []
    skipped: list[SkippedLayer] = []
    for ev in events:
        if isinstance(ev, SkippedLayer):
            skipped.append(ev)
        elif ev.problem is not None:
            skipped.append(SkippedLayer(name=ev.name, reason=ev.problem))
        else:
            layers.append(_to_layer(ev, tensors))
    return layers, skipped


def _is_weight_key(key: str) -> bool:
    return key == "weight" or key.endswith(".weight")


def _not_a_layer(key: str, arr: np.ndarray) -> str | None:
    """None for a conv/linear candidate, "" to ignore silently, else the reason it is skipped."""
    if key.endswith(".weight_g"):
        return ""
    if not _is_weight_key(key):
        if _RECURRENT_KEY.search(key):
            return RECURRENT_REASON
        return WEIGHT_NORM_REASON if key.endswith(".weight_v") else OTHER_TENSOR_REASON
    if arr.dtype.kind != "f":
        return f"has dtype {arr.dtype}: only floating-point weights are analysed (dequantize first)"
    if arr.ndim == 2 and _is_embedding(layer_name(key)):
        return EMBEDDING_REASON
    if arr.ndim > 5:
        return f"has {arr.ndim} dimensions: not a conv or linear weight"
    if arr.size == 0:
        return f"is empty (shape {tuple(arr.shape)})"
    return None


def _is_embedding(name: str) -> bool:
    """An embedding table: the module's own name mentions ``embed`` (or is wte/wpe/emb).

    Only the last name component counts, so ``patch_embed.proj`` (a projection) is a layer.
    """
    last = name.rsplit(".", 1)[-1].lower()
    return "embed" in last or last in _EMBEDDING_NAMES or last.endswith("_emb")


def _value_problem(w: np.ndarray) -> str | None:
    if not np.isfinite(w).all():
        return NAN_REASON
    if w.shape[0] == 1:
        return ONE_FILTER_REASON
    if not np.any(w):
        return DEAD_REASON
    return None


def _set_groups(
    cand: _Candidate,
    manifest: Mapping[str, int],
    known: Mapping[str, int],
    prev: _Candidate | None,
) -> None:
    if cand.name in manifest:
        try:
            g = operator.index(manifest[cand.name])
        except TypeError:
            g = 0
        if g < 1 or cand.out % g or (cand.kind == "linear" and g != 1):
            raise InvalidInputError(
                f"the manifest gives groups={manifest[cand.name]!r} for {cand.kind} layer "
                f"{cand.name!r} with {cand.out} filters; groups must be a positive divisor of the "
                "filter count (1 for linear layers).",
                hint="Fix the manifest's groups entry for this layer.",
            )
        cand.groups, cand.groups_source = g, "manifest"
    elif cand.name in known and cand.kind != "linear":
        g = int(known[cand.name])
        if g < 1 or cand.out % g:
            cand.problem = cand.problem or f"groups={g} does not divide its {cand.out} filters"
        else:
            cand.groups, cand.groups_source = g, "onnx"
    elif cand.kind != "linear" and prev is not None:
        out, cin = cand.weight.shape[:2]
        if cin == 1 and out > 1 and prev.out == out:
            cand.groups, cand.groups_source = int(out), "inferred"


def _pair_batchnorms(
    chain: list[_Candidate], bns: list[tuple[str, int, int]], tensors: Mapping[str, np.ndarray]
) -> None:
    by_name = {c.name: c for c in chain}
    pending: list[tuple[str, int, int]] = []
    for prefix, size, pos in bns:
        match = next(
            (c for c in _name_matches(prefix, by_name) if c.out == size and c.bn is None), None
        )
        if match is None:
            pending.append((prefix, size, pos))
        else:
            _attach(match, prefix, tensors)
    for prefix, size, pos in pending:
        for c in reversed(chain):
            if c.position < pos and c.out == size and c.bn is None:
                _attach(c, prefix, tensors)
                break


def _name_matches(bn: str, by_name: Mapping[str, _Candidate]) -> list[_Candidate]:
    """Layers whose names pair with BN ``bn``: ``seq.1`` -> ``seq.0``, ``x.bn1`` -> ``x.conv1``."""
    parent, _, last = bn.rpartition(".")
    stem = f"{parent}." if parent else ""
    names = []
    if last.isdigit() and int(last) > 0:
        names.append(f"{stem}{int(last) - 1}")
    m = _NORM_PREFIX.match(last)
    if m:
        names += [f"{stem}{w}{last[m.end() :]}" for w in ("conv", "fc", "linear", "proj")]
    return [by_name[n] for n in names if n in by_name]


def _attach(cand: _Candidate, bn: str, tensors: Mapping[str, np.ndarray]) -> None:
    cand.bn = bn
    for part in ("weight", "bias"):
        arr = tensors.get(f"{bn}.{part}" if bn else part)
        if arr is not None and arr.ndim == 1:
            cand.extra_params += int(arr.size)


def _to_layer(cand: _Candidate, tensors: Mapping[str, np.ndarray]) -> LayerWeights:
    bias = tensors.get(f"{cand.name}.bias" if cand.name else "bias")
    if bias is not None and (bias.shape != (cand.out,) or bias.dtype.kind != "f"):
        bias = None
    return LayerWeights(
        name=cand.name,
        kind=cand.kind,
        weight=cand.weight,
        groups=cand.groups,
        groups_source=cand.groups_source,
        bias=bias,
        bn=cand.bn,
        extra_params=cand.extra_params,
    )

"""``name -> array`` mappings to prunable layers: kinds, groups, depthwise producers, BN pairs.

Conv ``groups`` cannot be read from a state dict. They come, in this order of precedence, from the
``groups`` argument (a user manifest), from the file (ONNX ``group`` attributes), or are inferred
conservatively. In checkpoint order (state dicts, ONNX graphs), from the nearest preceding
conv/linear layer ("prev"), skipped layers (NaN weights, ...) included:

- depthwise: weight (C, 1, *k) with C > 1 and prev outputs exactly C channels -> groups = C (a
  regular conv with ONE input channel cannot follow a layer with C > 1 outputs);
- other grouped convs are never inferred: a (C, c, *k) conv after a layer with C = g*c outputs is
  ResNeXt's grouped conv, but equally HRNet's fuse conv (256, 128, 3, 3) after a 256-output conv,
  or a ResNet shortcut (4C, C, 1, 1) after a 4C-output conv; a manifest or ONNX says which;
- otherwise (first layer, different widths) groups = 1, ``groups_source="default"``.

Without checkpoint order (safetensors sorts tensors by name) the "prev" of a (C, 1, *k) conv comes
from its name instead (:mod:`service.ingest.name_order`); when that finds candidates of width C but
cannot tell which one produces it, the conv is still depthwise but its producer is unknown.

Every depthwise conv (inferred, or given by a manifest or ONNX) gets ``LayerWeights.producer``: the
layer whose outputs it filters. ONNX names it from the graph (or None where the graph shows no
single producer, e.g. after a residual Add); otherwise it is the layer the
inference used, the nearest preceding layer of width C, even one that is skipped, so that the
grouping can refuse to attach the depthwise conv to another layer. A depthwise conv after a
depthwise conv shares its producer.

Transposed convolutions cannot be told apart from convs in a state dict (their weight is
(in, out/groups, *k)); send a manifest or an ONNX model for such models.

Recurrent modules' matrices (``weight_ih_l0``, ``weight_hh_l0_reverse``, a cell's ``weight_ih``…)
are layers named by their parameter (:mod:`service.ingest.recurrent_tensors`), grouped into hidden
units later (:mod:`graphs.recurrent`); they take no part in depthwise or BatchNorm inference.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from graphs.errors import InvalidInputError
from graphs.layers import GroupsSource, LayerKind, LayerWeights, release
from graphs.report import SkippedLayer
from service.ingest.detect import EMBEDDING_REASON, RECURRENT_REASON, is_float, layer_name
from service.ingest.name_order import NameOrder, pair_bns_by_parent
from service.ingest.recurrent_tensors import recurrent_entries

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
    producer: str | None = None

    @property
    def out(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dw_shaped(self) -> bool:
        """A conv with one input channel per filter and more than one filter."""
        return self.kind != "linear" and self.weight.shape[1] == 1 and self.out > 1

    @property
    def is_depthwise(self) -> bool:
        return self.dw_shaped and self.groups == self.out


def extract_layers(
    tensors: Mapping[str, np.ndarray],
    *,
    groups: Mapping[str, int] | None = None,
    known_groups: Mapping[str, int] | None = None,
    known_producers: Mapping[str, str | None] | None = None,
    ordered: bool = True,
) -> tuple[list[LayerWeights], list[SkippedLayer]]:
    """Prunable layers and skipped layer-like tensors of a ``name -> array`` mapping.

    ``*.weight`` arrays with 2/3/4/5 dimensions are linear/conv1d/conv2d/conv3d layers (2-D
    embedding tables excepted); ``{name}.bias`` of shape (out,) is the bias. 1-D tensors are not
    layers and are not listed. Layers with NaN/Inf, a single filter or only zero filters are
    skipped with a reason. ``groups`` (manifest) wins over ``known_groups`` (from the file), which
    wins over inference (see the module docstring); ``known_producers`` (from the file) name
    depthwise producers, None where the file shows that no single layer is one. ``ordered`` says
    whether ``tensors`` is in data-flow order. A BatchNorm (a prefix with ``running_mean``) is
    paired by name first (``x.bn1`` <-> ``x.conv1``, ``seq.1`` <-> ``seq.0``), else, in order,
    with the most recent preceding layer of the same width that has no BN yet, or, without
    order, within its parent (:mod:`service.ingest.name_order`).
    """
    groups, known_groups = groups or {}, known_groups or {}
    known_producers = known_producers or {}
    events: list[_Candidate | SkippedLayer | LayerWeights] = []
    chain: list[_Candidate] = []
    bns: list[tuple[str, int, int]] = []  # (prefix, size, position)
    recurrent = recurrent_entries(tensors)
    for pos, (key, arr) in enumerate(tensors.items()):
        if key in recurrent:
            events.append(recurrent[key])
            continue
        if key.endswith("running_mean") and arr.ndim == 1:
            bns.append((key[: -len("running_mean")].rstrip("."), int(arr.shape[0]), pos))
            continue
        if arr.ndim < 2 or (not is_float(arr) and not _is_weight_key(key)):
            continue
        reason = _not_a_layer(key, arr)
        if reason is not None:
            if reason:
                name = key[: -len(".weight_v")] if key.endswith(".weight_v") else layer_name(key)
                events.append(SkippedLayer(name=name, reason=reason))
            continue
        cand = _Candidate(layer_name(key), _KINDS[arr.ndim], arr, pos)
        cand.problem = _value_problem(arr)
        _set_given_groups(cand, groups, known_groups)
        chain.append(cand)
        events.append(cand)
    if ordered:
        _ordered_producers(chain, known_producers)
    else:
        _orderless_producers(chain, known_producers)
    _pair_batchnorms(chain, bns, tensors, ordered)
    layers: list[LayerWeights] = []
    skipped: list[SkippedLayer] = []
    for ev in events:
        if isinstance(ev, LayerWeights):
            layers.append(ev)
        elif isinstance(ev, SkippedLayer):
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
    if not is_float(arr):
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


VALUE_CHUNK = 1 << 22
"""Elements checked at a time for NaN/Inf and zeros (bounded temporaries for huge layers)."""


def _value_problem(w: np.ndarray) -> str | None:
    """NaN/Inf, a single filter, or all zeros; a file-mapped ``w`` is released afterwards."""
    if w.shape[0] == 1:
        return ONE_FILTER_REASON if _finite(w) else NAN_REASON
    flat = w.reshape(w.shape[0], -1)
    rows = max(1, VALUE_CHUNK // max(flat.shape[1], 1))
    nonzero = False
    for start in range(0, flat.shape[0], rows):
        block = _native(flat[start : start + rows])
        if not np.isfinite(block).all():
            release(w)
            return NAN_REASON
        nonzero = nonzero or bool(np.any(block))
    release(w)
    return None if nonzero else DEAD_REASON


def _finite(w: np.ndarray) -> bool:
    ok = bool(np.isfinite(_native(w)).all())
    release(w)
    return ok


def _native(a: np.ndarray) -> np.ndarray:
    """numpy floats as they are; bfloat16/float8 as float32 (exact)."""
    return a if a.dtype.kind == "f" else np.asarray(a, dtype=np.float32)


def _set_given_groups(
    cand: _Candidate, manifest: Mapping[str, int], known: Mapping[str, int]
) -> None:
    """Groups from the manifest or the file; inference happens later, with order in hand."""
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


def _ordered_producers(chain: list[_Candidate], known: Mapping[str, str | None]) -> None:
    for i, cand in enumerate(chain):
        prev = chain[i - 1] if i else None
        if (
            cand.groups_source == "default"
            and cand.dw_shaped
            and prev is not None
            and prev.out == cand.out
        ):
            cand.groups, cand.groups_source = cand.out, "inferred"
        if cand.is_depthwise:
            cand.producer = known[cand.name] if cand.name in known else _nearest_producer(chain, i)


def _nearest_producer(chain: list[_Candidate], i: int) -> str | None:
    """The nearest layer before ``chain[i]`` with as many outputs (through depthwise convs)."""
    for prev in reversed(chain[:i]):
        if prev.out == chain[i].out:
            return prev.producer if prev.is_depthwise else prev.name
    return None


NAME_INFERENCE_BUDGET = 4_000_000
"""Most (depthwise-shaped layers × layers) for inferring producers from names: each search
scans the names, so a hostile file of thousands of flat depthwise-shaped layers would cost
quadratic time. Beyond it those layers stay regular convs (a manifest or ONNX says more)."""


def _orderless_producers(chain: list[_Candidate], known: Mapping[str, str | None]) -> None:
    if sum(c.dw_shaped for c in chain) * len(chain) > NAME_INFERENCE_BUDGET:
        return
    order = NameOrder({c.name: (c.out, int(c.weight.shape[1])) for c in chain})
    by_name = {c.name: c for c in chain}
    seen: set[str] = set()

    def resolve(cand: _Candidate) -> None:
        if cand.name in seen:
            return  # done, or in progress (a cycle of depthwise convs: producer unknown)
        seen.add(cand.name)
        if not cand.dw_shaped or (cand.groups_source != "default" and not cand.is_depthwise):
            return
        found, name = order.producer(cand.name)
        if cand.groups_source == "default":
            if not found:
                return
            cand.groups, cand.groups_source = cand.out, "inferred"
        if cand.name in known:
            cand.producer = known[cand.name]
        elif name is not None:
            prod = by_name[name]
            resolve(prod)
            cand.producer = prod.producer if prod.is_depthwise else prod.name

    for cand in chain:
        resolve(cand)


def _pair_batchnorms(
    chain: list[_Candidate],
    bns: list[tuple[str, int, int]],
    tensors: Mapping[str, np.ndarray],
    ordered: bool,
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
    if not ordered:
        layers = {c.name: (c.out, c.producer) for c in chain}
        free = [c.name for c in chain if c.bn is None]
        for bn, name in pair_bns_by_parent([(p, s) for p, s, _ in pending], layers, free):
            _attach(by_name[name], bn, tensors)
        return
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
    if bias is not None and (bias.shape != (cand.out,) or not is_float(bias)):
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
        producer=cand.producer if cand.is_depthwise else None,
    )

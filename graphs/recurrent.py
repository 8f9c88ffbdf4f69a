"""Recurrent layers (LSTM, GRU, vanilla RNN and their cells) as graphs of hidden units.

A hidden unit is a vertex. In PyTorch's layout a layer's ``weight_ih`` (G·H, in) and
``weight_hh`` (G·H, H) stack G gates of H rows each (LSTM: i, f, g, o; GRU: r, z, n; RNN: one),
so unit j owns rows j, H+j, …, (G−1)·H+j of both, and column j of ``weight_hh`` (what it feeds
back into every gate). Its vector is those rows of ``weight_ih``, those rows of ``weight_hh`` and
that column of ``weight_hh``, each part scaled to unit RMS (:meth:`graphs.layers.LayerGroup.
vectors`), like the members of a coupled group. With a manifest the unit's columns in its
consumers' inputs (the next layer's ``weight_ih``, a linear head) join the vector as well.

Layers are recognised by their parameter names: ``{module}.weight_ih_l{k}[_reverse]`` and
``weight_hh_l{k}[_reverse]`` (``nn.LSTM``/``nn.GRU``/``nn.RNN``; every layer k and each direction
of a bidirectional layer is a group of its own), ``{module}.weight_ih``/``weight_hh``
(``nn.LSTMCell``/``nn.GRUCell``/``nn.RNNCell``). The gate count is ``weight_hh``'s rows over its
columns. In the :class:`~graphs.layers.LayerWeights` of such a matrix, ``name`` is the parameter's
full name (``rnn.weight_ih_l0``), ``kind`` is ``linear`` and ``bias`` is the matching
``bias_ih``/``bias_hh``.

A manifest (``clients.build_manifest``) couples every layer and direction of one ``nn.LSTM``
(``nn.GRU``, ``nn.RNN``) into one group of ``hidden_size`` units, the only change such a module
can express (one ``hidden_size`` for all of them): vertex j is unit j of each layer and direction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from graphs.layers import Coupling, LayerGroup, LayerWeights
from graphs.manifest import ChannelGroup, Manifest, ParamAxis
from graphs.report import SkippedLayer

Cell = Literal["lstm", "gru", "rnn"]
GATES: dict[Cell, int] = {"lstm": 4, "gru": 3, "rnn": 1}
CELLS: dict[int, Cell] = {g: c for c, g in GATES.items()}
KIND = "recurrent"
"""The report's ``kind`` of a group of hidden units."""

RECURRENT_PARAM = re.compile(
    r"^(?:(?P<module>.*)\.)?(?P<what>weight|bias)_(?P<mat>ih|hh|hr)(?P<suffix>(?:_l\d+)?(?:_reverse)?)$"
)
"""A recurrent module's parameter: ``rnn.weight_ih_l0``, ``rnn.bias_hh_l1_reverse``,
``cell.weight_hh``, ``lstm.weight_hr_l0`` (an LSTM with ``proj_size``)."""

NO_MAPS_REASON = (
    "recurrent hidden units have no captured feature maps, so data-aware analysis (ci, "
    "vectors=activations) does not cover them; analyse without activations to score them"
)
PROJ_REASON = (
    "LSTM with proj_size (weight_hr): the hidden state is a projection of the cell's units, which "
    "is not analysed; its weights are skipped"
)


def parse(name: str) -> tuple[str, str, str, str] | None:
    """``(module, weight|bias, ih|hh|hr, suffix)`` of a recurrent parameter name, else None."""
    m = RECURRENT_PARAM.match(name)
    if m is None:
        return None
    return m["module"] or "", m["what"], m["mat"], m["suffix"]


def param_name(module: str, what: str, mat: str, suffix: str) -> str:
    """The parameter's name: ``param_name("rnn", "bias", "ih", "_l0")`` is ``rnn.bias_ih_l0``."""
    return f"{module}.{what}_{mat}{suffix}" if module else f"{what}_{mat}{suffix}"


def gates_of(ih_shape: Sequence[int], hh_shape: Sequence[int]) -> tuple[Cell, int] | str:
    """``(cell, hidden size)`` of a layer from its ``weight_ih`` and ``weight_hh`` shapes, or
    why they are not one recurrent layer's."""
    if len(ih_shape) != 2 or len(hh_shape) != 2:
        return "recurrent weights must be matrices"
    rows, hidden = int(hh_shape[0]), int(hh_shape[1])
    if hidden < 1 or rows % hidden or rows // hidden not in CELLS:
        return (
            f"weight_hh of shape {list(hh_shape)} is not 1, 3 or 4 gates of {hidden} hidden units "
            "(RNN, GRU, LSTM)"
        )
    if int(ih_shape[0]) != rows:
        return f"weight_ih has {ih_shape[0]} rows, weight_hh {rows}: not one recurrent layer"
    return CELLS[rows // hidden], hidden


@dataclass(frozen=True)
class RecurrentLayer:
    """One layer (and direction) of a recurrent module: its two weight matrices."""

    module: str
    suffix: str
    cell: Cell
    ih: LayerWeights
    hh: LayerWeights

    @property
    def hidden(self) -> int:
        return self.hh.shape[1]


def find_recurrent(layers: Sequence[LayerWeights]) -> list[RecurrentLayer]:
    """The recurrent layers among ``layers`` (pairs of ``weight_ih``/``weight_hh`` whose shapes
    fit; :func:`gates_of`), in the order of their ``weight_ih``."""
    by_name = {x.name: x for x in layers}
    out: list[RecurrentLayer] = []
    for x in layers:
        parsed = parse(x.name)
        if parsed is None or parsed[1:3] != ("weight", "ih"):
            continue
        module, _, _, suffix = parsed
        hh = by_name.get(param_name(module, "weight", "hh", suffix))
        if hh is None:
            continue
        got = gates_of(x.shape, hh.shape)
        if not isinstance(got, str):
            out.append(RecurrentLayer(module, suffix, got[0], x, hh))
    return out


def layer_group(
    layer: RecurrentLayer, *, coupling: Coupling = "inferred", group_id: int | None = None
) -> LayerGroup:
    """The hidden units of one layer and direction: rows of ``weight_ih`` and ``weight_hh`` in
    every gate, and columns of ``weight_hh``."""
    g = GATES[layer.cell]
    return LayerGroup(
        name=layer.ih.name,
        members=(layer.ih, layer.hh, layer.hh),
        coupling=coupling,
        group_id=group_id,
        unit="hidden",
        axes=((0, 1), (0, 1), (1, 1)),
        blocks=(g, g, 1),
    )


def recurrent_groups(
    layers: Sequence[LayerWeights],
) -> tuple[dict[str, LayerGroup], set[str]]:
    """Without a manifest: one group per recurrent layer and direction, by its first member's
    name, and the names of all the layers in them."""
    groups: dict[str, LayerGroup] = {}
    names: set[str] = set()
    for rl in find_recurrent(layers):
        group = layer_group(rl)
        groups[group.name] = group
        names |= {rl.ih.name, rl.hh.name}
    return groups, names


def without_hidden(groups: Sequence[LayerGroup]) -> tuple[list[LayerGroup], list[SkippedLayer]]:
    """``groups`` without the groups of hidden units, and those as skipped layers (reason
    :data:`NO_MAPS_REASON`): what data-aware analysis covers."""
    kept = [g for g in groups if g.unit != "hidden"]
    skipped = [
        SkippedLayer(name=m.name, reason=NO_MAPS_REASON)
        for g in groups
        if g.unit == "hidden"
        for m in g.producers
    ]
    return kept, skipped


def hidden_kept(group: LayerGroup, ok: bool, with_maps: bool) -> str | None:
    """A plan's rationale for hidden units it keeps whole because it cannot plan them: without a
    manifest, or with feature maps; None otherwise."""
    if group.unit != "hidden" or ok:
        return None
    if with_maps:
        return f"not pruned: {NO_MAPS_REASON}"
    if group.coupling != "manifest":
        return (
            "not pruned: recurrent hidden units are planned only with a manifest "
            "(clients.build_manifest knows their consumers and the module's one hidden_size)"
        )
    return None


def _weight_param(m: LayerWeights) -> str:
    """A member's weight parameter: its name for recurrent matrices, else ``{name}.weight``."""
    return m.name if parse(m.name) is not None else f"{m.name}.weight"


def _bias_param(m: LayerWeights) -> str:
    parsed = parse(m.name)
    if parsed is None:
        return f"{m.name}.bias"
    module, _, mat, suffix = parsed
    return param_name(module, "bias", mat, suffix)


def group_params(group: LayerGroup) -> list[ParamAxis]:
    """Every (parameter, axis, entries per unit, blocks) a group of hidden units shrinks: its
    weights' axes once each, and the biases of the row members."""
    out: dict[tuple[str, int], ParamAxis] = {}
    blocks = group.blocks or (1,) * len(group.members)
    for m, (axis, per), b in zip(group.members, group.axes, blocks, strict=True):
        pa = ParamAxis(param=_weight_param(m), axis=axis, per_channel=per, blocks=b)
        out.setdefault((pa.param, axis), pa)
        if axis == 0 and m.bias is not None:
            bias = ParamAxis(param=_bias_param(m), axis=0, per_channel=per, blocks=b)
            out.setdefault((bias.param, 0), bias)
    return list(out.values())


def cost_axes(group: LayerGroup) -> list[tuple[str, list[int], list[tuple[int, int]]]]:
    """Without a manifest: ``(parameter, shape, [(axis, entries per unit), ...])`` of every
    tensor the group shrinks (weights and biases), for :class:`graphs.cost.CostModel`."""
    shapes = {_weight_param(m): list(m.shape) for m in group.members}
    shapes |= {_bias_param(m): [m.shape[0]] for m in group.members if m.bias is not None}
    axes: dict[str, list[tuple[int, int]]] = {}
    for pa in group_params(group):
        axes.setdefault(pa.param, []).append((pa.axis, pa.per_channel * pa.blocks))
    return [(name, shapes[name], a) for name, a in axes.items()]


def manifest_groups(
    layers: Sequence[LayerWeights], manifest: Manifest
) -> tuple[dict[int, LayerGroup], list[SkippedLayer], set[str]]:
    """The manifest's groups of hidden units (``unit == "hidden"``) as layer groups (id ->
    group), the layers of those it cannot build (a weight the checkpoint lacks or of another
    width) with the reason, and the names of every recurrent layer they cover.

    A group's vertex is the hidden unit in every (weight, axis) the manifest lists whose weight
    is a recurrent matrix or a linear layer of the checkpoint; other entries (a conv consumer,
    biases) are pruned with the unit but not part of its vector.
    """
    by_param = {_weight_param(x): x for x in layers if x.kind == "linear"}
    out: dict[int, LayerGroup] = {}
    skipped: list[SkippedLayer] = []
    covered: set[str] = set()
    for g in manifest.groups:
        if g.unit != "hidden":
            continue
        own = [pa for pa in g.params if (p := parse(pa.param)) is not None and p[1] == "weight"]
        covered |= {pa.param for pa in own}
        made = _manifest_group(g, by_param)
        if isinstance(made, str):
            skipped += [SkippedLayer(name=n, reason=made) for n in sorted({pa.param for pa in own})]
        else:
            out[g.id] = made
    return out, skipped, covered


def _manifest_group(g: ChannelGroup, by_param: dict[str, LayerWeights]) -> LayerGroup | str:
    parts = [pa for pa in g.params if pa.param in by_param]
    missing = [
        pa.param
        for pa in g.params
        if pa.param not in by_param and (p := parse(pa.param)) is not None and p[1] == "weight"
    ]
    if missing or not parts:
        return (
            f"the manifest's recurrent group {g.id} needs {', '.join(missing) or 'weights'}, which "
            "the checkpoint does not hold: rebuild the manifest from this model"
        )
    members = tuple(by_param[pa.param] for pa in parts)
    try:
        group = LayerGroup(
            name=members[0].name,
            members=members,
            coupling="manifest",
            group_id=g.id,
            unit="hidden",
            axes=tuple((pa.axis, pa.per_channel) for pa in parts),
            blocks=tuple(pa.blocks for pa in parts),
        )
    except ValueError:
        group = None
    if group is None or group.n_filters != g.channels:
        return (
            f"the manifest says {g.channels} hidden units for group {g.id}; the checkpoint's "
            "weights differ: rebuild the manifest from this model"
        )
    return group

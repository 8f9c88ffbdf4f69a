"""Params and MACs of a model as a function of how many channels each group keeps.

Exact with a manifest (every parameter tensor and every MAC-counting module is listed with the
channel groups that shrink it); without one, an estimate from the checkpoint's layers alone (see
:meth:`CostModel.from_layers`). Incremental: removing channels from one group updates only the
tensors and modules that group touches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphs.layers import LayerGroup, LayerWeights
from graphs.manifest import Manifest
from graphs.recurrent import cost_axes as recurrent_axes


@dataclass
class _Tensor:
    name: str
    shape: list[int]
    axes: list[tuple[int, int, int]]  # (axis, group id, entries per channel)


@dataclass
class _Module:
    macs: int
    out_group: int | None
    in_group: int | None


@dataclass
class CostModel:
    """Params/MACs bookkeeping over channel groups (ids → channel counts)."""

    channels: dict[int, int]
    tensors: list[_Tensor]
    modules: list[_Module]
    params_fixed: int  # parameters no group touches
    macs_fixed: int | None  # MACs no group scales; None: MACs unknown
    by_group: dict[int, list[int]] = field(init=False)
    mods_by_group: dict[int, list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_group = {g: [] for g in self.channels}
        for i, t in enumerate(self.tensors):
            for g in {g for _, g, _ in t.axes}:
                self.by_group[g].append(i)
        self.mods_by_group = {g: [] for g in self.channels}
        for i, m in enumerate(self.modules):
            for gid in {m.out_group, m.in_group}:
                if gid is not None:
                    self.mods_by_group[gid].append(i)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> CostModel:
        channels = {g.id: g.channels for g in manifest.groups}
        axes: dict[str, list[tuple[int, int, int]]] = {}
        for g in manifest.groups:
            for pa in g.params:
                axes.setdefault(pa.param, []).append((pa.axis, g.id, pa.per_channel * pa.blocks))
        tensors = [_Tensor(n, list(manifest.param_shapes[n]), a) for n, a in sorted(axes.items())]
        fixed = sum(int(np.prod(s)) for n, s in manifest.param_shapes.items() if n not in axes)
        modules = [_Module(c.macs, c.out_group, c.in_group) for c in manifest.costs]
        macs_fixed = manifest.macs_total - sum(c.macs for c in manifest.costs)
        return cls(channels, tensors, modules, fixed, macs_fixed)

    @classmethod
    def from_layers(cls, groups: Sequence[LayerGroup], params_total: int) -> CostModel:
        """Estimate without a manifest: a group shrinks its members' weights, biases and paired
        BatchNorms, and the input channels of its consumers (:func:`infer_consumers`). MACs are
        unknown."""
        channels = {i: g.n_filters for i, g in enumerate(groups)}
        tensors: list[_Tensor] = []
        for i, g in enumerate(groups):
            if g.unit == "hidden":  # recurrent units: gates of weights and biases, by name
                for name, shape, axes in recurrent_axes(g):
                    tensors.append(_Tensor(name, shape, [(a, i, per) for a, per in axes]))
                continue
            if g.unit != "channels":  # neurons/heads: every axis and bias by name, exactly
                for m, (axis, per) in zip(g.members, g.axes, strict=True):
                    tensors.append(_Tensor(f"{m.name}.weight", list(m.shape), [(axis, i, per)]))
                    if m.bias is not None:  # o's and down's biases keep their size
                        shrink = [(0, i, per)] if axis == 0 else []
                        tensors.append(_Tensor(f"{m.name}.bias", [m.shape[0]], shrink))
                continue
            for m in g.members:
                tensors.append(_Tensor(f"{m.name}.weight", list(m.shape), [(0, i, 1)]))
                rest = m.params - int(m.weight.size)
                if rest:  # bias and BN affine: one entry each per channel
                    per = rest // m.n_filters
                    tensors.append(
                        _Tensor(f"{m.name}.<per-channel>", [m.n_filters, per], [(0, i, 1)])
                    )
        for i, consumers in infer_consumers(groups).items():
            for j, per in consumers:
                weight = next(t for t in tensors if t.name == f"{groups[j].members[0].name}.weight")
                weight.axes.append((1, i, per))
        counted = sum(int(np.prod(t.shape)) for t in tensors)
        return cls(channels, tensors, [], max(params_total - counted, 0), None)

    # --- bookkeeping ---------------------------------------------------------------------------
    def _shape(self, t: _Tensor, kept: Mapping[int, int]) -> list[int]:
        shape = list(t.shape)
        for axis, g, per in t.axes:
            shape[axis] -= (self.channels[g] - kept[g]) * per
        return shape

    def _tensor_size(self, t: _Tensor, kept: Mapping[int, int]) -> int:
        return math.prod(self._shape(t, kept))

    def delta(self, kept: Mapping[int, int], group: int, new: int) -> tuple[int, float]:
        """Change of (params, MACs) when ``group`` goes from ``kept[group]`` to ``new`` channels,
        the other groups as in ``kept``; touches only what the group shrinks."""
        after = {**kept, group: new}
        dp = sum(
            self._tensor_size(self.tensors[i], after) - self._tensor_size(self.tensors[i], kept)
            for i in self.by_group[group]
        )
        dm = sum(
            self._module_macs(self.modules[i], after) - self._module_macs(self.modules[i], kept)
            for i in self.mods_by_group[group]
        )
        return dp, dm

    def _module_macs(self, m: _Module, kept: Mapping[int, int]) -> float:
        scale = 1.0
        if m.out_group is not None:
            scale *= kept[m.out_group] / self.channels[m.out_group]
        if m.in_group is not None:
            scale *= kept[m.in_group] / self.channels[m.in_group]
        return m.macs * scale

    def params(self, kept: Mapping[int, int] | None = None) -> int:
        k = self.channels if kept is None else kept
        return self.params_fixed + sum(self._tensor_size(t, k) for t in self.tensors)

    def macs(self, kept: Mapping[int, int] | None = None) -> int | None:
        if self.macs_fixed is None:
            return None
        k = self.channels if kept is None else kept
        return round(self.macs_fixed + sum(self._module_macs(m, k) for m in self.modules))

    def shapes(self, kept: Mapping[int, int] | None = None) -> dict[str, list[int]]:
        """Shapes after pruning of every tensor the model tracks (placeholders excluded)."""
        k = self.channels if kept is None else kept
        return {t.name: self._shape(t, k) for t in self.tensors if "<" not in t.name}


def infer_consumers(groups: Sequence[LayerGroup]) -> dict[int, list[tuple[int, int]]]:
    """Without a manifest: which later groups read each group's channels, by position.

    The consumer of group i is the first later layer that takes exactly its channels (a conv
    with that many input channels, or a linear whose inputs are a whole multiple of them, as
    after a flatten), together with the layers right after it that take the same input (heads
    side by side, as in MTCNN). Returns ``{i: [(j, entries per channel), ...]}``; a group with
    no consumer is a model output. Transformer groups (neurons, heads) contain their consumers
    and are never consumers of another group (they read the residual stream).
    """

    def fan(layer: LayerWeights) -> int:
        return layer.shape[1] * layer.groups if layer.kind != "linear" else layer.shape[1]

    def takes(layer: LayerWeights, n: int, flatten: bool) -> bool:
        f = fan(layer)
        return layer.groups == 1 and (f == n or (flatten and layer.kind == "linear" and f % n == 0))

    heads = [g.members[0] for g in groups]
    plain = [g.unit == "channels" for g in groups]
    out: dict[int, list[tuple[int, int]]] = {}
    for i, g in enumerate(groups):
        n = g.n_filters
        flat = heads[i].kind != "linear"  # only a conv's output is flattened into a linear
        first = next(
            (
                j
                for j in range(i + 1, len(groups))
                if groups[j].unit == "hidden" or (plain[j] and takes(heads[j], n, flat))
            ),
            None,
        )
        if first is not None and groups[first].unit == "hidden":
            continue  # read by a recurrent layer (weight_ih): not expressed without a manifest
        if first is None or not plain[i]:
            continue
        out[i] = [(first, fan(heads[first]) // n)]
        for j in range(first + 1, len(groups)):
            if not plain[j] or fan(heads[j]) != fan(heads[first]) or not takes(heads[j], n, flat):
                break
            out[i].append((j, fan(heads[j]) // n))
    return out

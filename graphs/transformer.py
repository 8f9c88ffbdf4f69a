"""Transformer blocks as neuron graphs: FFN neurons and attention heads as vertices.

Found from layer names alone (a prefix ending in the block's index, e.g. ``encoder.layer.3`` or
``model.layers.3``):

========================  ===============================================  ===================
block                     BERT-style                                       Llama-style
========================  ===============================================  ===================
attention q, k, v         ``attention.self.query``/``key``/``value``       ``self_attn.q_proj``…
attention o               ``attention.output.dense``                       ``self_attn.o_proj``
FFN up (gate)             ``intermediate.dense``                           ``mlp.up_proj``
                                                                           (``mlp.gate_proj``)
FFN down                  ``output.dense``                                 ``mlp.down_proj``
========================  ===============================================  ===================

- **FFN group** (unit ``neurons``): a vertex is an intermediate neuron; its vector is its row of
  up (and gate) and its column of down, each member scaled to unit RMS
  (:meth:`graphs.layers.LayerGroup.vectors`). Removing a neuron removes those rows and column.
- **Attention group** (unit ``heads``): a vertex is a k/v head together with the
  ``num_heads / num_kv_heads`` q heads that share it (one head each without grouped-query
  attention); its vector is its rows of q, k, v and its columns of o. Plans therefore remove
  whole GQA groups and never break the ratio. The number of heads is not in the weights: it
  comes from ``LayerWeights.heads`` (config.json next to the checkpoint) or a manifest's
  ``attention``; without it the block's q/k/v/o are skipped with :data:`NO_HEADS_REASON`.

(HF ViT's ``attention.attention.query``… is read like BERT's ``attention.self``.) A block
missing a member, or whose shapes do not fit, is left to the ordinary per-layer rules; fused
projections (``attn.qkv``, ``in_proj_weight``) are not split.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from graphs import recurrent
from graphs.layers import Coupling, LayerGroup, LayerWeights
from graphs.manifest import ChannelGroup, Heads, Manifest, ModuleCost, ParamAxis
from graphs.report import SkippedLayer

Part = Literal["q", "k", "v", "o", "up", "gate", "down"]
NO_HEADS_REASON = (
    "attention projection: the number of heads is not in the weights, so heads are not "
    "analysed; put the model's config.json (num_attention_heads, num_key_value_heads) next to "
    "the checkpoint, or pass a manifest built from the model"
)
KINDS = {"heads": "attention", "neurons": "ffn", "hidden": "recurrent"}
"""The report's ``kind`` of a transformer group."""

_RULES: tuple[tuple[re.Pattern[str], Literal["heads", "neurons"], Part], ...] = (
    (re.compile(r"^(.*\d)\.attention\.(?:self|attention)\.query$"), "heads", "q"),
    (re.compile(r"^(.*\d)\.attention\.(?:self|attention)\.key$"), "heads", "k"),
    (re.compile(r"^(.*\d)\.attention\.(?:self|attention)\.value$"), "heads", "v"),
    (re.compile(r"^(.*\d)\.attention\.output\.dense$"), "heads", "o"),
    (re.compile(r"^(.*\d)\.intermediate\.dense$"), "neurons", "up"),
    (re.compile(r"^(.*\d)\.output\.dense$"), "neurons", "down"),
    (re.compile(r"^(.*\d)\.self_attn\.([qkvo])_proj$"), "heads", "q"),
    (re.compile(r"^(.*\d)\.mlp\.(up|gate|down)_proj$"), "neurons", "up"),
)
_ORDER: dict[str, tuple[Part, ...]] = {
    "heads": ("q", "k", "v", "o"),
    "neurons": ("up", "gate", "down"),
}


@dataclass
class Block:
    """One attention block or FFN of a transformer layer, by the names of its linear layers."""

    prefix: str
    unit: Literal["heads", "neurons"]
    parts: dict[str, LayerWeights] = field(default_factory=dict)

    @property
    def members(self) -> list[LayerWeights]:
        return [self.parts[p] for p in _ORDER[self.unit] if p in self.parts]

    @property
    def complete(self) -> bool:
        need = ("q", "k", "v", "o") if self.unit == "heads" else ("up", "down")
        return all(p in self.parts for p in need)


def _match(name: str) -> tuple[str, Literal["heads", "neurons"], Part] | None:
    for pattern, unit, part in _RULES:
        m = pattern.match(name)
        if m:
            found = m.group(2) if m.lastindex == 2 else part
            return m.group(1), unit, found  # type: ignore[return-value]
    return None


def find_blocks(layers: Sequence[LayerWeights]) -> list[Block]:
    """Complete attention blocks and FFNs of linear layers, in the order of their first member."""
    blocks: dict[tuple[str, str], Block] = {}
    for layer in layers:
        hit = _match(layer.name) if layer.kind == "linear" else None
        if hit is None:
            continue
        prefix, unit, part = hit
        block = blocks.setdefault((prefix, unit), Block(prefix, unit))
        if part in block.parts:  # two layers for one role: not a block we understand
            block.parts["?"] = layer
        block.parts[part] = layer
    return [b for b in blocks.values() if b.complete and "?" not in b.parts]


def attach_heads(layers: Sequence[LayerWeights], heads: dict[str, Heads]) -> list[LayerWeights]:
    """``layers`` with ``heads[name]`` set on the named attention projections that lack heads."""
    return [
        dataclasses.replace(x, heads=heads[x.name]) if x.heads is None and x.name in heads else x
        for x in layers
    ]


def heads_for(
    layers: Sequence[LayerWeights], n_heads: int, n_kv: int | None, head_dim: int | None
) -> dict[str, Heads]:
    """Heads of every attention block of ``layers`` from a model config (head_dim defaults to
    q's rows / num_heads); blocks the numbers do not fit get none (and are skipped later)."""
    out: dict[str, Heads] = {}
    for b in find_blocks(layers):
        if b.unit != "heads":
            continue
        rows = b.parts["q"].shape[0]
        d = head_dim or (rows // n_heads if n_heads and rows % n_heads == 0 else 0)
        kv = n_kv or n_heads
        if n_heads >= 1 and d >= 1 and kv >= 1 and n_heads % kv == 0:
            h = Heads(num_heads=n_heads, num_kv_heads=kv, head_dim=d)
            out.update({m.name: h for m in b.members})
    return out


def block_group(
    block: Block, *, coupling: Coupling = "inferred", group_id: int | None = None
) -> LayerGroup | str | None:
    """The block's group; a reason to skip its layers (attention without heads, or heads that
    do not fit the weights); None when its shapes are not a block's (left to the other rules)."""
    p = block.parts
    if block.unit == "neurons":
        up, down = p["up"], p["down"]
        gate = p.get("gate")
        n = up.shape[0]
        if down.shape[1] != n or (gate is not None and gate.shape != up.shape):
            return None
        members = tuple(block.members)
        axes = tuple((1, 1) if m is down else (0, 1) for m in members)
        return LayerGroup(up.name, members, coupling, group_id, "neurons", axes)
    h = next((m.heads for m in block.members if m.heads is not None), None)
    if h is None:
        return NO_HEADS_REASON
    q, k, v, o = p["q"], p["k"], p["v"], p["o"]
    d, rep = h.head_dim, h.n_rep
    want = {
        "q rows": (q.shape[0], h.num_heads * d),
        "k rows": (k.shape[0], h.num_kv_heads * d),
        "v rows": (v.shape[0], h.num_kv_heads * d),
        "o columns": (o.shape[1], h.num_heads * d),
    }
    wrong = [f"{what} {got} ≠ {exp}" for what, (got, exp) in want.items() if got != exp]
    if wrong or not q.shape[1] == k.shape[1] == v.shape[1]:
        return (
            f"attention heads ({h.num_heads} heads, {h.num_kv_heads} k/v heads of {d}) do not "
            f"fit the weights ({', '.join(wrong) or 'q, k, v read different widths'}); fix "
            "config.json or the manifest"
        )
    axes = ((0, rep * d), (0, d), (0, d), (1, rep * d))
    return LayerGroup(q.name, (q, k, v, o), coupling, group_id, "heads", axes, h)


def group_params(group: LayerGroup, known: set[str] | None = None) -> list[ParamAxis]:
    """Every (parameter, axis, entries per vertex) a neuron/head group shrinks: weights on their
    axis, biases of row members. ``known``: the parameter names that exist (default: the
    layers' own biases)."""
    out: list[ParamAxis] = []
    for m, (axis, per) in zip(group.members, group.axes, strict=True):
        out.append(ParamAxis(param=f"{m.name}.weight", axis=axis, per_channel=per))
        has_bias = m.bias is not None if known is None else f"{m.name}.bias" in known
        if axis == 0 and has_bias:
            out.append(ParamAxis(param=f"{m.name}.bias", axis=0, per_channel=per))
    return out


def plan_fields(group: LayerGroup) -> dict[str, object]:
    """The extra :class:`graphs.plan.GroupPlan` fields of a neuron/head group ({} otherwise)."""
    if group.unit == "channels":
        return {}
    if group.unit == "hidden":
        return {"unit": "hidden", "params": recurrent.group_params(group)}
    return {"unit": group.unit, "params": group_params(group), "heads": group.heads}


def adapt_manifest(layers: Sequence[LayerWeights], manifest: Manifest) -> Manifest:
    """The manifest with each transformer block's channel groups merged into one group of its
    vertices (keeping the lowest of their ids; channels = neurons or k/v heads, every axis
    ``per`` entries per vertex), and the module costs they scaled moved to it. An attention
    block that cannot be merged (no heads; channel groups that also shrink parameters outside
    the block) gets its channel groups marked unprunable: their channels are parts of heads.
    Idempotent."""
    known = set(manifest.param_shapes)
    groups = list(manifest.groups)
    moved: dict[int, int] = {}
    for _, axes, group in _manifest_blocks(layers, manifest):
        touched = [g for g in groups if any((pa.param, pa.axis) in axes for pa in g.params)]
        if not touched:
            continue
        why = group if isinstance(group, str) else "its channels are parts of attention heads"
        if isinstance(group, LayerGroup):
            params = group_params(group, known)
            fits = all(
                pa.param in known
                and manifest.param_shapes[pa.param][pa.axis] == pa.per_channel * group.n_filters
                for pa in params
            ) and all((pa.param, pa.axis) in axes for g in touched for pa in g.params)
            if fits:
                gid = min(g.id for g in touched)
                merged = ChannelGroup(
                    id=gid,
                    channels=group.n_filters,
                    producers=[m.name for m in group.producers],
                    params=params,
                    prunable=all(g.prunable for g in touched),
                    reason="; ".join(dict.fromkeys(g.reason for g in touched if g.reason)) or None,
                )
                moved.update({g.id: gid for g in touched})
                groups = [
                    merged if g.id == gid else g for g in groups if g not in touched or g.id == gid
                ]
                continue
            if group.unit == "neurons":
                continue  # neurons are channels: the manifest's own groups are right
        groups = [
            g.model_copy(update={"prunable": False, "reason": why}) if g in touched else g
            for g in groups
        ]
    costs = [_move(c, moved) for c in manifest.costs]
    return manifest.model_copy(update={"groups": groups, "costs": costs})


def _move(c: ModuleCost, moved: dict[int, int]) -> ModuleCost:
    og = moved.get(c.out_group, c.out_group) if c.out_group is not None else None
    ig = moved.get(c.in_group, c.in_group) if c.in_group is not None else None
    if (og, ig) == (c.out_group, c.in_group):
        return c
    return c.model_copy(update={"out_group": og, "in_group": ig})


def _manifest_blocks(
    layers: Sequence[LayerWeights], manifest: Manifest
) -> list[tuple[set[str], set[tuple[str, int]], LayerGroup | str]]:
    """Blocks as (member names, the (parameter, axis) pairs of their vertices, their group or why
    it cannot be analysed), heads from the layers or else from the manifest's ``attention``."""
    heads = {n: a.heads for a in manifest.attention for n in (a.q, a.k, a.v, a.o)}
    out: list[tuple[set[str], set[tuple[str, int]], LayerGroup | str]] = []
    for b in find_blocks(attach_heads(layers, heads)):
        g = block_group(b, coupling="manifest")
        if g is None:
            continue
        axes: set[tuple[str, int]] = set()
        for part, m in b.parts.items():
            axis = 1 if part in ("o", "down") else 0
            axes |= {(f"{m.name}.weight", axis)} | ({(f"{m.name}.bias", 0)} if axis == 0 else set())
        out.append(({m.name for m in b.members}, axes, g))
    return out


def manifest_block_groups(
    layers: Sequence[LayerWeights], manifest: Manifest
) -> tuple[dict[int, LayerGroup], list[SkippedLayer], set[str], set[tuple[str, int]]]:
    """For an adapted manifest (:func:`adapt_manifest`): its groups that are transformer blocks
    (id -> group), the layers of attention blocks that cannot be analysed with the reason, the
    names of all those layers, and the (parameter, axis) pairs of their vertices (no other
    channel group over them is analysed)."""
    by_id: dict[int, LayerGroup] = {}
    skipped: list[SkippedLayer] = []
    names: set[str] = set()
    vertex_axes: set[tuple[str, int]] = set()
    for members, axes, group in _manifest_blocks(layers, manifest):
        producers = {m.name for m in group.producers} if isinstance(group, LayerGroup) else set()
        g = next((g for g in manifest.groups if set(g.producers) == producers), None)
        if isinstance(group, LayerGroup) and g is not None and g.channels == group.n_filters:
            by_id[g.id] = dataclasses.replace(group, group_id=g.id)
        elif isinstance(group, LayerGroup) and group.unit == "neurons":
            continue
        else:
            why = group if isinstance(group, str) else "its heads are not one group of the manifest"
            skipped += [SkippedLayer(name=n, reason=why) for n in sorted(members)]
        names |= members
        vertex_axes |= axes
    return by_id, skipped, names, vertex_axes

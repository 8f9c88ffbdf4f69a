"""Orderless checkpoints (safetensors): depthwise producers and BN pairs from layer names alone.

safetensors writers sort tensors by name, so the checkpoint order that "the nearest preceding
layer" rules rely on is lost. Names still carry order where they hold Sequential/ModuleList
indices: inside one container ``features.2`` runs before ``features.10``, whereas the order of
named children (``conv_pw``, ``conv_dw``, ``conv_pwl``) is unknown. A module's *parent* is its
name without the last dotted component (``blocks.0.conv_dw`` -> ``blocks.0``).

Producer of a depthwise-shaped conv D (weight (C, 1, *k)), walking D's name components from the
last one up, at each level with parent P and D's component c:

- c is a number: the nearest numbered sibling ``P.j`` (j < c) that holds layers decides. Its
  output layer (:meth:`NameOrder.producer` documents it) is the producer if it has C outputs;
  otherwise D has no producer and is not depthwise. With no earlier sibling, go one level up.
  (``features.2.conv.1.0`` -> ``features.2.conv.0.0``; ``features.1.conv.0.0`` ->
  ``features.0.0``, the last layer of the previous block.)
- c is a name: the layers of width C among P's other named children. One with C *input*
  channels may be D's consumer rather than its producer and is not accepted. Exactly one
  accepted -> the producer; some of width C but not exactly one accepted -> depthwise with an
  unknown producer. With no named sibling of width C, the layers of width C inside the named
  siblings' submodules are looked at the same way (an SE block's ``se.conv_expand`` therefore
  only counts when no direct sibling has width C), except that several of them there are too
  weak a sign: D is then not depthwise. None at all -> go one level up.

Layers shaped (C, 1, ...) themselves are candidates only where nothing else is.

BatchNorms, after pairing by name (``x.bn1`` <-> ``x.conv1``, ``seq.2`` <-> ``seq.1``), pair only
within their parent: a numbered BN with the nearest lower-numbered free layer of its width; named
BNs of one width (in name order: ``bn1``, ``bn2``, ...) with the parent's named free layers of
that width, only when there are as many layers as BNs and their data order is known from
depthwise producers (a producer runs before its depthwise conv).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from service.ingest.detect import natural_key

Found = tuple[bool, str | None]
"""``(False, None)``: no producer (not depthwise); ``(True, None)``: ambiguous; else the name."""


class NameOrder:
    """Producer search over ``name -> (out channels, in channels per group)``."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        self.shapes = dict(shapes)
        self.parts = {n: n.split(".") if n else [] for n in shapes}

    def producer(self, name: str) -> Found:
        """The producer of depthwise-shaped layer ``name`` (see the module docstring)."""
        width = self.shapes[name][0]
        parts = self.parts[name]
        for depth in range(len(parts) - 1, -1, -1):
            parent, comp = parts[:depth], parts[depth]
            others = [
                (n, p[depth])
                for n, p in self.parts.items()
                if len(p) > depth and p[:depth] == parent and p[depth] != comp
            ]
            if comp.isdigit():
                earlier = [c for _, c in others if c.isdigit() and int(c) < int(comp)]
                if earlier:
                    return self._output([*parent, max(earlier, key=int)], width)
                continue
            named = [n for n, c in others if not c.isdigit() and self.shapes[n][0] == width]
            direct = self._prefer_regular([n for n in named if len(self.parts[n]) == depth + 1])
            nested = self._prefer_regular([n for n in named if len(self.parts[n]) > depth + 1])
            for pool in (direct, nested):
                accepted = [n for n in pool if self.shapes[n][1] != width]
                if len(accepted) == 1:
                    return True, accepted[0]
                if pool:  # several direct siblings: depthwise; deeper layers: too weak to infer
                    return pool is direct, None
        return False, None

    def _output(self, prefix: list[str], width: int) -> Found:
        """The output layer of the subtree ``prefix``, if it has ``width`` outputs.

        A layer with no submodules is its own output; a container whose children are all
        numbered outputs through its highest-numbered child; otherwise the subtree's unique layer
        of that width is the output (several: ambiguous).
        """
        depth = len(prefix)
        inside = [n for n, p in self.parts.items() if p[:depth] == prefix]
        children = {self.parts[n][depth] for n in inside if len(self.parts[n]) > depth}
        if not children:
            name = inside[0]
            return (True, name) if self.shapes[name][0] == width else (False, None)
        if all(c.isdigit() for c in children):
            return self._output([*prefix, max(children, key=int)], width)
        pool = self._prefer_regular([n for n in inside if self.shapes[n][0] == width])
        if len(pool) == 1:
            return True, pool[0]
        return (True, None) if pool else (False, None)

    def _prefer_regular(self, names: list[str]) -> list[str]:
        regular = [n for n in names if self.shapes[n][1] != 1]
        return regular or names


def pair_bns_by_parent(
    bns: Sequence[tuple[str, int]],
    layers: Mapping[str, tuple[int, str | None]],
    free: Sequence[str],
) -> list[tuple[str, str]]:
    """(BN, layer) pairs within parents (see the module docstring).

    Args:
        bns: unpaired BatchNorms as ``(prefix, size)``.
        layers: every layer as ``name -> (out channels, depthwise producer or None)``.
        free: names of the layers that have no BN yet.
    """
    left = [n for n in free if n]
    pairs: list[tuple[str, str]] = []
    named: dict[tuple[str, int], list[str]] = {}
    for bn, size in sorted(bns, key=lambda b: natural_key(b[0])):
        parent, _, last = bn.rpartition(".")
        if not last.isdigit():
            named.setdefault((parent, size), []).append(bn)
            continue
        below = [
            n
            for n in left
            if _split(n)[0] == parent
            and _split(n)[1].isdigit()
            and int(_split(n)[1]) < int(last)
            and layers[n][0] == size
        ]
        if below:
            match = max(below, key=lambda n: int(_split(n)[1]))
            pairs.append((bn, match))
            left.remove(match)
    for (parent, size), group in named.items():
        cands = [
            n
            for n in left
            if _split(n)[0] == parent and not _split(n)[1].isdigit() and layers[n][0] == size
        ]
        if len(cands) != len(group):
            continue
        rank = {n: _depth_among(n, set(cands), layers) for n in cands}
        if len(set(rank.values())) == len(cands):
            pairs += zip(group, sorted(cands, key=rank.__getitem__), strict=True)
    return pairs


def _split(name: str) -> tuple[str, str]:
    parent, _, last = name.rpartition(".")
    return parent, last


def _depth_among(name: str, group: set[str], layers: Mapping[str, tuple[int, str | None]]) -> int:
    """How many producer links lead from ``name`` back through layers of ``group``."""
    depth = 0
    producer = layers[name][1]
    while producer in group and depth < len(group):
        depth += 1
        producer = layers[producer][1] if producer is not None else None
    return depth

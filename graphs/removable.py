"""How much of a model its redundant channels are: the model-level figure of reports and of the
CI gate (``prunegraph check --max-redundancy``).

A group with redundancy ``r`` over ``n`` channels has ``round(r · n)`` redundant channels.
Removing them removes the producers' rows, biases and norm entries and the consumers' input
slices; the figure is the fraction of the model's parameters (and of its MACs, with a manifest)
that removing every group's redundant channels at once would remove. A parameter entry that
loses both its row and its column (a layer whose outputs and inputs are both redundant) counts
once: the cost model sizes every tensor as the product of its kept extents
(:class:`graphs.cost.CostModel`, the planner's own). Exact with a manifest; without one, the
planner's estimate from the layers alone (consumers by :func:`graphs.cost.infer_consumers`;
MACs unknown).

Model outputs are left whole: removing a classifier's rows would remove outputs (classes), not
redundancy. They are the manifest's ``classifier`` layers or, without a manifest, the channel
groups no other layer reads.

Unlike the params-weighted mean of per-layer redundancy, this figure cannot be diluted by a
large layer that is not redundant itself: widening every conv of a network 2× by duplicated
filters removes about half of every widened layer *and* of its consumer's inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from graphs.cost import CostModel, infer_consumers
from graphs.errors import InvalidInputError
from graphs.layers import LayerGroup
from graphs.manifest import Manifest
from graphs.report import LayerRemoval, Removal


def redundant_channels(redundancy: float, n: int) -> int:
    """``round(redundancy · n)`` (halves up), the channels a group's redundancy stands for."""
    return min(n, max(0, math.floor(redundancy * n + 0.5)))


def cost_model(
    groups: Sequence[LayerGroup], manifest: Manifest | None, params_total: int
) -> tuple[CostModel, list[int], bool]:
    """The planner's cost model over ``groups``, each group's id in it, and whether it is exact
    (a manifest that covers every group; otherwise the estimate from the layers alone)."""
    if manifest is not None and all(g.group_id is not None for g in groups):
        return CostModel.from_manifest(manifest), [int(g.group_id or 0) for g in groups], True
    return CostModel.from_layers(groups, params_total), list(range(len(groups))), False


def output_groups(groups: Sequence[LayerGroup], manifest: Manifest | None) -> set[int]:
    """Positions of the groups whose channels are model outputs (left whole)."""
    if manifest is not None and all(g.group_id is not None for g in groups):
        role = {layer.name: layer.role for layer in manifest.layers}
        return {i for i, g in enumerate(groups) if role.get(g.name) == "classifier"}
    consumed = infer_consumers(groups)
    return {i for i, g in enumerate(groups) if g.unit == "channels" and i not in consumed}


def _fraction(removed: float, total: int | None) -> float:
    return round(min(max(removed / total, 0.0), 1.0), 6) if total else 0.0


def removable(
    groups: Sequence[LayerGroup],
    redundancy: Sequence[float],
    *,
    manifest: Manifest | None = None,
    params_total: int,
    top: int = 5,
) -> Removal:
    """What removing every group's redundant channels would remove from the model.

    Args:
        groups: the analysed groups, in report order.
        redundancy: each group's redundancy in [0, 1] (one method's), same order.
        manifest: the (adapted) manifest the groups were made with, or None.
        params_total: the model's parameters (the checkpoint's count; with a manifest that
            covers every group, the manifest's own total is used).
        top: how many groups to list in ``largest``.

    Returns:
        a :class:`graphs.report.Removal`: fractions of parameters (and MACs with a manifest)
        rounded to 6 digits, the counts removed, and the groups whose redundant channels alone
        remove the most.

    Raises:
        InvalidInputError: lengths differ, a redundancy outside [0, 1], or params_total < 0.
    """
    if len(redundancy) != len(groups):
        raise InvalidInputError(
            f"{len(redundancy)} redundancies for {len(groups)} groups",
            hint="Pass one redundancy per group, in the groups' order.",
        )
    if any(not 0 <= r <= 1 for r in redundancy) or params_total < 0 or top < 0:
        raise InvalidInputError(
            "redundancies must be in [0, 1], params_total and top ≥ 0",
            hint="Pass the redundancies of a report's layers and the checkpoint's parameters.",
        )
    cost, ids, exact = cost_model(groups, manifest, params_total)
    outputs = output_groups(groups, manifest)
    full = dict(cost.channels)
    kept = dict(full)
    cut: dict[int, int] = {}
    for i, (g, r) in enumerate(zip(groups, redundancy, strict=True)):
        if i not in outputs:
            cut[i] = redundant_channels(r, g.n_filters)
            kept[ids[i]] = full[ids[i]] - cut[i]
    p_total, m_total = cost.params(), cost.macs()
    p_removed = p_total - cost.params(kept)
    m_after = cost.macs(kept)
    m_removed = m_total - m_after if m_total is not None and m_after is not None else None
    alone: list[tuple[float, str, LayerRemoval]] = []
    for i, n in cut.items():
        if n == 0:
            continue
        dp, dm = cost.delta(full, ids[i], full[ids[i]] - n)
        flops = _fraction(-dm, m_total) if m_total is not None else None
        entry = LayerRemoval(
            name=groups[i].name, channels=n, params=_fraction(-dp, p_total), flops=flops
        )
        alone.append((entry.flops if entry.flops is not None else entry.params, entry.name, entry))
    alone.sort(key=lambda t: (-t[0], t[1]))
    return Removal(
        params=_fraction(p_removed, p_total),
        flops=_fraction(m_removed, m_total) if m_removed is not None else None,
        params_removed=p_removed,
        flops_removed=m_removed,
        exact=exact,
        largest=[e for _, _, e in alone[:top]],
    )

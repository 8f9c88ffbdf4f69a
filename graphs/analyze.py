"""The analysis entry point: every method on every group of a checkpoint, into a :class:`Report`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphs.cache import Cache
from graphs.errors import NoPrunableLayersError
from graphs.features import Activations, group_features
from graphs.grouping import build_groups
from graphs.layers import LayerGroup, LayerWeights
from graphs.manifest import Manifest
from graphs.options import AnalysisOptions, check_inputs
from graphs.recurrent import without_hidden
from graphs.removable import removable
from graphs.report import (
    ALL_METHODS,
    CheckpointInfo,
    LayerReport,
    MethodResult,
    MethodSummary,
    Removal,
    Report,
    SkippedLayer,
    Summary,
)
from graphs.transformer import KINDS, adapt_manifest
from graphs.work import GroupWork

Progress = Callable[[int, int, str], None]
"""Called as ``progress(done, total, group_name)`` after each group."""


def analyze_group(
    group: LayerGroup,
    *,
    methods: Sequence[str] = ALL_METHODS,
    options: AnalysisOptions | None = None,
    seed: int = 0,
    cache: Cache | None = None,
    features: np.ndarray | None = None,
) -> dict[str, MethodResult]:
    """Run the chosen methods on one group's filter vectors (n_filters, fan_in) and, for ``ci``
    and data-aware graphs, its feature maps (samples, n_filters, pixels)."""
    work = GroupWork(group, seed=seed, options=options, cache=cache, features=features)
    return {method: work.result(method) for method in methods}


@dataclass(frozen=True)
class Grouping:
    """A checkpoint's groups, as :func:`analyze` scores them (:func:`group_layers`).

    Attributes:
        groups: the groups, in report order.
        skipped: every layer not analysed (the reader's and the grouping's), by name.
        manifest: the manifest adapted to the layers' transformer blocks, or None.
    """

    groups: list[LayerGroup]
    skipped: list[SkippedLayer]
    manifest: Manifest | None


def group_layers(
    layers: Sequence[LayerWeights],
    *,
    checkpoint: CheckpointInfo,
    skipped: Sequence[SkippedLayer] = (),
    manifest: Manifest | None = None,
    activations: Activations | None = None,
) -> Grouping:
    """The groups :func:`analyze` scores (reads no weight: only names and shapes). With
    ``activations``, recurrent hidden units (which have no captured maps) are skipped.

    Raises:
        NoPrunableLayersError: when no group is left to analyse.
    """
    if manifest is not None:
        manifest = adapt_manifest(layers, manifest)
    groups, dw_skipped = build_groups(layers, manifest)
    if activations is not None:
        groups, no_maps = without_hidden(groups)
        dw_skipped += no_maps
    if not groups:
        why = "; ".join(f"{s.name}: {s.reason}" for s in [*skipped, *dw_skipped][:5])
        raise NoPrunableLayersError(
            f"no layer of checkpoint {checkpoint.sha256[:12]}… can be analysed"
            + (f" ({why})" if why else "")
        )
    all_skipped = sorted([*skipped, *dw_skipped], key=lambda s: s.name)
    return Grouping(groups, all_skipped, manifest)


def analyze(
    layers: Sequence[LayerWeights],
    *,
    checkpoint: CheckpointInfo,
    skipped: Sequence[SkippedLayer] = (),
    methods: Sequence[str] = ALL_METHODS,
    seed: int = 0,
    options: AnalysisOptions | None = None,
    progress: Progress | None = None,
    manifest: Manifest | None = None,
    cache: Cache | None = None,
    activations: Activations | None = None,
) -> Report:
    """Calibrated per-layer redundancy of a checkpoint's layers.

    Args:
        layers: prunable layers in checkpoint order (depthwise convs are grouped with their
            producer, see :mod:`graphs.grouping`).
        checkpoint: identity of the checkpoint (goes into the report unchanged).
        skipped: layers the reader could not use, with reasons (carried into the report).
        methods: any of ``mrp, srr, hsc, l1, fpgm``.
        seed: seed of every stochastic step.
        options: method parameters.
        progress: optional callback after each group.
        manifest: coupling groups and MACs (design §2): coupled layers are scored as one group
            and the summary gains FLOPs and FLOPs-weighted redundancy.
        cache: per-group results already computed are taken from it, new ones stored in it
            (:mod:`graphs.cache`); the report is the same with or without.
        activations: feature maps per layer name, shape (samples, channels, pixels), for
            ``ci`` and ``options.vectors == "activations"`` (see :mod:`graphs.features`).

    Returns:
        the :class:`Report`; byte-identical JSON for the same inputs and seed.

    Raises:
        NoPrunableLayersError: when no group is left to analyse.
        InvalidInputError: for unknown methods or a seed outside [0, 2**32).
    """
    chosen, opts = check_inputs(methods, seed, options, activations)
    grouping = group_layers(
        layers, checkpoint=checkpoint, skipped=skipped, manifest=manifest, activations=activations
    )
    results: list[dict[str, MethodResult]] = []
    for i, group in enumerate(grouping.groups):
        maps = group_features(group, activations) if activations is not None else None
        results.append(
            analyze_group(
                group, methods=chosen, options=opts, seed=seed, cache=cache, features=maps
            )
        )
        if progress is not None:
            progress(i + 1, len(grouping.groups), group.name)
    return assemble_report(
        grouping, results, checkpoint=checkpoint, methods=chosen, seed=seed, options=opts
    )


def assemble_report(
    grouping: Grouping,
    results: Sequence[Mapping[str, MethodResult]],
    *,
    checkpoint: CheckpointInfo,
    methods: Sequence[str],
    seed: int,
    options: AnalysisOptions,
) -> Report:
    """The :class:`Report` of ``grouping``'s groups from their method results (one mapping
    method -> result per group, in the groups' order), computing nothing: how :func:`analyze`
    ends, and how a service job builds its report from its tasks' results."""
    if len(results) != len(grouping.groups):
        raise ValueError(f"{len(results)} results for {len(grouping.groups)} groups")
    reports: list[LayerReport] = []
    for group, by_method in zip(grouping.groups, results, strict=True):
        head = group.members[0]
        channels = group.unit == "channels"
        reports.append(
            LayerReport(
                name=group.name,
                kind=head.kind if channels else KINDS[group.unit],
                shape=list(head.shape) if channels else [group.n_filters, group.fan_in],
                n_filters=group.n_filters,
                fan_in=group.fan_in,
                groups=head.groups,
                members=list(dict.fromkeys(m.name for m in group.members)),
                coupling=group.coupling,
                bn=head.bn,
                params=group.params,
                methods={m: by_method[m] for m in methods},
            )
        )
    all_skipped = grouping.skipped
    removal = {
        m: removable(
            grouping.groups,
            [float(r.methods[m].redundancy or 0.0) for r in reports],
            manifest=grouping.manifest,
            params_total=checkpoint.n_params,
        )
        for m in methods
        if all(r.methods[m].redundancy is not None for r in reports)
    }
    return Report(
        checkpoint=checkpoint,
        methods=list(methods),
        parameters={m: options.parameters(m) for m in methods},
        seed=seed,
        layers=reports,
        skipped=all_skipped,
        summary=summarize(
            reports,
            methods,
            checkpoint,
            len(all_skipped),
            _group_macs(grouping.groups, grouping.manifest),
            removal,
        ),
    )


def _group_macs(
    groups: Sequence[LayerGroup], manifest: Manifest | None
) -> tuple[list[float], int] | None:
    """MACs that scale with each group's output channels, and the model's total."""
    if manifest is None:
        return None
    by_group: dict[int, float] = {}
    for c in manifest.costs:
        if c.out_group is not None:
            by_group[c.out_group] = by_group.get(c.out_group, 0.0) + c.macs
    return [by_group.get(g.group_id, 0.0) if g.group_id is not None else 0.0 for g in groups], (
        manifest.macs_total
    )


def summarize(
    layers: Sequence[LayerReport],
    methods: Sequence[str],
    checkpoint: CheckpointInfo,
    n_skip: int,
    macs: tuple[list[float], int] | None = None,
    removal: Mapping[str, Removal] | None = None,
) -> Summary:
    """Model-level figures: params- (and FLOPs-) weighted redundancy, the most redundant layers,
    and per method what removing the redundant channels would remove (``removal``, from
    :func:`graphs.removable.removable`)."""
    params = np.array([layer.params for layer in layers], dtype=np.float64)
    flops_w = np.array(macs[0], dtype=np.float64) if macs is not None else None
    per_method: dict[str, MethodSummary] = {}
    for m in methods:
        red = [layer.methods[m].redundancy for layer in layers]
        if any(r is None for r in red) or not layers:
            per_method[m] = MethodSummary(
                redundancy_params_weighted=None, redundancy_flops_weighted=None, most_redundant=[]
            )
            continue
        r = np.array(red, dtype=np.float64)
        weighted = float(np.dot(params, r) / params.sum()) if params.sum() > 0 else 0.0
        order = sorted(range(len(layers)), key=lambda i: (-r[i], layers[i].name))
        by_flops = (
            round(float(np.dot(flops_w, r) / flops_w.sum()), 6)
            if flops_w is not None and flops_w.sum() > 0
            else None
        )
        per_method[m] = MethodSummary(
            redundancy_params_weighted=round(weighted, 6),
            redundancy_flops_weighted=by_flops,
            most_redundant=[layers[i].name for i in order[:5] if r[i] > 0],
            removable=(removal or {}).get(m),
        )
    return Summary(
        n_layers=len(layers),
        n_skipped=n_skip,
        params_total=checkpoint.n_params,
        params_analysed=int(params.sum()),
        flops=macs[1] if macs is not None else None,
        methods=per_method,
    )


__all__ = [
    "Grouping",
    "Progress",
    "analyze",
    "analyze_group",
    "assemble_report",
    "group_layers",
    "summarize",
]

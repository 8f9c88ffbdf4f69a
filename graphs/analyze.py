"""The analysis entry point: every method on every group of a checkpoint, into a :class:`Report`."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from graphs.baselines import fpgm, l1
from graphs.errors import InvalidInputError, NoPrunableLayersError
from graphs.grouping import build_groups
from graphs.hsc import hsc
from graphs.layers import LayerGroup, LayerWeights
from graphs.manifest import Manifest
from graphs.mrp import mrp
from graphs.report import (
    ALL_METHODS,
    CheckpointInfo,
    LayerReport,
    MethodResult,
    MethodSummary,
    Report,
    SkippedLayer,
    Summary,
)
from graphs.similarity import DEFAULT_ALPHA, DEFAULT_MIN_EXPLAINED
from graphs.srr import srr

Progress = Callable[[int, int, str], None]
"""Called as ``progress(done, total, group_name)`` after each group."""


class AnalysisOptions(BaseModel):
    """Method parameters; they are part of the report and of every cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(DEFAULT_ALPHA, gt=0, lt=1, description="null edge rate per layer")
    min_explained: float = Field(
        DEFAULT_MIN_EXPLAINED, ge=0, lt=1, description="least cos² between joined filters"
    )
    resolution: float = Field(1.0, gt=0, description="Leiden resolution (mrp)")
    k: int = Field(5, ge=1, description="neighbours per hyperedge (hsc)")
    n_rounds: int = Field(3, ge=0, description="structure-learning rounds (hsc)")

    def parameters(self, method: str) -> dict[str, float | int | str]:
        if method == "mrp":
            return {**self._edges(), "resolution": self.resolution}
        if method == "srr":
            return self._edges()
        if method == "hsc":
            return {**self._edges(), "k": self.k, "n_rounds": self.n_rounds}
        return {}

    def _edges(self) -> dict[str, float | int | str]:
        return {"alpha": self.alpha, "min_explained": self.min_explained}


def layer_seed(seed: int, name: str) -> int:
    """A per-group seed that depends on the run's seed and the group's name only.

    Results of a group therefore do not depend on which other groups are analysed, or in what
    order (needed for caching and for distributing groups as separate tasks).
    """
    state = np.random.SeedSequence([int(seed), zlib.crc32(name.encode())])
    return int(state.generate_state(1)[0] & 0x7FFFFFFF)


def analyze_group(
    group: LayerGroup,
    *,
    methods: Sequence[str] = ALL_METHODS,
    options: AnalysisOptions | None = None,
    seed: int = 0,
) -> dict[str, MethodResult]:
    """Run the chosen methods on one group's filter vectors (n_filters, fan_in)."""
    opts = options or AnalysisOptions()
    X = group.vectors()
    s = layer_seed(seed, group.name)
    out: dict[str, MethodResult] = {}
    for method in methods:
        if method == "mrp":
            out[method] = mrp(
                X,
                alpha=opts.alpha,
                min_explained=opts.min_explained,
                resolution=opts.resolution,
                seed=s,
            ).to_model()
        elif method == "srr":
            out[method] = srr(X, alpha=opts.alpha, min_explained=opts.min_explained).to_model()
        elif method == "hsc":
            out[method] = hsc(
                X,
                k=opts.k,
                alpha=opts.alpha,
                min_explained=opts.min_explained,
                n_rounds=opts.n_rounds,
                seed=s,
            ).to_model()
        elif method == "l1":
            out[method] = l1(X).to_model()
        elif method == "fpgm":
            out[method] = fpgm(X).to_model()
        else:
            raise InvalidInputError(
                f"unknown method {method!r}", hint=f"Choose from {', '.join(ALL_METHODS)}."
            )
    return out


def check_methods(methods: Sequence[str]) -> list[str]:
    """Validate and de-duplicate method names, keeping the canonical order."""
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown or not methods:
        raise InvalidInputError(
            f"unknown or missing methods: {', '.join(unknown) or '(none given)'}",
            hint=f"Choose one or more of {', '.join(ALL_METHODS)}.",
        )
    return [m for m in ALL_METHODS if m in set(methods)]


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

    Returns:
        the :class:`Report`; byte-identical JSON for the same inputs and seed.

    Raises:
        NoPrunableLayersError: when no group is left to analyse.
        InvalidInputError: for unknown methods or a seed outside [0, 2**32).
    """
    chosen = check_methods(methods)
    if not 0 <= seed < 2**32:
        raise InvalidInputError(f"seed must be in [0, 2**32), got {seed}")
    opts = options or AnalysisOptions()
    groups, dw_skipped = build_groups(layers, manifest)
    if not groups:
        why = "; ".join(f"{s.name}: {s.reason}" for s in [*skipped, *dw_skipped][:5])
        raise NoPrunableLayersError(
            f"no layer of checkpoint {checkpoint.sha256[:12]}… can be analysed"
            + (f" ({why})" if why else "")
        )
    reports: list[LayerReport] = []
    for i, group in enumerate(groups):
        results = analyze_group(group, methods=chosen, options=opts, seed=seed)
        head = group.members[0]
        reports.append(
            LayerReport(
                name=group.name,
                kind=head.kind,
                shape=list(head.shape),
                n_filters=group.n_filters,
                fan_in=sum(m.fan_in for m in group.members),
                groups=head.groups,
                members=[m.name for m in group.members],
                coupling=group.coupling,
                bn=head.bn,
                params=group.params,
                methods=results,
            )
        )
        if progress is not None:
            progress(i + 1, len(groups), group.name)
    all_skipped = sorted([*skipped, *dw_skipped], key=lambda s: s.name)
    return Report(
        checkpoint=checkpoint,
        methods=chosen,
        parameters={m: opts.parameters(m) for m in chosen},
        seed=seed,
        layers=reports,
        skipped=all_skipped,
        summary=summarize(
            reports, chosen, checkpoint, len(all_skipped), _group_macs(groups, manifest)
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
) -> Summary:
    """Model-level figures: params- (and FLOPs-) weighted redundancy, the most redundant layers."""
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
        )
    return Summary(
        n_layers=len(layers),
        n_skipped=n_skip,
        params_total=checkpoint.n_params,
        params_analysed=int(params.sum()),
        flops=macs[1] if macs is not None else None,
        methods=per_method,
    )

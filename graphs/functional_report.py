"""Functional redundancy in the report: each group's figure and error-vs-fraction curve.

With the second moments of the consumers' inputs (``stats``: consumer module name → S, as
``clients.capture_activations`` records them under ``gram/<name>``), every prunable group that
has channel-mixing consumers with statistics gets, in its :class:`graphs.report.LayerReport`,
a :class:`graphs.report.FunctionalFigure`: the largest fraction of its channels removable with
relative consumer-output error ≤ ε after least-squares folds, and the whole greedy path
(:func:`graphs.functional.error_curve`: the error after removing k channels, k = 0 … n − 1).
The figures are computed here from the layers, the manifest and the statistics alone, after the
analysis, so the embedded report and the service's are the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from graphs.compensated import group_consumers
from graphs.errors import InvalidInputError
from graphs.grouping import build_groups
from graphs.layers import LayerWeights
from graphs.manifest import Manifest
from graphs.options import DEFAULT_EPSILON, DEFAULT_RIDGE
from graphs.report import FunctionalFigure, Report
from graphs.transformer import adapt_manifest

__all__ = ["functional_figures", "with_functional"]


@threadpool_limits.wrap(limits=1)  # one BLAS thread: the same curves on any machine
def functional_figures(
    layers: Sequence[LayerWeights],
    manifest: Manifest | None,
    stats: Mapping[str, np.ndarray],
    *,
    epsilon: float = DEFAULT_EPSILON,
    ridge: float = DEFAULT_RIDGE,
) -> dict[str, FunctionalFigure]:
    """Group name (its producer, as in the report) → its functional figure.

    Args:
        layers: the checkpoint's conv/linear layers.
        manifest: the model's manifest (which layers read each group); required.
        stats: consumer module name → S, shape (F+1, F+1), constant column last.
        epsilon: the relative consumer-output error allowed by the figure.
        ridge: the folds' ridge, relative to each kept channel's variance.

    Raises:
        InvalidInputError: no manifest, a bad epsilon or ridge, or statistics that do not fit.
    """
    if manifest is None:
        raise InvalidInputError(
            "functional redundancy from activation statistics needs the model's manifest",
            hint="Pass --manifest (prunegraph manifest --model pkg.module:factory "
            "--input-shape 1,3,224,224 -o manifest.json), or analyse without statistics.",
        )
    for name, v in (("epsilon", epsilon), ("ridge", ridge)):
        if not (np.isfinite(v) and v >= 0):
            raise InvalidInputError(f"{name} must be a finite number >= 0, got {v}")
    adapted = adapt_manifest(layers, manifest)
    groups, _ = build_groups(layers, adapted)
    name_of = {g.group_id: g.name for g in groups if g.group_id is not None}
    found = group_consumers(layers, adapted, stats)
    curves = found.curves(sorted(gid for gid in found.consumers if gid in name_of), ridge=ridge)
    out: dict[str, FunctionalFigure] = {}
    for gid, curve in curves.items():
        out[name_of[gid]] = FunctionalFigure(
            redundancy=round(curve.redundancy(epsilon), 6),
            epsilon=epsilon,
            consumers=sorted(s.consumer for s in found.consumers[gid]),
            errors=[round(float(e), 9) for e in curve.errors],
        )
    return out


def with_functional(report: Report, figures: Mapping[str, FunctionalFigure]) -> Report:
    """``report`` with each layer's functional figure (layers without one are unchanged)."""
    if not figures:
        return report
    layers = [
        layer.model_copy(update={"functional": figures[layer.name]})
        if layer.name in figures
        else layer
        for layer in report.layers
    ]
    return report.model_copy(update={"layers": layers})

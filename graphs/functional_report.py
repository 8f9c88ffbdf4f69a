"""Functional redundancy in the report: each group's figure and error-vs-fraction curve.

With the second moments of the consumers' inputs (``stats``: consumer module name → S, as
``clients.capture_activations`` records them under ``gram/<name>``), every prunable group that
has channel-mixing consumers with statistics gets, in its :class:`graphs.report.LayerReport`,
a :class:`graphs.report.FunctionalFigure`: the largest fraction of its channels removable with
relative consumer-output error ≤ ε after least-squares folds, and the whole greedy path
(:func:`graphs.functional.error_curve`: the error after removing k channels, k = 0 … n − 1).
The figures are computed here from the layers, the manifest and the statistics alone, after the
analysis, so the embedded report and the service's are the same bytes.

With ``holdout`` (the statistics of a part of the same calibration data, as the activations file
holds them under ``holdout/<name>``) the curves are cross-fitted
(:func:`graphs.crossfit.crossfit_curves`: folds fitted on one part, their error measured on the
other; the order is still the pooled greedy path), and the figure is read from them;
:func:`with_functional` then adds :data:`CROSSFIT_NOTE` to the report's notes. Without it the
figures and the report are as before, byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from graphs.compensated import curve_workers, group_consumers
from graphs.crossfit import crossfit_curves
from graphs.errors import InvalidInputError
from graphs.grouping import build_groups
from graphs.layers import LayerWeights
from graphs.manifest import Manifest
from graphs.options import DEFAULT_EPSILON, DEFAULT_RIDGE
from graphs.report import CROSSFIT_NOTE, FunctionalFigure, Report
from graphs.transformer import adapt_manifest

__all__ = ["CROSSFIT_NOTE", "functional_figures", "with_functional"]  # CROSSFIT_NOTE: re-exported


def functional_figures(
    layers: Sequence[LayerWeights],
    manifest: Manifest | None,
    stats: Mapping[str, np.ndarray],
    *,
    epsilon: float = DEFAULT_EPSILON,
    ridge: float = DEFAULT_RIDGE,
    holdout: Mapping[str, np.ndarray] | None = None,
) -> dict[str, FunctionalFigure]:
    """Group name (its producer, as in the report) → its functional figure.

    Args:
        layers: the checkpoint's conv/linear layers.
        manifest: the model's manifest (which layers read each group); required.
        stats: consumer module name → S, shape (F+1, F+1), constant column last.
        epsilon: the relative consumer-output error allowed by the figure.
        ridge: the folds' ridge, relative to each kept channel's variance.
        holdout: consumer module name → S of a part of the same data (same shapes): the
            curves (and the figure) are cross-fitted; None: in-sample.

    Raises:
        InvalidInputError: no manifest, a bad epsilon or ridge, statistics that do not fit, or
            held-out statistics missing a consumer or not a part of ``stats``.
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
    return _figures(layers, manifest, stats, epsilon, ridge, holdout, workers=curve_workers())


@threadpool_limits.wrap(limits=1)  # one BLAS thread per curve: the same curves on any machine
def _figures(
    layers: Sequence[LayerWeights],
    manifest: Manifest,
    stats: Mapping[str, np.ndarray],
    epsilon: float,
    ridge: float,
    holdout: Mapping[str, np.ndarray] | None,
    *,
    workers: int,
) -> dict[str, FunctionalFigure]:
    """:func:`functional_figures` after its checks; ``workers`` threads compute whole curves
    side by side (the BLAS threads the caller was allowed)."""
    adapted = adapt_manifest(layers, manifest)
    groups, _ = build_groups(layers, adapted)
    name_of = {g.group_id: g.name for g in groups if g.group_id is not None}
    found = group_consumers(layers, adapted, stats)
    ids = sorted(gid for gid in found.consumers if gid in name_of)
    if holdout is None:
        curves = found.curves(ids, ridge=ridge)
    else:  # the whole pooled path: the cross-fitted ε crossing may be anywhere
        curves = crossfit_curves(found, holdout, ids=ids, ridge=ridge, workers=workers)
    out: dict[str, FunctionalFigure] = {}
    for gid, curve in curves.items():
        out[name_of[gid]] = FunctionalFigure(
            redundancy=round(curve.redundancy(epsilon), 6),
            epsilon=epsilon,
            consumers=sorted(s.consumer for s in found.consumers[gid]),
            errors=[round(float(e), 9) for e in curve.errors],
        )
    return out


def with_functional(
    report: Report, figures: Mapping[str, FunctionalFigure], *, crossfit: bool = False
) -> Report:
    """``report`` with each layer's functional figure (layers without one are unchanged);
    ``crossfit``: the figures are cross-fitted, which :data:`CROSSFIT_NOTE` in the report's
    notes says (once)."""
    if not figures:
        return report
    layers = [
        layer.model_copy(update={"functional": figures[layer.name]})
        if layer.name in figures
        else layer
        for layer in report.layers
    ]
    update: dict[str, object] = {"layers": layers}
    if crossfit and CROSSFIT_NOTE not in report.notes:
        update["notes"] = [*report.notes, CROSSFIT_NOTE]
    return report.model_copy(update=update)

"""Compensated plans and functional redundancy in jobs (design §8).

A job whose activations file holds second-moment statistics (``gram/<module>``, see
:mod:`service.ingest.statistics`) plans with them (:func:`graphs.planner.plan_layers` with
``stats``): least-squares folds by default (``compensation``), counts by ``allocation``; its report
gains each group's functional redundancy (:mod:`graphs.functional_report`). Statistics need the
model's manifest; without one the job plans and reports as before.

When the activations file also holds the statistics of a held-out part of the same calibration
data (``holdout/<module>``), plans and figures are cross-fitted (:mod:`graphs.crossfit`: the
error of folds fitted on one part measured on the other) unless the request says
``crossfit=false`` (:func:`used_holdout`); without them, as before, byte for byte.

A compensated plan's sidecar (the fold matrices, :mod:`graphs.fold`) is stored by content
(``data_dir/sidecars/<sha256>``, written atomically by the job's worker) and served at
``GET /v1/jobs/{id}/plan/compensation`` (:func:`service.api.jobs.sidecar_response`); the plan
pins its sha256. The job's options for these plans are
:class:`graphs.contracts.jobs.CompensationOptions`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphs.fold import sidecar_sha256
from graphs.layers import LayerWeights
from graphs.manifest import Manifest
from graphs.plan import PruningPlan
from graphs.report import Report
from service.store.cache import write_atomically

if TYPE_CHECKING:
    from service.jobs.inputs import JobInputs


def used_holdout(inputs: JobInputs, *, crossfit: bool) -> dict[str, np.ndarray] | None:
    """The activations file's held-out statistics (consumer module name → S (c + 1, c + 1))
    when they cross-fit the job's curves: ``crossfit`` on, and statistics with a manifest to
    use them; else None (in-sample, as without them)."""
    if not crossfit or inputs.stats is None or inputs.manifest is None:
        return None
    return inputs.holdout


def with_figures(
    report: Report,
    layers: Sequence[LayerWeights],
    manifest: Manifest | None,
    stats: Mapping[str, np.ndarray] | None,
    epsilon: float,
    holdout: Mapping[str, np.ndarray] | None = None,
) -> Report:
    """``report`` with each group's functional redundancy when there are statistics and a
    manifest (:mod:`graphs.functional_report`; cross-fitted with ``holdout``, the statistics
    of a part of the same data, and the report's notes say so); else ``report`` as it is."""
    if not stats or manifest is None:
        return report
    from graphs.functional_report import functional_figures, with_functional

    figures = functional_figures(layers, manifest, stats, epsilon=epsilon, holdout=holdout)
    return with_functional(report, figures, crossfit=holdout is not None)


def store_sidecar(directory: str, plan: PruningPlan) -> None:
    """Write a compensated plan's sidecar to ``directory/<sha256>`` (atomically; bytes that
    are there already are kept). Nothing without compensation or a directory."""
    if plan.compensation is None or not directory:
        return
    from graphs.compensated import plan_sidecar

    data = plan_sidecar(plan)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    target = root / sidecar_sha256(data)
    if target.is_file() and target.stat().st_size == len(data):
        return
    write_atomically(target, data)

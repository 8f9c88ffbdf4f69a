"""Compensated plans and functional redundancy in jobs (design §8).

A job whose activations file holds second-moment statistics (``gram/<module>``, see
:mod:`service.ingest.statistics`) plans with them (:func:`graphs.planner.plan_layers` with
``stats``): least-squares folds by default (``compensation``), counts by ``allocation``; its report
gains each group's functional redundancy (:mod:`graphs.functional_report`). Statistics need the
model's manifest; without one the job plans and reports as before.

A compensated plan's sidecar (the fold matrices, :mod:`graphs.fold`) is stored by content
(``data_dir/sidecars/<sha256>``, written atomically by the job's worker) and served at
``GET /v1/jobs/{id}/plan/compensation`` (:func:`service.api.jobs.sidecar_response`); the plan
pins its sha256. The job's options for these plans are
:class:`graphs.contracts.jobs.CompensationOptions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from graphs.fold import sidecar_sha256
from graphs.layers import LayerWeights
from graphs.manifest import Manifest
from graphs.plan import PruningPlan
from graphs.report import Report
from service.store.cache import write_atomically


def with_figures(
    report: Report,
    layers: Sequence[LayerWeights],
    manifest: Manifest | None,
    stats: dict[str, np.ndarray] | None,
    epsilon: float,
) -> Report:
    """``report`` with each group's functional redundancy when there are statistics and a
    manifest (:mod:`graphs.functional_report`); else ``report`` as it is."""
    if stats is None or manifest is None:
        return report
    from graphs.functional_report import functional_figures, with_functional

    return with_functional(report, functional_figures(layers, manifest, stats, epsilon=epsilon))


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

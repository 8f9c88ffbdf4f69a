"""Softer calibration levels (graphs.anneal)."""

from __future__ import annotations

import itertools

import numpy as np

from graphs.anneal import anneal_levels
from graphs.options import AnalysisOptions
from graphs.similarity import calibrated_threshold, unit_rows
from tests.graphs.planted import random_layer


def test_anneal_levels_soften_monotonically() -> None:
    U, _ = unit_rows(random_layer(64, 144, seed=7))
    opts = AnalysisOptions()
    levels = anneal_levels(opts, 64)
    assert levels[0] == opts and len(levels) == 5
    thresholds = [
        calibrated_threshold(U, alpha=o.alpha, min_explained=o.min_explained)[0] for o in levels
    ]
    assert all(a > b for a, b in itertools.pairwise(thresholds)), thresholds
    assert anneal_levels(opts, 64, anneal=False) == [opts]
    low = AnalysisOptions(min_explained=0.0)  # the user's own level already is significance
    assert [(o.alpha, o.min_explained) for o in anneal_levels(low, 64)] == [
        (0.05, 0.0), (0.05 * 64, 0.0), (0.25 * 64, 0.0)
    ]  # fmt: skip
    # a random layer: the strict levels find nothing, the softest ones chance edges only
    n_edges = [
        int((np.abs(U @ U.T)[np.triu_indices(64, 1)] > t).sum()) for t in thresholds
    ]  # fmt: skip
    assert n_edges[:3] == [0, 0, 0] and n_edges[-1] < 0.5 * 64 * 2, n_edges

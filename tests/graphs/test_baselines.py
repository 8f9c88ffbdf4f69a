"""The baselines (graphs.baselines): references for fpgm and l1."""

from __future__ import annotations

import numpy as np

from graphs import fpgm, l1
from tests.graphs.planted import random_layer


def test_fpgm_matches_naive_loop() -> None:
    X = random_layer(37, 11, seed=1)
    ref = [sum(np.linalg.norm(X[i] - X[j]) for j in range(37)) for i in range(37)]
    assert np.allclose(fpgm(X, block_size=5).gm_distance, ref)


def test_l1_norms() -> None:
    X = random_layer(9, 4, seed=2)
    assert np.allclose(l1(X).l1_norm, np.abs(X).sum(axis=1))

"""mrp (graphs.mrp): replaceability, edge weights, communities and seeding."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import mrp
from graphs.mrp import response_information
from tests.graphs.planted import planted_layer


def test_mrp_replaceability_is_mean_cosine_within_community() -> None:
    X, _ = planted_layer(5, 4, 64, seed=3)
    r = mrp(X, seed=0)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    for i in range(X.shape[0]):
        mates = [j for j in range(X.shape[0]) if j != i and r.communities[j] == r.communities[i]]
        assert r.replaceability[i] == pytest.approx(np.mean(U[mates] @ U[i]))


def test_edge_weight_is_response_information() -> None:
    c = np.array([0.0, 0.5, 0.99, 1.0])
    w = response_information(c)
    assert np.allclose(w[:3], -0.5 * np.log(1 - c[:3] ** 2))
    assert np.isfinite(w[3]) and w[3] > w[2]


def test_weak_links_do_not_merge_duplicate_groups() -> None:
    """Two groups of near-duplicates joined by many barely significant links stay apart."""
    rng = np.random.default_rng(0)
    d = 144
    a = rng.standard_normal(d)
    b = 0.35 * a / np.linalg.norm(a) * np.linalg.norm(a) + rng.standard_normal(d)  # cos ≈ 0.33
    X = np.vstack([p + 0.02 * rng.standard_normal((4, d)) for p in (a, b)])
    r = mrp(X, seed=0)
    assert r.n_communities == 2


def test_mrp_is_deterministic_and_seeded() -> None:
    X, _ = planted_layer(10, 3, 32, seed=9, noise=0.3)
    a, b = mrp(X, seed=4), mrp(X, seed=4)
    assert np.array_equal(a.communities, b.communities)
    assert a.modularity == b.modularity

"""mrp, srr and the baselines: references, edge cases and determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from graphs import InvalidInputError, fpgm, hsc, l1, mrp, srr
from graphs.mrp import response_information
from graphs.srr import greedy_covering_number
from tests.graphs.planted import planted_layer, random_layer, same_partition


def _slow_greedy_cover(adj: np.ndarray, ell: int) -> int:
    """Reference: pure-Python greedy ℓ-cover by BFS balls."""
    n = adj.shape[0]
    balls = []
    for v in range(n):
        seen, frontier = {v}, {v}
        for _ in range(ell):
            frontier = {u for w in frontier for u in np.flatnonzero(adj[w])} - seen
            seen |= frontier
        balls.append(seen)
    uncovered, count = set(range(n)), 0
    while uncovered:
        best = max(range(n), key=lambda v: (len(balls[v] & uncovered), -v))
        uncovered -= balls[best]
        count += 1
    return count


@pytest.mark.parametrize("seed", range(8))
def test_greedy_cover_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 30))
    upper = np.triu(rng.random((n, n)) < rng.uniform(0.02, 0.3), 1)
    adj = (upper | upper.T).astype(int)
    for ell in (1, 2):
        got = greedy_covering_number(sp.csr_matrix(adj), ell=ell)
        assert got == _slow_greedy_cover(adj, ell)
    assert greedy_covering_number(sp.csr_matrix(adj), ell=2) <= greedy_covering_number(
        sp.csr_matrix(adj), ell=1
    )


def test_fpgm_matches_naive_loop() -> None:
    X = random_layer(37, 11, seed=1)
    ref = [sum(np.linalg.norm(X[i] - X[j]) for j in range(37)) for i in range(37)]
    assert np.allclose(fpgm(X, block_size=5).gm_distance, ref)


def test_l1_norms() -> None:
    X = random_layer(9, 4, seed=2)
    assert np.allclose(l1(X).l1_norm, np.abs(X).sum(axis=1))


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


@pytest.mark.parametrize("method", ["mrp", "srr", "hsc"])
def test_dead_filters_count_as_redundant(method: str) -> None:
    X = random_layer(20, 50, seed=4)
    X[[3, 7, 11]] = 0.0
    r = {"mrp": mrp, "srr": srr, "hsc": hsc}[method](X)
    assert r.redundancy == pytest.approx(3 / 20)
    if method == "hsc":
        assert not {3, 7, 11} & set(r.representatives.tolist())
    if method == "mrp":
        assert r.n_zero == 3
        assert np.all(r.replaceability[[3, 7, 11]] == 1.0)


@pytest.mark.parametrize("fn", [mrp, srr, fpgm, l1])
def test_bad_arrays_are_refused(fn: object) -> None:
    call = fn  # type: ignore[assignment]
    with pytest.raises(InvalidInputError):
        call(np.array([[np.inf, 1.0], [0.0, 1.0]]))  # type: ignore[operator]
    if fn in (mrp, srr):
        with pytest.raises(InvalidInputError, match="at least 2"):
            call(np.ones((1, 5)))  # type: ignore[operator]


def test_mrp_is_deterministic_and_seeded() -> None:
    X, _ = planted_layer(10, 3, 32, seed=9, noise=0.3)
    a, b = mrp(X, seed=4), mrp(X, seed=4)
    assert np.array_equal(a.communities, b.communities)
    assert a.modularity == b.modularity


def test_one_dimensional_filters_get_no_edges() -> None:
    X = np.arange(1.0, 11.0)[:, None]
    assert mrp(X).redundancy == 0.0
    assert srr(X).redundancy == 0.0


def test_exact_duplicates() -> None:
    X = np.vstack([np.eye(6)[:3]] * 4)  # 3 directions × 4 copies
    for r in (mrp(X), srr(X)):
        assert r.redundancy == pytest.approx(1 - 3 / 12)
    assert list(itertools.islice(mrp(X).communities, 6)) == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("method", ["mrp", "srr", "hsc"])
def test_weakly_alike_filters_are_not_redundant(method: str) -> None:
    """Significant but weak similarity is not replaceability: 8 pairs at cos 0.5 (a copy explains
    25 % of the energy) among 48 random filters are joined only without the effect-size floor."""
    rng = np.random.default_rng(0)
    d = 256
    a = rng.standard_normal((8, d))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    z = rng.standard_normal((8, d))
    z -= np.sum(z * a, axis=1, keepdims=True) * a
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    X = np.vstack([a, 0.5 * a + np.sqrt(0.75) * z, rng.standard_normal((48, d))])
    fn = {"mrp": mrp, "srr": srr, "hsc": hsc}[method]
    assert fn(X).redundancy == 0.0
    assert fn(X, min_explained=0.0).redundancy == pytest.approx(8 / 64)
    with pytest.raises(InvalidInputError):
        fn(X, min_explained=1.0)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 8),
    st.integers(1, 4),
    st.integers(2, 40),
    st.integers(0, 2**16),
)
def test_permutation_and_scale_change_only_labels(m: int, r: int, d: int, seed: int) -> None:
    """Property test: for any small layer of prototypes and copies, permuting and positively
    rescaling the filters permutes the labels and leaves every figure unchanged."""
    X, _ = planted_layer(m, r, d, seed=seed, noise=0.05)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    Y = X[perm] * rng.uniform(0.1, 10, (len(X), 1))
    a, b = mrp(X, seed=1), mrp(Y, seed=1)
    assert a.redundancy == b.redundancy and same_partition(a.communities[perm], b.communities)
    c, e = srr(X), srr(Y)
    assert c.redundancy == e.redundancy and same_partition(c.components[perm], e.components)
    f, g = hsc(X, seed=1), hsc(Y, seed=1)
    assert f.redundancy == g.redundancy and same_partition(f.clusters[perm], g.clusters)

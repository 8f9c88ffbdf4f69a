"""Similarity graphs: invariants, references and the null threshold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from graphs.errors import InvalidInputError
from graphs.similarity import (
    check_filters,
    cosine_knn,
    cosine_threshold_graph,
    null_cosine_threshold,
    unit_rows,
    upper_edges,
)

finite = st.floats(-10, 10, allow_nan=False, width=64)


@st.composite
def filter_matrices(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(2, 24))
    d = draw(st.integers(1, 12))
    X = draw(arrays(np.float64, (n, d), elements=finite))
    # plant exact duplicates and zero rows sometimes
    if draw(st.booleans()):
        X[1] = X[0] * draw(st.floats(0.1, 5))
    if draw(st.booleans()):
        X[-1] = 0.0
    return X


@settings(max_examples=60, deadline=None)
@given(filter_matrices(), st.floats(0.0, 0.99), st.integers(1, 7))
def test_threshold_graph_matches_dense_reference(X: np.ndarray, t: float, block: int) -> None:
    U, _ = unit_rows(X)
    G = cosine_threshold_graph(U, t, block_size=block).toarray()
    assert np.array_equal(G, G.T), "graph must be exactly symmetric"
    assert np.all(np.diag(G) == 0)
    S = U @ U.T
    live = np.any(U != 0, axis=1)
    mask = (S > t) & live[:, None] & live[None, :]  # zero rows never get an edge
    np.fill_diagonal(mask, False)
    # symmetric evaluation: a pair is an edge when its upper-triangle cosine is above t
    upper = np.triu(mask, 1)
    assert np.array_equal(G != 0, upper | upper.T)
    assert np.all((G[G != 0] > t) & (G[G != 0] <= 1 + 1e-12))


@settings(max_examples=60, deadline=None)
@given(filter_matrices(), st.integers(1, 5))
def test_knn_matches_dense_argsort(X: np.ndarray, block: int) -> None:
    U, _ = unit_rows(X)
    n = U.shape[0]
    k = min(3, n - 1)
    idx, sim = cosine_knn(U, k, block_size=block)
    S = U @ U.T
    for i in range(n):
        cand = [j for j in range(n) if j != i]
        ref = sorted(cand, key=lambda j: (-S[i, j], j))[:k]
        assert np.allclose(sim[i], S[i, ref], atol=1e-12)
        assert np.all(np.diff(sim[i]) <= 1e-12)
        assert i not in idx[i]
        # same indices as the reference, up to exact ties in value (resolved by index when the
        # tied values are bitwise equal, which BLAS does not promise across block shapes)
        for got, want in zip(idx[i], ref, strict=True):
            assert got == want or S[i, got] == pytest.approx(S[i, want], abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(filter_matrices())
def test_unit_rows_scale_invariant(X: np.ndarray) -> None:
    U, norms = unit_rows(X)
    live = norms > 0
    assert np.allclose(np.linalg.norm(U[live], axis=1), 1.0)
    assert np.all(U[~live] == 0)
    U2, _ = unit_rows(X * 3.5)
    assert np.allclose(U, U2)


def test_null_threshold_matches_monte_carlo() -> None:
    """P(cos > t) for one pair of isotropic vectors equals α (n = 2 means one pair)."""
    rng = np.random.default_rng(0)
    for d in (3, 9, 64):
        t = null_cosine_threshold(2, d, alpha=0.1)
        a = rng.standard_normal((200_000, d))
        b = rng.standard_normal((200_000, d))
        cos = np.einsum("ij,ij->i", a, b) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        frac = float(np.mean(cos > t))
        assert abs(frac - 0.1) < 0.004, (d, frac)


def test_null_threshold_is_bonferroni_over_pairs() -> None:
    # more pairs -> stricter threshold; higher dimension -> lower threshold
    assert null_cosine_threshold(100, 64) > null_cosine_threshold(10, 64)
    assert null_cosine_threshold(100, 64) > null_cosine_threshold(100, 640)
    assert null_cosine_threshold(100, 1) == 1.0
    with pytest.raises(InvalidInputError):
        null_cosine_threshold(10, 10, alpha=0.0)


def test_check_filters_rejects_bad_arrays() -> None:
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        check_filters(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(InvalidInputError, match="2-D"):
        check_filters(np.zeros(5))
    with pytest.raises(InvalidInputError, match="at least 2 filters"):
        check_filters(np.ones((1, 4)), min_rows=2)


def test_upper_edges_sorted_and_unique() -> None:
    U, _ = unit_rows(np.array([[1.0, 0], [1, 0.01], [1, 0.02], [0, 1]]))
    edges, w = upper_edges(cosine_threshold_graph(U, 0.9))
    assert edges.tolist() == [[0, 1], [0, 2], [1, 2]]
    assert np.all(w > 0.9)


def test_null_dimension_of_isotropic_and_anisotropic_layers() -> None:
    from graphs.similarity import null_dimension
    from tests.graphs.planted import anisotropic_layer, planted_layer

    iso, _ = unit_rows(np.random.default_rng(0).standard_normal((256, 576)))
    assert 0.8 * 576 <= null_dimension(iso) <= 576
    X = anisotropic_layer(256, 576, seed=0, decay=1.0)
    ev = np.arange(1, 577) ** -1.0
    ratio = ev.sum() ** 2 / (ev**2).sum()  # participation ratio: the layer's effective dimension
    m = null_dimension(unit_rows(X)[0])
    assert ratio / 1.5 <= m <= ratio * 1.5
    # a few groups of copies cannot be fitted: the fan-in is the null
    P, _ = planted_layer(2, 300, 64, seed=0)
    assert null_dimension(unit_rows(P)[0]) == 64
    assert null_dimension(iso[:5]) == 576  # too few filters

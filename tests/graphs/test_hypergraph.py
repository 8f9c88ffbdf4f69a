"""The kNN hypergraph and its Zhou Laplacian: invariants, references and export."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from graphs.errors import InvalidInputError
from graphs.hypergraph import knn_incidence, structure_step, to_hypernetx, zhou_laplacian
from graphs.similarity import null_cosine_threshold, unit_rows


@st.composite
def filter_sets(draw: st.DrawFn) -> np.ndarray:
    """Small random filter matrices with duplicates, rescaled copies and zero rows."""
    n = draw(st.integers(2, 14))
    d = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    X = rng.standard_normal((n, d))
    for _ in range(draw(st.integers(0, n // 2))):  # duplicates (possibly rescaled)
        i, j = rng.integers(n, size=2)
        X[i] = X[j] * draw(st.sampled_from([1.0, 0.5, 3.0]))
    for _ in range(draw(st.integers(0, 2))):  # dead filters
        X[rng.integers(n)] = 0.0
    return X


def _dense_reference(H: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Δ from the formula with dense matrices, shape (n, n)."""
    dv = H @ w
    de = H.sum(axis=0)
    dv_is = np.diag(np.where(dv > 0, 1 / np.sqrt(np.where(dv > 0, dv, 1)), 0))
    de_inv = np.diag(np.where(de > 0, 1 / np.where(de > 0, de, 1), 0))
    return np.eye(H.shape[0]) - dv_is @ H @ np.diag(w) @ de_inv @ H.T @ dv_is


@settings(max_examples=60, deadline=None)
@given(X=filter_sets(), k=st.integers(1, 6), threshold=st.sampled_from([-1.0, 0.0, 0.5, 0.95]))
def test_laplacian_is_symmetric_psd_with_spectrum_in_unit_interval(
    X: np.ndarray, k: int, threshold: float
) -> None:
    U, _ = unit_rows(X)
    H = knn_incidence(U, k=k, threshold=threshold)
    n = X.shape[0]
    assert H.shape == (n, n)
    assert np.all(H.data > 0) and np.all(H.data <= 1)
    assert np.array_equal(H.diagonal(), np.ones(n))  # every filter centres its own hyperedge
    assert np.all(H.getnnz(axis=0) <= min(k, n - 1) + 1)
    dead = ~np.any(X != 0, axis=1)
    assert np.all(H[dead].getnnz(axis=1) == 1) and np.all(H[:, dead].getnnz(axis=0) == 1)
    D = zhou_laplacian(H)
    dense = D.toarray()
    assert np.array_equal(dense, dense.T)
    lam = np.linalg.eigvalsh(dense)
    assert lam.min() >= -1e-9 and lam.max() <= 1 + 1e-9
    np.testing.assert_allclose(dense, _dense_reference(H.toarray(), np.ones(n)), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 10),
    m=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
    weighted=st.booleans(),
)
def test_laplacian_of_any_weighted_incidence(n: int, m: int, seed: int, weighted: bool) -> None:
    rng = np.random.default_rng(seed)
    H = rng.uniform(size=(n, m)) * (rng.uniform(size=(n, m)) < 0.5)
    w = rng.uniform(0.1, 3.0, size=m) if weighted else None
    D = zhou_laplacian(sp.csr_matrix(H), w).toarray()
    assert np.array_equal(D, D.T)
    lam = np.linalg.eigvalsh(D)
    assert lam.min() >= -1e-9 and lam.max() <= 1 + 1e-9
    np.testing.assert_allclose(D, _dense_reference(H, np.ones(m) if w is None else w), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(X=filter_sets(), seed=st.integers(0, 1000))
def test_structure_step_keeps_entries_in_unit_interval_and_support(
    X: np.ndarray, seed: int
) -> None:
    U, _ = unit_rows(X)
    H0 = knn_incidence(U, k=3, threshold=-1.0)
    n = X.shape[0]
    B = np.random.default_rng(seed).standard_normal((n, 2))
    data = H0.data.copy()
    for _ in range(3):
        data = structure_step(H0, data, B, np.zeros(n, dtype=np.int64), step=0.5, mu=1.0)
        assert data.shape == H0.data.shape
        assert np.all(data >= 0) and np.all(data <= 1)
    rows = np.repeat(np.arange(n), np.diff(H0.indptr))
    assert np.all(data[rows == H0.indices] == 1.0)


def test_random_filters_give_singleton_hyperedges() -> None:
    X = np.random.default_rng(0).standard_normal((64, 576))
    U, _ = unit_rows(X)
    H = knn_incidence(U, k=5, threshold=null_cosine_threshold(64, 576))
    assert H.nnz == 64 and np.array_equal(H.toarray(), np.eye(64))
    assert zhou_laplacian(H).count_nonzero() == 0


def test_incidence_weights_follow_the_gaussian_kernel() -> None:
    # Two tight pairs: each hyperedge holds its centre (1) and its twin at exp(-d²/mean d²).
    X = np.array([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0], [0.0, 0.2, 1.0]])
    U, _ = unit_rows(X)
    H = knn_incidence(U, k=3, threshold=0.5).toarray()
    d2 = np.array([np.sum((U[0] - U[1]) ** 2), np.sum((U[2] - U[3]) ** 2)])
    w = np.exp(-d2 / d2.mean())
    expected = np.array([[1, w[0], 0, 0], [w[0], 1, 0, 0], [0, 0, 1, w[1]], [0, 0, w[1], 1]])
    np.testing.assert_allclose(H, expected, rtol=1e-12)


def test_threshold_is_strict_and_k_is_clipped() -> None:
    X = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])  # cos(0, 2) == 1.0 exactly
    U, _ = unit_rows(X)
    assert knn_incidence(U, k=10, threshold=1.0).nnz == 3  # strictly above: nothing passes
    H = knn_incidence(U, k=10, threshold=float(np.nextafter(1.0, 0.0)))
    assert H.nnz == 3 + 2 and H[0, 2] == 1.0 and H[2, 0] == 1.0  # d = 0: weight 1
    assert knn_incidence(U, k=10, threshold=-1.0).nnz == 9  # k clipped to n - 1
    with pytest.raises(InvalidInputError, match="k must"):
        knn_incidence(U, k=0, threshold=0.0)


def test_connected_hyperedge_has_zero_eigenvalue_per_component() -> None:
    X = np.array([[1.0, 0, 0], [1, 0.05, 0], [1, 0, 0.05], [0, 1, 0], [0, 1, 0.05], [0, 0, 0]])
    U, _ = unit_rows(X)
    D = zhou_laplacian(knn_incidence(U, k=2, threshold=0.5)).toarray()
    lam = np.linalg.eigvalsh(D)
    assert np.sum(np.abs(lam) < 1e-9) == 3  # {0,1,2}, {3,4} and the dead filter


def test_hypernetx_export_has_the_same_hyperedges() -> None:
    X = np.array([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    U, _ = unit_rows(X)
    H = knn_incidence(U, k=2, threshold=0.5)
    names = ["f0", "f1", "f2", "f3"]
    hg = to_hypernetx(H, names)
    edges = {e: set(hg.incidence_dict[e]) for e in hg.edges}
    assert edges == {"f0": {"f0", "f1"}, "f1": {"f0", "f1"}, "f2": {"f2"}, "f3": {"f3"}}
    assert set(hg.nodes) == set(names)
    inc = hg.incidence_dataframe(weights=True).loc[names, names].to_numpy()
    np.testing.assert_allclose(inc, H.toarray())
    plain = to_hypernetx(H)
    assert {int(e): {int(v) for v in plain.incidence_dict[e]} for e in plain.edges}[0] == {0, 1}
    with pytest.raises(InvalidInputError, match="names"):
        to_hypernetx(H, names[:2])

"""Every method on the same inputs: dead filters, bad arrays, duplicates, weak similarity,
relabelling (per-method references are in test_mrp, test_srr, test_baselines)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphs import InvalidInputError, fpgm, hsc, l1, mrp, srr
from tests.graphs.planted import planted_layer, random_layer, same_partition


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

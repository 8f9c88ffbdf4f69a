"""hsc: calibration (design §3), invariances, determinism, scale and validation."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphs.errors import InvalidInputError
from graphs.hsc import HscLayerResult, hsc
from graphs.report import HscResult
from graphs.spectral import DENSE_MAX
from tests.graphs.planted import planted_layer, random_layer, same_partition

spectral_module = sys.modules["graphs.spectral"]

RANDOM_SHAPES = [(16, 144), (64, 576), (256, 2304), (512, 4608)]
PLANTED = [(8, 4, 144), (20, 3, 576), (32, 8, 576), (32, 8, 144)]


def _check_planted(r: HscLayerResult, truth: np.ndarray, m: int) -> None:
    n = len(truth)
    assert abs(r.redundancy - (1 - m / n)) <= 0.05
    assert same_partition(r.clusters, truth)  # copies together, prototypes apart
    assert sorted(truth[r.representatives].tolist()) == list(range(m))  # one per prototype


def _assert_identical(a: HscLayerResult, b: HscLayerResult) -> None:
    assert a.redundancy == b.redundancy and a.eigengap == b.eigengap
    assert (a.n_clusters, a.n_components, a.k, a.threshold) == (
        b.n_clusters,
        b.n_components,
        b.k,
        b.threshold,
    )
    assert np.array_equal(a.clusters, b.clusters)
    assert np.array_equal(a.representatives, b.representatives)


def _bridged(seed: int, cos: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Two prototypes at cosine ``cos`` (4 noisy copies each; k=5 links them) + 30 random."""
    rng = np.random.default_rng(seed)
    d = 144
    a = rng.standard_normal(d)
    a /= np.linalg.norm(a)
    z = rng.standard_normal(d)
    z -= (z @ a) * a
    b = cos * a + np.sqrt(1 - cos**2) * z / np.linalg.norm(z)
    copies = np.repeat(np.stack([a, b]), 4, axis=0)
    copies += 0.05 / np.sqrt(d) * rng.standard_normal(copies.shape)
    X = np.vstack([copies, rng.standard_normal((30, d))])
    return X, np.concatenate([[0] * 4, [1] * 4, np.arange(2, 32)])


@pytest.mark.parametrize("shape", RANDOM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_random_layers_have_no_redundancy(shape: tuple[int, int]) -> None:
    for seed in (0, 1):
        r = hsc(random_layer(*shape, seed=seed), seed=seed)
        assert r.redundancy <= 0.05
        assert len(r.representatives) == r.n_clusters == r.clusters.max() + 1


@pytest.mark.parametrize("m,r,d", PLANTED, ids=lambda v: str(v))
def test_planted_layers_recover_prototypes(m: int, r: int, d: int) -> None:
    for seed in (0, 1):
        X, truth = planted_layer(m, r, d, seed=seed)
        res = hsc(X, seed=seed)
        _check_planted(res, truth, m)
        assert res.n_clusters == res.n_components == m
        assert res.eigengap > 0.3  # a clear gap between the m zeros and the rest


def test_crowded_random_layer_reports_no_redundancy() -> None:
    # 512 random filters of fan-in 9 (width >> fan-in): many pairs are close by geometry alone,
    # but the Bonferroni null threshold (~0.98 here) is exact for isotropic filters, so no
    # neighbour passes it, every hyperedge is a singleton and hsc reports no redundancy. Crowded
    # layers show redundancy only where filters are more aligned than chance.
    for seed in (0, 1):
        r = hsc(random_layer(512, 9, seed=seed), seed=seed)
        assert r.threshold > 0.95
        assert r.redundancy <= 0.01
    X, truth = planted_layer(128, 4, 9, seed=0)  # crowded and truly redundant: still found
    _check_planted(hsc(X), truth, 128)


def test_scale_invariance() -> None:
    X, truth = planted_layer(20, 3, 144, seed=4)
    base = hsc(X, seed=2)
    assert same_partition(base.clusters, truth)
    scales = np.random.default_rng(5).uniform(0.01, 100.0, size=(len(X), 1))
    scaled = hsc(X * scales, seed=2)
    assert scaled.redundancy == base.redundancy and scaled.n_clusters == base.n_clusters
    assert np.array_equal(scaled.clusters, base.clusters)
    assert np.array_equal(scaled.representatives, base.representatives)
    common = hsc(X * 7.5, seed=2)
    assert np.array_equal(common.clusters, base.clusters)
    assert np.array_equal(common.representatives, base.representatives)
    rand = random_layer(60, 576, seed=3)
    assert hsc(rand * scales).redundancy == hsc(rand).redundancy == 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: planted_layer(8, 4, 144, seed=6),
        lambda: planted_layer(32, 8, 576, seed=7),
        lambda: _bridged(0),
    ],
    ids=["planted-8x4", "planted-32x8", "bridged"],
)
def test_permutation_equivariance(make: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
    X, _ = make()
    base = hsc(X, seed=1)
    perm = np.random.default_rng(8).permutation(len(X))
    permuted = hsc(X[perm], seed=1)
    assert permuted.redundancy == base.redundancy
    assert permuted.n_clusters == base.n_clusters and permuted.n_components == base.n_components
    assert same_partition(permuted.clusters, base.clusters[perm])
    assert np.array_equal(np.sort(perm[permuted.representatives]), base.representatives)
    assert permuted.eigengap == pytest.approx(base.eigengap, abs=1e-9)


def test_deterministic() -> None:
    for X in (planted_layer(20, 3, 576, seed=1)[0], _bridged(1)[0], random_layer(64, 8, 2)):
        for n_clusters in (None, 10):
            _assert_identical(
                hsc(X, seed=5, n_clusters=n_clusters), hsc(X, seed=5, n_clusters=n_clusters)
            )


def test_labels_by_first_occurrence_and_sorted_representatives() -> None:
    X, _ = planted_layer(8, 4, 144, seed=2)
    r = hsc(X)
    _, first = np.unique(r.clusters, return_index=True)
    assert r.clusters[0] == 0 and np.all(np.diff(first) > 0)
    assert np.all(np.diff(r.representatives) > 0)
    assert np.array_equal(np.sort(r.clusters[r.representatives]), np.arange(r.n_clusters))


def test_structure_learning_splits_bridged_prototypes() -> None:
    # k=5 > 3 other copies: each hyperedge also takes copies of the other, related prototype, so
    # the two groups form one component. The eigengap asks for one more cluster than there are
    # components; structure learning then drives the bridging incidences to 0.
    for seed in (0, 1):
        X, truth = _bridged(seed)
        # significance-only edges (no effect-size floor), so that the cos-0.5 bridge exists
        plain = hsc(X, n_rounds=0, seed=seed, min_explained=0.0)
        learned = hsc(X, n_rounds=3, seed=seed, min_explained=0.0)
        assert plain.n_components == 31 and learned.n_components == 32
        for r in (plain, learned):
            assert r.n_clusters == 32
            assert same_partition(r.clusters, truth)


def test_given_number_of_clusters() -> None:
    m, rep = 20, 3
    X, truth = planted_layer(m, rep, 144, seed=3)
    _check_planted(hsc(X, n_clusters=m), truth, m)
    for n_clusters in (1, 5, 19):  # fewer than components: whole components are merged
        r = hsc(X, n_clusters=n_clusters)
        assert r.n_clusters == n_clusters == len(r.representatives)
        assert r.redundancy == pytest.approx(1 - n_clusters / len(X))
        assert all(len(set(r.clusters[truth == j])) == 1 for j in range(m))
    for n_clusters in (21, 40, 60):  # more: components are split, never mixed
        r = hsc(X, n_clusters=n_clusters)
        assert r.n_clusters == n_clusters == len(r.representatives)
        assert all(len(set(truth[r.clusters == c])) == 1 for c in range(n_clusters))


def test_dead_filters_are_all_redundant() -> None:
    X = random_layer(20, 144, seed=0)
    X[[3, 7, 11]] = 0.0
    r = hsc(X)
    # dead filters are left out (label -1), represent nothing and all count as redundant
    assert r.n_clusters == 17 and r.redundancy == pytest.approx(3 / 20)
    assert r.clusters[[3, 7, 11]].tolist() == [-1, -1, -1]
    assert not {3, 7, 11} & set(r.representatives.tolist())
    assert hsc(X, n_clusters=17).n_clusters == 17
    with pytest.raises(InvalidInputError, match="non-zero filters"):
        hsc(X, n_clusters=18)
    assert hsc(np.zeros((4, 3))).redundancy == 1.0


def test_medoid_and_norm_tie_break() -> None:
    # Three filters: the middle one is closest to the other two and is kept.
    X = np.array([[1.0, 0.0], [1.0, 0.02], [1.0, 0.04], [0.0, 1.0]])
    r = hsc(X, alpha=0.5, k=2)
    assert r.n_clusters == 2 and r.representatives.tolist() == [1, 3]
    # Exact duplicates (scaled copies) tie on cosine: the larger norm is kept.
    Y = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [-3.0, 1.0, 0.0]])
    r = hsc(Y, alpha=0.5)
    assert r.clusters.tolist() == [0, 0, 1] and r.representatives.tolist() == [1, 2]


def test_large_component_uses_sparse_eigsh(monkeypatch: pytest.MonkeyPatch) -> None:
    dense_sizes: list[int] = []
    eigh = spectral_module.la.eigh

    def spy(a: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        dense_sizes.append(a.shape[0])
        return eigh(a, *args, **kwargs)

    monkeypatch.setattr(spectral_module.la, "eigh", spy)
    X, truth = planted_layer(2, 300, 64, seed=0)  # two components of 300 > DENSE_MAX
    r = hsc(X, seed=1)
    assert r.n_clusters == 2 and same_partition(r.clusters, truth)
    assert all(s <= DENSE_MAX for s in dense_sizes)
    _assert_identical(r, hsc(X, seed=1))
    r = hsc(X, n_clusters=40, seed=1)  # more eigenvectors on demand
    assert r.n_clusters == 40 and all(len(set(truth[r.clusters == c])) == 1 for c in range(40))


def test_wide_layer_runs_sparse() -> None:
    X = np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32)
    start = time.perf_counter()
    r = hsc(X)
    assert time.perf_counter() - start < 10
    assert r.clusters.shape == (4096,) and r.redundancy <= 0.05
    assert len(r.representatives) == r.n_clusters


def test_to_model() -> None:
    X, _ = planted_layer(8, 4, 144, seed=0)
    r = hsc(X)
    model = r.to_model()
    assert isinstance(model, HscResult)
    assert model.redundancy == round(r.redundancy, 6) and model.eigengap == round(r.eigengap, 6)
    assert all(type(c) is int for c in model.clusters + model.representatives)
    assert HscResult.model_validate_json(model.model_dump_json()) == model


@pytest.mark.parametrize(
    "X,kwargs",
    [
        (np.array([[1.0, np.nan], [0.0, 1.0]]), {}),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), {}),
        (np.ones((1, 5)), {}),
        (np.ones(5), {}),
        (np.ones((4, 3)), {"k": 0}),
        (np.ones((4, 3)), {"n_rounds": -1}),
        (np.ones((4, 3)), {"n_clusters": 0}),
        (np.ones((4, 3)), {"n_clusters": 5}),
        (np.ones((4, 3)), {"alpha": 0.0}),
    ],
)
def test_invalid_input(X: np.ndarray, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        hsc(X, **kwargs)


def test_k_is_clipped() -> None:
    r = hsc(np.eye(3), k=50)
    assert r.k == 2 and r.redundancy == 0.0


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(2, 24),
    d=st.integers(1, 8),
    k=st.integers(1, 7),
    seed=st.integers(0, 2**32 - 1),
)
def test_invariants_on_arbitrary_small_layers(
    data: st.DataObject, n: int, d: int, k: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    for i in rng.integers(n, size=rng.integers(0, n)):  # duplicates and rescaled copies
        X[i] = X[rng.integers(n)] * rng.choice([1.0, 0.3, 4.0])
    X[rng.integers(n, size=rng.integers(0, 3))] = 0.0  # dead filters
    dead = ~np.any(X != 0, axis=1)
    n_live = int((~dead).sum())
    n_clusters = data.draw(st.none() | st.integers(1, max(n_live, 1)))
    r = hsc(X, k=k, alpha=0.5, n_clusters=n_clusters, seed=seed % 1000)
    n_keep = r.n_clusters
    assert n_clusters is None or n_live < 2 or n_keep == n_clusters
    assert np.all(r.clusters[dead] == -1)
    live_labels = r.clusters[~dead]
    _, first = np.unique(live_labels, return_index=True)
    assert np.array_equal(np.unique(live_labels), np.arange(n_keep))
    assert np.all(np.diff(first) > 0)
    assert len(r.representatives) == n_keep and np.all(np.diff(r.representatives) > 0)
    assert np.array_equal(np.sort(r.clusters[r.representatives]), np.arange(n_keep))
    assert r.redundancy == pytest.approx(1 - n_keep / n) and 0 <= r.redundancy <= 1
    assert r.eigengap >= 0 and r.n_components <= n

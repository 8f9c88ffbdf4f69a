"""Design §3: every method's normalized redundancy is calibrated against a null model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from graphs import hsc, mrp, srr
from graphs.similarity import null_cosine_threshold, unit_rows
from tests.graphs.planted import anisotropic_layer, planted_layer, random_layer, same_partition

Method = Callable[[np.ndarray], tuple[float, np.ndarray]]


def _mrp(X: np.ndarray) -> tuple[float, np.ndarray]:
    r = mrp(X, seed=3)
    return r.redundancy, r.communities


def _srr(X: np.ndarray) -> tuple[float, np.ndarray]:
    r = srr(X)
    return r.redundancy, r.components


def _hsc(X: np.ndarray) -> tuple[float, np.ndarray]:
    r = hsc(X, seed=3)
    return r.redundancy, r.clusters


METHODS = {"mrp": _mrp, "srr": _srr, "hsc": _hsc}
RANDOM_SHAPES = [(16, 144), (64, 576), (256, 2304), (512, 4608)]
PLANTED = [(8, 4, 144), (20, 3, 576), (32, 8, 576), (64, 2, 2304)]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("shape", RANDOM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_random_layers_have_no_redundancy(method: str, shape: tuple[int, int]) -> None:
    for seed in (0, 1):
        red, _ = METHODS[method](random_layer(*shape, seed=seed))
        assert red <= 0.05, f"{method} on random {shape} (seed {seed}): {red}"


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("mrd", PLANTED, ids=lambda p: f"m{p[0]}r{p[1]}d{p[2]}")
def test_planted_duplicates_are_found(method: str, mrd: tuple[int, int, int]) -> None:
    m, r, d = mrd
    for seed in (0, 1):
        X, truth = planted_layer(m, r, d, seed=seed)
        red, labels = METHODS[method](X)
        assert abs(red - (1 - m / (m * r))) <= 0.05, f"{method}: {red} vs {1 - 1 / r}"
        assert same_partition(labels, truth), f"{method}: copies split or prototypes merged"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_crowded_random_layers_report_no_redundancy_beyond_chance(method: str) -> None:
    """Width ≫ fan-in: near-duplicates exist by geometry alone (512 filters in 9 dimensions are
    linearly dependent), but they are exactly as close as the isotropic null predicts, so the
    null-calibrated methods report (almost) no redundancy. This is the documented behaviour: a
    nonlinearity follows the layer, so a linear combination is not a replacement."""
    for n, d in [(512, 9), (1024, 16)]:
        red, _ = METHODS[method](random_layer(n, d, seed=7))
        assert red <= 0.05, f"{method} on crowded random {n}x{d}: {red}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_crowded_planted_layers_are_still_found(method: str) -> None:
    X, truth = planted_layer(40, 8, 9, seed=2, noise=0.01)
    red, labels = METHODS[method](X)
    assert abs(red - (1 - 40 / 320)) <= 0.05
    assert same_partition(labels, truth)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_scaling_and_permutation_change_only_labels(method: str) -> None:
    X, _ = planted_layer(12, 4, 144, seed=5)
    X = np.vstack([X, random_layer(16, 144, seed=6)])  # a mix of redundant and distinct filters
    red, labels = METHODS[method](X)
    rng = np.random.default_rng(11)
    scale = rng.uniform(0.1, 10.0, size=(X.shape[0], 1))
    red_s, labels_s = METHODS[method](X * scale)
    assert red_s == pytest.approx(red, abs=1e-12)
    assert same_partition(labels_s, labels)
    perm = rng.permutation(X.shape[0])
    red_p, labels_p = METHODS[method](X[perm])
    assert red_p == pytest.approx(red, abs=1e-12)
    assert same_partition(labels_p, labels[perm])


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    ("n", "d", "decay"), [(64, 576, 1.0), (256, 576, 1.0), (512, 2304, 1.2), (256, 144, 2.0)]
)
def test_anisotropic_random_layers_have_no_redundancy(
    method: str, n: int, d: int, decay: float
) -> None:
    """Unrelated but correlated filters (as trained ones are) are not redundant: the null is
    fitted to the layer, where a fixed fan-in null would join a large share of all pairs."""
    X = anisotropic_layer(n, d, seed=1, decay=decay)
    U, _ = unit_rows(X)
    cos = (U @ U.T)[np.triu_indices(n, 1)]
    assert np.mean(cos > null_cosine_threshold(n, d)) > 0.1  # the isotropic null would fail
    red, _ = METHODS[method](X)
    assert red <= 0.05, f"{method} on anisotropic {n}x{d}: {red}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_planted_duplicates_of_anisotropic_prototypes(method: str) -> None:
    m, r = 32, 4
    rng = np.random.default_rng(3)
    protos = anisotropic_layer(m, 576, seed=2)
    truth = np.repeat(np.arange(m), r)
    X = protos[truth] * rng.uniform(0.5, 2, (m * r, 1))
    X += 0.03 * np.linalg.norm(X, axis=1, keepdims=True) / 24 * rng.standard_normal(X.shape)
    red, labels = METHODS[method](X)
    assert abs(red - (1 - m / (m * r))) <= 0.05
    assert same_partition(labels, truth)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_permutation_invariance_of_wide_layers(method: str) -> None:
    """Over 512 filters the null is fitted on a sample of rows: chosen by content, not index."""
    rng = np.random.default_rng(4)
    base = anisotropic_layer(600, 160, seed=5)
    # 300 copies at cosines spread around the edge threshold, so the fit matters
    noise = rng.uniform(0.3, 1.5, (300, 1)) * np.linalg.norm(base[:300], axis=1, keepdims=True)
    copies = base[:300] + noise / np.sqrt(160) * rng.standard_normal((300, 160))
    X = np.vstack([base, copies])  # 900 filters
    red, labels = METHODS[method](X)
    perm = np.random.default_rng(0).permutation(X.shape[0])
    red_p, labels_p = METHODS[method](X[perm] * 3.0)
    assert red_p == pytest.approx(red, abs=1e-12)
    assert same_partition(labels_p, labels[perm])

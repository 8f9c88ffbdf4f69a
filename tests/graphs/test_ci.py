"""Channel independence (CHIP): the nuclear-norm definition, planted structure, invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphs import InvalidInputError
from graphs.ci import CiLayerResult, channel_independence, keep_mask

METHODS = ["spectral", "minors"]


def _naive_ci(F: np.ndarray) -> np.ndarray:
    """Reference (samples, channels): ‖A‖* − ‖A with row i zeroed‖* per sample, float64."""
    A = torch.as_tensor(np.asarray(F, dtype=np.float64))
    out = np.empty(A.shape[:2])
    c = A.shape[1]
    for s in range(A.shape[0]):
        removed = A[s].expand(c, -1, -1).clone()
        removed[torch.arange(c), torch.arange(c)] = 0.0  # removed[i] = A_s with row i zeroed
        full = torch.linalg.matrix_norm(A[s], "nuc")
        out[s] = (full - torch.linalg.matrix_norm(removed, "nuc")).numpy()
    return out


def _assert_matches_naive(F: np.ndarray, r: CiLayerResult, *, atol: float = 0.0) -> None:
    ref = _naive_ci(F)
    np.testing.assert_allclose(r.ci, ref.mean(axis=0), rtol=1e-8, atol=atol)
    np.testing.assert_allclose(r.ci_std, ref.std(axis=0), rtol=1e-6, atol=max(atol, 1e-10))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("c", "p"),
    [(8, 20), (30, 100), (16, 16), (2, 2), (12, 13), (13, 12), (20, 8), (40, 3), (5, 1), (2, 1)],
)
@pytest.mark.parametrize("seed", range(3))
def test_matches_nuclear_norm_definition(method: str, c: int, p: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((3, c, p)) * rng.uniform(0.01, 100.0)
    r = channel_independence(F, method=method)
    assert r.regime == ("channels<=pixels" if c <= p else "pixels<channels")
    assert r.method == method and r.n_samples == 3 and r.ci.shape == (c,)
    _assert_matches_naive(F, r)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    samples=st.integers(1, 3),
    c=st.integers(2, 10),
    p=st.integers(1, 12),
    rank=st.integers(1, 12),
    log_scale=st.floats(-30.0, 30.0),
    structure=st.sampled_from(["gaussian", "low_rank", "relu", "zero_row", "duplicate"]),
)
def test_structured_maps_match_definition(
    seed: int, samples: int, c: int, p: int, rank: int, log_scale: float, structure: str
) -> None:
    """Rank-deficient, ReLU'd, dead and duplicated channels: error ≤ 1e-8 of the maps' σ_max."""
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((samples, c, p))
    if structure == "low_rank":
        F = rng.standard_normal((samples, c, rank)) @ rng.standard_normal((samples, rank, p))
    elif structure == "relu":
        F = np.maximum(F + 0.5, 0.0)
    elif structure == "zero_row":
        F[:, rng.integers(c)] = 0.0
    elif structure == "duplicate":
        F[:, 0] = F[:, c - 1]
    F *= np.exp(log_scale)
    sigma_max = float(np.linalg.norm(F, ord=2, axis=(1, 2)).max())
    for method in METHODS:
        r = channel_independence(F, method=method)
        _assert_matches_naive(F, r, atol=1e-8 * sigma_max)
        assert np.all(r.ci >= 0)
        assert np.all(r.ci <= np.linalg.norm(F, axis=2).mean(axis=0) * (1 + 1e-12))  # CI ≤ ‖a_i‖


@pytest.mark.parametrize("seed", range(5))
def test_linear_combinations_have_the_lowest_ci(seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((8, 5, 64))
    combos = np.einsum("jk,skp->sjp", rng.uniform(-0.5, 0.5, (3, 5)), base)
    F = np.concatenate([base, combos], axis=1)  # channels 5..7 = combinations of 0..4
    ci = channel_independence(F).ci
    assert ci[5:].max() < ci[:5].min()
    assert channel_independence(F, method="minors").ci == pytest.approx(ci, rel=1e-9)


def test_duplicated_channel_has_the_lowest_ci() -> None:
    rng = np.random.default_rng(7)
    F = rng.standard_normal((8, 6, 64))
    F = np.concatenate([F, F[:, 2:3]], axis=1)  # channel 6 = channel 2
    ci = channel_independence(F).ci
    others = np.delete(ci, [2, 6])
    assert ci[2] == pytest.approx(ci[6], rel=1e-12)
    assert max(ci[2], ci[6]) < others.min()
    # an orthogonal row loses its whole norm; two equal ones lose (√2 − 1) of it each
    G = np.zeros((1, 3, 4))
    G[0, 0, 0] = G[0, 1, 0] = G[0, 2, 1] = 2.0
    assert channel_independence(G).ci == pytest.approx([2 * (np.sqrt(2) - 1)] * 2 + [2.0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("c", "p"), [(12, 30), (12, 5)])
def test_permuting_channels_permutes_ci(method: str, c: int, p: int) -> None:
    rng = np.random.default_rng(3)
    F = np.maximum(rng.standard_normal((4, c, p)), 0.0)
    perm = rng.permutation(c)
    a = channel_independence(F, method=method).ci
    b = channel_independence(F[:, perm], method=method).ci
    np.testing.assert_allclose(b, a[perm], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("c", "p"), [(10, 25), (10, 4)])
def test_scaling_maps_scales_ci(method: str, c: int, p: int) -> None:
    F = np.random.default_rng(4).standard_normal((3, c, p))
    base = channel_independence(F, method=method)
    for scale in (3.7, 1e-3, 1e200, 1e-200):
        r = channel_independence(F * scale, method=method)
        np.testing.assert_allclose(r.ci, base.ci * scale, rtol=1e-12)
        np.testing.assert_allclose(r.ci_std, base.ci_std * scale, rtol=1e-9)
    # powers of two are exact
    assert np.array_equal(channel_independence(F * 2.0**-40, method=method).ci, base.ci * 2.0**-40)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("c", "p"), [(9, 40), (9, 9), (30, 6)])
def test_chunking_does_not_change_the_result(method: str, c: int, p: int) -> None:
    F = np.maximum(np.random.default_rng(5).standard_normal((7, c, p)), 0.0)
    a = channel_independence(F, method=method)
    b = channel_independence(F, method=method, chunk_bytes=1)
    np.testing.assert_allclose(b.ci, a.ci, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.ci_std, a.ci_std, rtol=1e-12, atol=1e-12)


def test_dead_channels_and_zero_samples_are_exactly_zero() -> None:
    F = np.random.default_rng(6).standard_normal((3, 6, 20))
    F[:, 4] = 0.0
    F[1] = 0.0
    for method in METHODS:
        r = channel_independence(F, method=method)
        assert r.ci[4] == 0.0 and r.ci_std[4] == 0.0
        expected = _naive_ci(F[[0, 2]]).sum(axis=0) / 3  # the zero sample contributes 0
        np.testing.assert_allclose(r.ci, expected, rtol=1e-10, atol=1e-12)
    assert np.all(channel_independence(np.zeros((2, 3, 4))).ci == 0.0)


def test_spectral_and_minors_agree_on_correlated_relu_maps() -> None:
    rng = np.random.default_rng(8)
    low = rng.standard_normal((6, 24, 3)) @ rng.standard_normal((6, 3, 36))
    F = np.maximum(low + 0.05 * rng.standard_normal(low.shape), 0.0).astype(np.float32)
    a = channel_independence(F)
    b = channel_independence(F, method="minors")
    np.testing.assert_allclose(a.ci, b.ci, rtol=1e-8)
    # float32 maps are computed in float64: the same as passing the float64 values
    assert np.array_equal(a.ci, channel_independence(F.astype(np.float64)).ci)


def test_max_samples_is_a_seeded_subset() -> None:
    F = np.random.default_rng(9).standard_normal((20, 5, 12))
    r = channel_independence(F, max_samples=6, seed=3)
    assert r.n_samples == 6
    assert np.array_equal(r.ci, channel_independence(F, max_samples=6, seed=3).ci)
    pick = np.sort(np.random.default_rng(3).choice(20, size=6, replace=False))
    assert np.array_equal(r.ci, channel_independence(F[pick]).ci)
    assert not np.array_equal(r.ci, channel_independence(F, max_samples=6, seed=4).ci)
    assert channel_independence(F, max_samples=50).n_samples == 20


def test_keep_mask_is_the_adaptive_rule() -> None:
    ci = np.array([1.0, 2.0, 3.0, 6.0])  # mean 3
    assert keep_mask(ci, 0.5).tolist() == [False, True, True, True]
    assert keep_mask(ci, 1.0).tolist() == [False, False, True, True]
    assert keep_mask(ci, 0.0).all()
    assert keep_mask(np.zeros(3), 0.5).all()
    r = CiLayerResult(ci=ci, ci_std=np.zeros(4), n_samples=1, regime="pixels<channels",
                      method="spectral")  # fmt: skip
    assert r.keep(1.0).tolist() == [False, False, True, True]
    assert r.redundancy(1.0) == 0.5


@pytest.mark.parametrize(
    ("F", "kwargs", "fragment"),
    [
        (np.zeros((4, 5)), {}, "3-D"),
        (np.zeros((2, 1, 5)), {}, "≥ 2 channels"),
        (np.zeros((2, 3, 0)), {}, "≥ 1 pixel"),
        (np.zeros((0, 3, 4)), {}, "≥ 1 sample"),
        (np.full((1, 3, 4), np.nan), {}, "NaN or Inf"),
        (np.full((1, 3, 4), np.inf, dtype=np.float32), {}, "NaN or Inf"),
        (np.zeros((1, 3, 4), dtype=complex), {}, "real numbers"),
        (np.zeros((1, 3, 4)), {"method": "svd"}, "unknown method"),
        (np.zeros((1, 3, 4)), {"max_samples": 0}, "max_samples"),
        (np.zeros((1, 3, 4)), {"chunk_bytes": 0}, "chunk_bytes"),
    ],
)
def test_bad_input_is_refused_with_a_hint(F: np.ndarray, kwargs: dict, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment) as info:
        channel_independence(F, **kwargs)
    assert info.value.hint


@pytest.mark.parametrize(
    ("ci", "alpha", "fragment"),
    [
        (np.zeros((2, 2)), 0.5, "1-D"),
        (np.array([]), 0.5, "1-D"),
        (np.array([1.0, np.nan]), 0.5, "finite"),
        (np.ones(3), -0.1, "alpha"),
        (np.ones(3), float("nan"), "alpha"),
    ],
)
def test_keep_mask_refuses_bad_input(ci: np.ndarray, alpha: float, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment) as info:
        keep_mask(ci, alpha)
    assert info.value.hint

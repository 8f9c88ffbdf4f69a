"""Data-free merges of near-duplicate filters (Neuron Merging, Kim et al., NeurIPS 2020; design §8).

Two channels whose effective pre-activation filters (the producer's weights with its BatchNorm
folded in, ``v = γ/σ · W``) are positive multiples, ``v_j = s · v_i`` with the same relation for
the BN shift (``β_j = s · β_i``), give ``u_j = s · u_i`` for every input; through a positively
homogeneous activation (ReLU, identity: ``f(s·u) = s·f(u)`` for s > 0) their outputs are
``x_j = s · x_i``, so the consumer keeps its output exactly when channel j goes and its input
column i gains s times column j: the fold row ``B[j, i] = s`` of :mod:`graphs.fold`.

Here the merge is expressed through the data-free statistics (:mod:`graphs.datafree`), so the
planner, every method and ``apply_plan`` use it unchanged. The data-free model of a consumer
input is ``x_k = f(u_k)``, ``u_k = |γ_k| z_k + β_k`` with z ~ N(0, 1) (BN's normalized output);
channels are independent, except inside a *merge component*: the connected components of the
graph "cos(v_i, v_j) ≥ threshold" (:func:`merge_components`). Inside one, the z's are jointly
Gaussian with correlation ``ρ_ij = cos(v_i, v_j)`` (the correlation of two filters' responses
to isotropic input; the cosine Gram of the members, so always a valid correlation) and
:func:`cross_moments` gives ``E[f(u_i) f(u_j)]`` (closed form for the identity, one-dimensional
Gauss–Legendre quadrature split at the kinks for ReLU). The least-squares fold the planner
computes from such an S is then

* exactly the merge ``B[j, i] = s``, ``b_j = 0`` (up to the planner's 1e-6 ridge) when v_j = s·v_i
  and β_j = s·β_i — the output is kept to rounding;
* for a near-duplicate, the best linear replacement of x_j by the kept members under this model
  (a coefficient shrunk from s towards 0 as ρ falls, the shift keeping the mean) with its
  predicted error; channels outside components keep the mean fold.

Only ``relu`` and ``identity`` merge (:data:`MERGE_ACTIVATIONS`): ReLU6 is not homogeneous past
its knee (``min(s·u, 6) ≠ s·min(u, 6)``), so its channels stay independent (mean folds). Pairs
with a negative cosine (a negative scale) never join a component; constant channels (γ = 0) are
left out (they are replaced exactly by their mean already).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.special import ndtr

from graphs.datafree import moments_gram, rectified_moments
from graphs.errors import InvalidInputError

__all__ = [
    "DEFAULT_MERGE_THRESHOLD",
    "MERGE_ACTIVATIONS",
    "cross_moments",
    "filter_cosines",
    "merge_components",
    "merged_gram",
]

MergeActivation = Literal["relu", "identity"]
MERGE_ACTIVATIONS: tuple[MergeActivation, ...] = ("relu", "identity")
DEFAULT_MERGE_THRESHOLD = 0.9
"""Cosine of two effective filters above which their channels are modelled as correlated (merge
candidates). The model's correlation ρ = cos holds for isotropic input; for real inputs only
the limit cos → 1 is exact (``|u_j − s·u_i| ≤ ‖v_j − s·v_i‖·‖x‖`` whatever x is). At 0.9 the
residual filter is 44 % of ‖v_j‖ (19 % of its energy): close enough that the relation survives
moderately correlated inputs, and far above chance — random filters in d dimensions have
cosines of about ±1/√d, and P(cos ≥ 0.9) < 1e-6 per pair already for d = 16. Chosen before any
measurement; benchmarks/RESULTS.md counts how many pairs qualify on real checkpoints."""
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(96)
_ZMAX = 12.0  # φ(12) ≈ 2e-32: the Gaussian tail beyond is nothing in float64
_TINY = 1e-12
_CHUNK = 4096


def filter_cosines(filters: np.ndarray) -> np.ndarray:
    """Cosines (c, c) of the rows of ``filters`` (c, d); a zero row has cosine 0 with all."""
    V = np.asarray(filters, dtype=np.float64)
    if V.ndim != 2 or not np.all(np.isfinite(V)):
        raise InvalidInputError(f"filters must be a finite (c, d) matrix, got shape {V.shape}")
    norm = np.linalg.norm(V, axis=1)
    unit = np.divide(V, norm[:, None], out=np.zeros_like(V), where=norm[:, None] > 0)
    cos = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(cos, np.where(norm > 0, 1.0, 0.0))
    return cos


def merge_components(cos: np.ndarray, *, threshold: float) -> list[np.ndarray]:
    """Connected components (≥ 2 members) of the graph ``cos[i, j] ≥ threshold``, i ≠ j.

    Returns sorted index arrays, ordered by their smallest member (deterministic).
    """
    C = np.asarray(cos, dtype=np.float64)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise InvalidInputError(f"cos must be square, got {C.shape}")
    if not (np.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise InvalidInputError(
            f"the merge threshold must be in (0, 1], got {threshold}",
            hint=f"Use a cosine such as {DEFAULT_MERGE_THRESHOLD} (the default).",
        )
    edges = (C >= threshold) & ~np.eye(C.shape[0], dtype=bool)
    if not edges.any():
        return []
    _, labels = connected_components(csr_matrix(edges), directed=False)
    out = [np.flatnonzero(labels == lab) for lab in np.unique(labels)]
    return sorted((m for m in out if m.size > 1), key=lambda m: int(m[0]))


def _relu_given(m: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """E[max(y, 0)] for y ~ N(m, sd²), sd ≥ 0."""
    safe = np.where(sd > 0, sd, 1.0)
    t = m / safe
    smooth = m * ndtr(t) + safe * np.exp(-0.5 * t * t) / np.sqrt(2 * np.pi)
    return np.where(sd > 0, smooth, np.maximum(m, 0.0))


def _relu_pairs(ga: np.ndarray, ba: np.ndarray, gb: np.ndarray, bb: np.ndarray,
                rho: np.ndarray) -> np.ndarray:  # fmt: skip
    """E[relu(ga·za + ba) · relu(gb·zb + bb)] per pair (ga, gb > 0, corr(za, zb) = rho):
    ∫ φ(z) relu(ga z + ba) E[relu(u_b) | za = z] dz over z > −ba/ga, split where the
    conditional mean of u_b crosses 0 (its kink when rho → 1)."""
    lo = np.clip(-ba / ga, -_ZMAX, _ZMAX)
    hi = np.full_like(lo, _ZMAX)
    slope = gb * rho
    with np.errstate(divide="ignore", invalid="ignore"):
        kink = np.where(np.abs(slope) > 0, -bb / slope, lo)
    mid = np.clip(kink, lo, hi)
    sd = gb * np.sqrt(np.clip(1.0 - rho * rho, 0.0, None))
    total = np.zeros_like(lo)
    for a, b in ((lo, mid), (mid, hi)):
        half = (b - a) / 2
        z = (a + b)[:, None] / 2 + half[:, None] * _NODES[None, :]
        f = np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi) * np.maximum(ga[:, None] * z + ba[:, None], 0)
        g = _relu_given(bb[:, None] + slope[:, None] * z, sd[:, None])
        total += half * ((f * g) @ _WEIGHTS)
    return total


def _check_activation(activation: str) -> None:
    if activation not in MERGE_ACTIVATIONS:
        raise InvalidInputError(
            f"activation {activation!r} is not positively homogeneous: no merges",
            hint=f"Merges need one of {', '.join(MERGE_ACTIVATIONS)}; use mean folds otherwise.",
        )


def cross_moments(
    gamma: np.ndarray, beta: np.ndarray, rho: np.ndarray, *, activation: MergeActivation
) -> np.ndarray:
    """E[f(u_a) f(u_b)] (k, k) for u = |γ| z + β, z ~ N(0, ρ) jointly Gaussian.

    ``gamma``, ``beta``: (k,); ``rho``: (k, k) correlation matrix. The diagonal is the closed-form
    second moment of :func:`graphs.datafree.rectified_moments`.
    """
    g = np.abs(np.asarray(gamma, dtype=np.float64).reshape(-1))
    b = np.asarray(beta, dtype=np.float64).reshape(-1)
    R = np.asarray(rho, dtype=np.float64)
    k = g.size
    if b.shape != (k,) or R.shape != (k, k):
        raise InvalidInputError("gamma, beta (k,) and rho (k, k) must agree in size")
    _check_activation(activation)
    mean, var = rectified_moments(g, b, activation=activation)
    out = np.diag(var + mean * mean)
    ia, ib = np.triu_indices(k, 1)
    if activation == "identity":
        vals = R[ia, ib] * g[ia] * g[ib] + b[ia] * b[ib]
    else:
        vals = np.concatenate([
            _relu_pairs(g[ia[s]], b[ia[s]], g[ib[s]], b[ib[s]], R[ia[s], ib[s]])
            for s in (slice(i, i + _CHUNK) for i in range(0, max(ia.size, 1), _CHUNK))
        ])  # fmt: skip
    # a covariance never exceeds the geometric mean of the variances (quadrature rounding)
    bound = np.sqrt(var[ia] * var[ib])
    cov = np.clip(vals - mean[ia] * mean[ib], -bound, bound)
    out[ia, ib] = out[ib, ia] = cov + mean[ia] * mean[ib]
    return out


def merged_gram(
    gamma: np.ndarray,
    beta: np.ndarray,
    filters: np.ndarray,
    *,
    activation: MergeActivation,
    threshold: float = DEFAULT_MERGE_THRESHOLD,
    rows: float = 1.0,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The data-free S (c+1, c+1) of ``f(|γ| z + β)`` with merge components correlated.

    Args:
        gamma, beta: the producer's BN scale and shift, (c,).
        filters: its effective filters (c, d): rows ``γ_k/σ_k · W_k`` (a grouped producer's
            rows zero outside their group), so that a negative γ flips a filter.
        activation: ``relu`` or ``identity``.
        threshold: the cosine of :func:`merge_components`.
        rows: the nominal row count of :func:`graphs.datafree.moments_gram`.

    Returns:
        S, and the merge components (index arrays). Without components S is exactly
        ``moments_gram(*rectified_moments(gamma, beta, activation=activation), rows=rows)``.
    """
    _check_activation(activation)
    g = np.asarray(gamma, dtype=np.float64).reshape(-1)
    b = np.asarray(beta, dtype=np.float64).reshape(-1)
    V = np.asarray(filters, dtype=np.float64)
    if V.ndim != 2 or V.shape[0] != g.size:
        raise InvalidInputError(f"filters {V.shape} must have one row per channel ({g.size})")
    mean, var = rectified_moments(g, b, activation=activation)
    S = moments_gram(mean, var, rows=rows)
    cos = filter_cosines(V)
    const = np.abs(g) <= _TINY * np.maximum(np.abs(b), 1.0)
    cos[const, :] = 0.0
    cos[:, const] = 0.0
    comps = merge_components(cos, threshold=threshold)
    for members in comps:
        block = cross_moments(g[members], b[members], cos[np.ix_(members, members)],
                              activation=activation)  # fmt: skip
        S[np.ix_(members, members)] = block * rows
    return S, comps

"""CHIP's channel independence (CI) of a layer's feature maps, from Gram spectra.

Seed papers: "CHIP: CHannel Independence-based Pruning for Compact Neural Networks" (NeurIPS
2021) and "Adaptive convolutional network pruning through pixel-level cross-correlation and
channel independence" (EAAI 2025). For one input sample the layer's output is A (channels ×
pixels); the CI of channel i is how much the nuclear norm drops when its row is zeroed,
‖A‖* − ‖A with row i zeroed‖*, averaged over the samples. A channel that is (close to) a linear
combination of the others has a low CI and is the first to prune; CI ≥ 0 and CI ≤ ‖a_i‖.

No SVD of A is taken. With G = AAᵀ = QΛQᵀ (c × c) and w_k = Q_ik², zeroing row i deletes row and
column i of G, and with t = u²

    CI_i = (2/π) ∫₀^∞ f_i(u) du,   f_i = Σ_k w_k λ_k / (λ_k + t)²  /  Σ_k w_k / (λ_k + t)  ∈ [0, 1],

exact (from √x = (2/π)∫ x/(x + u²) du and tr((H_{-i})⁻¹) = tr(H⁻¹) − (H⁻²)_ii / (H⁻¹)_ii,
H = G + t). One eigendecomposition per sample serves every channel: O(c³ + c²·n) per sample, not
the O(c⁴) of c eigenvalue problems. When pixels < channels the p × p Gram AᵀA = VΛVᵀ is used
instead, with B = AV: numerator Σ_k B_ik² / (λ_k + t)², denominator (1 − Σ_k B_ik² / (λ_k + t)) / t.
The integral is taken on a uniform grid in log u scaled to the sample's largest singular value
(the trapezoid rule converges geometrically for this analytic integrand, ≤ 1e-13 relative at
step 1/4), with ψ_i = ‖a_i‖²/(σ_max² + t), whose integral is known, subtracted so that the
integrand above the grid is O(u⁻⁴). ``method="minors"`` takes the literal route instead: the
eigenvalues of the c stacked (c−1)² minors of AAᵀ (or of the c rank-one downdates
AᵀA − a_i a_iᵀ), batched.

Accuracy: both methods agree with the nuclear-norm definition to ~1e-13 relative on
well-conditioned maps. Any Gram method resolves singular values only down to ≈ √(eps·k)·σ_max
(≈ 1e-7 σ_max): a channel far weaker than that, or a spectrum with such tiny singular values,
gets an absolute error of that order. All-zero channels get CI = 0 exactly.

Memory: samples are processed in chunks whose float64 work arrays fit in ``chunk_bytes``
(default 16 MiB), at least one sample per chunk; peak memory ≈ the input (and the copy that
``max_samples`` takes) + max(chunk_bytes, one sample's work arrays, ≈ 8·(3cp + 4k² + 10c·n) bytes
with k = min(c, p) and n = 141 nodes) + 2 × (samples × channels) float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np

from graphs.errors import InvalidInputError

Method = Literal["spectral", "minors"]
Regime = Literal["channels<=pixels", "pixels<channels"]

DEFAULT_CHUNK_BYTES = 2**24
"""Budget for one chunk of float64 work arrays (16 MiB: large enough to batch LAPACK calls, small
enough to stay in cache; larger budgets are no faster)."""
QUAD_STEP = 0.25
QUAD_GRID = np.arange(-23.0, 12.0 + QUAD_STEP / 2, QUAD_STEP)
"""log(u / σ_max) nodes: from 1e-10 σ_max (below any Gram method's resolution) to e^12 σ_max."""
_EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class CiLayerResult:
    """CI of one layer; arrays have shape (channels,)."""

    ci: np.ndarray
    """Mean CI over the samples used."""
    ci_std: np.ndarray
    """Standard deviation of the per-sample CI (ddof 0)."""
    n_samples: int
    regime: Regime
    method: Method

    def keep(self, alpha: float) -> np.ndarray:
        """:func:`keep_mask` of this layer's CI."""
        return keep_mask(self.ci, alpha)

    def redundancy(self, alpha: float) -> float:
        """Share of channels the adaptive rule prunes: 1 − mean(keep(alpha))."""
        return float(1.0 - self.keep(alpha).mean())


def keep_mask(ci: np.ndarray, alpha: float) -> np.ndarray:
    """Adaptive per-layer rule: keep the channels whose CI is ≥ alpha · mean(CI).

    Args:
        ci: CI per channel, shape (channels,), non-negative.
        alpha: threshold relative to the layer's mean CI; 0 keeps every channel.

    Returns:
        bool array of shape (channels,); all True when every CI is 0 (nothing to tell apart).
    """
    c = np.asarray(ci, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or not np.all(np.isfinite(c)):
        raise InvalidInputError(
            f"ci must be a non-empty 1-D array of finite values, got shape {c.shape}",
            hint="Pass CiLayerResult.ci of one layer.",
        )
    if not (np.isfinite(alpha) and alpha >= 0):
        raise InvalidInputError(
            f"alpha must be a finite number ≥ 0, got {alpha}",
            hint="Use e.g. alpha=0.5 to drop channels under half of the layer's mean CI.",
        )
    mean = float(c.mean())
    return np.ones(c.size, dtype=bool) if mean <= 0 else c >= alpha * mean


def check_feature_maps(F: np.ndarray) -> np.ndarray:
    """Validate feature maps (samples, channels, pixels) once at the public entry."""
    A = np.asarray(F)
    if A.ndim != 3:
        raise InvalidInputError(
            f"feature maps must be a 3-D array (samples, channels, pixels), got shape {A.shape}",
            hint="Flatten the spatial axes: maps.reshape(n_samples, n_channels, -1).",
        )
    if A.shape[0] < 1 or A.shape[1] < 2 or A.shape[2] < 1:
        raise InvalidInputError(
            f"feature maps need ≥ 1 sample, ≥ 2 channels and ≥ 1 pixel, got shape {A.shape}",
            hint="CI compares a channel with the others of its layer: pass a whole layer.",
        )
    if not (np.issubdtype(A.dtype, np.floating) or np.issubdtype(A.dtype, np.integer)):
        raise InvalidInputError(f"feature maps must be real numbers, got dtype {A.dtype}")
    if not np.all(np.isfinite(A)):
        raise InvalidInputError(
            "feature maps contain NaN or Inf values",
            hint="Check the model's activations for overflow; non-finite maps have no CI.",
        )
    return A


def channel_independence(
    F: np.ndarray,
    *,
    max_samples: int | None = None,
    seed: int = 0,
    method: Method = "spectral",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> CiLayerResult:
    """Channel independence of every channel of one layer.

    Args:
        F: feature maps of shape (samples, channels, pixels), any real dtype (computed in
            float64); spatial axes flattened into pixels.
        max_samples: use at most this many samples, drawn without replacement with ``seed``.
        seed: seed of that draw (the result is otherwise deterministic).
        method: "spectral" (one eigendecomposition per sample) or "minors" (one eigenvalue
            problem per sample and channel; slower, kept as the literal reference).
        chunk_bytes: budget for one chunk of float64 work arrays.

    Returns:
        :class:`CiLayerResult`.
    """
    A = check_feature_maps(F)
    if method not in ("spectral", "minors"):
        raise InvalidInputError(f"unknown method {method!r}", hint='Use "spectral" or "minors".')
    if max_samples is not None and max_samples < 1:
        raise InvalidInputError(f"max_samples must be ≥ 1, got {max_samples}")
    if chunk_bytes < 1:
        raise InvalidInputError(f"chunk_bytes must be ≥ 1, got {chunk_bytes}")
    S, c, p = A.shape
    if max_samples is not None and max_samples < S:
        pick = np.random.default_rng(seed).choice(S, size=max_samples, replace=False)
        A, S = A[np.sort(pick)], max_samples
    k = min(c, p)
    fn: Callable[[np.ndarray], np.ndarray]
    if method == "spectral":
        per_sample = 8 * (3 * c * p + 4 * k * k + 4 * k * QUAD_GRID.size + 10 * c * QUAD_GRID.size)
        fn = _spectral_rows if c <= p else _spectral_pixels
    else:
        per_sample = 8 * (2 * c * p + 3 * k * k)
        fn = partial(_minors_rows if c <= p else _minors_pixels, chunk_bytes=chunk_bytes)
    step = max(1, chunk_bytes // per_sample)
    per = np.empty((S, c))
    for start in range(0, S, step):
        chunk = A[start : start + step]
        X = chunk.astype(np.float64)
        # exact power-of-two rescale to max |x| in [1/2, 1): no overflow, no underflow
        _, exponent = np.frexp(np.abs(chunk if chunk.dtype.kind == "f" else X).max(axis=(1, 2)))
        np.ldexp(X, -exponent[:, None, None], out=X)
        per[start : start + step] = np.ldexp(fn(X), exponent[:, None])
    _, top = np.frexp(per.max(axis=0))  # moments of rescaled values: no overflow
    scaled = np.ldexp(per, -top)
    return CiLayerResult(
        ci=np.ldexp(scaled.mean(axis=0), top),
        ci_std=np.ldexp(scaled.std(axis=0), top),
        n_samples=S,
        regime="channels<=pixels" if c <= p else "pixels<channels",
        method=method,
    )


def _floored_eigh(M: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of stacked symmetric PSD matrices; eigenvalues under the rounding floor → 0."""
    lam, V = np.linalg.eigh(M)
    floor = size * _EPS * np.maximum(lam[:, -1:], 0.0)
    return np.where(lam > floor, lam, 0.0), V


def _grid(lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid scale s (S,) = each sample's σ_max (1 for a zero sample) and nodes t = u² (S, n)."""
    smax = np.sqrt(lam[:, -1])
    s = np.where(smax > 0, smax, 1.0)
    return s, np.square(s[:, None] * np.exp(QUAD_GRID)[None, :])


def _integrate(f: np.ndarray, s: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(2/π)∫₀^∞ f du from f (S, c, n) on the nodes of :func:`_grid`; g = ‖a_i‖², shape (S, c).

    ψ = g / (s² + t), whose integral is (π/2)·g/s, is subtracted so that the integrand decays
    like u⁻⁴ above the grid (f and ψ both ~ g/u² there). In x = log u the trapezoid rule is
    exact up to O(e^{−π²/h}) for this analytic integrand; at the first node it behaves like e^x
    (f and ψ are constant to O(u²) below it), which gives the Euler–Maclaurin end term and the
    piece (f − ψ)(u0)·u0 below the grid.
    """
    e = np.exp(QUAD_GRID)
    w = np.full(QUAD_GRID.size, QUAD_STEP)
    w[[0, -1]] = QUAD_STEP / 2
    psi_sum = float(np.sum(w * e / (1.0 + e * e)))  # s · Σ w_q u_q ψ_q / g
    first = (f[:, :, 0] - g / (s * s * (1.0 + e[0] ** 2))[:, None]) * (s * e[0])[:, None]
    body = f @ (w * e) * s[:, None] - g * (psi_sum / s)[:, None]
    total = (2.0 / np.pi) * (body + (1.0 + QUAD_STEP**2 / 12.0) * first) + g / s[:, None]
    total[g == 0] = 0.0  # zeroing an all-zero row changes nothing
    return np.maximum(total, 0.0)


def _spectral_rows(X: np.ndarray) -> np.ndarray:
    """Per-sample CI (S, c) of X (S, c, p), c ≤ p, from the eigenpairs of XXᵀ."""
    G = X @ X.transpose(0, 2, 1)
    lam, Q = _floored_eigh(G, max(X.shape[1:]))
    s, t = _grid(lam)
    den = 1.0 / (lam[:, :, None] + t[:, None, :])  # (S, c, n)
    W = Q * Q  # W[s, i, k] = Q_ik²
    f = W @ den
    np.divide(W @ (lam[:, :, None] * den * den), f, out=f)
    return _integrate(f, s, np.einsum("sii->si", G))


def _spectral_pixels(X: np.ndarray) -> np.ndarray:
    """Per-sample CI (S, c) of X (S, c, p), p < c, from the eigenpairs of XᵀX."""
    lam, V = _floored_eigh(X.transpose(0, 2, 1) @ X, max(X.shape[1:]))
    s, t = _grid(lam)
    den = 1.0 / (lam[:, :, None] + t[:, None, :])  # (S, p, n)
    B2 = np.square(X @ V)  # (S, c, p)
    one_minus_h = 1.0 - B2 @ den  # ≥ 0 exactly; rounding can only push it to 0
    f = t[:, None, :] * (B2 @ (den * den))
    f /= np.maximum(one_minus_h, _EPS)
    np.minimum(f, 1.0, out=f)  # f ≤ 1 exactly
    return _integrate(f, s, np.einsum("sip,sip->si", X, X))


def _nuclear(M: np.ndarray, size: int) -> np.ndarray:
    """Σ √eig of stacked PSD Gram matrices (..., k, k) → (...); rounding-level eigenvalues → 0."""
    lam = np.linalg.eigvalsh(M)
    lam[lam <= size * _EPS * np.maximum(lam[..., -1:], 0.0)] = 0.0
    return np.sqrt(lam).sum(axis=-1)


def _item_chunks(S: int, c: int, item_bytes: int, chunk_bytes: int) -> list[np.ndarray]:
    """Flat (sample, channel) indices s·c + i in chunks of ≤ chunk_bytes / item_bytes."""
    step = max(1, chunk_bytes // item_bytes)
    return [np.arange(k, min(k + step, S * c)) for k in range(0, S * c, step)]


def _minors_rows(X: np.ndarray, chunk_bytes: int) -> np.ndarray:
    """Per-sample CI (S, c), c ≤ p: eigenvalues of the (c−1)² principal minors of XXᵀ."""
    S, c, p = X.shape
    G = X @ X.transpose(0, 2, 1)
    full = _nuclear(G, p)
    # others[i] = [0, …, c−1] without i
    j = np.arange(c - 1)
    others = j[None, :] + (j[None, :] >= np.arange(c)[:, None])
    out = np.empty(S * c)
    for flat in _item_chunks(S, c, 3 * 8 * (c - 1) ** 2, chunk_bytes):
        s, i = np.divmod(flat, c)
        rows = others[i]
        minors = G[s[:, None, None], rows[:, :, None], rows[:, None, :]]
        out[flat] = full[s] - _nuclear(minors, p)
    return np.where(X.any(axis=2), out.reshape(S, c), 0.0)


def _minors_pixels(X: np.ndarray, chunk_bytes: int) -> np.ndarray:
    """Per-sample CI (S, c), p < c: eigenvalues of the rank-one downdates XᵀX − x_i x_iᵀ."""
    S, c, p = X.shape
    M = X.transpose(0, 2, 1) @ X
    full = _nuclear(M, c)
    out = np.empty(S * c)
    for flat in _item_chunks(S, c, 3 * 8 * p * p, chunk_bytes):
        s, i = np.divmod(flat, c)
        x = X[s, i]  # (m, p)
        out[flat] = full[s] - _nuclear(M[s] - x[:, :, None] * x[:, None, :], c)
    return np.where(X.any(axis=2), out.reshape(S, c), 0.0)

"""Functional redundancy: how much of a group's channels the others can take over (design §8).

For a group of coupled channels, each channel-mixing consumer (the conv/linear reading them)
sees an input X (rows × c: one row per position of one sample). Everything here needs only its
second moment with a constant column, ``S = [X 1]ᵀ[X 1]`` of shape (c+1, c+1), constant LAST
(:class:`ConsumerStats`).

* **Replacement.** Removing channels R and keeping K, the least-squares fold
  ``X_R ≈ X_K Bᵀ + 1 bᵀ`` (:func:`least_squares_fold`) is computed from S: centred through the
  constant column, standardized (so it is invariant to rescaling a channel), a small ridge
  relative to each channel's variance, solved by Cholesky (eigenvalue floor when the kept
  channels are rank-deficient). Channels that are constant in the data are replaced exactly by
  their mean.
* **Predicted error.** With the consumer's weight W (out, c, taps), the fold leaves the output
  error ``Σ_t W_{R,t} E W_{R,t}ᵀ`` with E the residual covariance (taps treated as independent
  rows, which is exact for 1×1 convs and linear layers). It is reported *relative to each output
  channel's variance and averaged over output channels*: centred because the fold's shift b
  restores the mean exactly (raw energy would call any error small when outputs have a large
  mean, and a BN after the consumer removes the mean anyway); per output channel because a BN
  after the consumer rescales every channel to unit variance, so a small channel's error counts
  as much as a large one's. The output variances use the same tap approximation, so the ratio is
  consistent. Without a weight, each standardized channel is its own output (the error is the
  mean unexplained variance fraction of the removed channels over all channels). Coupled groups
  sum the relative errors of all their consumers.
* **Error curve.** :func:`error_curve` removes channels one at a time, each time the one whose
  removal (with the fold re-fitted) adds the least error: greedy backward elimination, exact at
  every step through the precision-matrix identities — removing j from K adds
  ``‖U_j‖² / [C_KK⁻¹]_jj`` where U is the compensated weight, and both C_KK⁻¹ and UᵀU get
  rank-one updates — O(c²) per step, recomputed from scratch whenever the kept set has shrunk
  by half (keeps rounding from accumulating).
* **Functional redundancy** (:func:`functional_redundancy`) = the largest fraction of the group
  removable with relative error ≤ ε along that curve. Default ε = 0.01 (see
  :data:`graphs.options.DEFAULT_EPSILON`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas

from graphs.consumers import (
    Consumer,
    Prepared,
    spd_inverse,
    spd_solve,
)
from graphs.errors import InvalidInputError
from graphs.options import DEFAULT_EPSILON, DEFAULT_RIDGE

__all__ = [
    "ErrorCurve",
    "error_curve",
    "functional_redundancy",
    "least_squares_fold",
    "predicted_error",
]

_syr = scipy.linalg.blas.dsyr
_syr2 = scipy.linalg.blas.dsyr2


def _std_fold(p: Prepared, kept: np.ndarray, removed: np.ndarray, ridge: float) -> np.ndarray:
    """B in standardized coordinates, (|R|, |K|)."""
    if kept.size == 0 or removed.size == 0:
        return np.zeros((removed.size, kept.size))
    ckk = p.corr[np.ix_(kept, kept)] + ridge * np.eye(kept.size)
    return spd_solve(ckk, p.corr[np.ix_(kept, removed)]).T


def least_squares_fold(
    consumer: Consumer,
    kept: Sequence[int],
    removed: Sequence[int],
    *,
    ridge: float = DEFAULT_RIDGE,
) -> tuple[np.ndarray, np.ndarray, float]:
    """The fold of one consumer and its predicted relative output error.

    Returns ``B`` (|R|, |K|), ``b`` (|R|,) with ``X_R ≈ X_K Bᵀ + 1 bᵀ`` in the channels' own
    units (apply with :func:`graphs.fold.fold_weight`), and the relative output error of the
    fold on the calibration statistics (see the module docstring).
    """
    k, r = _check_split(consumer.stats.channels, kept, removed)
    _check_ridge(ridge)
    p = consumer.prepared
    Bs = _std_fold(p, k, r, ridge)
    scale_k = np.where(p.sd[k] > 0, 1.0 / np.where(p.sd[k] > 0, p.sd[k], 1.0), 0.0)
    B = Bs * p.sd[r][:, None] * scale_k[None, :]
    b = p.mu[r] - B @ p.mu[k]
    return B, b, _error(p, k, r, Bs) * p.inflation(int((~p.constant[k]).sum()))


def _error(p: Prepared, k: np.ndarray, r: np.ndarray, Bs: np.ndarray) -> float:
    if r.size == 0:
        return 0.0
    c_rk = p.corr[np.ix_(r, k)]
    E = p.corr[np.ix_(r, r)] - Bs @ c_rk.T - c_rk @ Bs.T + Bs @ p.corr[np.ix_(k, k)] @ Bs.T
    return max(float(np.sum(p.metric[np.ix_(r, r)] * E)), 0.0)


def predicted_error(
    consumers: Sequence[Consumer],
    kept: Sequence[int],
    removed: Sequence[int],
    *,
    ridge: float = DEFAULT_RIDGE,
) -> float:
    """Relative output error of removing ``removed`` with least-squares folds, summed over the
    group's consumers."""
    return sum(least_squares_fold(c, kept, removed, ridge=ridge)[2] for c in consumers)


def _check_split(c: int, kept: Sequence[int], removed: Sequence[int]) -> tuple[np.ndarray, ...]:
    k = np.asarray(kept, dtype=np.int64).reshape(-1)
    r = np.asarray(removed, dtype=np.int64).reshape(-1)
    both = np.concatenate([k, r])
    if both.size != c or np.unique(both).size != c or (c and (both.min() < 0 or both.max() >= c)):
        raise InvalidInputError(
            f"kept and removed must split the {c} channels into two disjoint sets",
            hint="Pass every channel index exactly once.",
        )
    return k, r


def _check_ridge(ridge: float) -> None:
    if not (np.isfinite(ridge) and ridge >= 0):
        raise InvalidInputError(f"ridge must be a finite number >= 0, got {ridge}")


@dataclass(frozen=True)
class ErrorCurve:
    """Greedy backward elimination of a group's channels with least-squares folds.

    ``order`` (m,): channels in the order removed; ``errors`` (m+1,): relative output error
    (summed over consumers) after removing ``order[:k]``, ``errors[0] = 0``; ``channels``: n.
    """

    order: np.ndarray
    errors: np.ndarray
    channels: int

    def removable(self, epsilon: float = DEFAULT_EPSILON) -> int:
        """The most channels removable with error ≤ epsilon along the path."""
        return int(np.searchsorted(self.errors, epsilon, side="right") - 1)

    def redundancy(self, epsilon: float = DEFAULT_EPSILON) -> float:
        return self.removable(epsilon) / self.channels


class _State:
    """Kept-set state of one consumer for the greedy path: Q = (C̃_KK)⁻¹ and H = UᵀU (metric
    of the compensated weight), both over ``idx`` (positions still kept are where live)."""

    def __init__(self, p: Prepared, ridge: float) -> None:
        self.p, self.ridge = p, ridge

    def rebuild(self, kept: np.ndarray, removed: np.ndarray) -> None:
        p = self.p
        Q = spd_inverse(p.corr[np.ix_(kept, kept)] + self.ridge * np.eye(kept.size))
        A = p.corr[np.ix_(removed, kept)] @ Q  # (|R|, |K|)
        M = p.metric
        mkr = M[np.ix_(kept, removed)] @ A
        H = M[np.ix_(kept, kept)] + mkr + mkr.T + A.T @ M[np.ix_(removed, removed)] @ A
        # Fortran order: BLAS syr/syr2 update the upper triangle in place
        self.Q, self.H = np.asfortranarray(Q), np.asfortranarray(H)

    def scores(self, live: np.ndarray) -> np.ndarray:
        d = np.diagonal(self.Q)
        return np.divide(np.diagonal(self.H), d, out=np.zeros(d.size), where=live & (d > 0))

    def remove(self, j: int) -> None:
        """Q ← Q − Q_j Q_jᵀ / Q_jj;  H ← (I − q e_jᵀ) H (I − e_j qᵀ) with q = Q_j / Q_jj."""
        Q, H = self.Q, self.H
        qj = np.concatenate([Q[:j, j], Q[j, j:]])  # column j from the upper triangle
        hj = np.concatenate([H[:j, j], H[j, j:]])
        q = qj / qj[j]
        h = hj - 0.5 * hj[j] * q
        _syr(-1.0 / qj[j], qj, a=Q, lower=0, overwrite_a=1)
        _syr2(-1.0, q, h, a=H, lower=0, overwrite_a=1)


def error_curve(
    consumers: Sequence[Consumer],
    *,
    ridge: float = DEFAULT_RIDGE,
    max_remove: int | None = None,
    stop_above: float | None = None,
) -> ErrorCurve:
    """Remove a group's channels one by one, always the one adding least error.

    ``consumers``: every channel-mixing consumer of the group (same c). The path stops after
    ``max_remove`` channels (default c − 1: at least one channel stays), or after the first
    step whose error exceeds ``stop_above`` (enough for :meth:`ErrorCurve.removable` at any
    ε ≤ stop_above). Ties go to the lowest index. O(c²) per step per consumer. Errors are
    expected out-of-sample errors: each consumer's in-sample error times its
    :meth:`~graphs.consumers.Prepared.inflation` for the channels still kept.
    """
    if not consumers:
        raise InvalidInputError("a group needs at least one consumer for its error curve")
    c = consumers[0].stats.channels
    if any(k.stats.channels != c for k in consumers):
        raise InvalidInputError("all consumers of a group must read the same number of channels")
    _check_ridge(ridge)
    steps = c - 1 if max_remove is None else int(max_remove)
    if not 0 <= steps <= c - 1:
        raise InvalidInputError(f"max_remove must be in [0, {c - 1}], got {max_remove}")
    states = [_State(k.prepared, ridge) for k in consumers]
    kept = np.arange(c)
    order: list[int] = []
    errors = [0.0]
    size = c
    for s in states:
        s.rebuild(kept, np.zeros(0, dtype=np.int64))
    live = np.ones(c, dtype=bool)  # positions of kept[] still kept
    inner = [0.0] * len(states)  # in-sample error per consumer
    predictors = [int((~s.p.constant).sum()) for s in states]  # non-constant kept channels
    for _ in range(steps):
        if live.sum() < 0.5 * size and size > 32:
            kept = kept[live]
            removed = np.asarray(order, dtype=np.int64)
            for s in states:
                s.rebuild(kept, removed)
            live = np.ones(kept.size, dtype=bool)
            size = kept.size
        parts = [np.maximum(s.scores(live), 0.0) for s in states]
        score = np.zeros(kept.size)
        for s, part, q in zip(states, parts, predictors, strict=True):
            score += s.p.inflation(q - 1) * part
        j = int(np.argmin(np.where(live, score, np.inf)))
        order.append(int(kept[j]))
        for i, s in enumerate(states):
            inner[i] += float(parts[i][j])
            predictors[i] -= int(not s.p.constant[kept[j]])
        total = sum(s.p.inflation(q) * e for s, q, e in zip(states, predictors, inner, strict=True))
        errors.append(max(errors[-1], total))  # fewer predictors can overfit less: keep it monotone
        live[j] = False
        if stop_above is not None and errors[-1] > stop_above:
            break
        for s in states:
            s.remove(j)
    return ErrorCurve(
        order=np.asarray(order, dtype=np.int64), errors=np.asarray(errors), channels=c
    )


def functional_redundancy(
    consumers: Sequence[Consumer],
    *,
    epsilon: float = DEFAULT_EPSILON,
    ridge: float = DEFAULT_RIDGE,
) -> float:
    """The largest fraction of the group's channels removable with relative consumer-output
    error ≤ ``epsilon`` after least-squares folds (greedy path of :func:`error_curve`)."""
    if not (np.isfinite(epsilon) and epsilon >= 0):
        raise InvalidInputError(f"epsilon must be a finite number >= 0, got {epsilon}")
    return error_curve(consumers, ridge=ridge, stop_above=epsilon).redundancy(epsilon)

"""Cross-fitted error curves: the error of a fold measured on data it was not fitted on.

The predicted error of :mod:`graphs.functional` is in-sample (times a Gaussian out-of-sample
factor). In deep, wide, low-resolution layers a least-squares fold of many channels looks nearly
free in-sample and is not. Cross-fitting measures it instead: split the calibration data in two
halves A and B with second moments ``S_A`` and ``S_B`` ((c+1, c+1), constant last, as
:class:`graphs.consumers.ConsumerStats`); fit the fold on A and evaluate it exactly on B — the
squared consumer-output error of a fixed linear fold is a quadratic form in ``S_B`` — and vice
versa, and average the two.

* **Which channels.** The removal order is the greedy path of the pooled statistics
  ``S_A + S_B`` (:func:`graphs.functional.error_curve`): the channels a plan removes and folds
  (the fold itself is fitted on the pooled statistics, as without cross-fitting).
* **Fold** on the fit half: the ridge least squares of :func:`graphs.functional.least_squares_fold`
  (the half's own standardization and ridge), intercept included.
* **Error** on the other half: the residual's second moment under it — its mean included (the
  fold's shift was fitted on the other half) — weighted by the pooled output metric, i.e.
  relative to each output channel's pooled variance as in :mod:`graphs.functional`. No
  out-of-sample factor: the measurement is out-of-sample already (for a fold fitted on half the
  data, so slightly pessimistic for the pooled fold).
* Along the order, removing a block of channels J from the kept set K updates the fold by the
  precision-matrix identity of :func:`graphs.functional.error_curve` (exact with the ridge) in
  matrix products, and the error after each channel of the block comes from |J|×|J| matrices;
  the metric enters through a factor F (M = F Fᵀ, F (c, r) with r = outputs × taps when that is
  smaller). A whole curve costs O(c³) per consumer and direction (c/32 products of c×c by c×32).
* The two directions of every consumer are computed side by side (``workers`` threads), each
  alone, while the pooled curves of the next groups are computed in the calling thread: the
  result does not depend on the number of threads (under one BLAS thread, as the planner runs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg.lapack

from graphs.compensated import GroupConsumers
from graphs.consumers import (
    Consumer,
    ConsumerStats,
    Prepared,
    channel_gram,
    spd_inverse,
    spd_solve,
)
from graphs.errors import InvalidInputError
from graphs.functional import ErrorCurve, error_curve
from graphs.options import DEFAULT_RIDGE

__all__ = ["crossfit_curve", "crossfit_curves", "direction_errors", "split_stats"]

BLOCK = 32
"""Channels removed per state update along a cross-fitted curve (any block: the same errors)."""
_COND = 1e6  # a block whose Q_JJ is worse conditioned goes one channel at a time (scalar pivots)

_HINT = (
    "Pass the statistics of a part of the calibration data (e.g. the second half of the source "
    "images) captured exactly like the statistics of all of it."
)


def _moments_about(evaluate: ConsumerStats, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """E[(x − mu)(x − mu)ᵀ] / (sd sdᵀ) under ``evaluate``'s rows, (c, c)."""
    S, n = evaluate.gram, evaluate.count
    m = S[:-1, -1] / n
    raw = S[:-1, :-1] / n - np.outer(mu, m) - np.outer(m, mu) + np.outer(mu, mu)
    return (raw + raw.T) / (2 * np.outer(sd, sd))


def _spd_inverse(A: np.ndarray, ridge: float) -> np.ndarray:
    """(A + ridge I)⁻¹ of a symmetric positive (semi)definite A (a fresh copy, changed in
    place): Cholesky and its inverse (LAPACK potrf + potri, half the work of solving for the
    identity), else :func:`graphs.consumers.spd_inverse`."""
    A[np.diag_indices_from(A)] += ridge
    L, info = scipy.linalg.lapack.dpotrf(A, lower=1, clean=0)
    if info == 0:
        inv, info = scipy.linalg.lapack.dpotri(L, lower=1)
        if info == 0:
            low = np.tril(inv)
            return low + np.tril(inv, -1).T
    return spd_inverse(A)


class _Path:
    """One direction's state along the order since the last rebuild, in the fit half's
    standardized coordinates. With K the kept channels at the rebuild, the lift L (c, K) gives
    x̂ = L x_K (identity on K, the fold on the removed), and the metric is M = F Fᵀ (F (c, r)):
    ``Q`` = (C_KK + ridge I)⁻¹ (K, K), ``NF`` = Lᵀ F (K, r) (so H = Lᵀ M L = NF NFᵀ), and the
    error tr(M (I − L S_K) G (I − L S_K)ᵀ) = tr(MG) − 2 ``cross`` + ``quad`` with
    cross = tr(Lᵀ M G_:K), quad = tr(H G_KK). Removed positions have zero rows in Q and NF."""

    def __init__(self, C: np.ndarray, F: np.ndarray, G: np.ndarray, gone: np.ndarray, ridge: float):
        c = C.shape[0]
        self.basis = b = np.setdiff1d(np.arange(c), gone)
        self.Q = _spd_inverse(C[np.ix_(b, b)], ridge)
        self.NF = F[b] + self.Q @ (C[np.ix_(b, gone)] @ F[gone])  # Lᵀ F
        self.GkF = G[b] @ F  # (K, r)
        self.Gkk = G[np.ix_(b, b)]
        self.cross = float(np.sum(self.NF * self.GkF))
        self.quad = float(np.sum((self.Gkk @ self.NF) * self.NF))

    def remove(self, J: np.ndarray) -> list[float]:
        """Remove positions ``J`` (b,) in turn; −2 cross + quad after each of them (b values).

        Removing a set J from the kept set refits the fold: L ← L − L_J P with
        P = Q_JJ⁻¹ Q_J: (b, K), so NF ← NF − Pᵀ NF_J and Q ← Q − Q_:J P (H ← H + U P + Pᵀ Uᵀ
        with U = ½ Pᵀ H_JJ − H_:J). The traces after the first i of J need only b×b matrices:
        with Z = (Q_JJ)_i⁻¹, cross − tr(Z A_i) and quad + tr(H_JJ Z B Z)_i − 2 tr(D_i Z), where
        A = Q_:Jᵀ G_K: M L_J, B = Q_:Jᵀ G_KK Q_:J, D = H_:Jᵀ G_KK Q_:J. A block whose Q_JJ is
        ill-conditioned (nearly collinear channels; never on MobileNetV2, where cond ≤ 500) is
        removed one channel at a time, which divides by scalar pivots only.
        """
        Q, NF = self.Q, self.NF
        QJ, NFJ = Q[:, J], NF[J]
        QJJ = QJ[J]
        if J.size > 1 and np.linalg.cond(QJJ) > _COND:  # nearly collinear: one at a time
            return [e for j in range(J.size) for e in self.remove(J[j : j + 1])]
        HJ = NF @ NFJ.T  # (K, b)
        HJJ = HJ[J]
        V = self.Gkk @ QJ  # (K, b)
        A = QJ.T @ (self.GkF @ NFJ.T)
        B, D = QJ.T @ V, HJ.T @ V
        out = []
        cross = quad = 0.0
        for i in range(1, J.size + 1):
            Z = np.linalg.inv(QJJ[:i, :i])
            ZB = Z @ B[:i, :i]
            cross = self.cross - float(np.sum(Z * A[:i, :i].T))
            quad = self.quad + float(np.sum((HJJ[:i, :i] @ ZB) * Z.T) - 2 * np.sum(D[:i, :i] * Z.T))
            out.append(quad - 2.0 * cross)
        P = spd_solve(QJJ, QJ.T)  # (b, K)
        self.NF = NF - P.T @ NFJ
        self.Q = Q - QJ @ P
        self.cross, self.quad = cross, quad
        return out


def _metric_factor(pooled: Prepared, d: np.ndarray) -> np.ndarray:
    """F (c, r) with F Fᵀ = the pooled metric in fit's coordinates (diag(d) M diag(d))."""
    rows = pooled.metric_rows  # kept only where it has fewer rows than columns
    if rows is not None:
        return np.asarray(rows.T * d[:, None])
    w, V = np.linalg.eigh(pooled.metric * np.outer(d, d))
    keep = w > 1e-14 * max(float(w.max()), 1e-300)
    return np.asarray(V[:, keep] * np.sqrt(w[keep]))


def direction_errors(
    fit: Consumer,
    evaluate: Consumer,
    pooled: Prepared,
    order: np.ndarray,
    *,
    ridge: float,
    block: int = BLOCK,
) -> np.ndarray:
    """Output error (pooled metric) on ``evaluate``'s statistics of the folds fitted on
    ``fit``'s, after removing ``order[:k]`` for k = 0..m: (m+1,), raw (may be non-monotone).

    ``block``: channels removed per update of the state (matrix products instead of rank-one
    updates); every error along the way is exact whatever the block."""
    if block < 1:
        raise InvalidInputError(f"block must be at least 1, got {block}")
    pf = fit.prepared
    sd = np.where(pf.sd > 0, pf.sd, np.where(pooled.sd > 0, pooled.sd, 1.0))  # scale-free
    d = sd / np.where(pooled.sd > 0, pooled.sd, 1.0)
    F = _metric_factor(pooled, d)  # the pooled metric in fit's standardized coordinates
    G = _moments_about(evaluate.stats, pf.mu, sd)
    base = float(np.sum((G @ F) * F))
    order = np.asarray(order, dtype=np.int64)
    errors = [0.0]
    pos = np.zeros(pf.sd.size, dtype=np.int64)
    path: _Path | None = None
    live = done = 0
    while done < order.size:
        if path is None or (live < 0.5 * path.basis.size and path.basis.size > 32):
            path = _Path(pf.corr, F, G, order[:done], ridge)  # rebuild: rounding stays bounded
            live = path.basis.size
            pos[path.basis] = np.arange(live)
        step = order[done : done + block]
        errors.extend(base + e for e in path.remove(pos[step]))
        done += step.size
        live -= step.size
    return np.asarray(errors)


def _check_pair(a: Sequence[Consumer], b: Sequence[Consumer]) -> None:
    if not a or len(a) != len(b):
        raise InvalidInputError(
            f"cross-fitting needs the same consumers in both halves, got {len(a)} and {len(b)}",
            hint="Pass one Consumer per consumer of the group for each half (at least one).",
        )
    c = a[0].stats.channels
    for x, y in zip(a, b, strict=True):
        same_w = (x.weight is None and y.weight is None) or (
            x.weight is not None and y.weight is not None and np.array_equal(x.weight, y.weight)
        )
        if x.stats.channels != c or y.stats.channels != c or not same_w or x.groups != y.groups:
            raise InvalidInputError(
                f"consumer {x.name}/{y.name}: the two halves must describe the same consumer "
                f"(same weight, groups and {c} channels)",
                hint="Build both halves from the same layer, only the statistics differ.",
            )


def crossfit_curve(
    half_a: Sequence[Consumer],
    half_b: Sequence[Consumer],
    *,
    ridge: float = DEFAULT_RIDGE,
    max_remove: int | None = None,
    pooled: ErrorCurve | None = None,
) -> ErrorCurve:
    """A group's cross-fitted error curve.

    ``half_a``, ``half_b``: the group's consumers (same order, weights and groups) with the
    statistics of each half, S (c+1, c+1). The order is ``pooled.order`` when given (the
    :func:`graphs.functional.error_curve` of ``S_A + S_B``, as the planner has it), else that
    curve up to ``max_remove`` (default c − 1). ``errors`` (m+1,): mean over the two directions
    of the relative output error of folds fitted on one half, measured on the other, summed over
    consumers, clipped at 0 and kept non-decreasing (as :func:`graphs.functional.error_curve`).

    Raises:
        InvalidInputError: halves that do not describe the same consumers, a bad ``max_remove``
            or ridge.
    """
    directions, curve = _directions(
        half_a, half_b, ridge=ridge, max_remove=max_remove, pooled=pooled
    )
    return _combine([direction_errors(*d, ridge=ridge) for d in directions], curve)


Direction = tuple[Consumer, Consumer, Prepared, np.ndarray]
"""(fit, evaluate, pooled, order): the arguments of one :func:`direction_errors`."""


def _directions(
    half_a: Sequence[Consumer],
    half_b: Sequence[Consumer],
    *,
    ridge: float,
    max_remove: int | None,
    pooled: ErrorCurve | None,
) -> tuple[list[Direction], ErrorCurve]:
    """The two directions of every consumer (in the order their errors are summed), and the
    pooled curve."""
    _check_pair(half_a, half_b)
    both = [
        Consumer(x.name, ConsumerStats(x.stats.gram + y.stats.gram), x.weight, x.groups)
        for x, y in zip(half_a, half_b, strict=True)
    ]
    if pooled is None:
        pooled = error_curve(both, ridge=ridge, max_remove=max_remove)
    elif pooled.channels != half_a[0].stats.channels:
        raise InvalidInputError("the pooled curve is of another group (channel count differs)")
    order = np.asarray(pooled.order, dtype=np.int64)
    out: list[Direction] = []
    for x, y, p in zip(half_a, half_b, both, strict=True):
        out += [(x, y, p.prepared, order), (y, x, p.prepared, order)]
    return out, pooled


def _combine(errors: Sequence[np.ndarray], pooled: ErrorCurve) -> ErrorCurve:
    """The mean of the directions' errors (summed in order), clipped and non-decreasing."""
    total = np.zeros(pooled.order.size + 1)
    for e in errors:
        total += e
    errors_ = np.maximum.accumulate(np.maximum(total / 2.0, 0.0))
    return ErrorCurve(order=np.asarray(pooled.order, dtype=np.int64), errors=errors_,
                      channels=pooled.channels)  # fmt: skip


def split_stats(pooled: np.ndarray, part: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(S_A, S_B) = (pooled − part, part) for one consumer, both (c+1, c+1) float64.

    Raises:
        InvalidInputError: shapes differ, or ``part`` is not a strict part of ``pooled``.
    """
    S = np.asarray(pooled, dtype=np.float64)
    B = np.asarray(part, dtype=np.float64)
    if B.shape != S.shape:
        raise InvalidInputError(
            f"the held-out statistics of {name} have shape {B.shape}, not {S.shape}", hint=_HINT
        )
    A = S - B
    scale = float(np.abs(S).max()) if S.size else 0.0
    if not (B[-1, -1] > 0 and A[-1, -1] > 0) or np.any(np.diag(A) < -1e-9 * scale):
        raise InvalidInputError(
            f"the held-out statistics of {name} are not a part of its statistics "
            f"(rows {B[-1, -1]:g} of {S[-1, -1]:g})",
            hint=_HINT,
        )
    return A, B


def _halves(
    found: GroupConsumers, holdout: Mapping[str, np.ndarray], gid: int
) -> tuple[list[Consumer], list[Consumer]]:
    """The group's consumers with the statistics of each part (A = all − held-out, B)."""
    half_a, half_b = [], []
    for s in found.consumers[gid]:
        if s.consumer not in holdout:
            raise InvalidInputError(f"no held-out statistics for {s.consumer}", hint=_HINT)
        raw = np.asarray(holdout[s.consumer], np.float64)
        width = s.data.stats.channels * s.per_channel + 1
        if raw.shape != (width, width):
            raise InvalidInputError(
                f"the held-out statistics of {s.consumer} have shape {list(raw.shape)}, "
                f"not {[width, width]} like its statistics",
                hint=_HINT,
            )
        A, B = split_stats(s.data.stats.gram, channel_gram(raw, s.per_channel), s.consumer)
        d = s.data
        half_a.append(Consumer(d.name, ConsumerStats(A), d.weight, d.groups))
        half_b.append(Consumer(d.name, ConsumerStats(B), d.weight, d.groups))
    return half_a, half_b


def crossfit_curves(
    found: GroupConsumers,
    holdout: Mapping[str, np.ndarray],
    pooled: Mapping[int, ErrorCurve] | None = None,
    *,
    ridge: float = DEFAULT_RIDGE,
    ids: Iterable[int] | None = None,
    workers: int = 1,
    max_ratio: float = 1.0,
) -> dict[int, ErrorCurve]:
    """Cross-fitted curves of the groups of ``pooled`` (or ``ids``) that have consumers.

    ``found``: the groups' consumers with the statistics of all the calibration data;
    ``holdout``: consumer module name → the statistics of a part of it (B; A = all − B), raw
    shape as ``found`` was built from; ``pooled``: group id → the curve of all the data (its
    order is kept); None: computed here (``found.curves(ids, ridge=..., max_ratio=...)``), each
    in this thread while other threads cross-fit the groups already done. ``workers``: threads
    computing the two directions of every consumer side by side (BLAS releases the GIL; the
    planner runs them under one BLAS thread); each direction is computed alone and they are
    summed in a fixed order, so the result does not depend on it.

    Raises:
        InvalidInputError: a consumer without held-out statistics, statistics that are not a
            part of the pooled ones, ``workers`` < 1, or neither ``pooled`` nor ``ids``.
    """
    if workers < 1:
        raise InvalidInputError(f"workers must be at least 1, got {workers}")
    if pooled is None and ids is None:
        raise InvalidInputError("cross-fitting needs the pooled curves or the group ids")
    wanted = list(pooled if ids is None and pooled is not None else ids or [])
    todo = [g for g in wanted if found.consumers.get(g) and (pooled is None or g in pooled)]
    todo.sort(key=lambda g: -found.consumers[g][0].data.stats.channels)  # the widest first
    futures, bases = {}, {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for gid in todo:  # each direction computed alone: the bits do not depend on workers
            halves = _halves(found, holdout, gid)
            base = (pooled or found.curves([gid], ridge=ridge, max_ratio=max_ratio))[gid]
            runs, bases[gid] = _directions(*halves, ridge=ridge, max_remove=None, pooled=base)
            futures[gid] = [pool.submit(direction_errors, *d, ridge=ridge) for d in runs]
        done = {gid: _combine([f.result() for f in fs], bases[gid]) for gid, fs in futures.items()}
    return {gid: done[gid] for gid in wanted if gid in done}

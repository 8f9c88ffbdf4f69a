"""Consumer inputs for functional redundancy: second moments, weights, standardized form.

A channel-mixing consumer (a conv/linear reading a group's channels) is described by the second
moment of its input with a constant column, ``S = [X 1]ᵀ[X 1]`` (c+1, c+1), constant LAST
(:class:`ConsumerStats`), and its weight as (out, c, taps) (:func:`dense_weight`). :func:`prepare`
turns both into standardized coordinates (correlations and the output metric) used by
:mod:`graphs.functional`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from graphs.errors import InvalidInputError

_CONSTANT = 1e-10  # variance / mean square below which a channel is constant in the data


@dataclass(frozen=True)
class ConsumerStats:
    """The second moment of one consumer input: ``gram`` (c+1, c+1), constant column last.

    ``gram[c, c]`` is the number of rows, ``gram[:c, c]`` the sum of each channel.
    """

    gram: np.ndarray

    def __post_init__(self) -> None:
        S = np.asarray(self.gram, dtype=np.float64)
        hint = "Pass S = Σ [x, 1]ᵀ[x, 1] over rows, as clients.capture_activations records it."
        if S.ndim != 2 or S.shape[0] != S.shape[1] or S.shape[0] < 2:
            raise InvalidInputError(f"a Gram must be square (c+1, c+1), got {S.shape}", hint=hint)
        if not np.all(np.isfinite(S)):
            raise InvalidInputError("the Gram holds NaN or infinite values", hint=hint)
        if not S[-1, -1] > 0:
            raise InvalidInputError("the Gram's row count S[c, c] must be positive", hint=hint)
        if not np.allclose(S, S.T, rtol=1e-9, atol=1e-12 * float(np.abs(S).max())):
            raise InvalidInputError("the Gram is not symmetric", hint=hint)
        object.__setattr__(self, "gram", (S + S.T) / 2)

    @property
    def channels(self) -> int:
        return int(self.gram.shape[0] - 1)

    @property
    def count(self) -> float:
        return float(self.gram[-1, -1])

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (c,) and covariance (c, c) per row, centred through the constant column."""
        S, n = self.gram, self.count
        s = S[:-1, -1]
        mu = s / n
        cov = (S[:-1, :-1] - np.outer(s, s) / n) / n
        return mu, (cov + cov.T) / 2


def channel_gram(gram: np.ndarray, per_channel: int) -> np.ndarray:
    """Reduce the Gram of a linear layer after a flatten of C×P (P = H·W) to channels.

    ``gram``: (C·P+1, C·P+1) → (C+1, C+1), each position counted as a row:
    ``S_ch[a, b] = Σ_p S[a·P+p, b·P+p]``, constant entries summed likewise.
    """
    S = np.asarray(gram, dtype=np.float64)
    if per_channel == 1:
        return S
    f = S.shape[0] - 1
    if f % per_channel:
        raise InvalidInputError(f"a Gram of {f} features is not C × {per_channel} positions")
    c = f // per_channel
    X = S[:-1, :-1].reshape(c, per_channel, c, per_channel)
    out = np.empty((c + 1, c + 1))
    out[:-1, :-1] = np.einsum("apbp->ab", X)
    out[:-1, -1] = out[-1, :-1] = S[:-1, -1].reshape(c, per_channel).sum(axis=1)
    out[-1, -1] = S[-1, -1] * per_channel
    return out


def dense_weight(weight: np.ndarray, *, per_channel: int = 1, groups: int = 1) -> np.ndarray:
    """A consumer weight as (out, c, taps), a grouped conv expanded block-diagonally.

    ``weight``: conv (out, c/groups, *kernel) or linear (out, c·per_channel) with the channel-
    major flatten order of ``x.flatten(1)``.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim < 2 or w.shape[0] % groups:
        raise InvalidInputError(f"a consumer weight of shape {w.shape} (groups={groups})")
    out = w.shape[0]
    if per_channel > 1:
        if w.ndim != 2 or w.shape[1] % per_channel:
            raise InvalidInputError(f"{w.shape} is not a linear weight over C × {per_channel}")
        return w.reshape(out, w.shape[1] // per_channel, per_channel)
    w3 = w.reshape(out, w.shape[1], -1)
    if groups == 1:
        return w3
    cin, per_out = w3.shape[1], out // groups
    full = np.zeros((out, cin * groups, w3.shape[2]))
    for g in range(groups):
        full[g * per_out : (g + 1) * per_out, g * cin : (g + 1) * cin] = w3[
            g * per_out : (g + 1) * per_out
        ]
    return full


@dataclass(frozen=True)
class Consumer:
    """One channel-mixing consumer of a group: its input statistics (channel level, c = the
    group's channels) and its weight as (out, c, taps) (see :func:`dense_weight`), or None to
    measure the error on the standardized channels themselves. ``groups`` > 1: a grouped conv,
    whose removed channels may only be taken over by kept channels of the same conv group."""

    name: str
    stats: ConsumerStats
    weight: np.ndarray | None = None
    groups: int = 1

    def __post_init__(self) -> None:
        c = self.stats.channels
        if self.weight is not None and (self.weight.ndim != 3 or self.weight.shape[1] != c):
            raise InvalidInputError(
                f"consumer {self.name}: weight {self.weight.shape} is not (out, {c}, taps)",
                hint="Build it with graphs.functional.dense_weight.",
            )
        if self.groups < 1 or c % self.groups:
            raise InvalidInputError(f"consumer {self.name}: {self.groups} groups do not split {c}")

    @property
    def prepared(self) -> Prepared:
        """The standardized form (:func:`prepare`), computed once. No lock (Python 3.11's
        ``cached_property`` holds one for all instances, which made curve threads wait on each
        other): two threads may both compute it, with the same result."""
        got: Prepared | None = self.__dict__.get("_prepared")
        if got is None:
            got = prepare(self)
            self.__dict__["_prepared"] = got
        return got


@dataclass(frozen=True)
class Prepared:
    """A consumer in standardized coordinates: corr (c, c) (constant channels: unit diagonal,
    no correlation; grouped convs: block-diagonal), output metric M (c, c)."""

    mu: np.ndarray
    sd: np.ndarray
    corr: np.ndarray
    metric: np.ndarray
    constant: np.ndarray = field(repr=False)
    rows: float = 0.0
    regress: bool = True
    groups: int = 1
    metric_rows: np.ndarray | None = field(default=None, repr=False)
    """(r, c) with ``metric = metric_rowsᵀ metric_rows`` when the consumer has a weight and
    r = outputs × taps < c: a factor of the metric, cheaper than it; None otherwise."""

    def inflation(self, kept: int) -> float:
        """Expected out-of-sample / in-sample residual of a least-squares fit on ``kept``
        non-constant predictors (per conv group) from ``rows`` rows, with an intercept:
        n(n−1) / ((n−p−1)(n−p−2)) (Gaussian random design); 1 without regression."""
        if not self.regress:
            return 1.0
        n, q = self.rows, -(-kept // self.groups)
        return n * (n - 1) / ((n - q - 1) * (n - q - 2)) if n > q + 2 else float("inf")


def prepare(consumer: Consumer) -> Prepared:
    mu, cov = consumer.stats.moments()
    c = mu.size
    var = np.clip(np.diag(cov), 0.0, None)
    ms = np.diag(consumer.stats.gram)[:-1] / consumer.stats.count
    constant = var <= _CONSTANT * ms
    sd = np.where(constant, 0.0, np.sqrt(var))
    inv = np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, sd))
    corr = cov * np.outer(inv, inv)
    if consumer.groups > 1:
        g = np.arange(c) // (c // consumer.groups)
        corr = np.where(g[:, None] == g[None, :], corr, 0.0)
    corr[np.diag_indices(c)] = 1.0
    rows: np.ndarray | None = None
    if consumer.weight is None:
        metric = np.diag((~constant).astype(np.float64)) / max(int((~constant).sum()), 1)
    else:
        wt = (consumer.weight * sd[None, :, None]).transpose(0, 2, 1)  # (out, taps, c)
        flat = wt.reshape(-1, c)
        var_out = ((flat @ corr) * flat).sum(axis=1).reshape(wt.shape[:2]).sum(axis=1)
        floor = 1e-6 * float(var_out.mean()) if var_out.mean() > 0 else 1.0
        omega = 1.0 / (var_out.size * np.maximum(var_out, floor))
        rows = (wt * np.sqrt(omega)[:, None, None]).reshape(-1, c)
        metric = rows.T @ rows
        if rows.shape[0] >= c:  # kept only where it is cheaper than the metric itself
            rows = None
    n = consumer.stats.count
    regress = n > int((~constant).sum()) // consumer.groups + 2
    if not regress:  # fewer rows than predictors: no identifiable fit, mean folds only
        corr = np.eye(c)
    return Prepared(mu=mu, sd=sd, corr=corr, metric=metric, constant=constant, rows=n,
                    regress=regress, groups=consumer.groups, metric_rows=rows)  # fmt: skip


def spd_solve(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """A⁻¹ B for a symmetric positive (semi)definite A: Cholesky, else eigh with a floor."""
    try:
        cf = scipy.linalg.cho_factor(A, lower=True, check_finite=False)
        return scipy.linalg.cho_solve(cf, B, check_finite=False)
    except np.linalg.LinAlgError:
        w, V = np.linalg.eigh(A)
        w = np.maximum(w, 1e-12 * max(float(w.max()), 1e-300))
        return (V / w) @ (V.T @ B)


def spd_inverse(A: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive (semi)definite matrix: Cholesky, else eigh with a floor."""
    try:
        cf = scipy.linalg.cho_factor(A, lower=True, check_finite=False)
        return scipy.linalg.cho_solve(cf, np.eye(A.shape[0]), check_finite=False)
    except np.linalg.LinAlgError:
        w, V = np.linalg.eigh(A)
        w = np.maximum(w, 1e-12 * max(float(w.max()), 1e-300))
        return (V / w) @ V.T

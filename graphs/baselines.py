"""Importance baselines: per-filter scores with no layer redundancy (design §4 baselines).

* l1 (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): the L1 norm of each filter;
  the smallest are pruned.
* fpgm (He et al. 2019, "Filter Pruning via Geometric Median"): the sum of Euclidean distances
  from each filter to the layer's other filters; the filters with the smallest sum lie nearest
  the geometric median and are the most replaceable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphs._labels import round_list
from graphs.report import FpgmResult, L1Result
from graphs.similarity import check_filters, row_blocks


@dataclass(frozen=True)
class L1LayerResult:
    """Per-filter L1 norms, shape (n_filters,)."""

    l1_norm: np.ndarray

    def to_model(self) -> L1Result:
        return L1Result(l1_norm=round_list(self.l1_norm))


@dataclass(frozen=True)
class FpgmLayerResult:
    """Per-filter summed distance to the other filters, shape (n_filters,)."""

    gm_distance: np.ndarray

    def to_model(self) -> FpgmResult:
        return FpgmResult(gm_distance=round_list(self.gm_distance))


def l1(X: np.ndarray) -> L1LayerResult:
    """L1 norm of each filter of X, shape (n_filters, fan_in)."""
    X = check_filters(X)
    return L1LayerResult(l1_norm=np.abs(X).sum(axis=1))


def fpgm(X: np.ndarray, *, block_size: int | None = None) -> FpgmLayerResult:
    """Summed Euclidean distance of each filter of X (n_filters, fan_in) to all the others.

    Computed blockwise through ‖a − b‖² = ‖a‖² + ‖b‖² − 2 a·b (memory bounded, see
    :func:`graphs.similarity.row_blocks`), on X divided by its largest entry so that huge or
    tiny weights neither overflow nor underflow.
    """
    X = check_filters(X)
    scale = float(np.max(np.abs(X))) or 1.0
    Y = X / scale
    sq = np.einsum("ij,ij->i", Y, Y)
    out = np.empty(Y.shape[0])
    for start, stop in row_blocks(Y.shape[0], block_size):
        D2 = sq[start:stop, None] + sq[None, :] - 2.0 * (Y[start:stop] @ Y.T)
        out[start:stop] = np.sqrt(np.maximum(D2, 0.0)).sum(axis=1)
    return FpgmLayerResult(gm_distance=out * scale)

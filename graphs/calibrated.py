"""A layer's null-calibrated similarity graph, built once and shared by mrp, srr and planning.

The graph joins every pair of filters whose cosine exceeds the layer's calibrated threshold
(:func:`graphs.similarity.calibrated_threshold`); it is defined over all filters of the layer,
dead (all-zero) ones included as isolated vertices, so that planning can take subgraphs of the
kept filters by their original index. It serializes to bytes for :mod:`graphs.cache`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from graphs.errors import InvalidInputError
from graphs.options import DEFAULT_ALPHA, DEFAULT_MIN_EXPLAINED
from graphs.similarity import (
    calibrated_threshold,
    cosine_threshold_graph,
)


@dataclass(frozen=True)
class CalibratedGraph:
    """Attributes: ``graph`` (n, n) symmetric CSR with the cosine as weight; ``threshold`` the
    cosine above which filters are joined; ``null_dim`` the dimension of the fitted null."""

    graph: sp.csr_matrix
    threshold: float
    null_dim: float

    def live_subgraph(self, live: np.ndarray) -> sp.csr_matrix:
        """The graph among the filters ``live`` (sorted indices), renumbered 0..len-1."""
        if live.size == self.graph.shape[0]:
            return self.graph
        return self.graph[live][:, live].tocsr()

    def to_bytes(self) -> bytes:
        G = self.graph.tocsr()
        buf = io.BytesIO()
        np.savez(
            buf,
            indptr=G.indptr,
            indices=G.indices,
            data=G.data,
            shape=np.asarray(G.shape, dtype=np.int64),
            scalars=np.asarray([self.threshold, self.null_dim], dtype=np.float64),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, value: bytes) -> CalibratedGraph:
        with np.load(io.BytesIO(value), allow_pickle=False) as z:
            shape = (int(z["shape"][0]), int(z["shape"][1]))
            G = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=shape)
            t, m = (float(v) for v in z["scalars"])
        return cls(graph=G, threshold=t, null_dim=m)


def calibrated_graph(
    U: np.ndarray,
    *,
    alpha: float = DEFAULT_ALPHA,
    min_explained: float = DEFAULT_MIN_EXPLAINED,
) -> CalibratedGraph:
    """The calibrated graph of unit rows ``U`` (n, d); zero rows (dead filters) are isolated and
    take no part in fitting the null."""
    live = np.any(U != 0, axis=1)
    threshold, null_dim = calibrated_threshold(
        U if live.all() else U[live], alpha=alpha, min_explained=min_explained
    )
    return CalibratedGraph(cosine_threshold_graph(U, threshold), threshold, null_dim)


def checked_graph(graph: CalibratedGraph | None, n: int) -> CalibratedGraph | None:
    """``graph`` after checking that it covers the n filters of the layer it is used for."""
    if graph is not None and graph.graph.shape != (n, n):
        raise InvalidInputError(
            f"the calibrated graph has shape {graph.graph.shape}, the layer {n} filters",
            hint="Build it from the same filter matrix with graphs.calibrated.calibrated_graph.",
        )
    return graph

"""Per-group state for greedy allocation: a group's redundancy as its filters are removed.

Each state holds one group's per-filter numbers (its filters (n, d) are rebuilt on demand by a
``vectors`` callable, so a plan holds one group's vectors at a time) and answers two questions
for the planner:
``redundancy()`` of the filters still kept, and ``take(n)``: the next filters to remove. Graph
states keep the graph built once on all filters (same null threshold) and recompute only on the
kept vertices, so a step costs a Leiden run or a covering on a subgraph, not a new similarity
matrix (the graph and the hsc clustering come from :class:`graphs.work.GroupWork`, cached).
``order()`` ranks the kept filters for removal beyond their redundancy (fallback).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from graphs._labels import mean_cosine_to_group
from graphs.hsc import HscLayerResult, hsc
from graphs.mrp import leiden_communities, response_information
from graphs.options import DEFAULT_ALPHA, DEFAULT_MIN_EXPLAINED
from graphs.similarity import unit_rows, upper_edges
from graphs.srr import COVERING_WEIGHT, QUOTIENT_WEIGHT, greedy_covering_number


@dataclass
class GroupState:
    """Base: importance-only ordering (no redundancy).

    ``vectors`` returns the group's filters (n, d) when called; a state keeps only per-filter
    numbers (and its graph), and calls it again when a refresh needs the vectors, so that a
    plan holds one group's vectors at a time (LLM-sized checkpoints, issue 8).
    """

    vectors: Callable[[], np.ndarray]
    seed: int
    alive: np.ndarray = field(init=False)  # (n,) bool
    dead: np.ndarray = field(init=False)  # (n,) bool: all-zero filters
    l1: np.ndarray = field(init=False)  # (n,)

    def __post_init__(self) -> None:
        X = self.vectors()
        U, norms = unit_rows(X)
        self.alive = np.ones(X.shape[0], dtype=bool)
        self.dead = norms == 0
        self.l1 = np.abs(X).sum(axis=1)
        self._setup(U)

    @property
    def n(self) -> int:
        return int(self.alive.size)

    def _setup(self, U: np.ndarray) -> None:
        """What a subclass derives from the unit vectors (n, d) at the start."""

    def _unit(self) -> np.ndarray:
        return unit_rows(self.vectors())[0]

    def redundancy(self) -> float:
        return 0.0

    def redundant_count(self) -> int:
        return int(self.dead[self.alive].sum())

    def drop(self, idx: list[int]) -> None:
        """Mark filters already removed (at an earlier calibration level) as gone."""
        if idx:
            self.alive[idx] = False
            self._refresh()

    def _refresh(self, U: np.ndarray | None = None) -> None:
        """Recompute what depends on the kept filters (graph states); ``U``: the unit vectors
        when the caller has them."""

    def take(self, n: int) -> list[int]:
        """Remove up to n redundant filters (dead ones first); returns their indices."""
        idx = [int(i) for i in self.order()[:n] if self.dead[i]]
        self.alive[idx] = False
        return idx

    def order(self) -> np.ndarray:
        """Kept filters, most removable first (dead, then smallest L1, then index)."""
        live = np.flatnonzero(self.alive)
        return live[np.lexsort((live, self.l1[live], ~self.dead[live]))]


@dataclass
class MrpState(GroupState):
    """SRP: communities of the null-calibrated graph, recomputed on the kept filters."""

    G: sp.csr_matrix  # (n, n) calibrated graph over all filters (graphs.calibrated)
    resolution: float = 1.0

    def _setup(self, U: np.ndarray) -> None:
        self._refresh(U)

    def _refresh(self, U: np.ndarray | None = None) -> None:
        keep = np.flatnonzero(self.alive & ~self.dead)
        sub = self.G[keep][:, keep]
        edges, cos = upper_edges(sub)
        labels, _ = leiden_communities(
            keep.size, edges, response_information(cos), resolution=self.resolution, seed=self.seed
        )
        self.k = int(labels.max()) + 1 if keep.size else 0
        self.community = np.full(self.n, -1, dtype=np.int64)
        self.community[keep] = labels
        self.replace = np.zeros(self.n)
        self.replace[self.dead] = 1.0
        if keep.size:
            U = self._unit() if U is None else U
            self.replace[keep] = mean_cosine_to_group(U[keep], labels)

    def redundancy(self) -> float:
        n = int(self.alive.sum())
        return 1.0 - self.k / n if n else 0.0

    def redundant_count(self) -> int:
        return int(self.alive.sum()) - self.k

    def take(self, n: int) -> list[int]:
        """The n most replaceable filters, never the last member of a community (a step of
        several filters removes duplicates, not whole roles)."""
        left = np.bincount(self.community[self.community >= 0], minlength=self.k)
        cand: list[int] = []
        for i in self.order():
            if len(cand) >= min(n, self.redundant_count()):
                break
            c = int(self.community[i])
            if self.dead[i]:
                cand.append(int(i))
            elif self.replace[i] > 0 and left[c] > 1:
                left[c] -= 1
                cand.append(int(i))
        self.alive[cand] = False
        self._refresh()
        return cand

    def order(self) -> np.ndarray:
        live = np.flatnonzero(self.alive)
        return live[np.lexsort((live, self.l1[live], -self.replace[live]))]


@dataclass
class SrrState(GroupState):
    """SRR: quotient size and covering number of the γ-graph on the kept filters."""

    A: sp.csr_matrix  # (n, n) calibrated graph over all filters (graphs.calibrated)

    def _setup(self, U: np.ndarray) -> None:
        self._refresh(U)

    def _refresh(self, U: np.ndarray | None = None) -> None:
        keep = np.flatnonzero(self.alive & ~self.dead)
        sub = self.A[keep][:, keep].tocsr()
        k, comp = sp.csgraph.connected_components(sub, directed=False)
        cover = (greedy_covering_number(sub, ell=1) + greedy_covering_number(sub, ell=2)) / 2
        self.denom = QUOTIENT_WEIGHT * k + COVERING_WEIGHT * cover if keep.size else 0.0
        sizes = np.bincount(comp, minlength=k) if keep.size else np.zeros(0, dtype=np.int64)
        self.in_structure = np.zeros(self.n, dtype=bool)
        self.in_structure[keep] = sizes[comp] > 1 if keep.size else False

    def redundancy(self) -> float:
        n = int(self.alive.sum())
        return 1.0 - self.denom / n if n else 0.0

    def redundant_count(self) -> int:
        return int(np.floor(self.alive.sum() - self.denom + 1e-9))

    def take(self, n: int) -> list[int]:
        """One vertex at a time (the paper's rule): the smallest-L1 vertex of a non-trivial
        component, so the structure shrinks; which filters finally go is decided by L1."""
        out: list[int] = []
        for _ in range(min(n, self.redundant_count())):
            live = np.flatnonzero(self.alive & (self.in_structure | self.dead))
            if live.size == 0:
                break
            v = int(live[np.lexsort((live, self.l1[live], ~self.dead[live]))][0])
            self.alive[v] = False
            out.append(v)
            self._refresh()
        return out


@dataclass
class HscState(GroupState):
    """hsc: clusters of the kNN hypergraph; every cluster keeps its medoid."""

    result: HscLayerResult  # hsc of all filters, the cluster count by eigengap
    alpha: float = DEFAULT_ALPHA
    min_explained: float = DEFAULT_MIN_EXPLAINED
    k: int = 5
    n_rounds: int = 3

    def _setup(self, U: np.ndarray) -> None:
        labels = self.result.clusters
        self.is_rep = np.zeros(self.n, dtype=bool)
        self.is_rep[self.result.representatives] = True
        # similarity of each member to its cluster's medoid: most similar goes first
        medoid_of = {int(labels[r]): int(r) for r in self.result.representatives}
        self.to_medoid = np.array(
            [float(U[i] @ U[medoid_of[int(c)]]) if c >= 0 else 1.0 for i, c in enumerate(labels)]
        )

    def redundancy(self) -> float:
        n = int(self.alive.sum())
        return self.redundant_count() / n if n else 0.0

    def redundant_count(self) -> int:
        return int((self.alive & ~self.is_rep).sum())

    def take(self, n: int) -> list[int]:
        cand = [int(i) for i in self.order() if not self.is_rep[i]][:n]
        self.alive[cand] = False
        return cand

    def order(self) -> np.ndarray:
        live = np.flatnonzero(self.alive)
        return live[np.lexsort((live, self.l1[live], -self.to_medoid[live], self.is_rep[live]))]

    def keep_fewer_than_clusters(self, n_keep: int) -> np.ndarray:
        """Kept indices when fewer filters than clusters may stay: spectral clustering into
        n_keep clusters of the live filters, keeping each cluster's medoid."""
        return hsc(
            self.vectors(),
            k=self.k,
            alpha=self.alpha,
            min_explained=self.min_explained,
            n_rounds=self.n_rounds,
            n_clusters=n_keep,
            seed=self.seed,
            calibration=(self.result.threshold, self.result.null_dim),
        ).representatives

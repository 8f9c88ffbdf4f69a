"""One group's work: its vectors and the artifacts derived from them, computed at most once.

:class:`GroupWork` is what analysis and planning share. Within one object every artifact is
memoized (mrp and srr use one calibrated graph; a plan after an analysis reuses both); with a
:class:`graphs.cache.Cache` the artifacts also outlive the object, keyed by content
(:func:`graphs.cache.cache_key`), so a later job on the same weights, parameters and seed
recomputes nothing. Results are identical with and without a cache: the cache stores exact
float64 arrays and JSON of the already rounded report models.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from typing import TypeVar

from pydantic import TypeAdapter

from graphs.baselines import fpgm, l1
from graphs.cache import Cache, cache_key, vectors_digest
from graphs.calibrated import CalibratedGraph, calibrated_graph
from graphs.errors import InvalidInputError
from graphs.hsc import HscLayerResult, hsc
from graphs.layers import LayerGroup
from graphs.mrp import mrp
from graphs.options import AnalysisOptions, layer_seed
from graphs.report import ALL_METHODS, MethodResult
from graphs.similarity import check_filters, unit_rows
from graphs.srr import srr

T = TypeVar("T")
_RESULT: TypeAdapter[MethodResult] = TypeAdapter(MethodResult)


class GroupWork:
    """The filter vectors (n, d) of ``group`` and their graph, clustering and method results.

    Args:
        group: the group.
        seed: the run's seed (the group's own seed is :func:`graphs.options.layer_seed`).
        options: method parameters.
        cache: optional content-addressed store shared across calls and processes.
    """

    def __init__(
        self,
        group: LayerGroup,
        *,
        seed: int = 0,
        options: AnalysisOptions | None = None,
        cache: Cache | None = None,
    ) -> None:
        self.group = group
        self.X = group.vectors()
        self.seed = layer_seed(seed, group.name)
        self.options = options or AnalysisOptions()
        self.cache = cache
        self._digest: str | None = None
        self._graph: CalibratedGraph | None = None
        self._hsc: HscLayerResult | None = None

    def _key(self, kind: str, **parameters: float | int | str | None) -> str:
        if self._digest is None:
            self._digest = vectors_digest(self.X)
        return cache_key(kind, self._digest, name=self.group.name, **parameters)

    def _get(self, key: str) -> bytes | None:
        return self.cache.get(key) if self.cache is not None else None

    def _cached(self, key: str, decode: Callable[[bytes], T]) -> T | None:
        """The decoded entry, or None when it is missing or unreadable (then recomputed)."""
        hit = self._get(key)
        if hit is None:
            return None
        try:
            return decode(hit)
        except (ValueError, KeyError, OSError, zipfile.BadZipFile):
            return None

    def _put(self, key: str, value: bytes) -> None:
        if self.cache is not None:
            self.cache.put(key, value)

    def graph(self) -> CalibratedGraph:
        """The null-calibrated cosine graph over all filters (alpha, min_explained)."""
        if self._graph is None:
            o = self.options
            key = self._key("graph", alpha=o.alpha, min_explained=o.min_explained)
            self._graph = self._cached(key, CalibratedGraph.from_bytes)
            if self._graph is None:
                U, _ = unit_rows(check_filters(self.X, min_rows=2))
                self._graph = calibrated_graph(U, alpha=o.alpha, min_explained=o.min_explained)
                self._put(key, self._graph.to_bytes())
        return self._graph

    def hsc(self) -> HscLayerResult:
        """hsc's clustering with the eigengap's cluster count (k, n_rounds, seed)."""
        if self._hsc is None:
            o = self.options
            key = self._key("hsc", seed=self.seed, **o.parameters("hsc"))
            self._hsc = self._cached(key, HscLayerResult.from_bytes)
            if self._hsc is None:
                g = self.graph() if self.X.shape[0] >= 2 else None
                self._hsc = hsc(
                    self.X,
                    k=o.k,
                    alpha=o.alpha,
                    min_explained=o.min_explained,
                    n_rounds=o.n_rounds,
                    seed=self.seed,
                    calibration=(g.threshold, g.null_dim) if g is not None else None,
                )
                self._put(key, self._hsc.to_bytes())
        return self._hsc

    def result(self, method: str) -> MethodResult:
        """The report model of ``method`` on this group."""
        if method not in ALL_METHODS:
            raise InvalidInputError(
                f"unknown method {method!r}", hint=f"Choose from {', '.join(ALL_METHODS)}."
            )
        key = self._key("result", method=method, seed=self.seed, **self.options.parameters(method))
        cached = self._cached(key, _RESULT.validate_json)
        if cached is not None:
            return cached
        value = self._compute(method)
        self._put(key, value.model_dump_json().encode())
        return value

    def _compute(self, method: str) -> MethodResult:
        o, X = self.options, self.X
        if method == "l1":
            return l1(X).to_model()
        if method == "fpgm":
            return fpgm(X).to_model()
        if method == "hsc":
            return self.hsc().to_model()
        if X.shape[0] < 2:  # the methods' own validation says what is wrong
            return (mrp(X) if method == "mrp" else srr(X)).to_model()
        if method == "mrp":
            return mrp(
                X,
                alpha=o.alpha,
                min_explained=o.min_explained,
                resolution=o.resolution,
                seed=self.seed,
                graph=self.graph(),
            ).to_model()
        return srr(X, alpha=o.alpha, min_explained=o.min_explained, graph=self.graph()).to_model()

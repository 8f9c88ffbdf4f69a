"""One group's work: its vectors and the artifacts derived from them, computed at most once.

:class:`GroupWork` is what analysis and planning share. Within one object every artifact is
memoized (mrp and srr use one calibrated graph; a plan after an analysis reuses both); with a
:class:`graphs.cache.Cache` the artifacts also outlive the object, keyed by content
(:func:`graphs.cache.cache_key`), so a later job on the same weights, parameters and seed
recomputes nothing. Results are identical with and without a cache: the cache stores exact
float64 arrays and JSON of the already rounded report models.
"""

from __future__ import annotations

import copy
import io
import zipfile
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from pydantic import TypeAdapter

from graphs._labels import round_list
from graphs.baselines import fpgm, l1
from graphs.cache import Cache, cache_key, vectors_digest
from graphs.calibrated import CalibratedGraph, calibrated_graph
from graphs.ci import CiLayerResult, channel_independence
from graphs.errors import InvalidInputError
from graphs.features import activation_vectors
from graphs.hsc import HscLayerResult, hsc
from graphs.layers import LayerGroup
from graphs.mrp import mrp
from graphs.options import AnalysisOptions, layer_seed
from graphs.report import METHODS, CiResult, MethodResult
from graphs.similarity import (
    check_filters,
    cosine_threshold_graph,
    level_threshold,
    unit_rows,
)
from graphs.srr import srr

T = TypeVar("T")
_RESULT: TypeAdapter[MethodResult] = TypeAdapter(MethodResult)


def _ci_to_bytes(r: CiLayerResult) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, ci=r.ci, ci_std=r.ci_std, n=np.asarray([r.n_samples]),
             tags=np.asarray([r.regime, r.method]))  # fmt: skip
    return buf.getvalue()


def _ci_from_bytes(value: bytes) -> CiLayerResult:
    with np.load(io.BytesIO(value), allow_pickle=False) as z:
        regime, method = (str(t) for t in z["tags"])
        return CiLayerResult(
            ci=z["ci"], ci_std=z["ci_std"], n_samples=int(z["n"][0]),
            regime=regime, method=method,  # type: ignore[arg-type]
        )  # fmt: skip


class GroupWork:
    """The filter vectors (n, d) of ``group`` and their graph, clustering and method results.

    Args:
        group: the group.
        seed: the run's seed (the group's own seed is :func:`graphs.options.layer_seed`).
        options: method parameters; ``options.vectors == "activations"`` makes the graph
            methods compare the channels' feature maps instead of their weights.
        cache: optional content-addressed store shared across calls and processes.
        features: the group's feature maps (samples, n_filters, pixels), for ``ci`` and
            data-aware graphs (see :func:`graphs.features.group_features`).
    """

    def __init__(
        self,
        group: LayerGroup,
        *,
        seed: int = 0,
        options: AnalysisOptions | None = None,
        cache: Cache | None = None,
        features: np.ndarray | None = None,
    ) -> None:
        self.group = group
        self._X: np.ndarray | None = None
        self.features = features
        self.seed = layer_seed(seed, group.name)
        self.options = options or AnalysisOptions()
        self.cache = cache
        self._digests: dict[str, str] = {}
        self._V: np.ndarray | None = None
        self._act: np.ndarray | None = None  # activation vectors no larger than the maps held
        self._graph: CalibratedGraph | None = None
        self._hsc: HscLayerResult | None = None
        self._ci: CiLayerResult | None = None

    @property
    def X(self) -> np.ndarray:
        """The group's filter vectors (n_filters, d), float64 (built on first use)."""
        if self._X is None:
            self._X = self.group.vectors()
        return self._X

    @property
    def V(self) -> np.ndarray:
        """The vectors the graph methods compare, (n_filters, d): weights or feature maps."""
        if self._V is None:
            self._V = self.X if self.options.vectors == "weights" else self.fresh_vectors()
        return self._V

    def fresh_vectors(self) -> np.ndarray:
        """:attr:`V` for planning's per-group states, which call it when they need the vectors:
        weight vectors are built anew and not kept (a plan holds one group's at a time, not the
        model's); activation vectors are kept when no larger than the maps held anyway
        (read-only)."""
        if self.options.vectors == "weights":
            return self.group.vectors() if self._X is None else self._X
        if self._act is not None:
            return self._act
        maps = self._maps("data-aware graphs")
        V = activation_vectors(maps)
        if V.nbytes <= maps.nbytes:  # kept: it adds no more memory than the maps this holds
            V.setflags(write=False)  # shared by later calls: nobody may change it in place
            self._act = V
        return V

    def release(self) -> None:
        """Drop the vectors (rebuilt on demand); the graph, clustering, CI and digests stay, and
        so do activation vectors no larger than the feature maps this object holds anyway."""
        self._X = self._V = None

    def _maps(self, what: str) -> np.ndarray:
        if self.features is None:
            raise InvalidInputError(
                f"{what} need feature maps of {self.group.name}, and none were given",
                hint="Capture them with clients.capture_activations and pass them with the "
                "checkpoint (--activations FILE, or activations_id in a job).",
            )
        return self.features

    def _key(self, kind: str, source: str, **parameters: float | int | str | None) -> str:
        """Key of an artifact computed from ``source``: weights, vectors (V) or features."""
        if source not in self._digests:
            if source == "features":
                array = self._maps("feature-map methods")
            else:
                array = self.X if source == "weights" else self.V
            self._digests[source] = vectors_digest(array)
        return cache_key(kind, self._digests[source], name=self.group.name, **parameters)

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
            key = self._key("graph", "vectors", alpha=o.alpha, min_explained=o.min_explained)
            self._graph = self._cached(key, CalibratedGraph.from_bytes)
            if self._graph is None:
                U, _ = unit_rows(check_filters(self.V, min_rows=2))
                self._graph = calibrated_graph(U, alpha=o.alpha, min_explained=o.min_explained)
                self._put(key, self._graph.to_bytes())
        return self._graph

    def at_levels(self, levels: Sequence[AnalysisOptions]) -> list[GroupWork]:
        """This group's work at other calibration levels (:mod:`graphs.anneal`): options that
        differ only in ``alpha`` and ``min_explained``. The null is the strict graph's (same
        vectors); the graph is built once, at the softest level's threshold (cached), and each
        level's graph is its edges above that level's threshold — the same edges and weights
        as a graph built at that threshold. Each returned work computes hsc at its level."""
        strict = self.graph()
        n_live = int(np.count_nonzero(np.any(self.V != 0, axis=1)))
        thresholds = [
            level_threshold(n_live, strict.null_dim, alpha=o.alpha, min_explained=o.min_explained)
            for o in levels
        ]
        softest = min(thresholds, default=1.0)
        if softest >= strict.threshold:
            base = strict.graph
        else:
            key = self._key("graph", "vectors", threshold=softest, null_dim=strict.null_dim)
            cached = self._cached(key, CalibratedGraph.from_bytes)
            if cached is None:
                U, _ = unit_rows(self.V)
                cached = CalibratedGraph(
                    cosine_threshold_graph(U, softest), softest, strict.null_dim
                )
                self._put(key, cached.to_bytes())
            base = cached.graph
        out = []
        for o, t in zip(levels, thresholds, strict=True):
            G = base.copy()
            G.data[G.data <= t] = 0.0
            G.eliminate_zeros()
            level = copy.copy(self)
            level.options, level._hsc = o, None
            level._graph = CalibratedGraph(G, t, strict.null_dim)
            out.append(level)
        return out

    def hsc(self) -> HscLayerResult:
        """hsc's clustering with the eigengap's cluster count (k, n_rounds, seed)."""
        if self._hsc is None:
            o = self.options
            key = self._key("hsc", "vectors", seed=self.seed, **o.parameters("hsc"))
            self._hsc = self._cached(key, HscLayerResult.from_bytes)
            if self._hsc is None:
                g = self.graph() if self.V.shape[0] >= 2 else None
                self._hsc = hsc(
                    self.V,
                    k=o.k,
                    alpha=o.alpha,
                    min_explained=o.min_explained,
                    n_rounds=o.n_rounds,
                    seed=self.seed,
                    calibration=(g.threshold, g.null_dim) if g is not None else None,
                )
                self._put(key, self._hsc.to_bytes())
        return self._hsc

    def ci(self) -> CiLayerResult:
        """Channel independence of the group's feature maps."""
        if self._ci is None:
            key = self._key("ci", "features")
            self._ci = self._cached(key, _ci_from_bytes)
            if self._ci is None:
                self._ci = channel_independence(self._maps("ci"))
                self._put(key, _ci_to_bytes(self._ci))
        return self._ci

    def result(self, method: str) -> MethodResult:
        """The report model of ``method`` on this group."""
        if method not in METHODS:
            raise InvalidInputError(
                f"unknown method {method!r}", hint=f"Choose from {', '.join(METHODS)}."
            )
        source = {"l1": "weights", "fpgm": "weights", "ci": "features"}.get(method, "vectors")
        key = self._key(
            "result", source, method=method, seed=self.seed, **self.options.parameters(method)
        )
        cached = self._cached(key, _RESULT.validate_json)
        if cached is not None:
            return cached
        value = self._compute(method)
        self._put(key, value.model_dump_json().encode())
        return value

    def _compute(self, method: str) -> MethodResult:
        o, X, V = self.options, self.X, self.V if method in ("mrp", "srr") else self.X
        if method == "l1":
            return l1(X).to_model()
        if method == "fpgm":
            return fpgm(X).to_model()
        if method == "hsc":
            return self.hsc().to_model()
        if method == "ci":
            r = self.ci()
            return CiResult(ci=round_list(r.ci), ci_std=round_list(r.ci_std), n_samples=r.n_samples)
        if V.shape[0] < 2:  # the methods' own validation says what is wrong
            return (mrp(V) if method == "mrp" else srr(V)).to_model()
        if method == "mrp":
            return mrp(
                V,
                alpha=o.alpha,
                min_explained=o.min_explained,
                resolution=o.resolution,
                seed=self.seed,
                graph=self.graph(),
            ).to_model()
        return srr(V, alpha=o.alpha, min_explained=o.min_explained, graph=self.graph()).to_model()

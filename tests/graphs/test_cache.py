"""The per-group result cache: reuse is real, results never change, keys follow content."""

from __future__ import annotations

import numpy as np
import pytest

import graphs.work
from graphs import LayerWeights, analyze
from graphs.cache import MemoryCache, cache_key, vectors_digest
from graphs.calibrated import CalibratedGraph, calibrated_graph
from graphs.hsc import HscLayerResult, hsc
from graphs.options import AnalysisOptions
from graphs.plan import Target
from graphs.planner import plan_layers
from graphs.report import CheckpointInfo
from graphs.similarity import unit_rows
from tests.graphs.planted import planted_layer, random_layer


def _layers(seed: int = 0) -> list[LayerWeights]:
    planted, _ = planted_layer(8, 4, 16 * 9, seed=seed)
    planted[5] = 0.0  # a dead filter
    a = random_layer(16, 27, seed=1).reshape(16, 3, 3, 3)
    c = random_layer(24, 32 * 9, seed=2).reshape(24, 32, 3, 3)
    return [
        LayerWeights(name="a", kind="conv2d", weight=a),
        LayerWeights(name="b", kind="conv2d", weight=planted.reshape(32, 16, 3, 3)),
        LayerWeights(name="c", kind="conv2d", weight=c),
        LayerWeights(name="fc", kind="linear", weight=random_layer(10, 24, seed=3)),
    ]


def _info(layers: list[LayerWeights]) -> CheckpointInfo:
    n = sum(x.params for x in layers)
    return CheckpointInfo(sha256="0" * 64, format="pytorch", size_bytes=1, n_tensors=4, n_params=n)


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make graphs.work's own calls of these functions fail: a cache hit must not reach them."""

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("recomputed although cached")

    for name in names:
        monkeypatch.setattr(graphs.work, name, boom)


def test_second_analysis_is_served_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    layers = _layers()
    cache = MemoryCache()
    first = analyze(layers, checkpoint=_info(layers), seed=4, cache=cache).to_json()
    assert cache.hits == 0 and cache.entries
    misses = cache.misses
    _forbid(monkeypatch, "mrp", "srr", "hsc", "l1", "fpgm", "calibrated_graph")
    second = analyze(layers, checkpoint=_info(layers), seed=4, cache=cache).to_json()
    assert second == first
    assert cache.misses == misses and cache.hits == 4 * 5  # 4 groups × 5 methods
    monkeypatch.undo()
    assert analyze(layers, checkpoint=_info(layers), seed=4).to_json() == first  # no cache


@pytest.mark.parametrize("fallback", ["uniform", "anneal"])
def test_replanning_for_other_targets_reuses_graphs_and_clusters(
    monkeypatch: pytest.MonkeyPatch, fallback: str
) -> None:
    """With the uniform fallback a plan needs nothing beyond the analysis. Annealing needs the
    softer levels' graph (one pass per group, at the softest threshold) and hsc's clusterings
    at those levels: the first plan that reaches a level computes them, and every later plan,
    for any target no deeper, computes nothing."""
    layers = _layers()
    total = sum(x.params for x in layers)
    cache = MemoryCache()
    opts = AnalysisOptions(fallback=fallback)  # type: ignore[arg-type]
    analyze(layers, checkpoint=_info(layers), seed=2, cache=cache, options=opts)

    def plan(m: str, r: float, cache: MemoryCache | None) -> str:
        return plan_layers(
            layers, method=m, target=Target(params=r), params_total=total, seed=2, cache=cache,
            options=opts,
        ).to_json()  # type: ignore[arg-type]  # fmt: skip

    plain = {(m, r): plan(m, r, None) for m in ("mrp", "srr", "hsc") for r in (0.85, 0.2, 0.6)}
    if fallback == "anneal":
        assert any("softer calibration levels" in p for p in plain.values())
        for (m, r), expected in plain.items():  # the deepest target first: it warms the levels
            assert plan(m, r, cache) == expected
    _forbid(monkeypatch, "calibrated_graph", "hsc", "cosine_threshold_graph")
    for (m, r), expected in plain.items():
        misses = cache.misses
        assert plan(m, r, cache) == expected
        assert cache.misses == misses  # everything the plan needed was cached


def test_softer_levels_equal_graphs_built_at_their_thresholds() -> None:
    """GroupWork.at_levels filters one graph built at the softest threshold: the same edges and
    weights as a calibrated graph built directly with each level's alpha and min_explained."""
    from graphs.anneal import anneal_levels
    from graphs.grouping import build_groups
    from graphs.work import GroupWork

    groups, _ = build_groups(_layers())
    for g in groups:
        work = GroupWork(g, seed=0)
        levels = anneal_levels(work.options, g.n_filters)
        U, _ = unit_rows(g.vectors())
        for level, derived in zip(levels, work.at_levels(levels), strict=True):
            direct = calibrated_graph(U, alpha=level.alpha, min_explained=level.min_explained)
            got = derived.graph()
            assert got.threshold == direct.threshold and got.null_dim == direct.null_dim
            assert (got.graph != direct.graph).nnz == 0, (g.name, level)
            assert derived.options == level and derived.hsc().threshold == direct.threshold


def test_keys_follow_content_parameters_and_seed() -> None:
    layers = _layers()
    cache = MemoryCache()
    analyze(layers, checkpoint=_info(layers), methods=["mrp"], seed=0, cache=cache)
    n = len(cache.entries)
    changed = list(layers)
    w = layers[1].weight.copy()
    w[0, 0, 0, 0] += 1e-3
    changed[1] = LayerWeights(name="b", kind="conv2d", weight=w)
    misses = cache.misses
    analyze(changed, checkpoint=_info(changed), methods=["mrp"], seed=0, cache=cache)
    assert cache.misses - misses == 2  # layer b's graph and result; a, c, fc are hits
    analyze(layers, checkpoint=_info(layers), methods=["mrp"], seed=1, cache=cache)
    opts = AnalysisOptions(min_explained=0.3)
    analyze(layers, checkpoint=_info(layers), methods=["mrp"], options=opts, cache=cache)
    assert len(cache.entries) == n + 2 + 4 + 8  # new seed: results only; new option: both
    X = np.ones((3, 4))
    assert vectors_digest(X) != vectors_digest(X.astype(np.float32))
    assert cache_key("graph", "d", a=1) != cache_key("graph", "d", a=2)


def test_unreadable_entries_are_recomputed() -> None:
    layers = _layers()
    cache = MemoryCache()
    first = analyze(layers, checkpoint=_info(layers), cache=cache).to_json()
    for key in cache.entries:
        cache.entries[key] = b"not an entry"
    assert analyze(layers, checkpoint=_info(layers), cache=cache).to_json() == first


def test_artifacts_round_trip_exactly() -> None:
    X, _ = planted_layer(6, 3, 40, seed=5)
    X[2] = 0.0
    U, _ = unit_rows(X)
    g = calibrated_graph(U)
    back = CalibratedGraph.from_bytes(g.to_bytes())
    assert (back.graph != g.graph).nnz == 0 and back.graph.shape == g.graph.shape
    assert (back.threshold, back.null_dim) == (g.threshold, g.null_dim)
    assert g.graph[2].nnz == 0  # a dead filter is an isolated vertex
    r = hsc(X, seed=3)
    rb = HscLayerResult.from_bytes(r.to_bytes())
    assert rb.to_model() == r.to_model() and rb.eigengap == r.eigengap

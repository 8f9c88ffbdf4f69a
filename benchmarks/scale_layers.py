"""Part ``layers`` of the scale benchmark (:mod:`benchmarks.scale`): the seven matrices of a
Llama-7B block with seeded random float32 weights, each (matrix, method) in a fresh ``spawn``
process that reports the method's wall time and its peak RSS beside its RSS after the imports."""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from benchmarks.scale_checkpoint import HIDDEN, INTERMEDIATE, QUICK, STD
from benchmarks.support.meta import load_avg, machine_busy
from benchmarks.support.procfs import current_rss_mb, mb, peak_rss_kib

LAYER_METHODS = ["mrp", "hsc", "mrp+hsc", "srr", "l1", "fpgm"]
GOAL_S, GOAL_MB = 30.0, 4096.0


def layer_shapes(quick: bool) -> list[tuple[str, int, int]]:
    """(name, rows, columns) of a Llama-7B block's seven matrices (each divided by 8 if quick)."""
    d = QUICK if quick else 1
    h, i = HIDDEN // d, INTERMEDIATE // d
    return [
        ("self_attn.q_proj", h, h),
        ("self_attn.k_proj", h, h),
        ("self_attn.v_proj", h, h),
        ("self_attn.o_proj", h, h),
        ("mlp.gate_proj", i, h),
        ("mlp.up_proj", i, h),
        ("mlp.down_proj", h, i),
    ]


def run_layer(name: str, rows: int, cols: int, seed: int, method: str) -> dict[str, Any]:
    """In a fresh process: the method's wall time on a seeded random (rows, cols) float32 layer,
    and the process's peak RSS beside its RSS after the imports."""
    import graphs
    from graphs import CheckpointInfo, LayerWeights, analyze

    base = current_rss_mb()
    w = (np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32) * STD).astype(
        np.float32, copy=False
    )
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if method == "mrp+hsc":
        info = CheckpointInfo(
            sha256="0" * 64, format="safetensors", size_bytes=w.nbytes, n_tensors=1, n_params=w.size
        )
        layer = LayerWeights(name=f"model.layers.0.{name}", kind="linear", weight=w)
        report = analyze([layer], checkpoint=info, methods=["mrp", "hsc"], seed=0)
        m = report.layers[0].methods
        extra = {"mrp": m["mrp"].redundancy, "hsc": m["hsc"].redundancy}
    elif method in ("mrp", "hsc"):
        r = graphs.mrp(w, seed=0) if method == "mrp" else graphs.hsc(w, seed=0)
        extra = {method: r.redundancy}
    elif method == "srr":
        extra = {"srr": graphs.srr(w).redundancy}
    elif method == "l1":
        graphs.l1(w)
    elif method == "fpgm":
        graphs.fpgm(w)
    else:
        raise ValueError(f"unknown method {method}")
    seconds = time.perf_counter() - t0
    peak = mb(peak_rss_kib())
    return {
        "layer": name,
        "shape": [rows, cols],
        "method": method,
        "seconds": round(seconds, 3),
        "peak_rss_mb": peak,
        "baseline_rss_mb": base,
        "above_baseline_mb": round(peak - base, 1),
        "redundancy": extra,
    }


def part_layers(quick: bool, methods: list[str]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    meta = {"load_before": load_avg(), "busy_before": machine_busy()}
    print(f"\n== layers (load {meta['load_before']}, busy {meta['busy_before']}) ==", flush=True)
    print(f"{'layer':18s} {'shape':>12s} {'method':8s} {'s':>8s} {'peak MB':>8s} {'base MB':>8s}")
    for i, (name, r, c) in enumerate(layer_shapes(quick)):
        for method in methods:
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                row = pool.submit(run_layer, name, r, c, 1000 + i, method).result()
            rows.append(row)
            print(
                f"{name:18s} {f'{r}×{c}':>12s} {method:8s} {row['seconds']:8.2f} "
                f"{row['peak_rss_mb']:8.0f} {row['baseline_rss_mb']:8.0f}  "
                f"{row['redundancy'] or ''}",
                flush=True,
            )
    verdicts = []
    for name, r, c in layer_shapes(quick):
        got = {row["method"]: row for row in rows if row["layer"] == name}
        joint = got.get("mrp+hsc")
        split = (
            (got["mrp"]["seconds"] + got["hsc"]["seconds"]) if {"mrp", "hsc"} <= set(got) else None
        )
        graph = [row for m, row in got.items() if m in ("mrp", "hsc", "mrp+hsc")]
        peak = max((row["peak_rss_mb"] for row in graph), default=None)
        verdicts.append(
            {
                "layer": name,
                "shape": [r, c],
                "mrp+hsc_s": joint["seconds"] if joint else None,
                "mrp_s_plus_hsc_s": round(split, 3) if split is not None else None,
                "peak_rss_mb": peak,
                "peak_rss_any_method_mb": max(row["peak_rss_mb"] for row in got.values()),
                "time_goal_met": joint["seconds"] <= GOAL_S if joint else None,
                "memory_goal_met": peak <= GOAL_MB if peak is not None else None,
            }
        )
    meta["load_after"] = load_avg()
    print(f"\ngoal: mrp+hsc ≤ {GOAL_S:.0f} s per layer, peak ≤ {GOAL_MB:.0f} MB")
    verdict = {True: "met", False: "MISSED", None: "n/a"}
    for v in verdicts:
        print(
            f"{v['layer']:18s} mrp+hsc {v['mrp+hsc_s']} s (mrp s + hsc s: {v['mrp_s_plus_hsc_s']})"
            f" peak {v['peak_rss_mb']} MB (any method {v['peak_rss_any_method_mb']} MB) · time "
            f"{verdict[v['time_goal_met']]} · memory {verdict[v['memory_goal_met']]}"
        )
    return {"meta": meta, "rows": rows, "goals": verdicts}

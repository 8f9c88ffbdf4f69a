"""Channel independence (CHIP) for every conv of a ResNet-56-shaped net: Gram spectra vs SVDs.

55 convs of CIFAR ResNet-56: the stem (16 channels @ 32×32) and 3 stages of 18 convs (16 @ 32×32,
32 @ 16×16, 64 @ 8×8), each with feature maps of 640 samples (float32): random but correlated,
a low-rank mix of smooth spatial patterns plus noise, ReLU'd. The Gram method
(:func:`graphs.ci.channel_independence`, spectral and, on the naive subset, minors) runs on every
layer and sample; the naive definition (np.linalg.svd of each sample with each channel zeroed,
plus the full map) runs on a subset of samples and layers of each shape and is extrapolated
linearly in samples and layers (all layers of one shape cost the same). Both run in one process
under the same BLAS thread limit. The naive values also check the Gram values on the subset.
Goal: speed-up ≥ 20×.

Usage:  python -m benchmarks.ci [--quick] [--samples 640] [--naive-samples 64]
                                [--threads 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.support.meta import machine_busy, run_meta, write_json
from benchmarks.support.procfs import peak_rss_mb
from graphs.ci import channel_independence


def resnet56_layers() -> list[tuple[str, str, int, int]]:
    """(name, shape group, channels, side) of the 55 convs, in order."""
    layers = [("conv1", "stem 16@32x32", 16, 32)]
    for stage, (width, side) in enumerate([(16, 32), (32, 16), (64, 8)], start=1):
        for block in range(9):
            for conv in (1, 2):
                group = f"stage{stage} {width}@{side}x{side}"
                layers.append((f"layer{stage}.{block}.conv{conv}", group, width, side))
    return layers


def feature_maps(samples: int, channels: int, side: int, seed: int) -> np.ndarray:
    """ReLU(mix @ smooth patterns + noise), shape (samples, channels, side²), float32.

    Each channel mixes rank = channels/4 spatial patterns with weights shared by all samples
    (so channels are correlated the same way on every sample); the patterns are per sample,
    smoothed along both axes like real activations.
    """
    rng = np.random.default_rng(seed)
    rank = max(2, channels // 4)
    mix = rng.standard_normal((channels, rank), dtype=np.float32) / np.float32(np.sqrt(rank))
    z = rng.standard_normal((samples, rank, side, side), dtype=np.float32)
    for axis in (2, 3):  # a [1, 2, 1] blur along each spatial axis
        z = 0.25 * np.roll(z, 1, axis) + 0.5 * z + 0.25 * np.roll(z, -1, axis)
    maps = np.einsum("cr,srp->scp", mix, z.reshape(samples, rank, side * side))
    maps += 0.3 * rng.standard_normal(maps.shape, dtype=np.float32)
    maps += 0.1
    return np.maximum(maps, 0.0, out=maps)


def naive_ci(F: np.ndarray) -> np.ndarray:
    """CHIP's definition with one SVD per (sample, zeroed channel): shape (samples, channels)."""
    out = np.empty(F.shape[:2])
    for s in range(F.shape[0]):
        A = F[s].astype(np.float64)
        full = np.linalg.svd(A, compute_uv=False).sum()
        for i in range(A.shape[0]):
            B = A.copy()
            B[i] = 0.0
            out[s, i] = full - np.linalg.svd(B, compute_uv=False).sum()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    layers = resnet56_layers()
    groups: dict[str, dict[str, Any]] = {}
    for _, group, c, side in layers:
        row = groups.setdefault(group, {"group": group, "channels": c, "pixels": side * side})
        row["layers"] = row.get("layers", 0) + 1
    base_rss = peak_rss_mb()

    # 1. the Gram (spectral) method on every layer and sample
    gram_s = dict.fromkeys(groups, 0.0)
    peak_traced = 0
    naive_inputs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {g: [] for g in groups}
    for k, (_, group, c, side) in enumerate(layers):
        F = feature_maps(args.samples, c, side, seed=k)
        t = time.perf_counter()
        channel_independence(F)
        gram_s[group] += time.perf_counter() - t
        if len(naive_inputs[group]) < args.naive_layers:
            # memory of the first layer of each shape, traced apart (tracing slows allocation)
            if not naive_inputs[group]:
                tracemalloc.start()
                channel_independence(F)
                peak_traced = max(peak_traced, tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
            sub = F[: args.naive_samples].copy()
            naive_inputs[group].append((sub, channel_independence(sub).ci))
        del F
    gram_rss = peak_rss_mb()

    # 2. the naive definition and the minors method on the subset, extrapolated
    rows = []
    for group, row in groups.items():
        naive_t = minors_t = 0.0
        worst = 0.0
        for sub, ci_sub in naive_inputs[group]:
            t = time.perf_counter()
            ref = naive_ci(sub).mean(axis=0)
            naive_t += time.perf_counter() - t
            t = time.perf_counter()
            channel_independence(sub, method="minors")
            minors_t += time.perf_counter() - t
            worst = max(worst, float(np.max(np.abs(ci_sub - ref) / np.abs(ref).max())))
        measured = len(naive_inputs[group]) * args.naive_samples
        scale = row["layers"] * args.samples / measured
        row.update(
            gram_s=round(gram_s[group], 3),
            naive_s_extrapolated=round(naive_t * scale, 2),
            minors_s_extrapolated=round(minors_t * scale, 2),
            naive_measured_on=f"{len(naive_inputs[group])} layers x {args.naive_samples} samples",
            speedup=round(naive_t * scale / gram_s[group], 1),
            max_rel_error_vs_naive=float(f"{worst:.2e}"),
        )
        rows.append(row)
    gram_total = sum(r["gram_s"] for r in rows)
    naive_total = sum(r["naive_s_extrapolated"] for r in rows)
    return {
        "rows": rows,
        "total": {
            "layers": len(layers),
            "samples": args.samples,
            "gram_s": round(gram_total, 2),
            "naive_s_extrapolated": round(naive_total, 1),
            "minors_s_extrapolated": round(sum(r["minors_s_extrapolated"] for r in rows), 1),
            "speedup": round(naive_total / gram_total, 1),
            "goal_speedup": 20,
            "gram_peak_traced_mb": round(peak_traced / 2**20, 1),
            "baseline_rss_mb": round(base_rss, 1),
            "rss_after_gram_mb": round(gram_rss, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        },
    }


def capture_memory(samples: int, max_pixels: int) -> dict[str, float]:
    """In a fresh process: capture a ResNet-56's maps on ``samples`` inputs (batches of 64)."""
    import torch

    from clients.activations import capture_activations
    from tests.clients.models import resnet56

    torch.manual_seed(0)
    model = resnet56("A")
    gen = torch.Generator().manual_seed(0)
    batches = (torch.randn(64, 3, 32, 32, generator=gen) for _ in range((samples + 63) // 64))
    base = peak_rss_mb()
    t0 = time.perf_counter()
    acts = capture_activations(model, batches, max_samples=samples, max_pixels=max_pixels)
    seconds = time.perf_counter() - t0
    stored = sum(t.numel() * 4 for t in acts.tensors.values()) / 2**20
    return {
        "max_pixels": max_pixels,
        "layers": len(acts.layers),
        "seconds": round(seconds, 2),
        "stored_mb": round(stored, 1),
        "rss_before_mb": round(base, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def capture_rows(samples: int) -> list[dict[str, float]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    rows = []
    for max_pixels in (256, 1024):
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            rows.append(pool.submit(capture_memory, samples, max_pixels).result())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 samples, naive on 8 of them")
    parser.add_argument("--samples", type=int, default=640)
    parser.add_argument("--naive-samples", type=int, default=64)
    parser.add_argument("--naive-layers", type=int, default=2, help="per shape group")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads for both methods")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.samples, args.naive_samples, args.naive_layers = 64, 8, 1
    args.naive_samples = min(args.naive_samples, args.samples)
    busy = machine_busy()
    with threadpool_limits(limits=args.threads):
        result = run(args)
    print(
        f"{'shape group':22s} {'layers':>6s} {'gram s':>8s} {'naive s*':>9s} {'minors s*':>9s}"
        f" {'speed-up':>8s} {'max rel err':>11s}"
    )
    for r in result["rows"]:
        print(
            f"{r['group']:22s} {r['layers']:6d} {r['gram_s']:8.2f} {r['naive_s_extrapolated']:9.1f}"
            f" {r['minors_s_extrapolated']:9.1f} {r['speedup']:7.1f}x"
            f" {r['max_rel_error_vs_naive']:11.1e}"
        )
    tot = result["total"]
    print(
        f"{'total':22s} {tot['layers']:6d} {tot['gram_s']:8.2f} {tot['naive_s_extrapolated']:9.1f}"
        f" {tot['minors_s_extrapolated']:9.1f} {tot['speedup']:7.1f}x  (goal ≥ 20x)"
    )
    print(
        f"* extrapolated linearly from {args.naive_samples} samples x {args.naive_layers} layer(s)"
        f" per shape group to {args.samples} samples x all layers"
    )
    print(
        f"Gram method: {args.samples} samples, peak traced allocation"
        f" {tot['gram_peak_traced_mb']:.0f} MB (one layer, input excluded); process RSS"
        f" {tot['rss_after_gram_mb']:.0f} MB after it (baseline {tot['baseline_rss_mb']:.0f} MB);"
        f" BLAS threads {args.threads}; machine busy {busy}"
    )
    result["capture"] = capture_rows(args.samples)
    for r in result["capture"]:
        print(
            f"capture of {r['layers']:.0f} layers, {args.samples} samples, "
            f"max_pixels {r['max_pixels']:.0f}:"
            f" {r['seconds']:.1f} s, {r['stored_mb']:.0f} MB of maps kept, peak RSS"
            f" {r['peak_rss_mb']:.0f} MB (model and imports {r['rss_before_mb']:.0f} MB)"
        )
    if args.out:
        meta = {**run_meta(), "blas_threads": str(args.threads), "machine_busy": str(busy)}
        write_json(args.out, {"meta": meta, **result})


if __name__ == "__main__":
    main()

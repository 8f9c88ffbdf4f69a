"""Speed and memory of the redundancy engine (issue 2 goals, on 2 cores).

Cases:
* ``mobilenet_v2``: the real ImageNet MobileNetV2 from ../shared/realdata/fetch.sh (read + all
  methods). Goal: all methods ≤ 5 s.
* ``resnet50_shaped``: 53 convs + fc with ResNet-50 shapes and random weights (up to 2048
  filters). Goal: all methods ≤ 10 s.
* ``wide_8192x4608``: one random 8192 × 4608 layer, each method on its own.
Goal for every case: peak memory ≤ 2 GB.

Every (case, method) runs in a fresh process so its peak RSS is its own; the baseline RSS of a
process that has only imported the libraries is reported beside it.

Usage:  python -m benchmarks.speed [--cases mobilenet_v2,resnet50_shaped,wide_8192x4608]
                                   [--out results.json]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.support.meta import run_meta, write_json
from benchmarks.support.paths import realdata_dir
from benchmarks.support.procfs import peak_rss_mb

# "all": every method in one analyze(); "stages": similarity building blocks on the widest group
METHODS = ["mrp", "srr", "hsc", "l1", "fpgm", "all", "stages"]
ALL = ["mrp", "srr", "hsc", "l1", "fpgm"]


def resnet50_layers(seed: int = 0) -> list[Any]:
    """LayerWeights with ResNet-50 shapes (53 convs + fc), i.i.d. Gaussian weights."""
    from graphs import LayerWeights

    rng = np.random.default_rng(seed)
    layers: list[Any] = []

    def conv(name: str, out: int, inp: int, k: int) -> None:
        w = rng.standard_normal((out, inp, k, k)).astype(np.float32)
        layers.append(LayerWeights(name=name, kind="conv2d", weight=w))

    conv("conv1", 64, 3, 7)
    inp = 64
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            conv(f"{p}.conv1", width, inp, 1)
            conv(f"{p}.conv2", width, width, 3)
            conv(f"{p}.conv3", width * 4, width, 1)
            if b == 0:
                conv(f"{p}.downsample.0", width * 4, inp, 1)
            inp = width * 4
    fc = rng.standard_normal((1000, 2048)).astype(np.float32)
    layers.append(LayerWeights(name="fc", kind="linear", weight=fc))
    return layers


def _info() -> Any:
    from graphs import CheckpointInfo

    return CheckpointInfo(sha256="0" * 64, format="pytorch", size_bytes=0, n_tensors=0, n_params=0)


def _similarity_stages(X: np.ndarray) -> dict[str, float]:
    """Times of the shared building blocks on one layer (run before the method itself)."""
    from graphs.similarity import (
        calibrated_threshold,
        cosine_knn,
        cosine_threshold_graph,
        unit_rows,
    )

    out: dict[str, float] = {}
    t = time.perf_counter()
    U, _ = unit_rows(X)
    out["unit_rows"] = time.perf_counter() - t
    t = time.perf_counter()
    threshold, _ = calibrated_threshold(U)
    out["null_fit"] = time.perf_counter() - t
    t = time.perf_counter()
    cosine_threshold_graph(U, threshold)
    out["threshold_graph"] = time.perf_counter() - t
    t = time.perf_counter()
    cosine_knn(U, 5)
    out["knn"] = time.perf_counter() - t
    return out


def run_case(case: str, method: str) -> dict[str, Any]:
    """Run in a child process: returns times per stage and peak RSS."""
    import graphs  # noqa: F401  (import cost is not part of the measurement)
    import service.ingest.checkpoint

    base = peak_rss_mb()
    stages: dict[str, float] = {}
    layers: Sequence[Any]
    t0 = time.perf_counter()
    if case == "mobilenet_v2":
        parsed = service.ingest.checkpoint.read_checkpoint(
            realdata_dir() / "mobilenet_v2_imagenet.pth"
        )
        layers, info = parsed.layers, parsed.info
        stages["read"] = time.perf_counter() - t0
    elif case == "resnet50_shaped":
        layers, info = resnet50_layers(), _info()
    else:
        from graphs import LayerWeights

        w = np.random.default_rng(0).standard_normal((8192, 4608)).astype(np.float32)
        layers, info = [LayerWeights(name="wide", kind="linear", weight=w)], _info()
    from graphs import analyze

    if method == "stages":  # the shared building blocks on the case's widest group
        widest = max(layers, key=lambda layer: layer.n_filters)
        stages.update(_similarity_stages(widest.filters()))
        return _row(case, method, 1, stages, base, None)
    t1 = time.perf_counter()
    methods = ALL if method == "all" else [method]
    report = analyze(layers, checkpoint=info, methods=methods, seed=0)
    stages["analyze"] = time.perf_counter() - t1
    summary = report.summary.methods[methods[0]].redundancy_params_weighted
    return _row(case, method, len(report.layers), stages, base, summary)


def _row(
    case: str, method: str, groups: int, stages: dict[str, float], base: float, red: float | None
) -> dict[str, Any]:
    return {
        "case": case,
        "method": method,
        "groups": groups,
        "seconds": stages,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "baseline_rss_mb": round(base, 1),
        "params_weighted_redundancy": red,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cases", default="mobilenet_v2,resnet50_shaped,wide_8192x4608")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for case in args.cases.split(","):
        for method in args.methods.split(","):
            with ProcessPoolExecutor(max_workers=1) as pool:
                row = pool.submit(run_case, case, method).result()
            rows.append(row)
            print(
                f"{case:17s} {method:5s} groups={row['groups']:3d} "
                + " ".join(f"{k}={v:.2f}s" for k, v in row["seconds"].items())
                + f" peak_rss={row['peak_rss_mb']:.0f}MB (baseline {row['baseline_rss_mb']:.0f}MB)",
                flush=True,
            )
        total = sum(
            r["seconds"]["analyze"] for r in rows if r["case"] == case and r["method"] in ALL
        )
        print(f"{case:17s} sum of single-method runs {total:.2f}s", flush=True)
    meta = run_meta()
    if args.out:
        write_json(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()

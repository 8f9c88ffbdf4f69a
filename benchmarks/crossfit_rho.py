"""Does cross-fitting the error curves make functional redundancy predict sensitivity better?

Spearman ρ (with the 95 % bootstrap interval of :mod:`benchmarks.sensitivity_bench`) between
per-group figures and the **stored** measured sensitivity of that benchmark
(benchmarks/fidelity/sensitivity/sensitivity.json: mean top-1 agreement over the fractions on
its evaluation inputs, channels in the greedy least-error order of the whole-calibration
curve — the order the cross-fitted curves keep). Figures, from the calibration inputs only:

* ``functional`` / ``-predicted_error``: in-sample curves (as stored; recomputed as a check);
* ``functional-xfit`` / ``-predicted_error-xfit``: the same from cross-fitted curves
  (:mod:`graphs.crossfit`; halves = the calibration source images split as in
  :func:`benchmarks.fidelity_currency.split_calibration`), at the library's default ε.

``--holdout product``: statistics and held-out part from one ``capture_activations(...,
holdout_every=2)`` with a calibration source image per batch (the product's default path).

Usage:  python -m benchmarks.crossfit_rho [--stats FILE] [--holdout halves|product] [--out-dir DIR]
Writes DIR/rho.json and DIR/rho.md (default DIR: benchmarks/fidelity/crossfit/).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.fidelity_calibration import product_capture, split_calibration
from benchmarks.fidelity_compensation_rows import capture_stats
from benchmarks.fidelity_harness import setup
from benchmarks.fidelity_images import image_set
from benchmarks.sensitivity_bench import spearman_ci
from benchmarks.support.meta import run_meta
from benchmarks.support.paths import BENCHMARKS, realdata_dir

TABLE = BENCHMARKS / "fidelity" / "sensitivity" / "sensitivity.json"


def figures(curves: dict[int, Any], names: dict[int, str]) -> dict[str, dict[str, Any]]:
    from graphs.options import DEFAULT_EPSILON

    return {
        names[g]: {
            "functional": c.redundancy(DEFAULT_EPSILON),
            "curve": [float(e) for e in c.errors],
        }
        for g, c in curves.items()
    }


def rho_rows(
    rows: list[dict[str, Any]], figs: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for comp in (True, False):
        by: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["compensated"] == comp:
                by.setdefault(r["name"], []).append(r)
        keys = sorted(n for n in by if all(n in f for f in figs.values()))
        y = np.array([np.mean([r["metric"] for r in by[n]]) for n in keys])
        tag = "compensated" if comp else "uncompensated"
        for kind, f in figs.items():
            end = "" if kind == "in-sample" else "-xfit"
            fr = np.array([f[n]["functional"] for n in keys])
            pe = np.array(
                [
                    -np.mean(
                        [f[n]["curve"][min(r["removed"], len(f[n]["curve"]) - 1)] for r in by[n]]
                    )
                    for n in keys
                ]
            )
            for m, x in ((f"functional{end}", fr), (f"-predicted_error{end}", pe)):
                out[f"{m} vs {tag}"] = (
                    spearman_ci(x, y)
                    if np.ptp(x) > 0 and np.ptp(y) > 0
                    else {"rho": None, "note": "constant figure or score", "n": int(x.size)}
                )
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    from graphs.compensated import group_consumers
    from graphs.crossfit import crossfit_curves

    t0 = time.perf_counter()
    torch.set_num_threads(a.threads)
    stored = json.loads(a.table.read_text())
    images = image_set(None, None)
    s = setup(a.realdata or realdata_dir())
    if a.holdout == "product":  # the product's capture: every second source image held out
        stats, holdout, _ = product_capture(s, images)
    else:
        if a.stats is not None:
            from safetensors.numpy import load_file

            stats = {k.removeprefix("gram/"): v for k, v in load_file(str(a.stats)).items()}
        else:
            stats = capture_stats(s, images.calib_u8)[0]
        holdout = capture_stats(s, split_calibration(images)[1])[0]
    found = group_consumers(s.parsed.layers, s.manifest, stats)
    by_id = {g.id: g for g in s.manifest.groups}
    names = {g.id: g.producers[0] for g in s.manifest.groups}
    pooled = found.curves([gid for gid in found.consumers if by_id[gid].prunable])
    t = time.perf_counter()
    xfit = crossfit_curves(found, holdout, pooled)
    xfit_s = time.perf_counter() - t
    figs = {"in-sample": figures(pooled, names), "xfit": figures(xfit, names)}
    check = max(
        abs(figs["in-sample"][n]["functional"] - v["functional"])
        for n, v in stored["figures"].items()
        if "functional" in v and n in figs["in-sample"]
    )
    rows = stored["table_json"]["rows"]
    return {
        "meta": {**run_meta(), "torch_threads": a.threads},
        "config": {
            "table": str(a.table),
            "table_meta": stored["meta"],
            "n_calib": images.info["n_calib"],
            "holdout": a.holdout,
        },
        "check_max_functional_diff_vs_stored": check,
        "crossfit_s": round(xfit_s, 1),
        "figures": {k: {n: v["functional"] for n, v in f.items()} for k, f in figs.items()},
        "correlations": rho_rows(rows, figs),
        "total_s": round(time.perf_counter() - t0, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = ["| figure vs score | ρ | 95 % interval | groups |", "|---|---:|---:|---:|"]
    for k, v in result["correlations"].items():
        if v.get("rho") is None:
            lines.append(f"| {k} | – | {v['note']} | {v['n']} |")
        else:
            lo, hi = v["ci95"]
            lines.append(f"| {k} | {v['rho']:.2f} | {lo:.2f} – {hi:.2f} | {v['n']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stats", type=Path, default=None, help="use these statistics (no capture)")
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--realdata", type=Path, default=None)
    p.add_argument("--out-dir", type=Path, default=BENCHMARKS / "fidelity" / "crossfit")
    p.add_argument(
        "--holdout",
        choices=("halves", "product"),
        default="halves",
        help="the held-out part: the second half of the calibration sources, or the product's "
        "capture (holdout_every=2, one source per batch; it also gives the statistics)",
    )
    a = p.parse_args(argv)
    result = run(a)
    result["markdown"] = markdown(result)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "rho.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out_dir / "rho.md").write_text(result["markdown"] + "\n")
    print(result["markdown"])
    print(f"check {result['check_max_functional_diff_vs_stored']}; total {result['total_s']} s")


if __name__ == "__main__":
    main()

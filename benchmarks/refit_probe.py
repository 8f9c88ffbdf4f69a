"""Probe: does ``clients.refit`` (sequential refit against the unpruned model) fix the
compounding of fold errors on the real MobileNetV2?

The harness of :mod:`benchmarks.fidelity_compensation` (same model, same image split by source):
second moments and the refit use the **calibration inputs only**; the evaluation inputs give the
metrics (top-1 agreement with the unpruned model, mean KL(unpruned ‖ pruned)) and nothing else.
Per target: the compensated mrp plan with functional allocation, applied with its folds
(``fold``), then refitted (``fold+refit``); optionally the same plan without folds then refitted
(``refit``, ``--bare``).

Usage:  python -m benchmarks.refit_probe [--targets 0.1 0.2] [--n-eval N] [--n-calib N]
            [--min-rows 2.0] [--ridge 1] [--bias-only] [--bare] [--threads 1] [--out FILE.json]
Prints one line per row and writes the JSON when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import fidelity_compensation_rows as fc
from benchmarks.fidelity_harness import Setup, fidelity, log_probs, make_plan, setup
from benchmarks.fidelity_images import ImageSet, batches, image_set
from benchmarks.support.meta import run_meta
from benchmarks.support.paths import realdata_dir


def _row(
    name: str, target: float, s: Setup, pruned: Any, images: ImageSet, ref: Any
) -> dict[str, Any]:
    macs, _, _ = fc.structural_macs(pruned, s.model)
    m = fidelity(ref, log_probs(pruned, images.eval_u8), np.array(images.eval_sources))
    row = {"target": target, "variant": name, "flops_reduction": round(1 - macs / s.macs, 4)}
    row.update(m)
    print(json.dumps(row), flush=True)
    return row


def holdout(
    s: Setup, plan: Any, images: ImageSet, ridges: Sequence[float], min_rows: float
) -> list[dict[str, Any]]:
    """Choose the ridge without the evaluation images: refit on the first half of the
    calibration crops (earlier calibration sources), measure on the second half."""
    from clients import refit

    half = images.calib_u8.shape[0] // 2
    fit_u8, val_u8 = images.calib_u8[:half], images.calib_u8[half:]
    ref = log_probs(copy.deepcopy(s.model), val_u8)
    one = np.zeros(val_u8.shape[0])
    folded = fc.apply(s, plan, True)
    out = [{"ridge": None, **fidelity(ref, log_probs(folded, val_u8), one)}]
    print(json.dumps(out[-1]), flush=True)
    for ridge in ridges:
        pruned = copy.deepcopy(folded)
        refit(pruned, s.model, batches(fit_u8), plan=plan, ridge=ridge,
              min_rows_per_input=min_rows)  # fmt: skip
        out.append({"ridge": ridge, **fidelity(ref, log_probs(pruned, val_u8), one)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from clients import refit

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--targets", nargs="*", type=float, default=[0.1, 0.2])
    p.add_argument("--n-eval", type=int, default=None)
    p.add_argument("--n-calib", type=int, default=None)
    p.add_argument("--min-rows", type=float, default=2.0)
    p.add_argument("--ridge", type=float, default=1.0)
    p.add_argument(
        "--holdout-ridges", nargs="*", type=float, default=None,
        help="only: refit on half the calibration crops with each ridge, measure on the rest",
    )  # fmt: skip
    p.add_argument("--bias-only", action="store_true", help="refit(weights=False)")
    p.add_argument("--bare", action="store_true", help="also: no folds, refit only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    s = setup(realdata_dir())
    images = image_set(a.n_eval, a.n_calib)
    stats, capture_s = fc.capture_stats(s, images.calib_u8)
    if a.holdout_ridges is not None:
        for target in a.targets:
            plan, _ = make_plan(
                s, "mrp", target, 0, stats=stats, maps=None, allocation="functional"
            )
            print(f"target {target}", flush=True)
            holdout(s, plan, images, a.holdout_ridges, a.min_rows)
        return
    ref = log_probs(copy.deepcopy(s.model), images.eval_u8)
    calib = batches(images.calib_u8)
    rows: list[dict[str, Any]] = []
    for target in a.targets:
        plan, _ = make_plan(s, "mrp", target, 0, stats=stats, maps=None, allocation="functional")
        variants = [("fold", True)] + ([("bare", False)] if a.bare else [])
        for name, folds in variants:
            pruned = fc.apply(s, plan, folds)
            rows.append(_row(name, target, s, pruned, images, ref))
            t = time.perf_counter()
            report = refit(
                pruned, s.model, calib, plan=plan, ridge=a.ridge, min_rows_per_input=a.min_rows,
                weights=not a.bias_only,
            )  # fmt: skip
            row = _row(f"{name}+refit", target, s, pruned, images, ref)
            row.update(
                refit_s=round(time.perf_counter() - t, 1),
                refitted=len(report.layers),
                skipped=report.skipped,
            )
            rows.append(row)
            print(f"  refit {row['refit_s']} s, {len(report.layers)} layers, skipped "
                  f"{report.skipped}", flush=True)  # fmt: skip
    if a.out is not None:
        meta = run_meta()
        info = {"capture_s": round(capture_s, 1), "images": images.info, "args": vars(a)}
        a.out.write_text(json.dumps({"meta": meta, "info": info, "rows": rows}, default=str))


if __name__ == "__main__":
    main()

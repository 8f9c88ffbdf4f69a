"""Zero-shot fidelity of *compensated* plans of the real MobileNetV2 (issue 14, design §8).

The harness of :mod:`benchmarks.fidelity` (same model, same natural images split by source into
evaluation and calibration sets, same metrics: top-1 agreement with the unpruned model and mean
KL(unpruned ‖ pruned)), with the statistics compensation needs. Second moments of every
channel-mixing consumer's input (``clients.capture_activations(..., maps=False)``) are captured
on the **calibration inputs only**; evaluation inputs are used for the metrics and nothing else
(nothing here is tuned on them: ε, ridge and allocation are the library defaults).

Variants per method (``mrp srr hsc ci l1 fpgm random``), at each FLOPs target:

* ``weights``: today's plan without statistics (weight-space graphs, uniform fallback);
* ``stats``: ``plan_layers(stats=...)`` — graph methods compare Pearson correlations at the
  consumer inputs, counts by the default allocation (uniform) — applied **without** the folds
  (the same removed channels as ``comp``: the fold is the only difference);
* ``comp``: the same plan applied with its least-squares folds (allocation (a), uniform);
* ``refit`` (opt-in): ``comp`` followed by ``clients.refit`` on the calibration inputs (each
  consumer refitted in forward order against the unpruned model's output);
* ``comp/functional``, ``comp/marginal``: allocation (b) SRP on functional redundancy and
  (c) equal marginal relative consumer error per MAC (``--allocation-methods``, default mrp, l1).

plus ``tp_magnitude`` (Torch-Pruning's global MagnitudePruner bisected to the target). FLOPs are
``torch_pruning.utils.count_ops_and_params`` MACs of the pruned model **without the bias adds
the folds create** (a fold gives a bias-free consumer a bias; torch-pruning's counter counts one
add per output element for it, ≈ 1 % of MobileNetV2, which is not pruning's doing: the bias
could be absorbed into the following BN). ``flops_reduction_with_bias`` keeps the raw count.
BN re-estimation (``--bn-variants``, default ``comp`` rows) uses the calibration inputs.

Usage:  python -m benchmarks.fidelity_compensation [--quick] [--targets 0.05 0.1 0.2 0.3]
            [--methods ...] [--variants weights stats comp] [--allocation-methods mrp l1]
            [--bn-variants comp] [--seeds 0] [--threads 1] [--out-dir DIR]
(also ``python -m benchmarks.fidelity --compensation ...``). Writes DIR/compensation.json and
DIR/compensation.md (default DIR: benchmarks/fidelity/compensation/). The rows:
:mod:`benchmarks.fidelity_compensation_rows`; the tables:
:mod:`benchmarks.fidelity_compensation_report`.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.fidelity_compensation_report import markdown
from benchmarks.fidelity_compensation_rows import (
    Context,
    capture_stats,
    jobs,
    target_rows,
    tp_row,
)
from benchmarks.fidelity_harness import TP_METHOD, WEIGHTS, TpSearch, capture, log_probs, setup
from benchmarks.fidelity_images import QUICK_N, image_set
from benchmarks.support.meta import machine_busy, run_meta, write_json
from benchmarks.support.paths import BENCHMARKS, realdata_dir

TARGETS = (0.05, 0.1, 0.2, 0.3)
METHODS = ("mrp", "srr", "hsc", "ci", "l1", "fpgm", "random")
VARIANTS = ("weights", "stats", "comp", "refit")
DEFAULT_VARIANTS = ("weights", "stats", "comp")
ALLOCATIONS = ("functional", "marginal")
ALLOCATION_METHODS = ("mrp", "l1")
QUICK_METHODS = ("l1",)


def run(
    *,
    quick: bool,
    out_dir: Path,
    targets: Sequence[float] | None = None,
    methods: Sequence[str] | None = None,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    allocation_methods: Sequence[str] | None = None,
    allocations: Sequence[str] = ALLOCATIONS,
    bn_variants: Sequence[str] | None = None,
    bn_methods: Sequence[str] | None = None,
    ignored: Sequence[str] = (),
    tp: bool | None = None,
    seeds: Sequence[int] = (0,),
    realdata: Path | None = None,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every (target, method, variant) row; returns JSON-able results.

    ``quick``: target 0.1, l1 only (weights, stats, comp), no allocation rows, no TP, no BN,
    16 evaluation and 16 calibration inputs (each overridable)."""
    from graphs.cache import MemoryCache

    t_start = time.perf_counter()
    targets = list(targets or ((0.1,) if quick else TARGETS))
    methods = list(methods or (QUICK_METHODS if quick else METHODS))
    alloc_methods = list(
        allocation_methods
        if allocation_methods is not None
        else (() if quick else ALLOCATION_METHODS)
    )
    bn_set = set(bn_variants if bn_variants is not None else (() if quick else ("comp",)))
    bn_only = None if bn_methods is None else set(bn_methods)
    tp = (not quick) if tp is None else tp
    bad = [m for m in (*methods, *alloc_methods) if m not in METHODS]
    bad += [v for v in variants if v not in VARIANTS] + [
        a for a in allocations if a not in ALLOCATIONS
    ]
    if bad or not seeds:
        raise ValueError(f"unknown methods/variants/allocations {bad} (or no seeds)")
    root = realdata or realdata_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    busy = machine_busy(1.0)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timings: dict[str, float] = {}
        n = QUICK_N if quick else None
        images = image_set(n, n)
        s = setup(root)
        ref = log_probs(copy.deepcopy(s.model), images.eval_u8)
        stats, timings["stats_capture_s"] = capture_stats(s, images.calib_u8)
        maps = None
        if "ci" in methods or "ci" in alloc_methods:
            maps, timings["ci_capture_s"] = capture(s, images.calib_u8)
        log(
            f"images: {images.info['n_eval']} evaluation, {images.info['n_calib']} calibration; "
            f"statistics of {len(stats)} consumers in {timings['stats_capture_s']:.1f} s"
        )
        c = Context(s, stats, maps, MemoryCache(), images, ref, bn_set, bn_only, list(ignored), log)
        rows: list[dict[str, Any]] = []
        todo = jobs(methods, variants, alloc_methods, allocations, list(seeds))
        search = TpSearch(s)  # remembers the ratios it tried across targets
        for target in targets:
            rows += target_rows(c, target, todo)
            if tp:
                rows.append(tp_row(search, target, images, ref, c.bn(TP_METHOD, "comp"), log))
        timings["total_s"] = round(time.perf_counter() - t_start, 2)

        return {
            "meta": {**run_meta(), "machine_busy": busy, "torch_threads": threads},
            "config": {
                "model": "MobileNetV2 (torchvision layout), ImageNet weights " + WEIGHTS,
                "quick": quick,
                "targets": targets,
                "methods": methods,
                "variants": list(variants),
                "allocation_methods": alloc_methods,
                "allocations": list(allocations),
                "bn_variants": sorted(bn_set),
                "bn_methods": None if bn_only is None else sorted(bn_only),
                "ignored": list(ignored),
                "tp": tp,
                "seeds": list(seeds),
                "statistics": f"gram/<consumer> of all {images.info['n_calib']} calibration "
                "inputs, every position (clients.capture_activations maps=False)",
                "flops": "MACs by torch_pruning count_ops_and_params at 1x3x224x224, bias adds "
                "created by the folds left out (flops_reduction_with_bias: raw count)",
            },
            "images": images.info,
            "rows": rows,
            "timings": timings,
            "markdown": markdown(rows),
        }
    finally:
        torch.set_num_threads(old_threads)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="0.1, l1, 16 inputs, no TP/BN/allocations")
    p.add_argument("--targets", type=float, nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--allocation-methods", nargs="*", default=None, choices=METHODS)
    p.add_argument("--allocations", nargs="*", default=list(ALLOCATIONS), choices=ALLOCATIONS)
    p.add_argument("--bn-variants", nargs="*", default=None, choices=VARIANTS)
    p.add_argument("--bn-methods", nargs="*", default=None, help="BN rows only for these")
    p.add_argument("--ignore", nargs="*", default=[], help="layers never pruned (all plans)")
    p.add_argument("--tp", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--realdata", type=Path, default=None)
    p.add_argument("--out-dir", type=Path, default=BENCHMARKS / "fidelity" / "compensation")
    a = p.parse_args(argv)
    result = run(
        quick=a.quick,
        out_dir=a.out_dir,
        targets=a.targets,
        methods=a.methods,
        variants=a.variants,
        allocation_methods=a.allocation_methods,
        allocations=a.allocations,
        bn_variants=a.bn_variants,
        bn_methods=a.bn_methods,
        ignored=a.ignore,
        tp=a.tp,
        seeds=a.seeds,
        realdata=a.realdata,
        threads=a.threads,
    )
    write_json(a.out_dir / "compensation.json", result)
    (a.out_dir / "compensation.md").write_text(result["markdown"] + "\n")
    print()
    print(result["markdown"])
    print(
        f"\nwrote {a.out_dir / 'compensation.json'}, compensation.md; "
        f"total {result['timings']['total_s']:.1f} s"
    )


if __name__ == "__main__":
    main()

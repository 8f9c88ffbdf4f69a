"""Zero-shot fidelity of pruned real MobileNetV2 (ImageNet) on natural images, no labels (issue 7).

The real torchvision-layout MobileNetV2 (``realdata/mobilenet_v2_imagenet.pth``) is pruned to
10 / 20 / 30 % fewer FLOPs (MACs) by each method, and every pruned model is compared with the
unpruned one on natural images that scikit-image and scikit-learn ship: **top-1 agreement** (the
pruned model's top class equals the unpruned model's) and **mean KL(p_unpruned ‖ p_pruned)**
(nats) over the evaluation inputs, without and with **BN re-estimation** (running stats reset,
momentum None, the calibration inputs forwarded in train mode without grad, then eval). No labels
are needed: the unpruned model's predictions are the reference.

Images: 20 source images (``skimage.data`` photographs, textures and scientific images, gray ones
stacked to RGB; ``sklearn.datasets.load_sample_images`` china and flower), split **by source**
into evaluation and calibration sources (a fixed list, never the same image on both sides); each
source gives deterministic square crops (scales 1.0, 0.75, 0.5 of its short side at the centre
and the four corners, duplicates dropped) and their horizontal flips, resized to 224×224
(bilinear, antialias), ImageNet-normalized: 292 evaluation and 196 calibration inputs.
Calibration inputs feed ``ci``'s activations and the BN re-estimation; evaluation inputs only the
metrics.

Methods: prunegraph's plans (``mrp``, ``srr``, ``hsc``: redundancy-aware; ``ci``: CHIP's channel
independence on activations of the calibration inputs; ``l1``, ``fpgm``, ``random``: one uniform
ratio), made with a manifest at 1×3×224×224 (stem and classifier kept whole) and applied with
``clients.apply_plan``; and ``tp_magnitude``: Torch-Pruning's ``MagnitudePruner`` with global
pruning and ``MagnitudeImportance(p=1)`` (the tool's defaults otherwise; only the classifier
ignored), its ``pruning_ratio`` found by bisection so that its FLOPs reduction is within ±1 point
of the target. FLOPs and params are counted by ``torch_pruning.utils.count_ops_and_params`` at
1×3×224×224. Seeds only matter for ``random`` (each seed is a run; the table gives mean ± std);
the other methods are deterministic for a seed and run once, with the first seed.

Speed: forwards run in batches of 16 under ``torch.no_grad`` in channels_last with
``torch.set_num_threads(--threads)`` (default 1: on the shared 2-core machine two OpenMP threads
were several times slower than one while other work ran; the previous setting is restored
afterwards).

Usage:  python -m benchmarks.fidelity [--quick] [--seeds 0 1 2] [--targets 0.1 0.2 0.3]
            [--methods mrp srr ...] [--out-dir DIR] [--no-bn-recalibration] [--threads 1]
Writes DIR/fidelity.json, DIR/fidelity.md and DIR/fidelity.png (default DIR:
benchmarks/fidelity/) and prints the markdown tables.

Compensated plans (issue 14: statistics from the calibration inputs, least-squares folds, the
allocation rules): ``python -m benchmarks.fidelity --compensation [--quick] ...`` runs
:mod:`benchmarks.fidelity_compensation` with the remaining options.

Modules: the images (:mod:`benchmarks.fidelity_images`), the model, metrics and pruning
(:mod:`benchmarks.fidelity_harness`), the tables and plot (:mod:`benchmarks.fidelity_report`).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.fidelity_harness import (
    CI_MAX_PIXELS,
    CI_SAMPLES,
    CONFIDENT,
    METHODS,
    TP_METHOD,
    TP_TOLERANCE,
    WEIGHTS,
    Setup,
    TpSearch,
    capture,
    count,
    fidelity,
    log_probs,
    prune_prunegraph,
    recalibrate_bn,
    setup,
)
from benchmarks.fidelity_images import QUICK_N, ImageSet, image_set
from benchmarks.fidelity_report import markdown, plot, summarize
from benchmarks.support.meta import machine_busy, run_meta, write_json
from benchmarks.support.paths import BENCHMARKS, realdata_dir

TARGETS = (0.1, 0.2, 0.3)
QUICK_METHODS = ("l1", "mrp")


@dataclass
class Prepared:
    """What every row of a run shares: the model, the images, the unpruned model's
    log-probabilities (``ref``; ``ref_bn``: after BN re-estimation), ci's activations and cache,
    Torch-Pruning's ratio search."""

    s: Setup
    images: ImageSet
    groups: np.ndarray  # per evaluation input, its source image
    ref: torch.Tensor
    ref_bn: torch.Tensor | None
    acts: dict[str, np.ndarray] | None
    ci_cache: Any  # graphs.cache.MemoryCache
    search: TpSearch | None


def prepare(
    root: Path, *, quick: bool, bn: bool, methods: Sequence[str], log: Callable[[str], None]
) -> tuple[Prepared, dict[str, Any], dict[str, float]]:
    """The images, the model, the reference forwards (and, with ``bn``, the unpruned model
    re-estimated the same way), ci's activations: the run's shared state, the ``reference``
    section of the results and the timings so far."""
    from graphs.cache import MemoryCache

    timings: dict[str, float] = {}
    n = QUICK_N if quick else None
    images = image_set(n, n)
    timings["images_s"] = images.info["prepare_s"]
    log(f"images: {images.info['n_eval']} evaluation, {images.info['n_calib']} calibration")
    t = time.perf_counter()
    s = setup(root)
    timings["setup_s"] = round(time.perf_counter() - t, 2)
    groups = np.array(images.eval_sources)
    t = time.perf_counter()
    ref = log_probs(copy.deepcopy(s.model), images.eval_u8)
    timings["reference_forward_s"] = round(time.perf_counter() - t, 2)
    ref_conf = float((ref.max(1).values.exp() >= CONFIDENT).double().mean())
    reference: dict[str, Any] = {
        "macs": s.macs,
        "params": s.params,
        "confident_fraction": round(ref_conf, 4),
        "top1_classes": len(set(ref.argmax(1).tolist())),
    }
    ref_bn = None
    if bn:  # the unpruned model re-estimated the same way: what re-estimation alone does
        model = copy.deepcopy(s.model)
        t = time.perf_counter()
        recalibrate_bn(model, images.calib_u8)
        ref_bn = log_probs(model, images.eval_u8)
        reference["bn_recalibrated_unpruned"] = fidelity(ref, ref_bn, groups)
        timings["bn_reference_s"] = round(time.perf_counter() - t, 2)
    acts = None
    if "ci" in methods:
        acts, capture_s = capture(s, images.calib_u8)
        timings["ci_capture_s"] = round(capture_s, 2)
    search = TpSearch(s) if TP_METHOD in methods else None
    shared = Prepared(s, images, groups, ref, ref_bn, acts, MemoryCache(), search)
    return shared, reference, timings


def measure_row(
    p: Prepared, target: float, method: str, seed: int, *, bn: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    """Prune by ``method`` to ``target``, count, compare with the unpruned model (and after BN
    re-estimation with ``bn``): one row."""
    t = time.perf_counter()
    if method == TP_METHOD:
        assert p.search is not None
        pruned, extra = p.search.find(target)
    else:
        hits = p.ci_cache.hits
        cache = p.ci_cache if method == "ci" else None
        pruned, extra = prune_prunegraph(p.s, method, target, seed, p.acts, cache)
        extra["plan_cached"] = p.ci_cache.hits > hits
    macs, params = count(pruned)
    row: dict[str, Any] = {
        "target": target,
        "method": method,
        "seed": seed,
        "flops_reduction": round(1 - macs / p.s.macs, 5),
        "params_reduction": round(1 - params / p.s.params, 5),
        **extra,
    }
    lp = log_probs(pruned, p.images.eval_u8)
    row.update(fidelity(p.ref, lp, p.groups))
    if bn:
        recalibrate_bn(pruned, p.images.calib_u8)
        lp = log_probs(pruned, p.images.eval_u8)
        row.update({f"{k}_bn": v for k, v in fidelity(p.ref, lp, p.groups).items()})
        assert p.ref_bn is not None
        rel = fidelity(p.ref_bn, lp, p.groups)
        row["agreement_bn_vs_bn_unpruned"] = rel["agreement"]
        row["kl_bn_vs_bn_unpruned"] = rel["kl"]
    row["total_s"] = round(time.perf_counter() - t, 2)
    log(
        f"{100 * target:.0f}% {method:12s} seed {seed}: FLOPs "
        f"-{100 * row['flops_reduction']:.1f}% agree "
        f"{100 * row['agreement']:.1f}% KL {row['kl']:.3f}"
        + (f" | BN agree {100 * row['agreement_bn']:.1f}% KL {row['kl_bn']:.3f}" if bn else "")
        + f" ({row['total_s']:.1f} s)"
    )
    return row


def config(
    *,
    quick: bool,
    targets: list[float],
    methods: list[str],
    seeds: list[int],
    bn: bool,
    n_calib: int,
) -> dict[str, Any]:
    """The ``config`` section of the results: the settings and how each number is made."""
    return {
        "model": "MobileNetV2 (torchvision layout), ImageNet weights " + WEIGHTS,
        "quick": quick,
        "targets": targets,
        "methods": methods,
        "seeds": seeds,
        "seeds_note": "random runs once per seed (table: mean ± std); every other "
        "method is deterministic for a seed and runs once with the first seed",
        "bn_recalibration": bn,
        "flops": "MACs by torch_pruning.utils.count_ops_and_params at 1x3x224x224",
        "kl": "mean over evaluation inputs of KL(p_unpruned || p_pruned), nats",
        "prunegraph": "plan_layers with a manifest at 1x3x224x224 (stem and classifier "
        "kept whole), default constraints and step, applied by clients.apply_plan",
        "tp_magnitude": "torch_pruning MagnitudePruner, global_pruning=True, "
        "MagnitudeImportance(p=1), classifier ignored, pruning_ratio by bisection to "
        f"±{100 * TP_TOLERANCE:.1f} point of the FLOPs target",
        "ci": f"activations of {min(CI_SAMPLES, n_calib)} calibration "
        f"inputs (spread over all calibration sources), {CI_MAX_PIXELS} positions per "
        "input and layer; per-group CI cached across targets (plan_cached: the plan "
        "reused it, so its plan_s is the re-planning time)",
        "bn_vs_bn_unpruned": "agreement/KL of the BN-re-estimated pruned model against "
        "the BN-re-estimated unpruned model (what pruning changes when both see the "
        "same re-estimation)",
        "confident": f"agreement_confident: on inputs whose unpruned top-1 probability "
        f">= {CONFIDENT}",
    }


def run_fidelity(
    *,
    quick: bool,
    seeds: list[int],
    out_dir: Path,
    targets: Sequence[float] | None = None,
    methods: Sequence[str] | None = None,
    bn_recalibration: bool | None = None,
    realdata: Path | None = None,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Prune the real MobileNetV2 by each method to each FLOPs target and measure how closely
    it keeps the unpruned model's predictions; returns JSON-able results (``rows``, ``summary``,
    ``markdown``, ``plots``: the PNG paths written to ``out_dir``).

    ``quick``: target 0.1, methods l1 and mrp, 16 evaluation (and 16 calibration) inputs, no BN
    re-estimation (each overridable by the keyword arguments).
    """
    t_start = time.perf_counter()
    targets = list(targets if targets is not None else ((0.1,) if quick else TARGETS))
    methods = list(methods if methods is not None else (QUICK_METHODS if quick else METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if not seeds:
        raise ValueError("at least one seed")
    bn = (not quick) if bn_recalibration is None else bn_recalibration
    root = realdata or realdata_dir()
    if not (root / WEIGHTS).is_file():
        raise FileNotFoundError(f"{root / WEIGHTS} is missing: run ../shared/realdata/fetch.sh")
    out_dir.mkdir(parents=True, exist_ok=True)
    busy = machine_busy(1.0)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shared, reference, timings = prepare(root, quick=quick, bn=bn, methods=methods, log=log)
        rows: list[dict[str, Any]] = []
        for target in targets:
            for method in methods:
                for seed in seeds if method == "random" else seeds[:1]:
                    rows.append(measure_row(shared, target, method, seed, bn=bn, log=log))
        summary = summarize(rows)
        md = markdown(summary, reference, bn)
        png = plot(summary, reference, bn, out_dir / "fidelity.png")
        timings["total_s"] = round(time.perf_counter() - t_start, 2)
        n_calib = shared.images.info["n_calib"]
        return {
            "meta": {**run_meta(), "machine_busy": busy, "torch_threads": threads},
            "config": config(
                quick=quick, targets=targets, methods=methods, seeds=seeds, bn=bn, n_calib=n_calib
            ),
            "images": shared.images.info,
            "reference": reference,
            "rows": rows,
            "summary": summary,
            "timings": timings,
            "markdown": md,
            "plots": [str(png)],
        }
    finally:
        torch.set_num_threads(old_threads)


def main(argv: Sequence[str] | None = None) -> None:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--compensation" in args_in:  # compensated plans: benchmarks.fidelity_compensation
        from benchmarks.fidelity_compensation import main as compensation_main

        args_in.remove("--compensation")
        compensation_main(args_in)
        return
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="--compensation: measure compensated plans instead (options of "
        "python -m benchmarks.fidelity_compensation)",
    )
    parser.add_argument("--quick", action="store_true", help="target 0.1, l1 + mrp, 16 inputs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--out-dir", type=Path, default=BENCHMARKS / "fidelity")
    parser.add_argument(
        "--bn-recalibration", action=argparse.BooleanOptionalAction, default=None,
        help="BN re-estimation on the calibration inputs (default: on, off with --quick)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--realdata", type=Path, default=None)
    args = parser.parse_args(args_in)
    result = run_fidelity(
        quick=args.quick,
        seeds=args.seeds,
        out_dir=args.out_dir,
        targets=args.targets,
        methods=args.methods,
        bn_recalibration=args.bn_recalibration,
        realdata=args.realdata,
        threads=args.threads,
    )
    write_json(args.out_dir / "fidelity.json", result)
    (args.out_dir / "fidelity.md").write_text(result["markdown"] + "\n")
    print()
    print(result["markdown"])
    print(f"\nwrote {args.out_dir / 'fidelity.json'}, fidelity.md, {', '.join(result['plots'])}")
    print(f"total {result['timings']['total_s']:.1f} s")


if __name__ == "__main__":
    main()

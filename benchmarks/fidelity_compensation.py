"""Zero-shot fidelity of *compensated* plans of the real MobileNetV2 (issue 14, design §8).

The harness of ``benchmarks/fidelity.py`` (same model, same natural images split by source into
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

Usage:  python benchmarks/fidelity_compensation.py [--quick] [--targets 0.05 0.1 0.2 0.3]
            [--methods ...] [--variants weights stats comp] [--allocation-methods mrp l1]
            [--bn-variants comp] [--seeds 0] [--threads 1] [--out-dir DIR]
(also ``python benchmarks/fidelity.py --compensation ...``). Writes DIR/compensation.json and
DIR/compensation.md (default DIR: benchmarks/fidelity/compensation/).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fidelity as fid  # noqa: E402
from common import machine_busy, run_meta  # noqa: E402
from fidelity_compensation_report import line, markdown  # noqa: E402

TARGETS = (0.05, 0.1, 0.2, 0.3)
METHODS = ("mrp", "srr", "hsc", "ci", "l1", "fpgm", "random")
VARIANTS = ("weights", "stats", "comp", "refit")
DEFAULT_VARIANTS = ("weights", "stats", "comp")
ALLOCATIONS = ("functional", "marginal")
ALLOCATION_METHODS = ("mrp", "l1")
QUICK_METHODS = ("l1",)


def label(method: str, variant: str, allocation: str = "uniform") -> str:
    return f"{method} · {variant}" + ("" if allocation == "uniform" else f"/{allocation}")


def capture_stats(s: fid.Setup, calib_u8: torch.Tensor) -> tuple[dict[str, np.ndarray], float]:
    """Second moments of every consumer input over all calibration inputs (every position)."""
    from clients import capture_activations

    t = time.perf_counter()
    model = fid.channels_last(copy.deepcopy(s.model))
    acts = capture_activations(
        model, fid.batches(calib_u8), max_samples=calib_u8.shape[0], maps=False
    )
    return acts.stats(), time.perf_counter() - t


def structural_macs(pruned: nn.Module, original: nn.Module) -> tuple[float, float, float]:
    """(MACs without the biases the folds created, MACs as counted, params)."""
    had = {n for n, _ in original.named_parameters()}
    bare = copy.deepcopy(pruned)
    for name, m in bare.named_modules():
        if (
            isinstance(m, nn.Conv2d | nn.Linear)
            and m.bias is not None
            and f"{name}.bias" not in had
        ):
            m.bias = None
    macs, _ = fid.count(bare)
    raw, params = fid.count(pruned)
    return macs, raw, params


def make_plan(
    s: fid.Setup,
    method: str,
    target: float,
    seed: int,
    *,
    stats: dict[str, np.ndarray] | None,
    maps: dict[str, np.ndarray] | None,
    allocation: str = "uniform",
    cache: Any = None,
    ignored: Sequence[str] = (),
) -> tuple[Any, float]:
    from graphs.plan import Constraints, Target
    from graphs.planner import plan_layers

    t = time.perf_counter()
    plan = plan_layers(
        s.parsed.layers,
        method=method,  # type: ignore[arg-type]
        target=Target(flops=target),
        params_total=s.parsed.info.n_params,
        manifest=s.manifest,
        seed=seed,
        checkpoint_sha256=s.parsed.info.sha256,
        activations=maps if method == "ci" else None,
        cache=cache if method == "ci" else None,
        stats=stats,
        allocation=allocation if stats is not None else None,  # type: ignore[arg-type]
        constraints=Constraints(ignored=list(ignored)) if ignored else None,
    )
    return plan, time.perf_counter() - t


def apply(s: fid.Setup, plan: Any, folds: bool) -> nn.Module:
    """The plan applied to a copy of the model, with its folds or (``folds=False``) the same
    channels removed without them."""
    from clients import apply_plan
    from graphs.compensated import plan_sidecar
    from graphs.plan import PruningPlan

    example = torch.zeros(1, 3, fid.SIZE, fid.SIZE)
    model = copy.deepcopy(s.model)
    if plan.compensation is None:
        return apply_plan(model, plan, example)
    if folds:
        return apply_plan(model, plan, example, compensation=plan_sidecar(plan))
    bare = PruningPlan.model_validate({**plan.model_dump(), "compensation": None})
    return apply_plan(model, bare, example)


def plan_info(plan: Any) -> dict[str, Any]:
    groups = plan.groups
    pe = [g.predicted_error for g in groups if getattr(g, "predicted_error", None) is not None]
    return {
        "planned_flops_reduction": plan.achieved.get("flops"),
        "channels_removed": sum(len(g.remove) for g in groups),
        "predicted_error_sum": round(float(sum(pe)), 6) if pe else None,
        "folds": len(plan.compensation.folds) if plan.compensation is not None else 0,
        "rule": plan.rule,
    }


def measure(
    s: fid.Setup, pruned: nn.Module, images: fid.ImageSet, ref: torch.Tensor, bn: bool
) -> dict[str, Any]:
    groups = np.array(images.eval_sources)
    macs, raw, params = structural_macs(pruned, s.model)
    row: dict[str, Any] = {
        "flops_reduction": round(1 - macs / s.macs, 5),
        "flops_reduction_with_bias": round(1 - raw / s.macs, 5),
        "params_reduction": round(1 - params / s.params, 5),
    }
    row.update(fid.fidelity(ref, fid.log_probs(pruned, images.eval_u8), groups))
    if bn:
        fid.recalibrate_bn(pruned, images.calib_u8)
        lp = fid.log_probs(pruned, images.eval_u8)
        row.update({f"{k}_bn": v for k, v in fid.fidelity(ref, lp, groups).items()})
    return row


def jobs(
    methods: Sequence[str],
    variants: Sequence[str],
    allocation_methods: Sequence[str],
    allocations: Sequence[str],
    seeds: Sequence[int],
) -> list[tuple[str, str, str, int]]:
    """(method, variant, allocation, seed) in run order; ``stats`` rows follow their ``comp``."""
    out: list[tuple[str, str, str, int]] = []
    for m in methods:
        for seed in seeds if m == "random" else seeds[:1]:
            out += [(m, v, "uniform", seed) for v in variants]
    folded = [v for v in variants if v in ("comp", "refit")] or ["comp"]
    for m in allocation_methods:
        out += [(m, v, a, seeds[0]) for a in allocations for v in folded]
    return out


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
    root = realdata or fid.realdata_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    busy = machine_busy(1.0)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timings: dict[str, float] = {}
        n = fid.QUICK_N if quick else None
        images = fid.image_set(n, n)
        s = fid.setup(root)
        ref = fid.log_probs(copy.deepcopy(s.model), images.eval_u8)
        stats, timings["stats_capture_s"] = capture_stats(s, images.calib_u8)
        maps = None
        if "ci" in methods or "ci" in alloc_methods:
            maps, timings["ci_capture_s"] = fid.capture(s, images.calib_u8)
        log(
            f"images: {images.info['n_eval']} evaluation, {images.info['n_calib']} calibration; "
            f"statistics of {len(stats)} consumers in {timings['stats_capture_s']:.1f} s"
        )
        c = Context(s, stats, maps, MemoryCache(), images, ref, bn_set, bn_only, list(ignored), log)
        rows: list[dict[str, Any]] = []
        todo = jobs(methods, variants, alloc_methods, allocations, list(seeds))
        search = fid.TpSearch(s)  # remembers the ratios it tried across targets
        for target in targets:
            rows += _target_rows(c, target, todo)
            if tp:
                rows.append(_tp_row(search, target, images, ref, c.bn(fid.TP_METHOD, "comp"), log))
        timings["total_s"] = round(time.perf_counter() - t_start, 2)

        return {
            "meta": {**run_meta(), "machine_busy": busy, "torch_threads": threads},
            "config": {
                "model": "MobileNetV2 (torchvision layout), ImageNet weights " + fid.WEIGHTS,
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


@dataclass
class Context:
    """What every row of a run shares."""

    s: fid.Setup
    stats: dict[str, np.ndarray]
    maps: dict[str, np.ndarray] | None
    ci_cache: Any
    images: fid.ImageSet
    ref: torch.Tensor
    bn_variants: set[str]
    bn_methods: set[str] | None  # None: every method
    ignored: list[str]
    log: Callable[[str], None]

    def bn(self, method: str, variant: str) -> bool:
        return variant in self.bn_variants and (
            self.bn_methods is None or method in self.bn_methods
        )


def refit(c: Context, pruned: nn.Module, plan: Any) -> dict[str, Any]:
    """``clients.refit`` of the folded model against the unpruned one on the calibration
    inputs (forward order, second moments, ridge default)."""
    from clients import refit as refit_model

    t = time.perf_counter()
    report = refit_model(pruned, c.s.model, fid.batches(c.images.calib_u8), plan=plan)
    return {
        "refit_s": round(time.perf_counter() - t, 2),
        "refit_layers": len(report.layers),
        "refit_skipped": dict(report.skipped),
    }


def _target_rows(
    c: Context, target: float, todo: list[tuple[str, str, str, int]]
) -> list[dict[str, Any]]:
    rows = []
    plans: dict[tuple[str, str, int], tuple[Any, float]] = {}  # stats plans shared by variants
    for method, variant, allocation, seed in todo:
        t = time.perf_counter()
        kw = {"maps": c.maps, "cache": c.ci_cache, "ignored": c.ignored}
        if variant == "weights":
            plan, plan_s = make_plan(c.s, method, target, seed, stats=None, **kw)
        else:
            key = (method, allocation, seed)
            if key not in plans:
                plans[key] = make_plan(
                    c.s, method, target, seed, stats=c.stats, allocation=allocation, **kw
                )
            plan, plan_s = plans[key]
        pruned = apply(c.s, plan, folds=variant in ("comp", "refit"))
        extra = refit(c, pruned, plan) if variant == "refit" else {}
        row: dict[str, Any] = {
            "target": target,
            "method": method,
            "variant": variant,
            "allocation": allocation,
            "label": label(method, variant, allocation),
            "seed": seed,
            "plan_s": round(plan_s, 3),
            **plan_info(plan),
            **extra,
        }
        row.update(measure(c.s, pruned, c.images, c.ref, bn=c.bn(method, variant)))
        row["total_s"] = round(time.perf_counter() - t, 2)
        rows.append(row)
        c.log(line(row))
    return rows


def _tp_row(
    search: fid.TpSearch,
    target: float,
    images: fid.ImageSet,
    ref: torch.Tensor,
    bn: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    t = time.perf_counter()
    s = search.s
    pruned, extra = search.find(target)
    row: dict[str, Any] = {
        "target": target,
        "method": fid.TP_METHOD,
        "variant": "weights",
        "allocation": "global",
        "label": fid.TP_METHOD,
        "seed": 0,
        **extra,
    }
    row.update(measure(s, pruned, images, ref, bn=bn))
    row["total_s"] = round(time.perf_counter() - t, 2)
    log(line(row))
    return row


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    p.add_argument(
        "--out-dir", type=Path, default=ROOT / "benchmarks" / "fidelity" / "compensation"
    )
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
    (a.out_dir / "compensation.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out_dir / "compensation.md").write_text(result["markdown"] + "\n")
    print()
    print(result["markdown"])
    print(
        f"\nwrote {a.out_dir / 'compensation.json'}, compensation.md; "
        f"total {result['timings']['total_s']:.1f} s"
    )


if __name__ == "__main__":
    main()

"""The rows of the compensated-plan fidelity benchmark (:mod:`benchmarks.fidelity_compensation`):
statistics of the calibration inputs, a plan per (method, target, variant, allocation), applied
with or without its folds (or refitted), measured against the unpruned model; the Torch-Pruning
row."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.fidelity_compensation_report import line
from benchmarks.fidelity_harness import (
    TP_METHOD,
    Setup,
    TpSearch,
    channels_last,
    count,
    example,
    fidelity,
    log_probs,
    make_plan,
    recalibrate_bn,
)
from benchmarks.fidelity_images import ImageSet, batches
from benchmarks.support.compensation import apply_variant, without_created_biases


def label(method: str, variant: str, allocation: str = "uniform") -> str:
    return f"{method} · {variant}" + ("" if allocation == "uniform" else f"/{allocation}")


def capture_stats(s: Setup, calib_u8: torch.Tensor) -> tuple[dict[str, np.ndarray], float]:
    """Second moments of every consumer input over all calibration inputs (every position)."""
    from clients import capture_activations

    t = time.perf_counter()
    model = channels_last(copy.deepcopy(s.model))
    acts = capture_activations(model, batches(calib_u8), max_samples=calib_u8.shape[0], maps=False)
    return acts.stats(), time.perf_counter() - t


def structural_macs(pruned: nn.Module, original: nn.Module) -> tuple[float, float, float]:
    """(MACs without the biases the folds created, MACs as counted, params)."""
    macs, _ = count(without_created_biases(pruned, original))
    raw, params = count(pruned)
    return macs, raw, params


def apply(s: Setup, plan: Any, folds: bool) -> nn.Module:
    """The plan applied to a copy of the model, with its folds or (``folds=False``) the same
    channels removed without them."""
    return apply_variant(s.model, plan, example(), folds=folds)


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
    s: Setup, pruned: nn.Module, images: ImageSet, ref: torch.Tensor, bn: bool
) -> dict[str, Any]:
    groups = np.array(images.eval_sources)
    macs, raw, params = structural_macs(pruned, s.model)
    row: dict[str, Any] = {
        "flops_reduction": round(1 - macs / s.macs, 5),
        "flops_reduction_with_bias": round(1 - raw / s.macs, 5),
        "params_reduction": round(1 - params / s.params, 5),
    }
    row.update(fidelity(ref, log_probs(pruned, images.eval_u8), groups))
    if bn:
        recalibrate_bn(pruned, images.calib_u8)
        lp = log_probs(pruned, images.eval_u8)
        row.update({f"{k}_bn": v for k, v in fidelity(ref, lp, groups).items()})
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


@dataclass
class Context:
    """What every row of a run shares."""

    s: Setup
    stats: dict[str, np.ndarray]
    maps: dict[str, np.ndarray] | None
    ci_cache: Any
    images: ImageSet
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
    report = refit_model(pruned, c.s.model, batches(c.images.calib_u8), plan=plan)
    return {
        "refit_s": round(time.perf_counter() - t, 2),
        "refit_layers": len(report.layers),
        "refit_skipped": dict(report.skipped),
    }


def target_rows(
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


def tp_row(
    search: TpSearch,
    target: float,
    images: ImageSet,
    ref: torch.Tensor,
    bn: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    t = time.perf_counter()
    s = search.s
    pruned, extra = search.find(target)
    row: dict[str, Any] = {
        "target": target,
        "method": TP_METHOD,
        "variant": "weights",
        "allocation": "global",
        "label": TP_METHOD,
        "seed": 0,
        **extra,
    }
    row.update(measure(s, pruned, images, ref, bn=bn))
    row["total_s"] = round(time.perf_counter() - t, 2)
    log(line(row))
    return row

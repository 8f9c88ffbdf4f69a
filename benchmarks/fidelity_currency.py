"""A better currency for allocation (c), measured on the zero-shot MobileNetV2 (issue 14 point 4).

Allocation (c) (``graphs.error_allocation``, ``marginal``) removes channels where the predicted
relative consumer-output error per MAC saved is lowest. A relative error is not worth the same
at every depth, so each group's error curve is weighted by a measured **sensitivity weight**
(:func:`graphs.error_allocation.sensitivity_weights`): ``w_g`` = output change when group ``g``
alone is pruned at the probe fractions (compensated, channels in the greedy least-error order,
``clients.sensitivity``) ÷ the predicted relative error at the same removal. The output change
is measured on the **calibration inputs only** (the ones the statistics come from), as

* ``marginal-kl``: mean KL(unpruned ‖ pruned) of the softmax outputs;
* ``marginal-top1``: top-1 disagreement with the unpruned model;
* ``marginal-kl-xfit`` (opt-in): mean KL with the folds fitted on the first half of the
  calibration source images and the KL measured on the other half (cross-fitted: in-sample
  folds look nearly free in wide, low-resolution layers).
* ``functional-xfit``, ``marginal-xfit`` (opt-in): no sensitivity run; the error curves
  themselves cross-fitted (``plan_layers(holdout_stats=...)``, :mod:`graphs.crossfit`): folds
  fitted on the statistics of one half of the calibration source images, their error measured
  exactly on the other half's statistics, both ways, averaged (the folds of the plan are still
  fitted on all the calibration statistics).

Every row is ``mrp`` with compensation (least-squares folds) at the same FLOPs target, in one
run: ``uniform`` (a), ``functional`` (b, the default), ``marginal`` (c, w = 1) and the weighted
currencies; opt-in (``--rules``) ``marginal-cap`` and ``marginal-kl-cap``: the same with no group
losing more than the largest probe fraction (``Constraints(max_ratio=...)``: no extrapolation of
a weight beyond what was measured). Each row also records agreement and KL on the calibration
inputs (in-sample: a diagnostic of the currency, not a result).
Metrics on the evaluation inputs of ``benchmarks/fidelity.py`` (12 other source
images): top-1 agreement with the unpruned model [95 % bootstrap interval over source images]
and mean KL. Nothing is tuned on them: the probe fractions are fixed before the run.

Usage:  python -m benchmarks.fidelity_currency [--targets 0.1 0.2] [--probe 0.1 0.25]
            [--threads 2] [--out-dir DIR] [--golden-stats FILE] [--stats FILE]
Writes DIR/currency.json, DIR/currency.md and the two sensitivity tables (reused when present
and made with the same probe fractions) (default DIR: benchmarks/fidelity/currency/).
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

from benchmarks.fidelity_calibration import (
    compare_golden,
    first_sources,
    product_capture,
    split_calibration,
)
from benchmarks.fidelity_compensation_rows import apply, capture_stats, measure
from benchmarks.fidelity_harness import Setup, log_probs, setup
from benchmarks.fidelity_images import SIZE, ImageSet, image_set
from benchmarks.support.meta import machine_busy, run_meta
from benchmarks.support.paths import BENCHMARKS, realdata_dir

TARGETS = (0.1, 0.2)
PROBE = (0.1, 0.25)
RULES = ("uniform", "functional", "marginal", "marginal-kl", "marginal-top1")
CAPPED = ("marginal-cap", "marginal-kl-cap")  # no group loses more than the largest probe
XFIT_CURVES = ("functional-xfit", "marginal-xfit")  # cross-fitted error curves, no table
ALL_RULES = (*RULES, *CAPPED, "marginal-kl-xfit", *XFIT_CURVES)


def sensitivity_tables(
    s: Setup,
    stats: dict[str, np.ndarray],
    probe: Sequence[float],
    score_u8: torch.Tensor,
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Two tables from one ``clients.sensitivity`` pass (folds from ``stats``, metric on
    ``score_u8``): delta = mean KL and delta = top-1 disagreement (same pruned models)."""
    from clients import sensitivity

    t = time.perf_counter()
    ref = log_probs(copy.deepcopy(s.model), score_u8)
    top1: dict[float, float] = {}

    def evaluate(model: torch.nn.Module) -> float:
        lp = log_probs(model, score_u8)
        kl = float((ref.exp() * (ref - lp)).sum(1).clamp_min(0).mean())
        top1[kl] = float((ref.argmax(1) != lp.argmax(1)).double().mean())
        return kl

    table = sensitivity(
        copy.deepcopy(s.model),
        torch.zeros(1, 3, SIZE, SIZE),
        evaluate,
        manifest=s.manifest,
        fractions=tuple(probe),
        compensation=(True,),
        stats=stats,
        order="functional",
    )
    kl_table = json.loads(table.to_json())
    top_table = copy.deepcopy(kl_table)
    top_table["baseline"] = 0.0
    for r in top_table["rows"]:
        r["delta"] = r["metric"] = top1[r["metric"]]
    return kl_table, top_table, time.perf_counter() - t


def curves_of(s: Setup, stats: dict[str, np.ndarray]) -> dict[int, Any]:
    """The error curves ``plan_with_stats`` computes for ``marginal`` (default constraints)."""
    from graphs.allocation import group_limit
    from graphs.compensated import group_consumers
    from graphs.plan import Constraints

    c = Constraints()
    found = group_consumers(s.parsed.layers, s.manifest, stats)
    ids = [
        g.id
        for g in s.manifest.groups
        if g.prunable
        and g.id in found.consumers
        and group_limit(g.channels, c)
        and not any(p in s.manifest.ignored for p in g.producers)
    ]
    return found.curves(ids, max_ratio=c.max_ratio)


def plan_for(
    s: Setup,
    stats: dict[str, np.ndarray],
    target: float,
    rule: str,
    w: Any,
    cap: float,
    holdout: dict[str, np.ndarray] | None = None,
) -> Any:
    from graphs.plan import Constraints, Target
    from graphs.planner import plan_layers

    return plan_layers(
        s.parsed.layers,
        method="mrp",
        target=Target(flops=target),
        params_total=s.parsed.info.n_params,
        manifest=s.manifest,
        checkpoint_sha256=s.parsed.info.sha256,
        stats=stats,
        allocation="marginal" if rule.startswith("marginal") else rule.removesuffix("-xfit"),  # type: ignore[arg-type]
        group_weights=w,
        holdout_stats=holdout if rule in XFIT_CURVES else None,
        constraints=Constraints(max_ratio=cap) if rule.endswith("-cap") else None,
    )


def calib_fidelity(ref: torch.Tensor, lp: torch.Tensor) -> dict[str, float]:
    """Agreement and mean KL on the calibration inputs (a diagnostic: in-sample)."""
    kl = (ref.exp() * (ref - lp)).sum(1).clamp_min(0).mean()
    same = (ref.argmax(1) == lp.argmax(1)).double().mean()
    return {"calib_agreement": round(float(same), 4), "calib_kl": round(float(kl), 5)}


def cell(r: dict[str, Any]) -> str:
    lo, hi = r["agreement_ci95"]
    return f"{100 * r['agreement']:.1f} % [{100 * lo:.0f}–{100 * hi:.0f}] / {r['kl']:.2f}"


def markdown(rows: list[dict[str, Any]], targets: Sequence[float]) -> str:
    head = "| mrp · comp / allocation | " + " | ".join(f"−{100 * t:.0f} % FLOPs" for t in targets)
    out = [head + " |", "|---|" + "---:|" * len(targets)]
    for rule in ALL_RULES:
        got = {r["target"]: r for r in rows if r["rule"] == rule}
        if got:
            cells = [cell(got[t]) if t in got else "–" for t in targets]
            out.append(f"| {rule} | " + " | ".join(cells) + " |")
    bare = [r for r in rows if "without_folds" in r]
    if bare:
        out += ["", "The same plans without their folds (the same channels removed):", ""]
        out += [head.replace("comp", "no folds") + " |", "|---|" + "---:|" * len(targets)]
        for rule in ALL_RULES:
            got = {r["target"]: r["without_folds"] for r in bare if r["rule"] == rule}
            if got:
                cells = [cell(got[t]) if t in got else "–" for t in targets]
                out.append(f"| {rule} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Achieved FLOPs / params reduction (%), planning time, agreement / KL on the "
        "calibration inputs (in-sample diagnostic):",
        "",
    ]
    out += [head + " |", "|---|" + "---:|" * len(targets)]
    for rule in ALL_RULES:
        got = {r["target"]: r for r in rows if r["rule"] == rule}
        if got:
            cells = [
                f"{100 * got[t]['flops_reduction']:.1f} / {100 * got[t]['params_reduction']:.1f}"
                f" · {got[t]['plan_s']:.0f} s · calib {100 * got[t].get('calib_agreement', 0):.1f}"
                f" % / {got[t].get('calib_kl', 0):.2f}"
                if t in got
                else "–"
                for t in targets
            ]
            out.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def load_or_measure(
    out_dir: Path,
    s: Setup,
    images: ImageSet,
    stats: dict[str, np.ndarray],
    probe: Any,
    *,
    xfit: bool = False,
) -> tuple[dict[str, Any], dict[str, Any], float | None]:
    """The tables of the whole calibration set (folds and metric on the same inputs) or, with
    ``xfit``, cross-fitted: folds from the first half of the calibration sources, metric on the
    other half."""
    end = "_xfit" if xfit else ""
    paths = out_dir / f"sensitivity_kl{end}.json", out_dir / f"sensitivity_top1{end}.json"
    meta = out_dir / f"sensitivity_probe{end}.json"
    if all(p.exists() for p in (*paths, meta)) and json.loads(meta.read_text()) == list(probe):
        return json.loads(paths[0].read_text()), json.loads(paths[1].read_text()), None
    if xfit:
        fit_u8, score_u8 = split_calibration(images)
        kl, top, sec = sensitivity_tables(s, capture_stats(s, fit_u8)[0], probe, score_u8)
    else:
        kl, top, sec = sensitivity_tables(s, stats, probe, images.calib_u8)
    paths[0].write_text(json.dumps(kl, indent=1) + "\n")
    paths[1].write_text(json.dumps(top, indent=1) + "\n")
    meta.write_text(json.dumps(list(probe)) + "\n")
    return kl, top, sec


def run(a: argparse.Namespace) -> dict[str, Any]:
    from graphs.error_allocation import sensitivity_weights

    t0 = time.perf_counter()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    busy = machine_busy(1.0)
    torch.set_num_threads(a.threads)
    images = first_sources(image_set(None, None, dense_calib=a.dense_calib), a.calib_sources)
    s = setup(a.realdata or realdata_dir())
    ref = log_probs(copy.deepcopy(s.model), images.eval_u8)
    ref_cal = log_probs(copy.deepcopy(s.model), images.calib_u8)
    holdout = None
    if a.holdout == "product":  # the product's own capture: every second batch held out
        stats, holdout, capture_s = product_capture(s, images)
        print(f"statistics and held-out part (one capture, a source per batch): {capture_s:.1f} s")
    elif a.stats is not None:  # a file of these very statistics (checked with --golden-stats)
        from safetensors.numpy import load_file

        stats = {k.removeprefix("gram/"): v for k, v in load_file(str(a.stats)).items()}
        capture_s = 0.0
    else:
        stats, capture_s = capture_stats(s, images.calib_u8)
    golden = compare_golden(stats, a.golden_stats)
    print(f"statistics of {len(stats)} consumers in {capture_s:.1f} s; golden: {golden}")
    weights: dict[str, Any] = {"marginal": None}
    sens_s = None
    if any(r.removesuffix("-cap") in ("marginal-kl", "marginal-top1") for r in a.rules):
        kl_table, top_table, sens_s = load_or_measure(a.out_dir, s, images, stats, a.probe)
        print(f"sensitivity tables ({len(kl_table['rows'])} rows) in {sens_s} s")
        curves = curves_of(s, stats)
        channels = {g.id: g.channels for g in s.manifest.groups}
        weights["marginal-kl"] = sensitivity_weights(kl_table, curves, channels=channels)
        weights["marginal-top1"] = sensitivity_weights(top_table, curves, channels=channels)
    if "marginal-kl-xfit" in a.rules:
        curves = curves_of(s, stats)
        channels = {g.id: g.channels for g in s.manifest.groups}
        xkl, _, xs = load_or_measure(a.out_dir, s, images, stats, a.probe, xfit=True)
        print(f"cross-fitted sensitivity table in {xs} s")
        weights["marginal-kl-xfit"] = sensitivity_weights(xkl, curves, channels=channels)
    if holdout is None and any(r in XFIT_CURVES for r in a.rules):
        holdout, hold_s = capture_stats(s, split_calibration(images)[1])
        print(f"held-out statistics (second half of the sources) in {hold_s:.1f} s")
    rows = []
    for target in a.targets:
        for rule in a.rules:
            t = time.perf_counter()
            sw = weights.get(rule.removesuffix("-cap"))
            w = sw.weights if sw is not None else None
            plan = plan_for(s, stats, target, rule, w, max(a.probe), holdout)
            plan_s = time.perf_counter() - t
            pruned = apply(s, plan, folds=True)
            row = {"target": target, "rule": rule, "plan_s": round(plan_s, 2)}
            row["removed"] = {g.name: len(g.remove) for g in plan.groups if g.remove}
            row.update(measure(s, pruned, images, ref, bn=False))
            row.update(calib_fidelity(ref_cal, log_probs(pruned, images.calib_u8)))
            if a.without_folds:  # the same channels removed, no folds: what compensation adds
                bare = measure(s, apply(s, plan, folds=False), images, ref, bn=False)
                row["without_folds"] = {k: bare[k] for k in ("agreement", "agreement_ci95", "kl")}
            rows.append(row)
            print(f"{target} {rule:14s} FLOPs -{100 * row['flops_reduction']:.1f} % {cell(row)}")
    return {
        "meta": {**run_meta(), "machine_busy": busy, "torch_threads": a.threads},
        "config": {
            "targets": list(a.targets),
            "probe_fractions": list(a.probe),
            "holdout": a.holdout,
            "without_folds": a.without_folds,
            "calib_sources": images.info["calib_sources"],
            "dense_calib": a.dense_calib,
            "rules": list(a.rules),
            "method": "mrp, compensated (least-squares folds), default constraints",
            "sensitivity": "clients.sensitivity(order='functional', compensation=(True,)) on "
            f"the {images.info['n_calib']} calibration inputs only",
        },
        "images": images.info,
        "golden_stats": golden,
        "weights": {
            k: {"weights": {str(g): v for g, v in w.weights.items()}, "filled": list(w.filled)}
            for k, w in weights.items()
            if w is not None
        },
        "timings": {"capture_s": capture_s, "sensitivity_s": sens_s},
        "rows": rows,
        "total_s": round(time.perf_counter() - t0, 1),
        "markdown": markdown(rows, a.targets),
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    p.add_argument("--probe", type=float, nargs="+", default=list(PROBE))
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=ALL_RULES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--realdata", type=Path, default=None)
    p.add_argument("--golden-stats", type=Path, default=None, help="compare our statistics")
    p.add_argument("--stats", type=Path, default=None, help="use these statistics (no capture)")
    p.add_argument("--out-dir", type=Path, default=BENCHMARKS / "fidelity" / "currency")
    p.add_argument(
        "--without-folds",
        action="store_true",
        help="also measure every plan applied without its folds (the same channels removed)",
    )
    p.add_argument(
        "--dense-calib",
        action="store_true",
        help="more crops of the same calibration sources (5 scales × 3×3 positions, flipped): "
        "calibration augmentation; evaluation inputs unchanged",
    )
    p.add_argument(
        "--calib-sources",
        type=int,
        default=None,
        help="calibrate on the first K of the 8 calibration source images only (how the result "
        "scales with calibration data; evaluation inputs unchanged)",
    )
    p.add_argument(
        "--holdout",
        choices=("halves", "product"),
        default="halves",
        help="held-out part of the -xfit rows: the second half of the calibration sources "
        "(captured apart), or the product's capture (holdout_every=2, one source per batch; "
        "it also gives the statistics, --stats is then not used)",
    )
    a = p.parse_args(argv)
    result = run(a)
    (a.out_dir / "currency.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out_dir / "currency.md").write_text(result["markdown"] + "\n")
    print()
    print(result["markdown"])
    print(f"\nwrote {a.out_dir / 'currency.json'}; total {result['total_s']:.1f} s")


if __name__ == "__main__":
    main()

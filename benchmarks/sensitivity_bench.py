"""Does a redundancy figure predict prunability? Spearman ρ against measured sensitivity on the
real MobileNetV2 (issue 14 point 8, design §8 "Ground truth").

* **Sensitivity** (the ground truth): ``clients.sensitivity`` prunes one channel group at a time
  at ``--fractions`` of its channels (channels in the order of the group's greedy least-error
  path, ``order="functional"``), with and without least-squares compensation, and measures the
  **top-1 agreement** with the unpruned model on the **evaluation** inputs of
  :mod:`benchmarks.fidelity` (mean KL is recorded beside it). A group's score is its mean
  agreement over the fractions (higher = less sensitive = more prunable).
* **Figures** per group: the weight-space calibrated redundancy of ``mrp``, ``srr``, ``hsc``
  (``graphs.analyze`` with the manifest, no data), the **functional redundancy** (largest
  fraction removable within relative consumer-output error ε = the library default, from the
  second moments of the **calibration** inputs only), and the predicted relative error of the
  error curve at each measured fraction (negated, so that higher = more prunable).
* **ρ** between each figure and the score, with a 95 % bootstrap interval (groups resampled with
  replacement, 2000 times); groups with a constant figure give ties, which Spearman ranks as such.

Usage:  python -m benchmarks.sensitivity_bench [--quick] [--fractions 0.1 0.25 0.5]
            [--n-eval N] [--threads 1] [--out-dir DIR]
Writes DIR/sensitivity.json, DIR/sensitivity.csv (the clients' table) and DIR/sensitivity.md
(default DIR: benchmarks/fidelity/sensitivity/).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from benchmarks.fidelity_compensation_rows import capture_stats
from benchmarks.fidelity_harness import Setup, log_probs, setup
from benchmarks.fidelity_images import QUICK_N, SIZE, image_set
from benchmarks.support.meta import machine_busy, run_meta, write_json
from benchmarks.support.paths import BENCHMARKS, realdata_dir

FRACTIONS = (0.1, 0.25, 0.5)
WEIGHT_METHODS = ("mrp", "srr", "hsc")
BOOTSTRAP = 2000
QUICK_GROUPS = 4


def figures(s: Setup, stats: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Producer name → weight-space redundancies per method, functional redundancy and the
    error curve (relative consumer error after removing k channels, k = 0, 1, ...)."""
    from graphs.analyze import analyze
    from graphs.compensated import group_consumers
    from graphs.options import DEFAULT_EPSILON

    report = analyze(
        s.parsed.layers,
        checkpoint=s.parsed.info,
        methods=list(WEIGHT_METHODS),
        manifest=s.manifest,
    )
    out: dict[str, dict[str, Any]] = {
        layer.name: {m: layer.methods[m].redundancy for m in WEIGHT_METHODS}
        for layer in report.layers
    }
    found = group_consumers(s.parsed.layers, s.manifest, stats)
    by_id = {g.id: g for g in s.manifest.groups}
    curves = found.curves([gid for gid in found.consumers if by_id[gid].prunable])
    for gid, curve in curves.items():
        entry = out.setdefault(by_id[gid].producers[0], {})
        entry["functional"] = curve.redundancy(DEFAULT_EPSILON)
        entry["curve"] = [float(e) for e in curve.errors]
    return out


def spearman_ci(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """ρ and a 95 % percentile interval from resampling the pairs (groups)."""
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(BOOTSTRAP):
        i = rng.integers(0, x.size, x.size)
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boot.append(float(spearmanr(x[i], y[i]).statistic))
    lo, hi = np.percentile(boot, [2.5, 97.5]) if boot else (float("nan"), float("nan"))
    return {
        "rho": round(rho, 4),
        "ci95": [round(float(lo), 4), round(float(hi), 4)],
        "n": int(x.size),
    }


def correlations(
    table: Any, figs: dict[str, dict[str, Any]], fractions: Sequence[float]
) -> dict[str, dict[str, Any]]:
    """ρ of every figure against the mean agreement over fractions, compensated and not."""
    out: dict[str, dict[str, Any]] = {}
    names = sorted({r.name for r in table.rows})
    for comp in (True, False):
        score, rows_of = {}, {}
        for n in names:
            rs = [r for r in table.rows if r.name == n and r.compensated == comp]
            if rs:
                score[n] = float(np.mean([r.metric for r in rs]))
                rows_of[n] = rs
        keys = [n for n in names if n in score and n in figs]
        y = np.array([score[n] for n in keys])
        preds: dict[str, np.ndarray] = {
            m: np.array([figs[n].get(m) or 0.0 for n in keys]) for m in WEIGHT_METHODS
        }
        if all("functional" in figs[n] for n in keys):
            preds["functional"] = np.array([figs[n]["functional"] for n in keys])
            # the curve's predicted error at the measured counts, averaged like the score
            preds["-predicted_error"] = np.array(
                [
                    -float(
                        np.mean(
                            [
                                figs[n]["curve"][min(r.removed, len(figs[n]["curve"]) - 1)]
                                for r in rows_of[n]
                            ]
                        )
                    )
                    for n in keys
                ]
            )
        tag = "compensated" if comp else "uncompensated"
        for m, x in preds.items():
            out[f"{m} vs {tag}"] = (
                spearman_ci(x, y)
                if np.ptp(x) > 0 and np.ptp(y) > 0
                else {"rho": None, "note": "constant figure or score", "n": int(x.size)}
            )
    return out


def run(
    *,
    quick: bool,
    fractions: Sequence[float] = FRACTIONS,
    n_eval: int | None = None,
    realdata: Path | None = None,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from clients import sensitivity

    t0 = time.perf_counter()
    busy = machine_busy(1.0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = QUICK_N if quick else None
        images = image_set(n_eval or n, n)
        s = setup(realdata or realdata_dir())
        ref = log_probs(copy.deepcopy(s.model), images.eval_u8)
        stats, capture_s = capture_stats(s, images.calib_u8)
        t = time.perf_counter()
        figs = figures(s, stats)
        figures_s = time.perf_counter() - t
        kls: list[float] = []

        def evaluate(model: nn.Module) -> float:
            lp = log_probs(model, images.eval_u8)
            kls.append(float((ref.exp() * (ref - lp)).sum(1).clamp_min(0).mean()))
            return float((lp.argmax(1) == ref.argmax(1)).double().mean())

        prunable = [g.id for g in s.manifest.groups if g.prunable and g.channels >= 2]
        t = time.perf_counter()
        table = sensitivity(
            s.model,
            torch.zeros(1, 3, SIZE, SIZE),
            evaluate,
            manifest=s.manifest,
            fractions=fractions,
            compensation=(False, True),
            stats=stats,
            order="functional",
            groups=prunable[:QUICK_GROUPS] if quick else None,
        )
        sens_s = time.perf_counter() - t
        log(f"sensitivity: {len(table.rows)} rows, {len(kls)} evaluations in {sens_s:.0f} s")
        corr = correlations(table, figs, fractions)
        return {
            "meta": {**run_meta(), "machine_busy": busy, "torch_threads": threads},
            "config": {
                "quick": quick,
                "fractions": list(fractions),
                "order": "functional",
                "metric": "top-1 agreement with the unpruned model on the evaluation inputs",
                "n_eval": images.info["n_eval"],
                "n_calib": images.info["n_calib"],
                "score": "mean agreement over the fractions, per group",
                "bootstrap": f"{BOOTSTRAP} resamples of the groups, percentile 95 % interval",
            },
            "baseline": table.baseline,
            "kl_per_evaluation": kls,
            "figures": figs,
            "correlations": corr,
            "skipped": {str(k): v for k, v in table.skipped.items()},
            "table_json": json.loads(table.to_json()),
            "csv": table.to_csv(),
            "timings": {
                "capture_s": round(capture_s, 2),
                "figures_s": round(figures_s, 2),
                "sensitivity_s": round(sens_s, 1),
                "total_s": round(time.perf_counter() - t0, 1),
            },
        }
    finally:
        torch.set_num_threads(old)


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"Spearman ρ between each per-group figure and the measured sensitivity score (mean "
        f"top-1 agreement over fractions {c['fractions']}, {c['n_eval']} evaluation inputs), "
        "95 % bootstrap interval over groups:",
        "",
        "| figure vs score | ρ | 95 % interval | groups |",
        "|---|---:|---:|---:|",
    ]
    for k, v in result["correlations"].items():
        if v.get("rho") is None:
            lines.append(f"| {k} | – ({v['note']}) | | {v['n']} |")
        else:
            lo, hi = v["ci95"]
            lines.append(f"| {k} | {v['rho']:.2f} | {lo:.2f} – {hi:.2f} | {v['n']} |")
    figs = result["figures"]
    rows = result["table_json"]["rows"]
    lines += [
        "",
        "Per group: figures and agreement (%) after pruning f of the group "
        "(uncompensated → compensated):",
        "",
        "| group (producer) | c | mrp | srr | hsc | functional | "
        + " | ".join(f"f={f}" for f in c["fractions"])
        + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(c["fractions"]),
    ]
    for name in dict.fromkeys(r["name"] for r in rows):
        f = figs.get(name, {})
        cells = []
        for frac in c["fractions"]:
            got = {
                r["compensated"]: r["metric"]
                for r in rows
                if r["name"] == name and r["fraction"] == frac
            }
            cells.append(" → ".join(f"{100 * got[k]:.0f}" for k in (False, True) if k in got))
        ch = next(r["channels"] for r in rows if r["name"] == name)
        fr = f.get("functional")
        lines.append(
            f"| {name} | {ch} | "
            + " | ".join(f"{f.get(m) or 0:.3f}" for m in WEIGHT_METHODS)
            + f" | {'–' if fr is None else f'{fr:.3f}'} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 groups, 16 inputs")
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--n-eval", type=int, default=None, help="evaluation inputs (default all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--realdata", type=Path, default=None)
    p.add_argument("--out-dir", type=Path, default=BENCHMARKS / "fidelity" / "sensitivity")
    a = p.parse_args(argv)
    result = run(
        quick=a.quick,
        fractions=a.fractions,
        n_eval=a.n_eval,
        realdata=a.realdata,
        threads=a.threads,
    )
    a.out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    write_json(a.out_dir / "sensitivity.json", result)
    (a.out_dir / "sensitivity.csv").write_text(result["csv"])
    (a.out_dir / "sensitivity.md").write_text(md + "\n")
    print(md)
    print(f"\ntotal {result['timings']['total_s']:.0f} s")


if __name__ == "__main__":
    main()

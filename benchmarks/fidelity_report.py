"""The tables and the plot of the zero-shot fidelity benchmark (:mod:`benchmarks.fidelity`):
mean (± std over seeds) per (target, method), markdown, agreement and KL against the achieved
FLOPs reduction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fidelity_harness import METHODS, REDUNDANCY_AWARE


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and std over seeds) per (target, method)."""
    keys = sorted({(r["target"], r["method"]) for r in rows}, key=lambda k: (k[0], _rank(k[1])))
    out = []
    for target, method in keys:
        rs = [r for r in rows if r["target"] == target and r["method"] == method]
        entry: dict[str, Any] = {"target": target, "method": method, "n_seeds": len(rs)}
        for k in ("flops_reduction", "params_reduction", "agreement", "kl", "agreement_bn",
                  "kl_bn", "plan_s"):  # fmt: skip
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                entry[k] = round(float(np.mean(vals)), 5)
                entry[k + "_std"] = round(float(np.std(vals)), 5) if len(vals) > 1 else None
        out.append(entry)
    return out


def _rank(method: str) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS)


def _cell(e: dict[str, Any] | None, agree: str, kl: str) -> str:
    if e is None or agree not in e:
        return "–"
    a, k = 100 * e[agree], e[kl]
    if e.get(agree + "_std") is not None:
        return f"{a:.1f} ± {100 * e[agree + '_std']:.1f} % / {k:.3f} ± {e[kl + '_std']:.3f}"
    return f"{a:.1f} % / {k:.3f}"


def markdown(summary: list[dict[str, Any]], reference: dict[str, Any], bn: bool) -> str:
    targets = sorted({e["target"] for e in summary})
    methods = sorted({e["method"] for e in summary}, key=_rank)
    at = {(e["target"], e["method"]): e for e in summary}
    head = "| method | " + " | ".join(f"{100 * t:.0f} % FLOPs" for t in targets) + " |"
    rule = "|---|" + "---:|" * len(targets)

    def table(agree: str, kl: str) -> list[str]:
        lines = [head, rule]
        for m in methods:
            cells = [_cell(at.get((t, m)), agree, kl) for t in targets]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return lines

    parts = ["Top-1 agreement with the unpruned model / mean KL(unpruned ‖ pruned) in nats, "
             "without BN re-estimation:", "", *table("agreement", "kl")]  # fmt: skip
    if bn:
        ref = reference.get("bn_recalibrated_unpruned") or {}
        parts += [
            "",
            "With BN re-estimation on the calibration inputs (the unpruned model re-estimated "
            f"the same way: {100 * ref.get('agreement', float('nan')):.1f} % / "
            f"{ref.get('kl', float('nan')):.3f}):",
            "",
            *table("agreement_bn", "kl_bn"),
        ]
    parts += ["", "Achieved FLOPs / params reduction and planning time (s):", "", head, rule]
    for m in methods:
        cells = []
        for t in targets:
            e = at.get((t, m))
            cells.append(
                "–"
                if e is None
                else f"{100 * e['flops_reduction']:.1f} / "
                f"{100 * e['params_reduction']:.1f} % · {e['plan_s']:.1f} s"
            )
        lines = f"| {m} | " + " | ".join(cells) + " |"
        parts.append(lines)
    return "\n".join(parts)


def plot(summary: list[dict[str, Any]], reference: dict[str, Any], bn: bool, path: Path) -> Path:
    """Agreement (top) and KL (bottom) against the achieved FLOPs reduction, per method; a
    column without and, with ``bn``, one with BN re-estimation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("", "without BN re-estimation")]
    if bn:
        columns.append(("_bn", "with BN re-estimation"))
    rows = [("agreement", "top-1 agreement with the unpruned model (%)", 100.0),
            ("kl", "mean KL(unpruned ‖ pruned), nats", 1.0)]  # fmt: skip
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(6.5 * len(columns), 4.2 * len(rows)), squeeze=False
    )
    methods = sorted({e["method"] for e in summary}, key=_rank)
    ref_bn = reference.get("bn_recalibrated_unpruned")
    for i, (metric, label, scale) in enumerate(rows):
        for j, (suffix, title) in enumerate(columns):
            ax, key = axes[i][j], metric + suffix
            for m in methods:
                es = sorted((e for e in summary if e["method"] == m and key in e),
                            key=lambda e: e["flops_reduction"])  # fmt: skip
                if not es:
                    continue
                x = [100 * e["flops_reduction"] for e in es]
                y = [scale * e[key] for e in es]
                err = [scale * (e.get(key + "_std") or 0.0) for e in es]
                style = "-" if m in (*REDUNDANCY_AWARE, "ci") else "--"
                ax.errorbar(x, y, yerr=err, fmt=style + "o", label=m, capsize=3, markersize=4)
            if suffix and ref_bn is not None:
                ax.axhline(scale * ref_bn[metric], color="gray", lw=1, ls=":",
                           label="unpruned, BN re-estimated")  # fmt: skip
            ax.set_xlabel("FLOPs reduction (%)")
            ax.set_ylabel(label)
            ax.set_title(f"MobileNetV2 (ImageNet), {title}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

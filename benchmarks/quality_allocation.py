"""Table and verdict of the allocation studies of ``quality_compensation.py --allocations``.

``decide`` applies a decision rule fixed before the first run (``quality_compensation``'s
``DECISION_RULE`` against ``uniform``, ``XFIT_DECISION_RULE`` against ``functional``) to the
``comp`` rows: one cell per (model, target, method), one accuracy per allocation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BASELINE = "uniform"
MAX_CELL_LOSS = 0.01  # one point of accuracy


def _cells(rows: Sequence[dict[str, Any]], key: str) -> dict[tuple[Any, ...], dict[str, float]]:
    cells: dict[tuple[Any, ...], dict[str, float]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["target"], r["method"]), {})[r["allocation"]] = r[key]
    return cells


def decide(comp_rows: Sequence[dict[str, Any]], baseline: str = BASELINE) -> dict[str, Any]:
    """Means, worst cell against ``baseline`` (the current default), qualification and the
    chosen default: X qualifies if its mean beats the baseline's and no cell is worse by more
    than one point; the qualified X with the highest mean wins, a tie keeps the baseline. The
    ``*_minus_uniform`` keys are differences to ``baseline`` (named for the first study)."""
    cells = _cells(comp_rows, "acc_before_ft")
    allocations = sorted({a for c in cells.values() for a in c})
    if baseline not in allocations:
        return {"chosen": None, "why": f"no {baseline} rows"}
    complete = {k: c for k, c in cells.items() if set(c) == set(allocations)}
    out: dict[str, Any] = {"cells": len(complete), "per_allocation": {}}
    for a in allocations:
        diffs = [c[a] - c[baseline] for c in complete.values()]
        mean = sum(c[a] for c in complete.values()) / max(len(complete), 1)
        out["per_allocation"][a] = {
            "mean": round(mean, 4),
            "mean_minus_uniform": round(sum(diffs) / max(len(diffs), 1), 4),
            "worst_cell_minus_uniform": round(min(diffs), 4) if diffs else None,
            "cells_worse_by_more_than_1pt": sum(d < -MAX_CELL_LOSS - 1e-9 for d in diffs),
        }
    base = out["per_allocation"][baseline]["mean"]
    qualified = [
        a
        for a, s in out["per_allocation"].items()
        if a != baseline and s["mean"] > base and s["cells_worse_by_more_than_1pt"] == 0
    ]
    best = sorted(qualified, key=lambda a: -out["per_allocation"][a]["mean"])
    tie = len(best) > 1 and (
        out["per_allocation"][best[0]]["mean"] == out["per_allocation"][best[1]]["mean"]
    )
    out["qualified"] = qualified
    out["chosen"] = baseline if not best or tie else best[0]
    return out


def allocation_markdown(
    rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    rule: str,
    verdict: dict[str, Any],
    baseline: str = BASELINE,
    title: str = "Allocation rule of compensated plans on the MNIST models (before fine-tuning)",
) -> str:
    """The results page: command, machine, the rule, one table per variant, the verdict."""
    split = rows[0]["eval_split"] if rows else "?"
    lines = [
        f"# {title}",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}; machine: {meta['machine']}; others' load at start: "
        f"{meta.get('machine_busy')}; total {meta['total_s']} s",
        f"- Accuracy measured on the **{split}** split of `benchmarks/quality_data.py`.",
        "",
        "## Decision rule (written before the first run)",
        "",
        rule,
        "",
    ]
    allocations = sorted({r["allocation"] for r in rows}, key=lambda a: (a != baseline, a))
    for variant in ("comp", "stats"):
        sub = [r for r in rows if r["variant"] == variant]
        if not sub:
            continue
        before, after = _cells(sub, "acc_before_ft"), _cells(sub, "acc_bn_recal")
        unpruned = {r["model"]: r["acc_unpruned_eval"] for r in sub}
        head = " | ".join(f"{a} (BN re-est.)" for a in allocations)
        lines += [
            f"## `{variant}` rows: {split} accuracy % before fine-tuning (after BN re-est.)",
            "",
            f"| model | target | method | {head} |",
            "|---|---:|---|" + "---:|" * len(allocations),
        ]
        for (model, target, method), c in before.items():
            vals = " | ".join(
                f"{100 * c[a]:.1f} ({100 * after[(model, target, method)][a]:.1f})"
                if a in c
                else "–"
                for a in allocations
            )
            lines.append(
                f"| {model} (unpruned {100 * unpruned[model]:.1f}) | {100 * target:.0f} % "
                f"| {method} | {vals} |"
            )
        lines.append("")
    lines += ["## Verdict", ""]
    for a, s in verdict.get("per_allocation", {}).items():
        lines.append(
            f"- {a}: mean {100 * s['mean']:.2f} % over {verdict['cells']} cells "
            f"(vs {baseline} {100 * s['mean_minus_uniform']:+.2f} pt; worst cell "
            f"{100 * (s['worst_cell_minus_uniform'] or 0):+.1f} pt; cells worse by > 1 pt: "
            f"{s['cells_worse_by_more_than_1pt']})"
        )
    lines += ["", f"**Default by the rule: {verdict.get('chosen')}**"]
    return "\n".join(lines)

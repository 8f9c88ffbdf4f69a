"""Compare two plan-quality runs (:mod:`benchmarks.quality`) row by row: what a change did.

For each (dataset, model, target) and each of ``--methods``: accuracy after fine-tuning and
before it (BN re-estimated) in the old and the new run, the difference, and whether it exceeds
the noise (2 × the pooled seed std and 2 × the binomial std of one accuracy on the test set);
beside them the best baseline of the new run. Prints markdown tables and a count per method.

Usage:  python -m benchmarks.quality_compare OLD/quality.json NEW/quality.json
            [--methods mrp srr hsc mrp-act] [--old-label uniform] [--new-label anneal]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

METRICS = (("acc_after_ft", "after FT"), ("acc_bn_recal", "before FT, BN re-est."))


def _index(path: Path) -> dict[tuple[str, str, float, str], dict[str, Any]]:
    run = json.loads(path.read_text())
    n_test = {name: sizes["test"] for name, sizes in run["data"].items()}
    return {
        (e["dataset"], e["model"], e["target"], e["method"]): {**e, "n_test": n_test[e["dataset"]]}
        for e in run["summary"]
    }


def _cell(e: dict[str, Any], metric: str) -> str:
    m = e[metric]
    return f"{100 * m['mean']:.2f} ± {100 * m['std']:.2f}"


def _verdict(a: dict[str, Any], b: dict[str, Any], metric: str) -> str:
    """The change, bold when beyond 2 × the pooled seed std and 2 × the binomial std of one
    accuracy on the test digits (plans that do not depend on the seed have seed std 0)."""
    diff = b[metric]["mean"] - a[metric]["mean"]
    seeds = 2 * math.sqrt((a[metric]["std"] ** 2 + b[metric]["std"] ** 2) / 2)
    p = a[metric]["mean"]
    binomial = 2 * math.sqrt(max(p * (1 - p), 0.0) / max(a["n_test"], 1))
    sign = f"{100 * diff:+.2f}"
    if abs(diff) <= max(seeds, binomial):
        return f"{sign} (noise)"
    return f"**{sign}**"


def compare(old: Path, new: Path, methods: list[str], labels: tuple[str, str]) -> str:
    a, b = _index(old), _index(new)
    cells = sorted({k[:3] for k in b})
    lines: list[str] = []
    counts: dict[tuple[str, str], list[int]] = {}
    for metric, title in METRICS:
        lines += [
            f"**{title}** (%, mean ± std over seeds; change = {labels[1]} − {labels[0]}, bold "
            "when beyond 2 × the pooled seed std and 2 × the test-set binomial std)",
            "",
            f"| dataset · model · target | method | {labels[0]} | {labels[1]} | change | "
            "best baseline (new run) |",
            "|---|---|---:|---:|---:|---|",
        ]
        for cell in cells:
            base = [e for k, e in b.items() if k[:3] == cell and not e["aware"]]
            best = max(base, key=lambda e: e[metric]["mean"]) if base else None
            best_text = f"{best['method']} {_cell(best, metric)}" if best else "–"
            for m in methods:
                if (*cell, m) not in a or (*cell, m) not in b:
                    continue
                ea, eb = a[(*cell, m)], b[(*cell, m)]
                verdict = _verdict(ea, eb, metric)
                tally = counts.setdefault((title, m), [0, 0, 0])
                tally[0 if "noise" in verdict else 1 if "+" in verdict else 2] += 1
                lines.append(
                    f"| {cell[0]} · {cell[1]} · {cell[2]:.0%} | {m} | {_cell(ea, metric)} | "
                    f"{_cell(eb, metric)} | {verdict} | {best_text} |"
                )
        lines.append("")
    lines.append(f"Cells where {labels[1]} is better / worse than {labels[0]} beyond noise:")
    lines.append("")
    for (title, m), (_, better, worse) in counts.items():
        lines.append(f"- {title}, {m}: better {better}, worse {worse} (of {len(cells)})")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--methods", nargs="+", default=["mrp", "srr", "hsc", "mrp-act"])
    p.add_argument("--old-label", default="old")
    p.add_argument("--new-label", default="new")
    args = p.parse_args()
    labels = (args.old_label, args.new_label)
    print(compare(args.old, args.new, args.methods, labels))


if __name__ == "__main__":
    main()

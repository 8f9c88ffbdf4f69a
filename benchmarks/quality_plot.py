"""The plots of the plan-quality benchmark (:mod:`benchmarks.quality`): per (dataset, model),
accuracy against the achieved FLOPs reduction for every method."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality_run import METHODS


def plot(summary: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per (dataset, model): accuracy before / after fine-tuning vs FLOPs reduction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for e in summary:
        if e["n"]:
            groups[(e["dataset"], e["model"])].append(e)
    colors = [*plt.get_cmap("tab10").colors, "black"]  # type: ignore[attr-defined]
    for (dataset, model), entries in groups.items():
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), sharex=True)
        panels = (
            ("acc_before_ft", "before FT"),
            ("acc_bn_recal", "before FT, BN re-estimated"),
            ("acc_after_ft", "after FT"),
        )
        for k, (metric, title) in enumerate(panels):
            ax = axes[k]
            for i, name in enumerate(METHODS):
                pts = sorted((e for e in entries if e["method"] == name), key=lambda e: e["target"])
                if not pts:
                    continue
                ax.errorbar(
                    [e["flops_reduction"]["mean"] * 100 for e in pts],
                    [e[metric]["mean"] * 100 for e in pts],
                    yerr=[e[metric]["std"] * 100 for e in pts],
                    label=name,
                    color=colors[i % len(colors)],
                    linestyle="-" if METHODS[name].aware else "--",
                    marker="o" if METHODS[name].aware else "s",
                    markerfacecolor=None if METHODS[name].aware else "none",
                    markersize=6 if METHODS[name].aware else 9,
                    capsize=3,
                )
            unpruned = [e["acc_unpruned"] for e in entries if not METHODS[e["method"]].pcc]
            if unpruned:
                ax.axhline(float(np.mean(unpruned)) * 100, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{dataset} · {model} · {title}")
            targets = [e["target"] * 100 for e in entries]
            ax.set_xlim(min(targets) - 5, max(targets) + 5)
            ax.ticklabel_format(useOffset=False)
            ax.set_xlabel("FLOPs reduction (%)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
        axes[2].legend(fontsize=7, loc="lower left", ncol=2)
        fig.tight_layout()
        path = out_dir / f"quality-{dataset}-{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths

"""Tables, winner lines and plots of the plan-quality benchmark (:mod:`benchmarks.quality`)."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from benchmarks.quality_run import METHODS

METRICS = (
    "flops_reduction",
    "params_reduction",
    "acc_before_ft",
    "acc_bn_recal",
    "acc_after_ft",
    "plan_s",
)
WINNER_METRICS = {
    "acc_after_ft": "after FT",
    "acc_bn_recal": "before FT, BN re-estimated",
    "acc_before_ft": "before FT",
}


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, model, target, method): mean and std over the seeds of every metric."""
    cells: dict[tuple[str, str, float, str], list[dict[str, Any]]] = defaultdict(list)
    failed: dict[tuple[str, str, float, str], int] = defaultdict(int)
    for r in rows:
        key = (r["dataset"], r["model"], float(r["target"]), r["method"])
        if "error" in r:
            failed[key] += 1
        else:
            cells[key].append(r)
    out: list[dict[str, Any]] = []
    for key in sorted(set(cells) | set(failed), key=_order):
        runs = cells.get(key, [])
        entry: dict[str, Any] = {
            "dataset": key[0],
            "model": key[1],
            "target": key[2],
            "method": key[3],
            "aware": METHODS[key[3]].aware,
            "n": len(runs),
            "failed": failed.get(key, 0),
            "seeds": sorted(r["seed"] for r in runs),
        }
        for m in METRICS:
            if runs:
                mean, std = _stats([float(r[m]) for r in runs])
                entry[m] = {"mean": round(mean, 6), "std": round(std, 6)}
        if runs:
            entry["acc_unpruned"] = round(float(np.mean([r["acc_unpruned"] for r in runs])), 6)
            split = [_greedy_fallback(r.get("rule", "")) for r in runs]
            if all(g is not None for g in split):
                entry["greedy_channels"] = float(np.mean([g[0] for g in split if g]))
                entry["softer_channels"] = float(np.mean([g[1] for g in split if g]))
                entry["fallback_channels"] = float(np.mean([g[2] for g in split if g]))
            entry["pcc_weight"] = runs[0].get("pcc_weight")
        out.append(entry)
    return out


def _greedy_fallback(rule: str) -> tuple[int, int, int] | None:
    """Channels a graph method's plan removed as redundant at the strict calibration level, at
    the softer (annealed) levels, and by the uniform fallback."""
    greedy = re.search(r"greedy on redundancy removed (\d+) channels", rule)
    if greedy is None:
        return None
    softer = re.search(r"\((\d+) of them at softer calibration levels\)", rule)
    fallback = re.search(r"uniform fallback removed (\d+) more", rule)
    n_soft = int(softer.group(1)) if softer else 0
    return int(greedy.group(1)) - n_soft, n_soft, int(fallback.group(1)) if fallback else 0


def _order(key: tuple[str, str, float, str]) -> tuple[Any, ...]:
    names = list(METHODS)
    return key[0], key[1], key[2], names.index(key[3]) if key[3] in names else len(names)


def winners(
    summary: Sequence[dict[str, Any]], metric: str, n_test: dict[str, int]
) -> list[dict[str, Any]]:
    """Per (dataset, model, target): the best redundancy-aware method against the best baseline
    (by mean ``metric``), the difference, and whether it exceeds 2 × the noise.

    Two noises are judged: the pooled seed std sqrt((s_a² + s_b²) / 2) (the issue's criterion),
    and the binomial std of one accuracy on the test digits, sqrt(p (1 − p) / n_test): a plan
    that does not depend on the seed has seed std 0 before fine-tuning, yet its accuracy is
    still measured on a finite test set. "beyond noise" needs both."""
    by_cell: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for e in summary:
        if e["n"]:
            by_cell[(e["dataset"], e["model"], e["target"])].append(e)
    out: list[dict[str, Any]] = []
    for (dataset, model, target), entries in by_cell.items():
        aware = [e for e in entries if e["aware"]]
        base = [e for e in entries if not e["aware"]]
        if not aware or not base:
            continue
        a = max(aware, key=lambda e: e[metric]["mean"])
        b = max(base, key=lambda e: e[metric]["mean"])
        diff = a[metric]["mean"] - b[metric]["mean"]
        pooled = math.sqrt((a[metric]["std"] ** 2 + b[metric]["std"] ** 2) / 2)
        p = (a[metric]["mean"] + b[metric]["mean"]) / 2
        binomial = math.sqrt(max(p * (1 - p), 0.0) / max(n_test[dataset], 1))
        noise = max(pooled, binomial)
        side = "redundancy-aware better" if diff > 0 else "baseline better"
        if min(a["n"], b["n"]) < 2:
            verdict = "one seed: no noise estimate"
        elif abs(diff) > 2 * noise:
            verdict = f"{side} beyond noise"
        elif abs(diff) > 2 * pooled:
            verdict = f"{side} beyond seed noise, within test-set noise"
        else:
            verdict = "within seed noise"
        out.append(
            {
                "dataset": dataset,
                "model": model,
                "target": target,
                "metric": metric,
                "best_aware": a["method"],
                "best_aware_mean": a[metric]["mean"],
                "best_baseline": b["method"],
                "best_baseline_mean": b[metric]["mean"],
                "difference": round(diff, 6),
                "pooled_std": round(pooled, 6),
                "test_binomial_std": round(binomial, 6),
                "noise": round(noise, 6),
                "verdict": verdict,
            }
        )
    return out


def _pm(stat: dict[str, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _winner_line(w: dict[str, Any]) -> str:
    what = WINNER_METRICS[w["metric"]]
    return (
        f"- **{what}:** best redundancy-aware `{w['best_aware']}` "
        f"{w['best_aware_mean'] * 100:.2f} % vs best baseline `{w['best_baseline']}` "
        f"{w['best_baseline_mean'] * 100:.2f} %: difference {w['difference'] * 100:+.2f} points, "
        f"2 × pooled seed std {2 * w['pooled_std'] * 100:.2f}, 2 × test-set binomial std "
        f"{2 * w['test_binomial_std'] * 100:.2f} → **{w['verdict']}**"
    )


def cell_table(entries: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | kind | FLOPs red. % | params red. % | acc before FT % | before FT, BN "
        "re-est. % | acc after FT % | plan s | strict / softer / uniform ch. | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        kind = "prunegraph" if e["aware"] else "baseline"
        name = e["method"] + (f" (λ={e['pcc_weight']:g})" if e.get("pcc_weight") else "")
        if not e["n"]:
            lines.append(f"| {name} | {kind} | failed ({e['failed']}) | | | | | | | 0 |")
            continue
        plan = e["plan_s"]
        split = (
            f"{e['greedy_channels']:.0f} / {e.get('softer_channels', 0):.0f} / "
            f"{e['fallback_channels']:.0f}"
            if "greedy_channels" in e
            else "–"
        )
        failed = f" ({e['failed']} failed)" if e["failed"] else ""
        lines.append(
            f"| {name} | {kind} | {_pm(e['flops_reduction'])} | {_pm(e['params_reduction'])} "
            f"| {_pm(e['acc_before_ft'])} | {_pm(e['acc_bn_recal'])} "
            f"| {_pm(e['acc_after_ft'], digits=2)} "
            f"| {plan['mean']:.2f} | {split} | {e['n']}{failed} |"
        )
    return lines


def markdown(result: dict[str, Any], image_prefix: str = "") -> str:
    """The whole report: setup, base models, per-cell tables with winner lines, summary."""
    meta, cfg = result["meta"], result["config"]
    lines = [
        "## Plan quality: redundancy-aware plans vs baselines (issue 7)",
        "",
        f"- **Command:** `{meta['command']}`",
        f"- **Date:** {meta['date']}; wall time {result['wall_s'] / 60:.1f} min"
        + (
            f" (this invocation; {result['resumed_rows']} rows came from the journal of an "
            "earlier, stopped invocation with the same settings)"
            if result.get("resumed_rows")
            else ""
        )
        + (" (quick mode: checks the harness, not the numbers)" if cfg["quick"] else ""),
        f"- **Machine:** {meta['machine']}; {cfg['jobs']} worker processes × "
        f"{cfg['threads']} torch thread(s); fraction of all cores busy before the run (others' "
        f"load): {meta.get('busy_before')}; torch {meta['versions']['torch']}, torch-pruning "
        f"{meta['versions']['torch_pruning']}",
        f"- **Data:** {_data_line(result)}; splits fixed and stratified (seed 0); `fit` for "
        "all training, `val` only for tuning (PCC λ), `test` only for the numbers below.",
        f"- **Budgets:** {_budget_line(cfg)}",
        f"- **Seeds** {cfg['seeds']}: the seed sets the plan seed (random's choice, Leiden, "
        "k-means), the calibration digits of data-aware methods and the fine-tune batch order; "
        "base models are trained once with seed 0.",
        "- **Methods:** prunegraph plans (`graphs.planner.plan_layers` with the manifest from "
        "`clients.build_manifest`, applied with `clients.apply_plan`; stem and classifier kept, "
        f"at most {cfg['max_ratio']:.0%} of a group removed): "
        + ", ".join(f"`{m}`" for m in cfg["methods"] if METHODS[m].aware)
        + " (`-act`: graph methods on feature maps; `ci`/`-act` capture "
        f"{cfg['calib_samples']} train digits; `ci+pcc`: `ci` on the base model further trained "
        "with `clients.PCCLoss`, λ chosen on `val`). Baselines: "
        + ", ".join(f"`{m}`" for m in cfg["methods"] if not METHODS[m].aware)
        + f" (`random`/`l1`/`fpgm`: prunegraph's uniform ratio; `tp`: Torch-Pruning "
        f"`MagnitudePruner(global_pruning=True, MagnitudeImportance(p={cfg['tp_p']}), "
        f"max_pruning_ratio={cfg['max_ratio']}, ignored_layers=[classifier])`, `pruning_ratio` "
        f"by bisection to the FLOPs target ±{cfg['tp_tolerance'] * 100:.0f} point, FLOPs only; "
        "TP may prune the stem, prunegraph does not).",
        "- **Accuracy before FT** is the pruned model as it is; **BN re-est.** the same after "
        f"re-estimating BatchNorm statistics on {cfg['bn_samples']} train digits (no gradient "
        "step; equal to before FT for the digit CNN, which has no BN); **after FT** after the "
        "fine-tune budget. Cells are mean ± std over the seeds, in %.",
        "- *strict / softer / uniform ch.*: for mrp/srr/hsc (and -act), the channels the plan "
        "removed as redundant by the greedy allocation at the strict calibration level, at the "
        "softer annealed levels (`graphs.anneal`), and those taken by the uniform fallback once "
        "even the softest level had no redundancy left (mean over seeds; from the plan's "
        "`rule`).",
        "- FLOPs = MACs from `torch_pruning.utils.count_ops_and_params` on 1×1×28×28; "
        "`plan s` = planning wall time in a worker (prunegraph: `plan_layers` plus the "
        "activation capture; tp: the whole bisection), other work running beside it.",
        "",
        "### Base models",
        "",
        "| dataset | model | MMACs | params k | base test acc % | base val acc % | trained s "
        "| PCC λ (val score) | PCC model test acc % |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for b in result["bases"]:
        pcc = b.get("pcc")
        lam = pcc_acc = "–"
        if pcc:
            scores = ", ".join(f"{k}: {v * 100:.1f}" for k, v in pcc["scores"].items())
            lam = f"{pcc['weight']:g}" + (f" ({scores})" if scores else "")
            pcc_acc = f"{pcc['test_acc'] * 100:.1f}"
        lines.append(
            f"| {b['dataset']} | {b['model']} | {b['macs'] / 1e6:.1f} | {b['params'] / 1e3:.0f} "
            f"| {b['test_acc'] * 100:.1f} | {b['val_acc'] * 100:.1f} | {b['train_s']:.0f} "
            f"| {lam} | {pcc_acc} |"
        )
    lines += [
        "",
        "*trained s*: wall time of the run that trained the base model, in a worker beside other "
        "work (models are cached under `--cache-dir` and reused by later runs). *PCC λ*: chosen "
        "on `val` by the accuracy after ci pruning and fine-tuning (seed 0, mean over targets); "
        "ties go to the smaller λ.",
    ]
    summary = result["summary"]
    wins = {(w["dataset"], w["model"], w["target"], w["metric"]): w for w in result["winners"]}
    cells: dict[tuple[str, str], dict[float, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for e in summary:
        cells[(e["dataset"], e["model"])][e["target"]].append(e)
    models = list(cfg["models"])
    order = sorted(
        cells, key=lambda k: (k[0], models.index(k[1]) if k[1] in models else len(models))
    )
    for dataset, model in order:
        by_target = cells[(dataset, model)]
        lines += ["", f"### {dataset} · {model}", ""]
        for target in sorted(by_target):
            lines += [f"**FLOPs target {target:.0%}**", ""]
            lines += cell_table(by_target[target])
            lines.append("")
            for metric in WINNER_METRICS:
                w = wins.get((dataset, model, target, metric))
                if w:
                    lines.append(_winner_line(w))
            lines.append("")
        png = f"quality-{dataset}-{model}.png"
        if png in result.get("plots", []):
            lines += [f"![{dataset} {model}]({image_prefix}{png})", ""]
    lines += ["### Summary", "", *summary_lines(result["winners"])]
    return "\n".join(lines).rstrip() + "\n"


def summary_lines(wins: Sequence[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for metric, what in WINNER_METRICS.items():
        ws = [w for w in wins if w["metric"] == metric]
        if not ws:
            continue
        counts: dict[str, int] = defaultdict(int)
        for w in ws:
            counts[w["verdict"]] += 1
        parts = ", ".join(f"{v}: {n}" for v, n in sorted(counts.items()))
        out.append(f"- Accuracy {what}: {len(ws)} (dataset, model, target) cells — {parts}.")
    out.append(
        "- Noise: a difference is *beyond seed noise* when it exceeds 2 × the pooled seed std "
        "of the two rows, and *beyond noise* when it also exceeds 2 × the binomial std of one "
        "accuracy on the test digits (seed std alone is 0 for plans that do not depend on the "
        "seed, e.g. before fine-tuning)."
    )
    out.append(
        "- Caveat: the best of the redundancy-aware rows is compared with the best of the "
        "baselines; with more rows on one side, its maximum is favoured by chance alone."
    )
    return out


def _data_line(result: dict[str, Any]) -> str:
    parts = []
    for name, sizes in result["data"].items():
        parts.append(f"{name} fit/val/test {sizes['fit']}/{sizes['val']}/{sizes['test']}")
    return "; ".join(parts)


def _budget_line(cfg: dict[str, Any]) -> str:
    def tc(c: dict[str, Any]) -> str:
        length = f"{c['max_steps']} steps" if c.get("max_steps") else f"{c['epochs']:g} epoch(s)"
        return f"{length}, Adam lr {c['lr']:g} cosine, batch {c['batch']}"

    parts = []
    for d in cfg["datasets"]:
        parts.append(
            f"{d}: base {tc(cfg['base'][d])}; fine-tune (same for every row) "
            f"{tc(cfg['finetune'][d])}; PCC pre-training {tc(cfg['pcc_train'][d])}, "
            f"λ ∈ {cfg['pcc_weights']}"
        )
    return "; ".join(parts)

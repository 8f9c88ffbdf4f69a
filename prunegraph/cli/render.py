"""Reports and plans as tables for people (``--json`` prints the models themselves)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from graphs import Report
from graphs.plan import PruningPlan
from graphs.report import LayerReport, MethodResult
from prunegraph.cli import compensation as comp

FOLD_WORDS = (("least_squares", "least-squares"), ("mean", "mean"), ("merge", "merge"))
"""How the plan table names each kind of fold (graphs.fold.ConsumerFold.kind)."""


def _figure(result: MethodResult) -> str:
    """A method's redundancy with its defining raw figure, for the table."""
    if result.method == "mrp":
        return f"{result.redundancy:.3f} K={result.n_communities}"
    if result.method == "srr":
        return f"{result.redundancy:.3f} k={result.n_components} Nc={result.covering_number:g}"
    if result.method == "hsc":
        return f"{result.redundancy:.3f} K={result.n_clusters}"
    return "scores"


def _layer_row(layer: LayerReport, methods: list[str]) -> list[str]:
    name = layer.name if len(layer.members) == 1 else f"{layer.name} (+{len(layer.members) - 1})"
    shape = "×".join(str(s) for s in layer.shape)
    return [name, layer.kind, shape, str(layer.n_filters)] + [
        _figure(layer.methods[m]) for m in methods
    ]


def render_report(report: Report, console: Console) -> None:
    """Per-layer table, skipped layers and the model summary."""
    table = Table(title=f"prunegraph report · sha256 {report.checkpoint.sha256[:12]}…")
    for col in ("layer", "kind", "shape", "filters"):
        table.add_column(col, justify="right" if col == "filters" else "left", no_wrap=True)
    for m in report.methods:
        table.add_column(m, justify="right", no_wrap=True)
    functional = any(layer.functional is not None for layer in report.layers)
    if functional:
        table.add_column("functional", justify="right", no_wrap=True)
    for layer in report.layers:
        f = layer.functional
        cell = [] if not functional else ["—" if f is None else f"{f.redundancy:.3f}"]
        table.add_row(*_layer_row(layer, report.methods), *cell)
    console.print(table)
    if report.skipped:
        skip = Table(title="skipped layers")
        skip.add_column("layer")
        skip.add_column("reason")
        for item in report.skipped:
            skip.add_row(item.name, item.reason)
        console.print(skip)
    _render_summary(report, console)


def _render_summary(report: Report, console: Console) -> None:
    s = report.summary
    console.print(
        f"{s.n_layers} groups analysed, {s.n_skipped} skipped · "
        f"params {s.params_total:,} ({s.params_analysed:,} in analysed layers) · "
        f"FLOPs {'unknown (no manifest)' if s.flops is None else f'{s.flops:,}'}"
    )
    for m, ms in s.methods.items():
        if ms.redundancy_params_weighted is None:
            console.print(f"  {m}: importance scores only (no layer redundancy)")
            continue
        worst = ", ".join(ms.most_redundant[:3]) or "none"
        rm = ms.removable
        gone = (
            ""
            if rm is None
            else f"removable {rm.params:.3f} of params"
            + (f", {rm.flops:.3f} of FLOPs; " if rm.flops is not None else "; ")
        )
        console.print(
            f"  {m}: {gone}params-weighted redundancy {ms.redundancy_params_weighted:.3f}; "
            f"most redundant: {worst}"
        )


def render_plan(plan: PruningPlan, console: Console) -> None:
    """Per-group before → after table with the method's rationale, then the totals."""
    table = Table(title=f"prunegraph plan · {plan.method} · target {plan.target.kind} "
                  f"{plan.target.ratio:.0%} · coupling {plan.coupling}")  # fmt: skip
    extra_cols = comp.plan_columns(plan)
    for col in ("group", "layers", "channels", "removed", *extra_cols, "rationale"):
        table.add_column(col, no_wrap=col != "rationale")
    for g in plan.groups:
        extra = f" (+{len(g.producers) - 1})" if len(g.producers) > 1 else ""
        table.add_row(
            f"{g.name}{extra}",
            str(len(g.producers)),
            f"{g.channels_before} → {g.channels_after}",
            str(len(g.remove)),
            *comp.plan_cells(plan, g.id),
            g.rationale,
        )
    console.print(table)
    console.print(
        f"params {plan.params_before:,} → {plan.params_after:,} "
        f"(−{plan.achieved['params']:.1%})"
        + (
            f" · FLOPs (MACs) {plan.flops_before:,} → {plan.flops_after:,} "
            f"(−{plan.achieved['flops']:.1%})"
            if plan.flops_before is not None and plan.flops_after is not None
            else " · FLOPs unknown (no manifest)"
        )
    )
    console.print(f"rule: {plan.rule}", highlight=False)
    if plan.compensation is not None:
        total = sum(g.predicted_error or 0.0 for g in plan.groups)
        kinds = [f.kind for f in plan.compensation.folds]
        folds = ", ".join(f"{kinds.count(k)} {word} folds" for k, word in FOLD_WORDS if k in kinds)
        console.print(
            f"compensation: {folds}; predicted "
            f"relative consumer-output error summed over groups {total:.3g}",
            highlight=False,
        )

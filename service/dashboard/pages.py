"""What each dashboard page shows: the user's rows and the jobs' JSON, as template contexts.

One function per page; each returns a :class:`Page` (template, context, status) and never
raises for a job that is unknown, someone else's, failed or still running: those become a 404
page or a page that shows the status instead of charts.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from sqlalchemy import select

from graphs.errors import PruneGraphError
from graphs.plan import PruningPlan
from graphs.report import CROSSFIT_NOTE, MethodSummary, Report
from service.api.deps import State
from service.api.jobs import recent_jobs
from service.api.schemas import job_status
from service.dashboard.charts import (
    cluster_sizes,
    graph_svg,
    grouped_bars,
    plan_chart,
    redundancy_chart,
    redundancy_methods,
)
from service.dashboard.curves import functional_curves
from service.dashboard.layer_graph import find_job, layer_graph
from service.errors import ServiceError
from service.store.db import DONE, CheckpointRow, JobRow


@dataclass(frozen=True)
class Page:
    template: str
    context: dict[str, Any] = field(default_factory=dict)
    status: int = 200


def not_found(what: str, ident: str) -> Page:
    return Page("not_found.html", {"what": what, "ident": ident}, 404)


def when(ts: float | None) -> str:
    """A timestamp as UTC text."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "—"


def describe(request: dict[str, Any]) -> str:
    """A job's request in one line: methods, and the plan's method and target."""
    text = ", ".join(str(m) for m in request.get("methods") or [])
    target = request.get("target") or {}
    for kind, ratio in target.items():
        if ratio is not None:
            text += f" · plan {request.get('plan_method', 'mrp')} −{float(ratio):.0%} {kind}"
    return text


def index_page(state: State, user: str) -> Page:
    with state.sessions() as s:
        checkpoints = s.scalars(
            select(CheckpointRow)
            .where(CheckpointRow.owner == user)
            .order_by(CheckpointRow.created_at.desc())
        ).all()
    jobs = recent_jobs(state, user)  # newest first
    per_checkpoint = Counter(j.checkpoint_id for j in jobs)
    return Page(
        "index.html",
        {
            "checkpoints": [(c, per_checkpoint[c.id]) for c in checkpoints],
            "jobs": [(j, describe(j.model_dump())) for j in jobs],
            "done": [(j, describe(j.model_dump())) for j in jobs if j.status == DONE],
        },
    )


def report_context(row: JobRow, base: str) -> dict[str, Any]:
    job = job_status(row)
    ctx: dict[str, Any] = {"job": job, "describe": describe(job.request), "report": None}
    if row.status != DONE or row.report_json is None:
        return ctx
    report = Report.model_validate_json(row.report_json)
    plan = PruningPlan.model_validate_json(row.plan_json) if row.plan_json else None
    methods = redundancy_methods(report)
    ctx.update(
        report=report,
        methods=methods,
        importance_only=[m for m in report.methods if m not in methods],
        chart=redundancy_chart(report, f"{base}/jobs/{row.id}/layer?name=") if methods else None,
        plan=plan,
        plan_chart=plan_chart(plan) if plan is not None and plan.groups else None,
        curves=functional_curves(report),
        functional_crossfit=CROSSFIT_NOTE in report.notes,
        plan_functional=plan is not None
        and any(g.functional_redundancy is not None for g in plan.groups),
        plan_error=plan is not None and any(g.predicted_error is not None for g in plan.groups),
    )
    return ctx


def job_page(state: State, user: str, job_id: str, base: str, *, part: bool = False) -> Page:
    """The report page (or, with ``part``, only the part the progress script reloads)."""
    row = find_job(state.sessions, job_id, user)
    if row is None:
        return not_found("job", job_id)
    return Page("_report.html" if part else "job.html", report_context(row, base))


def layer_page(state: State, user: str, job_id: str, layer: str, base: str) -> Page:
    """One layer's filter graph coloured by mrp community, and its hsc cluster sizes."""
    row = find_job(state.sessions, job_id, user)
    if row is None:
        return not_found("job", job_id)
    job = job_status(row)
    ctx: dict[str, Any] = {"job": job, "layer": layer, "entry": None, "error": None}
    if row.status != DONE or row.report_json is None:
        return Page("layer.html", ctx)
    report = Report.model_validate_json(row.report_json)
    names = [entry.name for entry in report.layers]
    if layer not in names:
        return not_found("layer", layer)
    entry = report.layers[names.index(layer)]
    ctx.update(entry=entry, names=names, graph=None, svg=None, clusters=None)
    hsc = entry.methods.get("hsc")
    if hsc is not None and hsc.method == "hsc":
        ctx["clusters"] = cluster_sizes(hsc.clusters, hsc.representatives)
    try:
        graph = layer_graph(
            state.sessions,
            job_id,
            user,
            layer,
            state.store.path(row.checkpoint_id),
            state.activations.root,
            state.settings.cache_dir(),
        )
    except (ServiceError, PruneGraphError) as e:
        ctx["error"] = f"{e.message} {e.hint}".strip()
        return Page("layer.html", ctx)
    ctx.update(graph=graph, svg=graph_svg(graph))
    return Page("layer.html", ctx)


@dataclass(frozen=True)
class Comparison:
    methods: list[str]
    rows: list[tuple[str, list[tuple[str, float, float, float]]]]  # layer, (method, a, b, b − a)
    only_a: list[str]
    only_b: list[str]
    summary: list[tuple[str, str, str, float | None, float | None, float | None]]
    """(method, figure: removable or weighted, of: params or flops, a, b, b − a)"""


def _delta(a: float | None, b: float | None) -> float | None:
    return b - a if a is not None and b is not None else None


def _figures(ms: MethodSummary) -> list[tuple[str, str, float | None]]:
    """(figure, of what, value): the removable fractions, then the weighted mean redundancy."""
    rm = ms.removable
    return [
        ("removable", "params", rm.params if rm is not None else None),
        ("removable", "flops", rm.flops if rm is not None else None),
        ("weighted", "params", ms.redundancy_params_weighted),
        ("weighted", "flops", ms.redundancy_flops_weighted),
    ]


def compare(ra: Report, rb: Report) -> Comparison:
    """Per-layer redundancy deltas (b − a), layers matched by name."""
    methods = [m for m in redundancy_methods(ra) if m in redundancy_methods(rb)]
    in_b = {entry.name: entry for entry in rb.layers}
    in_a = {entry.name for entry in ra.layers}
    rows = []
    for la in ra.layers:
        lb = in_b.get(la.name)
        if lb is None:
            continue
        values = []
        for m in methods:
            a, b = float(la.methods[m].redundancy or 0.0), float(lb.methods[m].redundancy or 0.0)
            values.append((m, a, b, b - a))
        rows.append((la.name, values))
    summary = [
        (m, fig, of, a, b, _delta(a, b))
        for m in methods
        for (fig, of, a), (_, _, b) in zip(
            _figures(ra.summary.methods[m]), _figures(rb.summary.methods[m]), strict=True
        )
    ]
    return Comparison(
        methods,
        rows,
        [e.name for e in ra.layers if e.name not in in_b],
        [e.name for e in rb.layers if e.name not in in_a],
        summary,
    )


def compare_page(state: State, user: str, a: str, b: str, base: str) -> Page:
    done = [(j, describe(j.model_dump())) for j in recent_jobs(state, user) if j.status == DONE]
    ctx: dict[str, Any] = {"done": done, "a": a, "b": b, "cmp": None, "chart": None, "error": None}
    if not (a and b):
        return Page("compare.html", ctx)
    reports = []
    for job_id in (a, b):
        row = find_job(state.sessions, job_id, user)
        if row is None:
            return not_found("job", job_id)
        if row.status != DONE or row.report_json is None:
            ctx["error"] = f"job {job_id} is {row.status}: only finished jobs can be compared"
            return Page("compare.html", ctx, 409)
        reports.append(Report.model_validate_json(row.report_json))
    cmp = compare(reports[0], reports[1])
    href = f"{base}/jobs/{quote(b)}/layer?name="
    rows = [(name, href + quote(name), [(m, d) for m, _, _, d in v]) for name, v in cmp.rows]
    ctx.update(
        cmp=cmp,
        chart=grouped_bars(rows, cmp.methods, diverging=True, value_key="delta")
        if cmp.rows and cmp.methods
        else None,
    )
    return Page("compare.html", ctx)

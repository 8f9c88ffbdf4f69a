"""One layer's filter similarity graph, laid out for drawing (dashboard and JSON API).

For job J and layer L the graph is the calibrated cosine graph the job's methods used
(:meth:`graphs.work.GroupWork.graph`): the job's checkpoint and request (options, manifest,
activations) are read by the worker's own loader (:func:`service.jobs.inputs.load_inputs`), so
the group and its vectors are the same, and the service's result cache makes the graph itself a
lookup. The layout is seeded (:func:`graphs.layout.spring_layout`); the drawing is capped at
:data:`MAX_NODES` filters and :data:`MAX_EDGES` edges, with a note saying what was left out.
Each node carries its mrp community and hsc cluster from the job's report.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker

from graphs.contracts.jobs import JobRequest
from graphs.errors import InvalidInputError
from graphs.features import group_features
from graphs.grouping import build_groups
from graphs.layout import spring_layout
from graphs.report import LayerReport, Report
from graphs.work import GroupWork
from service.errors import NotFoundError, not_found, unfinished
from service.jobs.inputs import load_job_inputs
from service.store.cache import FileCache
from service.store.db import DONE, JobRow

MAX_NODES = 400
MAX_EDGES = 5000


class GraphNode(BaseModel):
    index: int = Field(description="the filter's index in the layer")
    x: float = Field(description="layout position in [0, 1]")
    y: float
    community: int | None = Field(description="mrp community from the report (null without mrp)")
    cluster: int | None = Field(description="hsc cluster from the report (null without hsc)")


class GraphEdge(BaseModel):
    i: int
    j: int
    weight: float = Field(description="cosine similarity of the two filters")


class LayerGraph(BaseModel):
    job_id: str
    layer: str
    n_filters: int
    n_edges: int = Field(description="edges of the whole graph (the drawing may show fewer)")
    threshold: float | None = Field(description="cosine above which filters are joined")
    null_dim: float | None
    nodes: list[GraphNode]
    edges: list[GraphEdge]
    note: str | None = Field(description="what the drawing leaves out, if anything")


@dataclass(frozen=True)
class _Drawing:
    n_filters: int
    n_edges: int
    threshold: float | None
    null_dim: float | None
    shown: tuple[int, ...]
    xy: tuple[tuple[float, float], ...]
    edges: tuple[tuple[int, int, float], ...]


def find_job(sessions: sessionmaker[Session], job_id: str, user: str) -> JobRow | None:
    """The user's job, or None (unknown, or another user's)."""
    with sessions() as s:
        row = s.get(JobRow, job_id)
    return row if row is not None and row.owner == user else None


def finished_report(row: JobRow) -> Report:
    """The job's report.

    Raises:
        NotReadyError: the job has not finished; JobFailedError: it failed.
    """
    if row.status != DONE or row.report_json is None:
        raise unfinished(row.id, row.status, row.error)
    return Report.model_validate_json(row.report_json)


def report_layer(report: Report, job_id: str, layer: str) -> LayerReport:
    for entry in report.layers:
        if entry.name == layer:
            return entry
    raise NotFoundError(
        f"layer {layer!r} is not in the report of job {job_id}",
        "Use a layer name from the report's layers (skipped layers have no graph).",
    )


def layer_graph(
    sessions: sessionmaker[Session],
    job_id: str,
    user: str,
    layer: str,
    checkpoint_path: Path,
    activations_dir: Path,
    cache_dir: Path | None,
) -> LayerGraph:
    """The drawing payload of ``layer`` of the user's finished job ``job_id``."""
    row = find_job(sessions, job_id, user)
    if row is None:
        raise not_found("job", job_id)
    entry = report_layer(finished_report(row), job_id, layer)
    request = JobRequest.model_validate_json(row.request_json)
    aid = request.activations_id
    drawing = _drawing(
        str(checkpoint_path),
        row.request_json,
        str(activations_dir / aid) if aid else None,
        str(cache_dir) if cache_dir is not None else None,
        layer,
    )
    mrp, hsc = entry.methods.get("mrp"), entry.methods.get("hsc")
    communities = getattr(mrp, "communities", None)
    clusters = getattr(hsc, "clusters", None)
    nodes = [
        GraphNode(
            index=i,
            x=x,
            y=y,
            community=communities[i] if communities is not None else None,
            cluster=clusters[i] if clusters is not None else None,
        )
        for i, (x, y) in zip(drawing.shown, drawing.xy, strict=True)
    ]
    left_out = []
    if len(drawing.shown) < drawing.n_filters:
        left_out.append(
            f"{len(drawing.shown)} of {drawing.n_filters} filters (those with the most edges)"
        )
    if len(drawing.edges) < drawing.n_edges:
        left_out.append(f"{len(drawing.edges)} of {drawing.n_edges} edges (the most similar)")
    note = f"drawing {' and '.join(left_out)}" if left_out else None
    return LayerGraph(
        job_id=job_id,
        layer=layer,
        n_filters=drawing.n_filters,
        n_edges=drawing.n_edges,
        threshold=drawing.threshold,
        null_dim=drawing.null_dim,
        nodes=nodes,
        edges=[GraphEdge(i=i, j=j, weight=w) for i, j, w in drawing.edges],
        note=note,
    )


@lru_cache(maxsize=32)
def _drawing(
    checkpoint_path: str,
    request_json: str,
    activations_path: str | None,
    cache_dir: str | None,
    layer: str,
) -> _Drawing:
    """Graph and layout of one group (pure function of its arguments, hence cached)."""
    request = JobRequest.model_validate_json(request_json)
    inputs = load_job_inputs(request, checkpoint_path, activations_path)
    groups = build_groups(inputs.checkpoint.layers, inputs.manifest)[0]
    group = next((g for g in groups if g.name == layer), None)
    if group is None:
        raise InvalidInputError(f"layer {layer!r} is not a group of the checkpoint")
    maps = inputs.maps
    features = group_features(group, maps) if maps is not None else None
    cache = FileCache(Path(cache_dir)) if cache_dir is not None else None
    work = GroupWork(
        group, seed=request.seed, options=request.options, cache=cache, features=features
    )
    n = group.n_filters
    if n < 2:
        return _Drawing(n, 0, None, None, tuple(range(n)), ((0.5, 0.5),) * n, ())
    calibrated = work.graph()
    upper = calibrated.graph.tocoo()
    keep = upper.row < upper.col
    ii, jj, ww = upper.row[keep], upper.col[keep], upper.data[keep]
    degree = np.bincount(np.concatenate([ii, jj]), minlength=n)
    shown = np.sort(np.lexsort((np.arange(n), -degree))[:MAX_NODES])
    position = np.full(n, -1)
    position[shown] = np.arange(shown.size)
    inside = (position[ii] >= 0) & (position[jj] >= 0)
    order = np.lexsort((jj[inside], ii[inside], -ww[inside]))[:MAX_EDGES]
    ei, ej, ew = ii[inside][order], jj[inside][order], ww[inside][order]
    xy = spring_layout(
        shown.size, np.stack([position[ei], position[ej]], axis=1), np.maximum(ew, 1e-6), seed=0
    )
    return _Drawing(
        n_filters=n,
        n_edges=int(ii.size),
        threshold=round(calibrated.threshold, 6),
        null_dim=round(calibrated.null_dim, 4),
        shown=tuple(int(i) for i in shown),
        xy=tuple((round(float(x), 4), round(float(y), 4)) for x, y in xy),
        edges=tuple(
            (int(a), int(b), round(float(w), 6)) for a, b, w in zip(ei, ej, ew, strict=True)
        ),
    )

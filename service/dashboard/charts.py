"""Geometry of the dashboard's SVG charts, computed on the server (no client-side charting).

Every function returns plain shapes that ``templates/_chart.html`` and ``_graph.html`` draw;
text and attributes are escaped by Jinja2's autoescape there. Each bar carries ``data-*``
attributes with the exact values from the report or plan (``str(float)`` round-trips), so what
is drawn can be checked against the API's JSON.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from graphs.plan import PruningPlan
from graphs.report import Report
from service.dashboard.layer_graph import LayerGraph

WIDTH, LABEL_W, VALUE_W = 780.0, 200.0, 80.0
BAR_H, GROUP_GAP, TOP = 8.0, 8.0, 26.0
METHOD_COLOURS = {"mrp": "#1f6fb4", "srr": "#e07b00", "hsc": "#2a9d3a"}
SINGLETON, DEAD = "#a3acb6", "#1b1b1b"
_NICE = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    fill: str
    title: str
    text: str
    data: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    href: str | None = None


@dataclass(frozen=True)
class Chart:
    width: float
    height: float
    bars: list[Bar]
    labels: list[Label]
    ticks: list[Label]
    grid: list[float]
    legend: list[tuple[str, str]] = field(default_factory=list)


def redundancy_methods(report: Report) -> list[str]:
    """Methods that give a layer redundancy (mrp, srr, hsc), in the report's order."""
    return [
        m
        for m in report.methods
        if report.layers and all(layer.methods[m].redundancy is not None for layer in report.layers)
    ]


def _nice(top: float) -> float:
    return next((v for v in _NICE if v >= top), 1.0)


def _grid(
    lo: float, hi: float, x0: float, plot_w: float, fmt: str
) -> tuple[list[Label], list[float]]:
    xs = [x0 + plot_w * k / 4 for k in range(5)]
    return [Label(x, TOP - 8, format(lo + (hi - lo) * k / 4, fmt)) for k, x in enumerate(xs)], xs


def grouped_bars(
    rows: Sequence[tuple[str, str | None, Sequence[tuple[str, float]]]],
    methods: Sequence[str],
    *,
    diverging: bool = False,
    value_key: str = "value",
) -> Chart:
    """Horizontal grouped bars: per row (label, href, [(method, value)]) one bar per method.

    Values are redundancies in [0, 1], or with ``diverging`` signed deltas drawn from a centre
    line. The axis adapts to the largest value so that small redundancies stay visible.
    """
    plot_w = WIDTH - LABEL_W - VALUE_W
    values = [abs(v) for _, _, vs in rows for _, v in vs]
    top = _nice(max([*values, 0.002]))
    lo, x0 = (-top, LABEL_W + plot_w / 2) if diverging else (0.0, LABEL_W)
    scale = plot_w / (top - lo)
    ticks, grid = _grid(lo, top, LABEL_W, plot_w, "+.3g" if diverging else ".3g")
    bars: list[Bar] = []
    labels: list[Label] = []
    y = TOP
    for name, href, vs in rows:
        group_h = max(len(methods), 1) * (BAR_H + 1)
        labels.append(Label(LABEL_W - 6, y + group_h / 2 + 4, name, href))
        for k, (method, v) in enumerate(vs):
            w = abs(v) * scale
            shown = f"{v:+.4f}" if diverging else f"{v:.4f}"
            bars.append(
                Bar(
                    x=round(x0 - w if v < 0 else x0, 2),
                    y=round(y + k * (BAR_H + 1), 2),
                    w=round(w, 2),
                    h=BAR_H,
                    fill=METHOD_COLOURS.get(method, "#666"),
                    title=f"{name} · {method}: {shown}",
                    text=f"{v:+.3f}" if diverging else f"{v:.3f}",
                    data=(("layer", name), ("method", method), (value_key, str(v))),
                )
            )
        y += group_h + GROUP_GAP
    legend = [(m, METHOD_COLOURS.get(m, "#666")) for m in methods]
    return Chart(WIDTH, y + 4, bars, labels, ticks, grid, legend)


def redundancy_chart(report: Report, layer_href: str) -> Chart:
    """Per layer, the redundancy of each method side by side; labels link to the layer page."""
    methods = redundancy_methods(report)
    rows = [
        (
            layer.name,
            layer_href + quote(layer.name),
            [(m, float(layer.methods[m].redundancy or 0.0)) for m in methods],
        )
        for layer in report.layers
    ]
    return grouped_bars(rows, methods)


def plan_chart(plan: PruningPlan) -> Chart:
    """Per planned group its width before (light) and after (dark)."""
    plot_w = WIDTH - LABEL_W - VALUE_W - 40
    widest = max([g.channels_before for g in plan.groups] + [1])
    bars: list[Bar] = []
    labels: list[Label] = []
    y = TOP
    for g in plan.groups:
        labels.append(Label(LABEL_W - 6, y + BAR_H + 3, g.name))
        removed = 1 - g.channels_after / g.channels_before if g.channels_before else 0.0
        data = (
            ("layer", g.name),
            ("before", str(g.channels_before)),
            ("after", str(g.channels_after)),
        )
        title = f"{g.name}: {g.channels_before} → {g.channels_after} channels"
        text = f"{g.channels_before} → {g.channels_after} (−{removed:.0%})"
        for role, n, fill, inset in (
            ("before", g.channels_before, "#cfd8e3", 0.0),
            ("after", g.channels_after, "#2f4b7c", 3.0),
        ):
            bars.append(
                Bar(
                    x=LABEL_W,
                    y=y + inset,
                    w=round(plot_w * n / widest, 2),
                    h=2 * BAR_H - 2 * inset,
                    fill=fill,
                    title=title,
                    text=text if role == "before" else "",
                    data=(("role", role), *data),
                )
            )
        y += 2 * BAR_H + GROUP_GAP
    ticks, grid = _grid(0, widest, LABEL_W, plot_w, ".0f")
    return Chart(WIDTH, y + 4, bars, labels, ticks, grid)


def community_colours(labels: Sequence[int]) -> dict[int, str]:
    """A colour per label: groups of two or more get distinct hues, singletons grey, -1 black."""
    sizes = Counter(labels)
    multi = sorted((c for c, s in sizes.items() if s >= 2 and c >= 0), key=lambda c: (-sizes[c], c))
    colours = {c: SINGLETON for c in sizes}
    colours.update({c: f"hsl({(i * 137.508) % 360:.1f}, 70%, {45 + 10 * (i % 2)}%)"
                    for i, c in enumerate(multi)})  # fmt: skip
    if -1 in colours:
        colours[-1] = DEAD
    return colours


@dataclass(frozen=True)
class ClusterSizes:
    clusters: list[tuple[int, int, int | None]]  # (cluster, size, representative), size >= 2
    singletons: int
    dead: int

    @property
    def distribution(self) -> list[tuple[int, int]]:
        """(size, number of clusters of that size), largest size first."""
        counts = Counter(size for _, size, _ in self.clusters)
        if self.singletons:
            counts[1] = self.singletons
        return sorted(counts.items(), reverse=True)


def cluster_sizes(clusters: Sequence[int], representatives: Sequence[int]) -> ClusterSizes:
    """hsc clusters of two or more filters (largest first), the count of singletons and dead."""
    sizes = Counter(clusters)
    rep = {clusters[r]: r for r in representatives}
    multi = sorted((c for c, s in sizes.items() if s >= 2 and c >= 0), key=lambda c: (-sizes[c], c))
    singles = sum(1 for c, s in sizes.items() if s == 1 and c >= 0)
    return ClusterSizes([(c, sizes[c], rep.get(c)) for c in multi], singles, sizes.get(-1, 0))


@dataclass(frozen=True)
class Node:
    cx: float
    cy: float
    r: float
    fill: str
    index: int
    community: int | None
    cluster: int | None


@dataclass(frozen=True)
class Edge:
    x1: float
    y1: float
    x2: float
    y2: float
    opacity: float


@dataclass(frozen=True)
class GraphSvg:
    size: float
    nodes: list[Node]
    edges: list[Edge]
    legend: list[tuple[str, str]]


def graph_svg(g: LayerGraph, size: float = 640.0) -> GraphSvg:
    """Nodes coloured by mrp community (grey when alone); edges fade with lower similarity."""
    pad = 14.0
    span = size - 2 * pad
    communities = [n.community for n in g.nodes if n.community is not None]
    colours = community_colours(communities)
    r = max(2.5, min(7.0, 120.0 / max(len(g.nodes), 1) ** 0.5))
    at = {n.index: (pad + n.x * span, pad + n.y * span) for n in g.nodes}
    lo = g.threshold if g.threshold is not None else 0.0
    edges = []
    for e in g.edges:
        (x1, y1), (x2, y2) = at[e.i], at[e.j]
        strength = max(0.0, (e.weight - lo) / max(1 - lo, 1e-9))
        edges.append(Edge(round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2),
                          round(0.25 + 0.65 * strength, 3)))  # fmt: skip
    nodes = []
    for n in g.nodes:
        fill = colours[n.community] if n.community is not None else SINGLETON
        cx, cy = at[n.index]
        nodes.append(Node(round(cx, 2), round(cy, 2), r, fill, n.index, n.community, n.cluster))
    legend = [("alone", SINGLETON)] + ([("dead", DEAD)] if -1 in colours else [])
    return GraphSvg(size, nodes, edges, legend)

"""The dashboard shows functional redundancy and compensated plans as the report and plan say
(no browser: the report page's HTML is parsed): per group the functional redundancy, its
error-vs-fraction curve (the drawn points read back into the report's errors), and the plan's
predicted output error per group. Real digit CNN, real MNIST digits."""

from __future__ import annotations

import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from clients import build_manifest
from clients.activations import capture_activations
from graphs.analyze import analyze
from graphs.functional_report import functional_figures, with_functional
from graphs.plan import PruningPlan, Target
from graphs.planner import plan_layers
from graphs.report import Report
from service.dashboard.curves import CEILING, FLOOR, error_of
from service.dashboard.pages import report_context
from service.dashboard.routes import TEMPLATES
from service.ingest.checkpoint import read_checkpoint
from service.store.db import DONE, JobRow
from tests.clients import models
from tests.mnist import load_mnist, split

pytestmark = pytest.mark.real


class Elements(HTMLParser):
    """Attributes of every tr/td/svg/polyline/p with data-* or points, and each td's text."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str], list[str]]] = []
        self.td: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("tr", "td", "svg", "polyline", "p") and (
            any(k.startswith("data-") for k in a) or "points" in a
        ):
            text: list[str] = []
            self.found.append((tag, a, text))
            if tag == "td":
                self.td = text

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self.td = None

    def handle_data(self, data: str) -> None:
        if self.td is not None:
            self.td.append(data)


@pytest.fixture(scope="module")
def made(realdata: Path) -> tuple[Report, PruningPlan]:
    net = models.digit_cnn()
    net.load_state_dict(torch.load(realdata / "digit_cnn.pth", weights_only=True))
    net.eval()
    x, _ = load_mnist(realdata)
    calib, _ = split(len(x))
    stats = capture_activations(net, [x[calib[:256]]], maps=False).stats()
    manifest = build_manifest(net, torch.zeros(1, 1, 28, 28))
    parsed = read_checkpoint(realdata / "digit_cnn.pth")
    report = analyze(parsed.layers, checkpoint=parsed.info, methods=["mrp"], manifest=manifest)
    report = with_functional(report, functional_figures(parsed.layers, manifest, stats))
    plan = plan_layers(
        parsed.layers, method="mrp", target=Target(flops=0.5), manifest=manifest,
        params_total=parsed.info.n_params, stats=stats,
    )  # fmt: skip
    return report, plan


def _page(report: Report, plan: PruningPlan | None) -> list[tuple[str, dict[str, str], str]]:
    now = time.time()
    row = JobRow(
        id="0" * 32, owner="alice", checkpoint_id="1" * 64, request_json='{"methods": ["mrp"]}',
        status=DONE, progress=1.0, report_json=report.to_json(),
        plan_json=plan.to_json() if plan else None, cache_hits=0, cache_misses=0,
        created_at=now, updated_at=now,
    )  # fmt: skip
    context = {"base": "", "user": None, "auth": False, **report_context(row, "")}
    parser = Elements()
    parser.feed(TEMPLATES.get_template("_report.html").render(context))
    return [(tag, a, "".join(text).strip()) for tag, a, text in parser.found]


def test_report_page_shows_functional_redundancy_and_curves(
    made: tuple[Report, PruningPlan],
) -> None:
    report, _ = made
    elements = _page(report, None)
    figures = {layer.name: layer for layer in report.layers if layer.functional is not None}
    assert figures
    rows = {a["data-layer"]: a for tag, a, _ in elements if tag == "tr" and "data-functional" in a}
    assert set(rows) == set(figures)
    cells = [(a, text) for tag, a, text in elements if a.get("data-role") == "functional"]
    assert len(cells) == len(figures)
    for a, text in cells:
        assert float(a["data-value"]) in {f.functional.redundancy for f in figures.values()}  # type: ignore[union-attr]
        assert text == f"{float(a['data-value']):.4f}"
    curves = [a for tag, a, _ in elements if tag == "svg" and "data-y-min" in a]
    lines = [a["points"] for tag, a, _ in elements if tag == "polyline"]
    assert len(curves) == len(lines) == len(figures)
    for svg, points in zip(curves, lines, strict=True):
        layer = figures[svg["data-layer"]]
        f = layer.functional
        assert f is not None and float(rows[layer.name]["data-functional"]) == f.redundancy
        pairs = [tuple(map(float, p.split(","))) for p in points.split()]
        assert len(pairs) == int(svg["data-count"]) == len(f.errors)
        lo, hi = float(svg["data-y-min"]), float(svg["data-y-max"])
        assert lo == FLOOR and (max(f.errors) <= hi or hi == CEILING)
        xs = [x for x, _ in pairs]
        assert xs == sorted(xs) and len(set(xs)) == len(xs)  # one point per channel removed
        for (_, y), e in zip(pairs, f.errors, strict=True):
            shown = error_of(y, lo, hi)
            if lo < e < hi:
                assert shown == pytest.approx(e, rel=2e-2)
            else:  # drawn at the axis' end
                assert shown == pytest.approx(lo if e <= lo else hi, rel=2e-2)
    # a report without statistics has no functional section
    plain = report.model_copy(
        update={"layers": [la.model_copy(update={"functional": None}) for la in report.layers]}
    )
    assert not any(tag == "svg" and "data-y-min" in a for tag, a, _ in _page(plain, None))


def test_plan_view_shows_predicted_error_per_group(made: tuple[Report, PruningPlan]) -> None:
    report, plan = made
    assert plan.compensation is not None
    elements = _page(report, plan)
    shown = {a["data-value"] for tag, a, _ in elements if a.get("data-role") == "predicted-error"}
    expected = {
        str(g.predicted_error) if g.predicted_error is not None else "" for g in plan.groups
    }
    assert shown == expected
    errors = [(a, t) for tag, a, t in elements if a.get("data-role") == "predicted-error"]
    assert len(errors) == len(plan.groups)
    for a, text in errors:
        assert text == ("—" if a["data-value"] == "" else f"{float(a['data-value']):.3g}")
    functional = [
        a["data-value"] for _, a, _ in elements if a.get("data-role") == "plan-functional"
    ]
    assert functional == [
        "" if g.functional_redundancy is None else str(g.functional_redundancy) for g in plan.groups
    ]
    comp = next(a for tag, a, _ in elements if a.get("data-role") == "compensation")
    assert comp["data-sha256"] == plan.compensation.sidecar_sha256
    assert int(comp["data-folds"]) == len(plan.compensation.folds)
    # an uncompensated plan shows no predicted error column
    bare = plan.model_copy(
        update={
            "compensation": None,
            "groups": [g.model_copy(update={"predicted_error": None}) for g in plan.groups],
        }
    )
    assert not any(a.get("data-role") == "predicted-error" for _, a, _ in _page(report, bare))


def test_cross_fitted_figures_are_labelled_so(made: tuple[Report, PruningPlan]) -> None:
    from graphs.report import CROSSFIT_NOTE

    report, _ = made
    label = [a for tag, a, _ in _page(report, None) if a.get("data-role") == "crossfit"]
    assert report.notes == [] and label == []  # in-sample: no label
    crossed = report.model_copy(update={"notes": [CROSSFIT_NOTE]})
    label = [a for tag, a, _ in _page(crossed, None) if a.get("data-role") == "crossfit"]
    assert len(label) == 1

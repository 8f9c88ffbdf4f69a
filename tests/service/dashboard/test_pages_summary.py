"""The dashboard's model summary shows the report's own model figures (no browser needed): the
report page and the compare page are rendered from the real digit CNN and the same network with
every conv widened 2× by duplicated filters (tests/prunegraph/test_check_bloat.py), with a
manifest, and every number shown is the report's."""

from __future__ import annotations

import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from graphs import Report
from graphs.analyze import analyze
from service.dashboard.pages import compare, report_context
from service.dashboard.routes import TEMPLATES
from service.ingest.checkpoint import read_checkpoint
from service.store.db import DONE, JobRow
from tests.prunegraph.test_check_bloat import model_of, widen


class Cells(HTMLParser):
    """Every element with a data-* attribute: (tag, its data-* attributes, its text)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str], list[str]]] = []
        self.open: list[tuple[str, dict[str, str], list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        data = {k[5:]: v or "" for k, v in attrs if k.startswith("data-")}
        if tag in ("td", "tr", "span") and data:
            entry: tuple[str, dict[str, str], list[str]] = (tag, data, [])
            self.found.append(entry)
            self.open.append(entry)
        elif tag in ("td", "tr", "span"):
            self.open.append((tag, {}, []))

    def handle_endtag(self, tag: str) -> None:
        if self.open and self.open[-1][0] == tag:
            self.open.pop()

    def handle_data(self, data: str) -> None:
        for _, _, text in self.open:
            text.append(data)


def _cells(html: str) -> list[tuple[str, dict[str, str], str]]:
    parser = Cells()
    parser.feed(html)
    return [(tag, data, "".join(text).strip()) for tag, data, text in parser.found]


def _page(report: Report, template: str = "_report.html") -> str:
    now = time.time()
    row = JobRow(
        id="0" * 32, owner="alice", checkpoint_id="1" * 64, request_json='{"methods": ["mrp"]}',
        status=DONE, progress=1.0, report_json=report.to_json(), plan_json=None,
        cache_hits=0, cache_misses=0, created_at=now, updated_at=now,
    )  # fmt: skip
    context = {"base": "", "user": None, "auth": False, **report_context(row, "")}
    return TEMPLATES.get_template(template).render(context)


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, realdata: Path) -> dict[str, Report]:
    from clients import build_manifest

    root = tmp_path_factory.mktemp("summary")
    sd = torch.load(realdata / "digit_cnn.pth", weights_only=True)
    out = {}
    for name, state in (("original", sd), ("wide", widen(sd))):
        path = root / f"{name}.pt"
        torch.save(state, path)
        manifest = build_manifest(model_of(state), torch.zeros(1, 1, 28, 28))
        parsed = read_checkpoint(path)
        out[name] = analyze(
            parsed.layers, checkpoint=parsed.info, skipped=parsed.skipped,
            methods=["mrp", "hsc", "l1"], manifest=manifest,
        )  # fmt: skip
    return out


@pytest.mark.real
def test_summary_shows_the_reports_removable_fractions(reports: dict[str, Report]) -> None:
    report = reports["wide"]
    cells = _cells(_page(report))
    rows = {d["method"]: d for tag, d, _ in cells if tag == "tr" and "method" in d}
    assert set(rows) == {"mrp", "hsc", "l1"}
    shown, method = {}, ""
    for tag, d, text in cells:  # each cell with the method of the row it is in
        method = d.get("method", method) if tag == "tr" else method
        if tag == "td" and "role" in d:
            shown[(method, d["role"])] = text
    for m, row in rows.items():
        ms = report.summary.methods[m]
        if ms.removable is None:  # l1: importance scores only
            assert m == "l1" and row["removable-params"] == row["removable-flops"] == ""
            continue
        assert float(row["removable-params"]) == ms.removable.params
        assert ms.removable.flops is not None
        assert float(row["removable-flops"]) == ms.removable.flops
        assert float(row["params-weighted"]) == ms.redundancy_params_weighted
    mrp = report.summary.methods["mrp"].removable
    assert mrp is not None and mrp.params > 0.3 and mrp.flops is not None and mrp.flops > 0.3
    for m in ("mrp", "hsc"):  # as shown to the reader: the report's numbers at four digits
        rm = report.summary.methods[m].removable
        assert rm is not None and rm.flops is not None
        assert shown[(m, "removable-params")] == f"{rm.params:.4f}"
        assert shown[(m, "removable-flops")] == f"{rm.flops:.4f}"
    largest = [d for tag, d, _ in cells if tag == "span" and d.get("role") == "largest"]
    assert [d["layer"] for d in largest[:3]] == [r.name for r in mrp.largest[:3]]
    assert {r.name for r in mrp.largest[:3]} == {"conv_layers.0", "conv_layers.3", "conv_layers.6"}
    assert [float(d["value"]) for d in largest[:3]] == [r.flops for r in mrp.largest[:3]]


@pytest.mark.real
def test_compare_shows_the_growth_of_the_removable_fraction(reports: dict[str, Report]) -> None:
    a, b = reports["original"], reports["wide"]
    cmp = compare(a, b)
    got = {(m, fig, of): (va, vb, d) for m, fig, of, va, vb, d in cmp.summary}
    for m in ("mrp", "hsc"):
        ra, rb = a.summary.methods[m].removable, b.summary.methods[m].removable
        assert ra is not None and rb is not None
        assert got[(m, "removable", "params")] == (ra.params, rb.params, rb.params - ra.params)
        assert got[(m, "removable", "flops")][2] == pytest.approx((rb.flops or 0) - (ra.flops or 0))
        assert got[(m, "weighted", "params")][1] == b.summary.methods[m].redundancy_params_weighted


@pytest.mark.real
def test_an_older_report_without_the_figure_still_renders(reports: dict[str, Report]) -> None:
    report = reports["wide"]
    methods = {
        m: ms.model_copy(update={"removable": None}) for m, ms in report.summary.methods.items()
    }
    old = report.model_copy(
        update={
            "schema_version": "1.0",
            "summary": report.summary.model_copy(update={"methods": methods}),
        }
    )
    html = _page(old)
    assert "not in this report" in html
    rows = [d for tag, d, _ in _cells(html) if tag == "tr" and "method" in d]
    assert all(d["removable-params"] == "" for d in rows)

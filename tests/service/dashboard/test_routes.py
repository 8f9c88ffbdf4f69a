"""The redundancy dashboard in a real headless browser (Debian's chromium driven by Playwright).

A real ``prunegraph serve`` process with tokens analyses the real digit CNN (all methods, its
manifest, a 50 % FLOPs plan), a second "epoch" of it (32 filters of one conv replaced by noisy
copies of others, the last layer gone), a job that fails, and MobileNetV2 while a page watches it.
What the pages draw is compared with the report and plan JSON fetched from the API: every
``data-*`` value on the SVG elements must equal the report's exact value. Screenshots go to
``test-artifacts/``.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest

from graphs.layout import spring_layout
from service.dashboard.charts import community_colours
from tests.server_process import Server
from tests.service.dashboard.site import (
    ALICE,
    BOB,
    RED,
    api_get,
    bearer,
    browser_test,
    data_attributes,
    screenshot,
    session_id,
    submit,
    upload,
    wait_done,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


def test_layout_is_seeded_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    edges = rng.integers(0, 60, size=(120, 2))
    edges = edges[edges[:, 0] != edges[:, 1]]
    weights = rng.random(len(edges)) + 0.1
    a = spring_layout(60, edges, weights, seed=3)
    assert a.shape == (60, 2) and a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, spring_layout(60, edges, weights, seed=3))
    assert not np.array_equal(a, spring_layout(60, edges, weights, seed=4))
    pair = spring_layout(10, np.array([[0, 1]]), seed=0)  # joined vertices end up close
    d = np.linalg.norm(pair[:, None] - pair[None], axis=-1)
    assert d[0, 1] < np.median(d[np.triu_indices(10, 1)])
    assert spring_layout(1, np.zeros((0, 2))).tolist() == [[0.5, 0.5]]


def test_community_colours() -> None:
    colours = community_colours([0, 1, 1, 2, 2, 2, 3, -1])
    assert colours[1] != colours[2] and colours[0] == colours[3] and colours[-1] != colours[0]


@browser_test
def test_login_flow(browser: Browser, server: Server, jobs: dict[str, str]) -> None:
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"{server.url}/jobs/{jobs['a']}")  # no token: to the login form, and back
        assert page.url == f"{server.url}/login?next=/jobs/{jobs['a']}"
        page.fill("input[name=token]", "not-a-token")
        page.click("form.login button")
        assert "/login" in page.url
        assert "not known" in page.inner_text("[data-role=login-error]")
        assert not context.cookies()
        screenshot(page, "login-error")
        page.fill("input[name=token]", ALICE)
        page.click("form.login button")
        assert page.url == f"{server.url}/jobs/{jobs['a']}"
        (cookie,) = context.cookies()
        assert cookie["name"] == "prunegraph_session" and ALICE not in cookie["value"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # invisible to scripts
        page.goto(f"{server.url}/")
        assert page.locator("#jobs tr[data-job]").count() >= 3
        page.click("header.top button")  # log out
        assert page.url == f"{server.url}/login"
        assert not context.cookies()
        page.goto(f"{server.url}/compare")
        assert page.url.startswith(f"{server.url}/login?next=")
    finally:
        context.close()
    # a page asked for with a bearer header needs no cookie; a bad one is sent to the login
    r = httpx.get(f"{server.url}/", headers=bearer(BOB))
    assert r.status_code == 200 and jobs["a"] not in r.text  # bob sees none of alice's jobs
    r = httpx.get(f"{server.url}/", cookies={"prunegraph_session": "nope"})
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/"


@browser_test
def test_list_page(page: Page, server: Server, jobs: dict[str, str]) -> None:
    page.goto(f"{server.url}/")
    rows = {d["job"]: d for d in data_attributes(page, "#jobs tr[data-job]")}
    assert set(jobs.values()) <= set(rows)
    for name, job_id in jobs.items():
        status = page.inner_text(f'#jobs tr[data-job="{job_id}"] [data-role=status]')
        assert status == ("failed" if name == "failed" else "done")
    assert page.locator("#checkpoints tr[data-checkpoint]").count() >= 2
    screenshot(page, "list")


@browser_test
def test_report_page_matches_the_report_and_plan(
    page: Page, server: Server, jobs: dict[str, str]
) -> None:
    report = api_get(server, f"/v1/jobs/{jobs['a']}/report")
    plan = api_get(server, f"/v1/jobs/{jobs['a']}/plan")
    page.goto(f"{server.url}/jobs/{jobs['a']}")
    bars = data_attributes(page, "#redundancy-chart rect.bar")
    drawn = {(d["layer"], d["method"]): float(d["value"]) for d in bars}
    expected = {
        (layer["name"], m): layer["methods"][m]["redundancy"]
        for layer in report["layers"]
        for m in RED
    }
    assert len(bars) == len(expected) == 3 * len(report["layers"])
    assert drawn == expected
    summary = report["summary"]
    assert summary["flops"] is not None  # the manifest gives FLOPs
    assert int(page.get_attribute("[data-role=flops]", "data-value") or 0) == summary["flops"]
    for row in data_attributes(page, "#method-summary tr[data-method]"):
        ms = summary["methods"][row["method"]]
        if ms["redundancy_params_weighted"] is None:
            assert row["paramsWeighted"] == row["flopsWeighted"] == row["removableParams"] == ""
        else:
            assert float(row["paramsWeighted"]) == ms["redundancy_params_weighted"]
            assert float(row["flopsWeighted"]) == ms["redundancy_flops_weighted"]
            assert float(row["removableParams"]) == ms["removable"]["params"]
            assert float(row["removableFlops"]) == ms["removable"]["flops"]  # a manifest
    section = data_attributes(page, "#plan")[0]
    assert section["targetKind"] == "flops" and float(section["target"]) == plan["target"]["flops"]
    assert float(section["achievedFlops"]) == plan["achieved"]["flops"]
    widths = {
        (d["role"], d["layer"]): (int(d["before"]), int(d["after"]))
        for d in data_attributes(page, "#plan-chart rect.bar")
    }
    for g in plan["groups"]:
        for role in ("before", "after"):
            assert widths[(role, g["name"])] == (g["channels_before"], g["channels_after"])
    assert len(widths) == 2 * len(plan["groups"])
    screenshot(page, "report")


@browser_test
def test_layer_graph_page(page: Page, server: Server, jobs: dict[str, str]) -> None:
    layer = "conv_layers.6"
    report = api_get(server, f"/v1/jobs/{jobs['b']}/report")
    entry = next(x for x in report["layers"] if x["name"] == layer)
    communities, clusters = (
        entry["methods"]["mrp"]["communities"],
        entry["methods"]["hsc"]["clusters"],
    )
    assert entry["methods"]["mrp"]["redundancy"] > 0.2  # the planted copies
    page.goto(f"{server.url}/jobs/{jobs['b']}")
    page.click(f'#redundancy-chart a[data-layer="{layer}"]')
    page.wait_for_url("**/layer?name=*")
    nodes = page.eval_on_selector_all(
        "#layer-graph circle",
        "els => els.map(e => [+e.dataset.index, +e.dataset.community, +e.dataset.cluster, "
        "e.getAttribute('fill')])",
    )
    assert len(nodes) == entry["n_filters"] == 128
    assert [n[0] for n in nodes] == list(range(128))
    assert [n[1] for n in nodes] == communities
    assert [n[2] for n in nodes] == clusters
    fill_of: dict[int, str] = {}
    for _, c, _, fill in nodes:
        assert fill_of.setdefault(c, fill) == fill  # one colour per community
    sizes = Counter(communities)
    multi = [c for c in sizes if sizes[c] > 1]
    assert len(multi) >= 16 and len({fill_of[c] for c in multi}) == len(multi)
    assert len({fill_of[c] for c in sizes if sizes[c] == 1}) == 1  # singletons share the grey
    n_edges = int(page.get_attribute("#layer-graph", "data-n-edges") or -1)
    assert (
        page.locator("#layer-graph line").count() == n_edges == entry["methods"]["mrp"]["n_edges"]
    )
    hsc_sizes = Counter(clusters)
    shown = {
        int(d["cluster"]): int(d["size"])
        for d in data_attributes(page, "#cluster-sizes tr[data-cluster]")
    }
    assert shown == {c: s for c, s in hsc_sizes.items() if s > 1 and c >= 0}
    singles = int(page.get_attribute("[data-role=singletons]", "data-value") or -1)
    assert singles == sum(1 for c, s in hsc_sizes.items() if s == 1 and c >= 0)
    screenshot(page, "layer-graph")
    # the same graph as JSON, fetched by the page with its cookie
    graph = page.evaluate(
        "url => fetch(url).then(r => r.json())",
        f"/v1/jobs/{jobs['b']}/layers/{layer}/graph",
    )
    assert [n["community"] for n in graph["nodes"]] == communities
    assert graph["note"] is None and len(graph["edges"]) == graph["n_edges"] == n_edges
    assert graph == api_get(server, f"/v1/jobs/{jobs['b']}/layers/{layer}/graph")


@browser_test
def test_compare_page(page: Page, server: Server, jobs: dict[str, str]) -> None:
    ra = api_get(server, f"/v1/jobs/{jobs['a']}/report")
    rb = api_get(server, f"/v1/jobs/{jobs['b']}/report")
    page.goto(f"{server.url}/")
    page.select_option("form.compare-form select[name=a]", jobs["a"])
    page.select_option("form.compare-form select[name=b]", jobs["b"])
    page.click("form.compare-form button")
    page.wait_for_url("**/compare?*")
    in_a = {x["name"]: x for x in ra["layers"]}
    in_b = {x["name"]: x for x in rb["layers"]}
    expected = {
        (name, m): in_b[name]["methods"][m]["redundancy"] - in_a[name]["methods"][m]["redundancy"]
        for name in in_a
        if name in in_b
        for m in RED
    }
    drawn = {
        (d["layer"], d["method"]): float(d["delta"])
        for d in data_attributes(page, "#delta-chart rect.bar")
    }
    assert drawn == expected and len(drawn) == 3 * 4
    assert drawn[("conv_layers.6", "mrp")] > 0.2
    only = {(d["only"], d["layer"]) for d in data_attributes(page, "[data-only]")}
    assert only == {("a", "fc_layers.2")}
    for row in data_attributes(page, "#compare-summary tr[data-method]"):
        sa, sb = (r["summary"]["methods"][row["method"]] for r in (ra, rb))
        if row["figure"] == "removable":
            a, b = sa["removable"][row["weight"]], sb["removable"][row["weight"]]
        else:
            a = sa[f"redundancy_{row['weight']}_weighted"]
            b = sb[f"redundancy_{row['weight']}_weighted"]
        assert row["delta"] == "" if a is None or b is None else float(row["delta"]) == b - a
    screenshot(page, "compare")


@browser_test
def test_failed_unknown_and_others_jobs(page: Page, server: Server, jobs: dict[str, str]) -> None:
    page.goto(f"{server.url}/jobs/{jobs['failed']}")
    assert page.get_attribute("[data-job-status]", "data-job-status") == "failed"
    assert "manifest" in page.inner_text("[data-role=error]")
    assert page.locator("#redundancy-chart").count() == 0
    screenshot(page, "failed")
    page.goto(f"{server.url}/jobs/{jobs['failed']}/layer?name=conv_layers.0")
    assert "failed" in page.inner_text("[data-role=error]")
    response = page.goto(f"{server.url}/jobs/{'0' * 32}")
    assert response is not None and response.status == 404
    response = page.goto(f"{server.url}/jobs/{jobs['a']}/layer?name=no.such.layer")
    assert response is not None and response.status == 404
    bob = {"prunegraph_session": session_id(server, BOB)}
    for path in (f"/jobs/{jobs['a']}", f"/jobs/{jobs['a']}/layer?name=conv_layers.0",
                 f"/compare?a={jobs['a']}&b={jobs['b']}", f"/jobs/{jobs['a']}/part"):  # fmt: skip
        r = httpx.get(f"{server.url}{path}", cookies=bob)
        assert r.status_code == 404 and "conv_layers" not in r.text, path
    r = httpx.get(f"{server.url}/v1/jobs/{jobs['a']}/layers/conv_layers.0/graph", cookies=bob)
    assert r.status_code == 404 and r.json()["error"].startswith("job ")


@browser_test
def test_running_job_updates_without_reload(
    page: Page, server: Server, jobs: dict[str, str], realdata: Path
) -> None:
    ckpt = upload(server, (realdata / "mobilenet_v2_imagenet.pth").read_bytes(), "mnv2.pth")
    job_id = submit(server, checkpoint_id=ckpt, target={"params": 0.3})
    page.goto(f"{server.url}/jobs/{job_id}")
    assert page.get_attribute("[data-job-status]", "data-job-status") in ("queued", "running")
    page.evaluate(
        """() => {
        window.__pgMarker = "same document";
        window.__pgSeen = [];
        const record = () => {
          const bar = document.querySelector("[data-role=progress]");
          if (bar) window.__pgSeen.push(bar.value);
        };
        new MutationObserver(record).observe(document.getElementById("report-part"),
          {subtree: true, childList: true, attributes: true, characterData: true});
        }"""
    )
    screenshot(page, "running")
    page.wait_for_selector('[data-job-status="done"]', timeout=60_000)
    assert page.evaluate("window.__pgMarker") == "same document"  # no navigation happened
    seen = page.evaluate("window.__pgSeen")  # progress values the page showed meanwhile
    assert any(0 < v < 1 for v in seen) and seen[-1] == 1.0
    report = api_get(server, f"/v1/jobs/{job_id}/report")
    bars = data_attributes(page, "#redundancy-chart rect.bar")
    assert len(bars) == 3 * len(report["layers"]) > 90
    assert page.locator("#plan-chart").count() == 1
    screenshot(page, "done-live")
    # the widest layer is drawn capped, with a note
    wide = max(report["layers"], key=lambda x: x["n_filters"])
    graph = api_get(server, f"/v1/jobs/{job_id}/layers/{wide['name']}/graph")
    assert graph["n_filters"] == wide["n_filters"] > 400
    assert len(graph["nodes"]) == 400 and "400 of" in graph["note"]
    page.goto(f"{server.url}/jobs/{job_id}/layer?name={wide['name']}")
    assert page.locator("#layer-graph circle").count() == 400
    assert page.inner_text("[data-role=note]") == graph["note"]
    screenshot(page, "layer-capped")


@browser_test
def test_names_are_escaped(page: Page, server: Server) -> None:
    """Layer names come from the checkpoint's keys: markup in them is shown as text, never run."""
    import torch

    evil = '<img src=x onerror="window.__xss=1">'
    sd = {f"{evil}.weight": torch.randn(16, 8, 3, 3), "fc&<b>'q'</b>.weight": torch.randn(10, 16)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    ckpt = upload(server, buf.getvalue(), "evil.pt")
    job_id = submit(server, checkpoint_id=ckpt, methods=["mrp", "hsc"])
    assert wait_done(server, job_id)["status"] == "done"
    response = page.goto(f"{server.url}/jobs/{job_id}")
    assert (
        response is not None and "script-src 'self'" in response.headers["content-security-policy"]
    )
    labels = page.eval_on_selector_all(
        "#redundancy-chart text.label", "els => els.map(e => e.textContent)"
    )
    assert labels == [evil, "fc&<b>'q'</b>"]
    assert page.locator("img").count() == 0 and page.locator("main b").count() == 0
    page.click("#redundancy-chart a.layer-link >> nth=0")
    page.wait_for_url("**/layer?name=*")
    assert page.inner_text("h1 code") == evil
    assert page.locator("#layer-graph circle").count() == 16
    assert page.evaluate("window.__xss") is None


@pytest.mark.slow
def test_pages_without_auth(tmp_path: Path) -> None:
    """With auth off every page is the anonymous user's; /login and /logout just go home."""
    from fastapi.testclient import TestClient

    from service.main import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(data_dir=tmp_path, workers=1))) as c:
        home = c.get("/")
        assert home.status_code == 200 and "No jobs yet" in home.text
        assert "Log out" not in home.text
        assert home.headers["content-security-policy"].startswith("default-src 'self'")
        assert c.get("/login", follow_redirects=False).headers["location"] == "/"
        assert c.post("/logout", follow_redirects=False).headers["location"] == "/"
        assert c.get("/docs").status_code == 200  # public, like the API, without tokens
        assert "/v1/jobs" in c.get("/openapi.json").json()["paths"]
        missing = c.get(f"/jobs/{'0' * 32}")
        assert missing.status_code == 404 and "not found" in missing.text
        assert c.get("/compare").status_code == 200
        js = c.get("/static/dashboard.js")
        assert js.status_code == 200 and "data-poll-url" in js.text
        assert c.get("/static/dashboard.css").status_code == 200

"""The MNIST compensation harness's allocation studies (``benchmarks.quality_compensation``):
the cross-fitted allocations' held-out part, the decision rule against a baseline, and a smoke
run of ``--allocations functional functional-xfit`` on the real digit CNN (the harness, not the
numbers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import quality_compensation as qc
from benchmarks.quality_allocation import decide
from benchmarks.support.paths import BENCHMARKS


def _rows(accs: dict[str, list[float]]) -> list[dict[str, object]]:
    cells = [(m, t, k) for m in ("a", "b") for t in (0.5, 0.7) for k in ("mrp", "l1")]
    return [
        {"model": m, "target": t, "method": k, "allocation": alloc, "acc_before_ft": acc[i]}
        for alloc, acc in accs.items()
        for i, (m, t, k) in enumerate(cells)
    ]


def test_decide_against_functional() -> None:
    base = [0.90, 0.80, 0.70, 0.60, 0.95, 0.85, 0.75, 0.65]
    better = [a + 0.02 for a in base]
    one_bad = [*better[:-1], base[-1] - 0.011]  # higher mean, one cell 1.1 pt worse
    verdict = decide(
        _rows({"functional": base, "functional-xfit": better, "marginal-xfit": one_bad}),
        "functional",
    )
    assert verdict["cells"] == 8
    assert verdict["qualified"] == ["functional-xfit"]
    assert verdict["chosen"] == "functional-xfit"
    assert verdict["per_allocation"]["marginal-xfit"]["cells_worse_by_more_than_1pt"] == 1
    assert (
        verdict["per_allocation"]["marginal-xfit"]["mean"]
        > verdict["per_allocation"]["functional"]["mean"]
    )
    # exactly one point worse is allowed; the higher mean of two qualified wins
    edge = [*[a + 0.03 for a in base[:-1]], base[-1] - 0.01]
    two = decide(_rows({"functional": base, "functional-xfit": better, "marginal-xfit": edge}),
                 "functional")  # fmt: skip
    assert sorted(two["qualified"]) == ["functional-xfit", "marginal-xfit"]
    assert two["chosen"] == "marginal-xfit"
    # a tie of the two best keeps the baseline; nothing better keeps it too
    tie = decide(_rows({"functional": base, "functional-xfit": better, "marginal-xfit": better}),
                 "functional")  # fmt: skip
    assert tie["chosen"] == "functional"
    worse = [a - 0.001 for a in base]
    assert (
        decide(_rows({"functional": base, "marginal-xfit": worse}), "functional")["chosen"]
        == "functional"
    )
    # the first study's call is unchanged: against uniform, and no baseline rows → no verdict
    assert decide(_rows({"uniform": base, "functional": better}))["chosen"] == "functional"
    assert decide(_rows({"functional": base, "marginal-xfit": better}))["chosen"] is None


def test_holdout_is_the_odd_batches() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU(),
        nn.Conv2d(4, 3, 1),
    ).eval()  # fmt: skip
    calib = torch.randn(4 * qc.CALIB_BATCH, 1, 8, 8)
    stats, none = qc.capture_stats(net, calib, holdout=False)
    assert none is None
    again, part = qc.capture_stats(net, calib, holdout=True)
    assert part is not None and set(part) == set(stats) and stats
    even, _ = qc.capture_stats(net, torch.cat([calib[:64], calib[128:192]]), holdout=False)
    odd, _ = qc.capture_stats(net, torch.cat([calib[64:128], calib[192:]]), holdout=False)
    for name, s in stats.items():
        np.testing.assert_array_equal(again[name], s)  # all the data, as without held-out part
        np.testing.assert_allclose(part[name], odd[name], rtol=1e-6)
        np.testing.assert_allclose(part[name] + even[name], s, rtol=1e-5, atol=1e-6)
        assert part[name][-1, -1] == 2 * qc.CALIB_BATCH * s[-1, -1] / calib.shape[0]
        assert not np.allclose(part[name], even[name])


def test_xfit_rule_is_the_preregistered_one() -> None:
    text = (BENCHMARKS / "fidelity" / "mnist" / "allocation-xfit.md").read_text()
    assert " ".join(qc.XFIT_DECISION_RULE.split()) in " ".join(text.split())
    assert qc.study(["functional", "marginal-xfit"])["baseline"] == "functional"
    assert qc.study(["uniform", "functional", "marginal"])["stem"] == "allocation"


@pytest.mark.real
def test_xfit_smoke(realdata: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    qc.main(["--models", "digit_cnn", "--targets", "0.5", "--methods", "l1",
             "--allocations", "functional", "functional-xfit", "--eval-split", "val",
             "--variants", "comp", "--no-tp", "--out-dir", str(out),
             "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    assert not (out / "allocation.json").exists()
    doc = json.loads((out / "allocation-xfit-results.json").read_text())
    assert doc["decision_rule"] == qc.XFIT_DECISION_RULE
    rows = doc["rows"]
    assert [r["allocation"] for r in rows] == ["functional", "functional-xfit"]
    plain, xfit = rows
    assert "cross-fitted error curves" in xfit["rule"]
    assert "cross-fitted" not in plain["rule"]
    for r in rows:
        assert r["eval_split"] == "val" and r["variant"] == "comp"
        assert abs(r["flops_reduction"] - 0.5) < 0.05, r["flops_reduction"]
        for key in ("acc_before_ft", "acc_bn_recal", "acc_unpruned_eval"):
            assert 0.0 <= r[key] <= 1.0
    assert doc["verdict"]["chosen"] in ("functional", "functional-xfit")
    md = (out / "allocation-xfit-results.md").read_text()
    assert "| functional (BN re-est.) | functional-xfit (BN re-est.) |" in md
    assert re.search(r"- functional-xfit: mean [\d.]+ % over 1 cells \(vs functional", md)


def test_first_study_page_unchanged() -> None:
    """The uniform study's verdict and page, regenerated from its stored rows, are what was
    committed (the hand-written notes follow the generated part)."""
    from benchmarks.quality_allocation import allocation_markdown

    folder = BENCHMARKS / "fidelity" / "mnist"
    doc = json.loads((folder / "allocation.json").read_text())
    verdict = decide([r for r in doc["rows"] if r["variant"] == "comp"])
    assert verdict == doc["verdict"]
    page = allocation_markdown(doc["rows"], doc["meta"], qc.DECISION_RULE, verdict)
    assert (folder / "allocation.md").read_text().startswith(page + "\n")

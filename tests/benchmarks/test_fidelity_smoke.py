"""The zero-shot fidelity benchmark (benchmarks.fidelity) in its quick mode, in-process: the
real MobileNetV2 pruned 10 % by l1 and mrp, compared with the unpruned model on 16 natural
images; checks the structure of the results and the written plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.fidelity import run_fidelity


@pytest.mark.slow
@pytest.mark.real
def test_quick_fidelity(realdata: Path, tmp_path: Path) -> None:
    pytest.importorskip("skimage", reason="scikit-image is not installed (dev extras)")
    threads = torch.get_num_threads()
    result = run_fidelity(quick=True, seeds=[0], out_dir=tmp_path, realdata=realdata)
    assert torch.get_num_threads() == threads  # restored
    json.dumps(result)  # JSON-able

    assert result["config"]["targets"] == [0.1]
    assert result["config"]["methods"] == ["l1", "mrp"]
    assert result["config"]["bn_recalibration"] is False
    assert result["images"]["n_eval"] == 16 and result["images"]["n_calib"] == 16
    assert not set(result["images"]["eval_sources"]) & set(result["images"]["calib_sources"])

    rows = result["rows"]
    assert [(r["method"], r["target"], r["seed"]) for r in rows] == [
        ("l1", 0.1, 0),
        ("mrp", 0.1, 0),
    ]
    for r in rows:
        assert abs(r["flops_reduction"] - 0.1) <= 0.02, r
        assert 0 < r["params_reduction"] < 1
        assert 0 <= r["agreement"] <= 1 and r["kl"] >= 0 and math.isfinite(r["kl"])
        lo, hi = r["agreement_ci95"]
        assert 0 <= lo <= hi <= 1
        assert r["plan_s"] >= 0
        assert "agreement_bn" not in r  # quick mode: no BN re-estimation

    assert {(e["method"], e["target"]) for e in result["summary"]} == {("l1", 0.1), ("mrp", 0.1)}
    md = result["markdown"]
    assert "| method | 10 % FLOPs |" in md and "| mrp |" in md and "| l1 |" in md
    assert [Path(p) for p in result["plots"]] == [tmp_path / "fidelity.png"]
    assert (tmp_path / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.real
def test_quick_compensated_fidelity(realdata: Path, tmp_path: Path) -> None:
    """The compensated path in quick mode: statistics from the calibration inputs only, the
    same channels removed with and without the folds, FLOPs counted without the fold biases."""
    pytest.importorskip("skimage", reason="scikit-image is not installed (dev extras)")
    from benchmarks.fidelity_compensation import run

    threads = torch.get_num_threads()
    result = run(quick=True, out_dir=tmp_path, realdata=realdata)
    assert torch.get_num_threads() == threads
    json.dumps(result)

    assert result["config"]["targets"] == [0.1] and result["config"]["methods"] == ["l1"]
    assert not set(result["images"]["eval_sources"]) & set(result["images"]["calib_sources"])
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"weights", "stats", "comp"}
    assert rows["weights"]["folds"] == 0 and rows["stats"]["folds"] == rows["comp"]["folds"] > 0
    # the fold changes weights only: same channels, same structural FLOPs
    assert rows["stats"]["channels_removed"] == rows["comp"]["channels_removed"]
    assert rows["stats"]["flops_reduction"] == rows["comp"]["flops_reduction"]
    assert rows["comp"]["flops_reduction_with_bias"] <= rows["comp"]["flops_reduction"]
    for r in rows.values():
        assert abs(r["flops_reduction"] - 0.1) <= 0.02, r
        assert 0 <= r["agreement"] <= 1 and math.isfinite(r["kl"]) and r["kl"] >= 0
    assert rows["comp"]["predicted_error_sum"] > 0
    assert "| l1 · comp |" in result["markdown"]


def test_compensation_report_goals() -> None:
    """The goal lines read the headline row and Torch-Pruning's at the same target."""
    from benchmarks.fidelity_compensation_report import markdown

    base = {"kl": 0.1, "flops_reduction": 0.1, "params_reduction": 0.05, "plan_s": 1.0,
            "seed": 0, "agreement_ci95": [0.0, 1.0]}  # fmt: skip
    rows = [
        {**base, "target": 0.1, "method": "mrp", "variant": "comp", "allocation": "uniform",
         "label": "mrp · comp", "agreement": 0.8},
        {**base, "target": 0.1, "method": "tp_magnitude", "variant": "weights",
         "allocation": "global", "label": "tp_magnitude", "agreement": 0.3},
    ]  # fmt: skip
    md = markdown(rows)
    assert "80.0 % vs goal ≥ 75 %: met" in md
    assert "ratio 2.7× (goal ≥ 3×: NOT met)" in md
    rows[1]["agreement"] = 0.2
    assert "ratio 4.0× (goal ≥ 3×: met)" in markdown(rows)

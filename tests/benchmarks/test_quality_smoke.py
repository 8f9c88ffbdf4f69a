"""Smoke test of the plan-quality benchmark: ``python -m benchmarks.quality --quick`` runs end to
end and writes its JSON, markdown and plot (the harness, not the numbers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.real
def test_quality_quick(realdata: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PRUNEGRAPH_REALDATA": str(realdata)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.quality",
            "--quick",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    result = json.loads((out / "quality.json").read_text())
    assert result["config"]["quick"] is True
    assert result["errors"] == []
    rows = result["rows"]
    assert {r["method"] for r in rows} == set(result["config"]["methods"])
    for r in rows:
        for key in ("flops_reduction", "params_reduction", "acc_before_ft", "acc_after_ft"):
            assert 0.0 <= r[key] <= 1.0, (r["method"], key, r[key])
        assert r["plan_s"] >= 0
    assert {w["metric"] for w in result["winners"]} >= {"acc_after_ft", "acc_before_ft"}
    assert result["fidelity"]["status"] in ("run",) or result["fidelity"]["status"].startswith(
        "fidelity: not run"
    )

    md = (out / "quality.md").read_text()
    assert "| method | kind | FLOPs red. %" in md
    assert "best redundancy-aware" in md
    for name in result["plots"]:
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["plots"], "no plot written"

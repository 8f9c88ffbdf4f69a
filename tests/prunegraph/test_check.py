"""`prunegraph check`: the CI gate's exit codes on real and planted bloated checkpoints, JUnit
XML, baselines, per-layer patterns and the pyproject.toml section."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import torch
from typer.testing import CliRunner

from prunegraph.cli import app
from tests.clients import models

runner = CliRunner()


def _run(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, ["check", *args])
    return res.exit_code, res.stdout, res.stderr


def _widen(sd: dict[str, torch.Tensor], layer: str, nxt: str, seed: int) -> None:
    """Duplicate every output filter of ``layer`` (tiny noise) and halve the matching inputs of
    ``nxt``: the function is unchanged, the layer twice as wide — bloat by duplication."""
    g = torch.Generator().manual_seed(seed)
    w = sd[f"{layer}.weight"]
    sd[f"{layer}.weight"] = torch.cat([w, w + 1e-3 * w.std() * torch.randn(w.shape, generator=g)])
    sd[f"{layer}.bias"] = torch.cat([sd[f"{layer}.bias"], sd[f"{layer}.bias"]])
    v = sd[f"{nxt}.weight"] / 2
    sd[f"{nxt}.weight"] = torch.cat([v, v], dim=1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, realdata: Path) -> tuple[Path, Path]:
    """The real digit CNN and the same network bloated by duplicated filters."""
    root = tmp_path_factory.mktemp("check")
    sd = torch.load(realdata / "digit_cnn.pth", weights_only=True)
    original = root / "digit_cnn.pt"
    torch.save(sd, original)
    bloated = dict(sd)
    _widen(bloated, "conv_layers.3", "conv_layers.6", seed=0)
    _widen(bloated, "fc_layers.0", "fc_layers.2", seed=1)
    path = root / "bloated.pt"
    torch.save(bloated, path)
    return original, path


@pytest.mark.real
def test_bloated_fails_and_original_passes(ckpts: tuple[Path, Path], tmp_path: Path) -> None:
    original, bloated = ckpts
    code, out, err = _run(str(original), "--max-redundancy", "0.2")
    assert code == 0, out + err
    assert "passed" in out
    code, out, err = _run(str(bloated), "--max-redundancy", "0.2")
    assert code == 1, out + err
    assert "exceeds by" in out and "fc_layers.0" in out  # names the worst layer and by how much
    # per-layer limits by pattern; the last matching pattern wins
    args = ["--layer-max", "conv_layers.*=0.3", "--layer-max", "conv_layers.3=0.6"]
    code, out, _ = _run(str(bloated), *args)
    assert code == 0, out
    code, out, _ = _run(str(bloated), "--layer-max", "conv_layers.*=0.3", "--json")
    result = json.loads(out)
    assert code == 1 and not result["passed"]
    failed = [c["name"] for c in result["checks"] if not c["passed"]]
    assert failed == ["layer conv_layers.3"]


@pytest.mark.real
def test_junit_xml_and_baseline_growth(ckpts: tuple[Path, Path], tmp_path: Path) -> None:
    original, bloated = ckpts
    base = tmp_path / "base.json"
    res = runner.invoke(app, ["analyze", str(original), "--methods", "mrp", "-o", str(base)])
    assert res.exit_code == 0, res.stderr
    junit = tmp_path / "junit.xml"
    args = ["--baseline", str(base), "--max-growth", "0.05", "--max-redundancy", "0.2"]
    code, out, _ = _run(str(bloated), *args, "--junit", str(junit))
    assert code == 1 and "growth" in out
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    cases = suites[0].findall("testcase")
    failures = [c for c in cases if c.find("failure") is not None]
    assert suites[0].get("tests") == str(len(cases)) == root.get("tests")
    assert suites[0].get("failures") == str(len(failures)) == "2"
    assert all(c.get("name") and c.get("classname") for c in cases)
    assert all(f.find("failure").get("message") for f in failures)  # type: ignore[union-attr]
    code, out, _ = _run(str(original), *args)  # the same checkpoint: no growth
    assert code == 0, out
    code, out, _ = _run(str(base), "--max-redundancy", "0.2")  # a report is checked as it is
    assert code == 0, out


@pytest.mark.real
def test_real_mobilenet(realdata: Path) -> None:
    ckpt = str(realdata / "mobilenet_v2_imagenet.pth")
    code, out, _ = _run(ckpt, "--max-redundancy", "0.3")
    assert code == 0, out
    code, out, _ = _run(ckpt, "--max-redundancy", "0.3", "--max-layer-redundancy", "0.02")
    assert code == 1 and "features." in out


@pytest.mark.real
def test_pyproject_section(
    ckpts: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, bloated = ckpts
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.prunegraph.check]\nmax-redundancy = 0.2\n'
        'layer-max = { "fc_layers.*" = 0.9 }\n'
    )
    sub = tmp_path / "src"
    sub.mkdir()
    monkeypatch.chdir(sub)  # found from the working directory upwards
    assert _run(str(original))[0] == 0
    code, out, _ = _run(str(bloated))
    assert code == 1 and "fc_layers.0" in out
    assert _run(str(bloated), "--max-redundancy", "0.9", "--layer-max", "fc_*=1")[0] == 0
    (tmp_path / "pyproject.toml").write_text("[tool.prunegraph.check]\nmax_redundancy = 'x'\n")
    code, _, err = _run(str(original))
    assert code == 2 and "tool.prunegraph.check" in err


def test_usage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no pyproject.toml here
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    torch.save(models.digit_cnn().state_dict(), ckpt)
    cases = [
        ([str(ckpt)], "no threshold"),
        ([str(ckpt), "--max-redundancy", "0.3", "--method", "l1"], "'mrp', 'srr' or 'hsc'"),
        ([str(ckpt), "--max-growth", "0.1"], "--baseline"),
        ([str(ckpt), "--layer-max", "conv"], "PATTERN=VALUE"),
        ([str(ckpt), "--max-redundancy", "1.5"], "less than or equal"),
        ([str(tmp_path / "missing.pt"), "--max-redundancy", "0.3"], "not found"),
    ]
    for args, text in cases:
        code, _, err = _run(*args)
        assert code == 2 and text in err, (args, err)
    (tmp_path / "bad.json").write_text('{"not": "a report"}')
    code, _, err = _run(str(tmp_path / "bad.json"), "--max-redundancy", "0.3")
    assert code == 2 and "not a prunegraph report" in err

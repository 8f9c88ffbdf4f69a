"""The CI gate fails a bloated model: the real digit CNN with every conv widened 2× by noisy
duplicated filters (the consumers' inputs halved over each pair, so the function is unchanged)
passes a 0.3 limit on the old params-weighted mean of layer redundancy, and fails the model's
removable fraction (graphs.removable), naming the widened layers; the original passes. The
figure is checked against a model built with the kept widths (its parameters and MACs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from prunegraph.cli import app
from tests.mnist import load_mnist

runner = CliRunner()
CONVS = ["conv_layers.0", "conv_layers.3", "conv_layers.6"]
NEXT = {"conv_layers.0": "conv_layers.3", "conv_layers.3": "conv_layers.6",
        "conv_layers.6": "fc_layers.0"}  # fmt: skip


class DigitNet(nn.Module):
    """The digit CNN's architecture (tests/clients/models.py) with any widths."""

    def __init__(self, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        c0, c1, c2, f0 = widths
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, c0, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c0, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc_layers = nn.Sequential(nn.Linear(c2 * 9, f0), nn.ReLU(), nn.Linear(f0, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(torch.flatten(self.conv_layers(x), 1))


def widen(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every conv 2× wide: its filters and biases duplicated with noise 1e-3 × the weights'
    std, and the next layer's inputs for each channel and its copy halved (a linear after the
    flatten has 3×3 inputs per channel)."""
    out = dict(sd)
    g = torch.Generator().manual_seed(seed)
    for conv in CONVS:
        w, nxt = out[f"{conv}.weight"], NEXT[conv]
        noise = 1e-3 * w.std() * torch.randn(w.shape, generator=g)
        out[f"{conv}.weight"] = torch.cat([w, w + noise])
        out[f"{conv}.bias"] = torch.cat([out[f"{conv}.bias"], out[f"{conv}.bias"]])
        v = out[f"{nxt}.weight"]
        per = v.reshape(v.shape[0], w.shape[0], -1) / 2  # (out, channels, entries per channel)
        out[f"{nxt}.weight"] = torch.cat([per, per], dim=1).reshape(v.shape[0], 2 * v.shape[1],
                                                                     *v.shape[2:])  # fmt: skip
    return out


def widths(sd: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    c0, c1, c2, f0 = (sd[f"{n}.weight"].shape[0] for n in [*CONVS, "fc_layers.0"])
    return c0, c1, c2, f0


def model_of(sd: dict[str, torch.Tensor]) -> DigitNet:
    model = DigitNet(widths(sd))
    model.load_state_dict(sd)
    return model.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, realdata: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bloat")
    sd = torch.load(realdata / "digit_cnn.pth", weights_only=True)
    wide = widen(sd)
    paths = {"original": root / "digit_cnn.pt", "wide": root / "wide.pt"}
    torch.save(sd, paths["original"])
    torch.save(wide, paths["wide"])
    from clients import build_manifest

    man = build_manifest(model_of(wide), torch.zeros(1, 1, 28, 28))
    paths["manifest"] = root / "wide.manifest.json"
    paths["manifest"].write_text(man.model_dump_json())
    return paths


@pytest.mark.real
def test_widening_keeps_the_function(realdata: Path) -> None:
    sd = torch.load(realdata / "digit_cnn.pth", weights_only=True)
    x, y = load_mnist(realdata)
    x, y = x[:1000], y[:1000]  # 100 digits of each class
    with torch.no_grad():
        before, after = model_of(sd)(x), model_of(widen(sd))(x)
    c0, c1, c2, f0 = widths(sd)
    assert widths(widen(sd)) == (2 * c0, 2 * c1, 2 * c2, f0)  # fc_layers.0 keeps its width
    scale = before.abs().max()
    assert torch.allclose(after, before, atol=float(2e-3 * scale), rtol=0)
    assert (after.argmax(1) == before.argmax(1)).all()
    assert (before.argmax(1) == y).float().mean() > 0.9  # the real trained network


def _check(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["check", *args])
    return res.exit_code, res.stdout + res.stderr


def _report(path: Path, *args: str) -> Any:
    res = runner.invoke(app, ["analyze", str(path), "--methods", "mrp", "--json", *args])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.real
def test_gate_fails_the_widened_model_and_passes_the_original(ckpts: dict[str, Path]) -> None:
    code, out = _check(str(ckpts["original"]), "--max-redundancy", "0.3")
    assert code == 0, out
    code, out = _check(str(ckpts["wide"]), "--max-redundancy", "0.3")
    assert code == 1, out
    assert "exceeds by" in out and "of the model's parameters" in out
    assert all(conv in out for conv in CONVS), out  # the widened layers are named
    assert "fc_layers.2" not in out
    # the old figure, the params-weighted mean of layer redundancy, is diluted by fc_layers.0
    summary = _report(ckpts["wide"])["summary"]["methods"]["mrp"]
    assert summary["redundancy_params_weighted"] < 0.3 < summary["removable"]["params"]
    # per-layer limits still apply to each layer's own redundancy (0.5 for a widened conv)
    code, out = _check(str(ckpts["wide"]), "--layer-max", "conv_layers.*=0.6", "--json")
    assert code == 0, out
    code, out = _check(str(ckpts["wide"]), "--max-layer-redundancy", "0.4", "--json")
    failed = [c["name"] for c in json.loads(out)["checks"] if not c["passed"]]
    assert code == 1 and failed == [f"layer {conv}" for conv in CONVS]


@pytest.mark.real
def test_removable_fraction_is_what_a_narrower_model_saves(ckpts: dict[str, Path]) -> None:
    """The channels the report calls redundant, removed: a DigitNet of the kept widths has
    exactly the parameters (and, with a manifest, the MACs) the figure leaves."""
    from clients import build_manifest

    for extra in ([], ["--manifest", str(ckpts["manifest"])]):
        report = _report(ckpts["wide"], *extra)
        removal = report["summary"]["methods"]["mrp"]["removable"]
        kept = [
            layer["n_filters"] - round(layer["methods"]["mrp"]["redundancy"] * layer["n_filters"])
            for layer in report["layers"][:4]  # the fifth, fc_layers.2, is the output
        ]
        narrow = DigitNet((kept[0], kept[1], kept[2], kept[3]))
        total = report["checkpoint"]["n_params"]
        assert removal["params_removed"] == total - sum(p.numel() for p in narrow.parameters())
        assert removal["exact"] == bool(extra)
        if extra:
            x = torch.zeros(1, 1, 28, 28)
            wide_macs = build_manifest(model_of(torch.load(ckpts["wide"])), x).macs_total
            narrow_macs = build_manifest(narrow.eval(), x).macs_total
            assert report["summary"]["flops"] == wide_macs
            # the manifest scales a module's MACs by kept_out/out · kept_in/in, its bias MACs
            # (one per output) included, which scale with kept_out alone: off by < 0.1 %
            assert removal["flops_removed"] == pytest.approx(wide_macs - narrow_macs, rel=1e-3)
            assert removal["flops"] > 0.3
            code, out = _check(str(ckpts["wide"]), "--max-redundancy", "0.3", *extra)
            assert code == 1 and "of the model's FLOPs" in out, out
        else:
            assert removal["flops"] is None


@pytest.mark.real
def test_reports_before_the_removable_fraction(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """A schema 1.0 report has no removable fraction: model-level limits ask for a new analysis
    (exit 2); per-layer limits still check it."""
    report = _report(ckpts["wide"])
    report["schema_version"] = "1.0"
    for summary in report["summary"]["methods"].values():
        del summary["removable"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(report))
    code, out = _check(str(old), "--max-redundancy", "0.3")
    assert code == 2 and "predates" in out and "Analyse the checkpoint again" in out, out
    code, out = _check(str(ckpts["wide"]), "--baseline", str(old), "--max-growth", "0.1")
    assert code == 2 and "predates" in out, out
    code, out = _check(str(old), "--max-layer-redundancy", "0.4", "--json")
    result = json.loads(out)
    assert code == 1 and result["redundancy"] is None
    assert [c["name"] for c in result["checks"] if not c["passed"]] == [
        f"layer {conv}" for conv in CONVS
    ]


@pytest.mark.real
def test_growth_since_a_baseline_compares_like_with_like(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    """The widened model against the original: the growth of the removable fraction, of
    parameters when only one of the two reports knows FLOPs."""
    wide = _report(ckpts["wide"], "--manifest", str(ckpts["manifest"]))
    original = _report(ckpts["original"])
    base = tmp_path / "base.json"  # a report: checked as it is (the manifest is the wide one's)
    base.write_text(json.dumps(original))
    extra = ["--manifest", str(ckpts["manifest"]), "--baseline", str(base)]
    code, out = _check(str(ckpts["wide"]), *extra, "--max-growth", "0.05", "--json")
    assert code == 1, out
    (growth,) = [c for c in json.loads(out)["checks"] if c["name"].startswith("growth")]
    removable = [r["summary"]["methods"]["mrp"]["removable"] for r in (wide, original)]
    assert removable[0]["flops"] is not None and removable[1]["flops"] is None
    assert growth["value"] == pytest.approx(removable[0]["params"] - removable[1]["params"])

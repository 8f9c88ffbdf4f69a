"""The engine on real trained checkpoints from ../shared/realdata/fetch.sh (marked `real`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from graphs import analyze, hsc, mrp, srr
from prunegraph.cli import app
from service.ingest.checkpoint import read_checkpoint

pytestmark = pytest.mark.real

FILES = ["mobilenet_v2_imagenet.pth", "digit_cnn.pth", "mtcnn_pnet.pt", "mtcnn_rnet.pt",
         "mtcnn_onet.pt"]  # fmt: skip


def _weight_layers(path: Path) -> set[str]:
    import torch

    sd = torch.load(path, weights_only=True, map_location="cpu")
    return {k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim >= 2}


@pytest.mark.parametrize("name", FILES)
def test_every_conv_and_linear_layer_is_reported(realdata: Path, name: str) -> None:
    path = realdata / name
    parsed = read_checkpoint(path)
    report = analyze(parsed.layers, checkpoint=parsed.info, skipped=parsed.skipped)
    seen = {m for layer in report.layers for m in layer.members} | {s.name for s in report.skipped}
    assert _weight_layers(path) <= seen
    for layer in report.layers:
        for res in layer.methods.values():
            assert res.redundancy is None or 0.0 <= res.redundancy <= 1.0


def test_mobilenet_depthwise_is_never_scored_alone(realdata: Path) -> None:
    parsed = read_checkpoint(realdata / "mobilenet_v2_imagenet.pth")
    report = analyze(parsed.layers, checkpoint=parsed.info, methods=["mrp", "l1"])
    depthwise = {layer.name for layer in parsed.layers if layer.is_depthwise}
    assert len(depthwise) == 17
    heads = {layer.name for layer in report.layers}
    assert not depthwise & heads
    grouped = {m for layer in report.layers for m in layer.members[1:]}
    assert depthwise == grouped
    by_name = {layer.name: layer for layer in report.layers}
    # the expansion conv of block 2 carries its depthwise conv: 16 + 9 values per channel
    block2 = by_name["features.2.conv.0.0"]
    assert block2.members == ["features.2.conv.0.0", "features.2.conv.1.0"]
    assert block2.fan_in == 16 + 9 and block2.coupling == "inferred"


def test_reports_are_deterministic_through_the_cli(realdata: Path) -> None:
    runner = CliRunner()
    path = str(realdata / "mobilenet_v2_imagenet.pth")
    a = runner.invoke(app, ["analyze", path, "--json", "--seed", "1"])
    b = runner.invoke(app, ["analyze", path, "--json", "--seed", "1"])
    assert a.exit_code == 0, a.stderr
    assert a.stdout == b.stdout
    assert json.loads(a.stdout)["summary"]["n_layers"] == 36  # 52 convs + fc − 17 depthwise


@pytest.mark.parametrize("method", ["mrp", "srr", "hsc"])
def test_planting_duplicates_in_a_real_layer_raises_redundancy_by_their_share(
    realdata: Path, method: str
) -> None:
    """Calibration on real weights: replace 32 of the 128 filters of the digit CNN's last conv
    by noisy copies of 32 others; the redundancy rises by about 32/128."""
    parsed = read_checkpoint(realdata / "digit_cnn.pth")
    X = next(layer for layer in parsed.layers if layer.name == "conv_layers.6").filters()
    rng = np.random.default_rng(0)
    src, dst = rng.choice(128, size=(2, 32), replace=False)
    Y = X.copy()
    Y[dst] = X[src] * rng.uniform(0.5, 2, (32, 1)) + 0.01 * X.std() * rng.standard_normal(
        (32, X.shape[1])
    )
    fn = {"mrp": lambda A: mrp(A, seed=0), "srr": srr, "hsc": lambda A: hsc(A, seed=0)}[method]
    base, planted = fn(X).redundancy, fn(Y).redundancy
    assert planted - base == pytest.approx(32 / 128, abs=0.05), (base, planted)

"""read_checkpoint on the real checkpoints (service.ingest.checkpoint), and its sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from service.ingest.checkpoint import (
    read_checkpoint,
)
from tests.service.ingest.helpers import by_name, save

Tensors = dict[str, torch.Tensor]


def test_sha256_is_streamed_over_large_files(tmp_path: Path) -> None:
    sd = {"big.weight": torch.randn(600, 1000), "fc.weight": torch.randn(3, 600)}
    path = save(tmp_path, sd)
    assert path.stat().st_size > 2 * 2**20
    a, b = read_checkpoint(path).info, read_checkpoint(path).info
    assert a.sha256 == b.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------- real checkpoints


REAL_FILES = [
    "mobilenet_v2_imagenet.pth",
    "digit_cnn.pth",
    "mtcnn_pnet.pt",
    "mtcnn_rnet.pt",
    "mtcnn_onet.pt",
]


@pytest.mark.real
@pytest.mark.parametrize("name", REAL_FILES)
def test_real_every_weight_is_a_layer_or_skipped(realdata: Path, name: str) -> None:
    path = realdata / name
    sd = torch.load(path, weights_only=True, map_location="cpu")
    weights = {k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim >= 2}
    parsed = read_checkpoint(path)
    names = [x.name for x in parsed.layers]
    assert weights == set(names) | {s.name for s in parsed.skipped}
    assert names == [k for k in (k[: -len(".weight")] for k in sd) if k in set(names)]
    for layer in parsed.layers:
        np.testing.assert_array_equal(layer.weight, sd[layer.name + ".weight"].numpy())
    info = parsed.info
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.sha256 == read_checkpoint(path).info.sha256
    assert info.n_tensors == len(sd)


@pytest.mark.real
def test_real_mobilenet_v2(realdata: Path) -> None:
    parsed = read_checkpoint(realdata / "mobilenet_v2_imagenet.pth")
    convs = [x for x in parsed.layers if x.kind == "conv2d"]
    assert len(parsed.layers) == 53 and len(convs) == 52 and parsed.skipped == ()
    inferred = [x for x in parsed.layers if x.groups_source == "inferred"]
    assert len(inferred) == 17
    assert all(x.is_depthwise and x.groups == x.n_filters > 1 for x in inferred)
    assert all(x.groups == 1 for x in parsed.layers if x.groups_source != "inferred")
    assert all(x.bn is not None and x.extra_params == 2 * x.n_filters for x in convs)
    assert parsed.layers[-1].name == "classifier.1" and parsed.layers[-1].bn is None
    assert parsed.layers[0].bn == "features.0.1"
    assert parsed.info.n_params == 3_504_872  # torchvision's MobileNetV2 parameter count


@pytest.mark.real
def test_real_digit_cnn_first_conv_is_not_depthwise(realdata: Path) -> None:
    parsed = read_checkpoint(realdata / "digit_cnn.pth")
    assert [x.name for x in parsed.layers] == [
        "conv_layers.0",
        "conv_layers.3",
        "conv_layers.6",
        "fc_layers.0",
        "fc_layers.2",
    ]
    first = parsed.layers[0]
    assert first.shape == (32, 1, 3, 3) and first.groups == 1 and not first.is_depthwise
    assert all(x.groups_source == "default" and x.bias is not None for x in parsed.layers)


@pytest.mark.real
def test_real_mtcnn(realdata: Path) -> None:
    pnet = by_name(read_checkpoint(realdata / "mtcnn_pnet.pt"))
    assert list(pnet) == ["conv1", "conv2", "conv3", "conv4_1", "conv4_2"]
    assert pnet["conv4_1"].n_filters == 2
    onet = read_checkpoint(realdata / "mtcnn_onet.pt")
    assert [x.kind for x in onet.layers].count("linear") == 4
    assert all(x.groups == 1 for x in onet.layers)

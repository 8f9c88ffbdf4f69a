"""capture_activations: post-activation maps at the right place, bounded, seeded, saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from clients.activations import capture_activations
from graphs.contracts.activations import FORMAT
from tests.clients import models


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1)


class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock layout: in-place ReLU module used twice, `out += identity`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = TorchvisionBlock()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(torch.relu(self.stem(x))).mean(dim=(2, 3)))


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_inplace_residual_block_is_captured_after_the_add() -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    _randomize_bn(model)
    x = torch.randn(5, 3, 6, 6)
    acts = capture_activations(model, [x], max_pixels=1000)
    model.eval()
    with torch.no_grad():
        s = torch.relu(model.stem(x))
        b = model.block
        r1 = torch.relu(b.bn1(b.conv1(s)))
        out = b(s)
    torch.testing.assert_close(acts["stem"], _flat(s))  # functional relu: the tensor a module reads
    torch.testing.assert_close(acts["block.conv1"], _flat(r1))  # in-place ReLU module followed
    torch.testing.assert_close(acts["block.conv2"], _flat(out))  # after the add and its ReLU
    assert acts["fc"].shape == (1, 4, 5)  # linear: one sample over the 5 inputs


def test_cifar_resnet_and_mobilenet_residuals() -> None:
    torch.manual_seed(1)
    net = models.resnet56("A")
    _randomize_bn(net)
    x = torch.randn(3, 3, 32, 32)
    acts = capture_activations(net, [x], layers=["layer1.0.conv2", "layer2.0.conv1"])
    assert set(acts.layers) == {"layer1.0.conv2", "layer2.0.conv1"}
    net.eval()
    with torch.no_grad():
        stem = torch.relu(net.bn1(net.conv1(x)))
        block0 = net.layer1[0](stem)
    idx = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0))[:256].sort().values
    torch.testing.assert_close(acts["layer1.0.conv2"], _flat(block0)[:, :, idx])
    mobile = models.mobilenet_v2()
    _randomize_bn(mobile)
    y = torch.randn(2, 3, 64, 64)
    acts = capture_activations(mobile, [y], layers=["features.3.conv.2", "features.2.conv.2"])
    mobile.eval()
    with torch.no_grad():
        out2 = mobile.features[:3](y)
        out3 = mobile.features[3](out2)  # a residual block: x + conv(x)
    torch.testing.assert_close(acts["features.3.conv.2"], _flat(out3))  # after the add
    torch.testing.assert_close(acts["features.2.conv.2"], _flat(out2))  # no residual: BN output


def test_bounded_seeded_and_the_model_untouched() -> None:
    torch.manual_seed(2)
    model = models.digit_cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(16, 1, 28, 28), torch.zeros(16)) for _ in range(4)]
    a = capture_activations(model, batches, max_samples=40, max_pixels=50, seed=3)
    b = capture_activations(model, batches, max_samples=40, max_pixels=50, seed=3)
    c = capture_activations(model, batches, max_samples=40, max_pixels=50, seed=4)
    first = a.layers["conv_layers.0"]
    assert a.tensors[first].shape == (40, 32, 50)  # 16 + 16 + 8 samples, 50 of 784 pixels
    assert a["fc_layers.0"].shape == (1, 256, 40)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not torch.equal(a.tensors[first], c.tensors[first])
    assert model.training  # restored
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats not updated


def test_save_writes_safetensors_with_metadata(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = models.digit_cnn()
    acts = capture_activations(model, [torch.randn(4, 1, 28, 28)], max_pixels=64)
    path = acts.save(tmp_path / "acts.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == FORMAT
        layers = json.loads(meta["layers"])
        assert layers == acts.layers
        assert json.loads(meta["shapes"])[layers["conv_layers.0"]] == [32, 28, 28]
        assert torch.equal(f.get_tensor(layers["conv_layers.3"]), acts["conv_layers.3"])


def test_bad_calls() -> None:
    model = models.digit_cnn()
    with pytest.raises(ValueError, match="not Conv/Linear"):
        capture_activations(model, [torch.randn(1, 1, 28, 28)], layers=["conv_layers.1"])
    with pytest.raises(ValueError, match="no calibration batch"):
        capture_activations(model, [])
    with pytest.raises(TypeError, match="tensor or an"):
        capture_activations(model, ["not a tensor"])
    with pytest.raises(ValueError, match="at least 1"):
        capture_activations(model, [torch.randn(1, 1, 28, 28)], max_samples=0)

"""ONNX test models with symbolic (dynamic) dims, their export, reference MACs and checks
(tests of service.ingest.onnx_shapes and of jobs with an input shape).

The models are plain torch, exported with the TorchScript exporter (``dynamo=False``: the default
exporter of torch 2.9+ needs onnxscript, which the project does not install) with
``dynamic_axes``, with constant folding on and off. FLOPs are checked against MACs counted by
forward hooks on the torch model itself (conv/linear: weight size × output positions; GRU: the
sizes of its weight_ih/weight_hh × (sequence × batch) positions), per sample.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from typer.testing import CliRunner

from graphs.recurrent import parse
from prunegraph.cli import app
from service.ingest.checkpoint import ParsedCheckpoint

runner = CliRunner()


class ConvNet(nn.Module):
    """Conv-BN-ReLU, a strided conv, a depthwise conv, global pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        h = torch.relu(self.dw(h)) + h
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class ViewNet(nn.Module):
    """``x.view(x.size(0), -1)`` before the classifier: a Reshape whose target is computed by
    Shape/Gather/Concat nodes (with a dynamic batch, shape inference alone cannot tell it)."""

    def __init__(self, flatten: bool = False) -> None:
        super().__init__()
        self.flatten = flatten
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        h = torch.flatten(h, 1) if self.flatten else h.view(h.size(0), -1)
        return self.fc2(torch.relu(self.fc1(h)))


class CRNN(nn.Module):
    """Conv features over a text line of any width, a bidirectional GRU over the columns and a
    per-column classifier (the shape of an OCR model)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.gru = nn.GRU(16 * 2, 12, bidirectional=True)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), (4, 1))  # (b, 16, 2, w/2)
        b, c, hh, w = h.shape
        seq = h.reshape(b, c * hh, w).permute(2, 0, 1)  # (w/2, b, 32)
        out, _ = self.gru(seq)
        return self.fc(out)


# name -> (model factory, dynamic axes of x, example shape for the export, other valid shapes)
MODELS: dict[str, tuple[Callable[[], nn.Module], dict[int, str], tuple[int, ...]]] = {
    "convnet": (ConvNet, {0: "batch", 2: "height", 3: "width"}, (1, 3, 16, 16)),
    "view": (ViewNet, {0: "batch"}, (1, 3, 8, 8)),
    "flatten": (lambda: ViewNet(flatten=True), {0: "batch"}, (1, 3, 8, 8)),
    "crnn": (CRNN, {0: "batch", 3: "width"}, (1, 1, 16, 32)),
}
OTHER_SHAPE = {"convnet": (2, 3, 24, 40), "view": (3, 3, 8, 8), "flatten": (2, 3, 8, 8),
               "crnn": (2, 1, 16, 64)}  # fmt: skip


def model_of(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.get_buffer("running_mean"), -0.5, 0.5)
                nn.init.uniform_(m.get_buffer("running_var"), 0.5, 2.0)
    return model


def export(name: str, folding: bool, path: Path) -> Path:
    _, axes, shape = MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model_of(name),
            (torch.randn(*shape),),
            str(path),
            dynamo=False,  # the TorchScript exporter: works offline, no onnxscript needed
            do_constant_folding=folding,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": axes},
        )
    return path


def reference_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """MACs per sample of the weights of every conv, linear and GRU, counted by forward hooks."""
    total = [0]

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if isinstance(module, nn.Conv2d):
            positions = out.shape[0] * math.prod(out.shape[2:])
        elif isinstance(module, nn.Linear):
            positions = out.numel() // out.shape[-1]
        else:  # nn.GRU, sequence first: (T, B, features)
            positions = args[0].shape[0] * args[0].shape[1]
            weights = [p for n, p in module.named_parameters() if n.startswith("weight")]
            total[0] += sum(p.numel() for p in weights) * positions
            return
        total[0] += module.weight.numel() * positions

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.GRU))
    ]
    with torch.no_grad():
        model(torch.zeros(*shape))
    for h in handles:
        h.remove()
    assert total[0] % shape[0] == 0
    return total[0] // shape[0]


def run_cli(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def shape_arg(shape: tuple[int, ...]) -> str:
    return ",".join(map(str, shape))


def assert_every_weight_accounted_for(path: Path, parsed: ParsedCheckpoint) -> None:
    """Every float matrix/kernel of the file is a layer's weight (as is, or transposed), or is
    skipped with a reason under its name, and every weight node of the graph is a layer; the
    weights of recurrent nodes are checked against the torch model (test_recurrent_nodes...)."""
    model = onnx.load(str(path))
    layers = [layer.weight for layer in parsed.layers]
    skipped = {s.name: s.reason for s in parsed.skipped}
    recurrent = {
        i for n in model.graph.node if n.op_type in ("GRU", "LSTM", "RNN") for i in n.input
    }
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind != "f" or arr.ndim < 2 or init.name in recurrent:
            continue
        as_layer = any(
            (w.shape == arr.shape and np.array_equal(w, arr))
            or (arr.ndim == 2 and w.shape == arr.T.shape and np.array_equal(w, arr.T))
            for w in layers
        )
        name = init.name.removesuffix(".weight")
        assert as_layer or skipped.get(name), f"{init.name} is neither a layer nor skipped"
    n_weight_nodes = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node)
    assert (
        len(plain_layers(parsed)) == n_weight_nodes
    )  # every conv/linear of these models is a layer


def plain_layers(parsed: ParsedCheckpoint) -> list[str]:
    """The checkpoint's layers that are not recurrent matrices."""
    return [la.name for la in parsed.layers if parse(la.name) is None]

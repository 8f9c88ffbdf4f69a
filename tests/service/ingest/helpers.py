"""What the ingestion tests share: a small net with BN and a depthwise conv, saving, lookups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from graphs.errors import (
    CheckpointError,
)
from graphs.layers import LayerWeights
from service.ingest.checkpoint import (
    ParsedCheckpoint,
)

Tensors = dict[str, torch.Tensor]


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),  # 0
        nn.BatchNorm2d(8),  # 1
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, bias=False),  # 3: depthwise
        nn.BatchNorm2d(8),  # 4
        nn.Conv2d(8, 16, 1),  # 5
        nn.Flatten(),
        nn.Linear(16, 4),  # 7
    )


def state_dict() -> Tensors:
    return dict(small_net().state_dict())


def save(tmp_path: Path, obj: object, name: str = "ckpt.pt", **kw: object) -> Path:
    path = tmp_path / name
    torch.save(obj, path, **kw)  # type: ignore[arg-type]
    return path


def by_name(parsed: ParsedCheckpoint) -> dict[str, LayerWeights]:
    return {layer.name: layer for layer in parsed.layers}


def skip_reasons(parsed: ParsedCheckpoint) -> dict[str, str]:
    return {s.name: s.reason for s in parsed.skipped}


def message(excinfo: pytest.ExceptionInfo[CheckpointError]) -> str:
    return excinfo.value.message


# ------------------------------------------------------------------------------------ ONNX


def onnx_initializer(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def onnx_model(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    w = {
        "features.0.0.weight": rng.standard_normal((8, 3, 3, 3)),
        "features.0.0.bias": rng.standard_normal(8),
        "features.0.1.weight": rng.random(8) + 0.5,
        "features.0.1.bias": rng.standard_normal(8),
        "features.0.1.running_mean": rng.standard_normal(8),
        "features.0.1.running_var": rng.random(8) + 0.5,
        "gray.weight": rng.standard_normal((8, 1, 3, 3)),
        "dw": rng.standard_normal((8, 1, 3, 3)),
        "onnx::Conv_7": rng.standard_normal((16, 8, 1, 1)),
        "fc1.weight": rng.standard_normal((4, 16)),  # Gemm transB=1: (out, in)
        "fc1.bias": rng.standard_normal(4),
        "fc2.weight": rng.standard_normal((4, 6)),  # Gemm transB=0: (in, out)
        "proj": rng.standard_normal((6, 5)),  # MatMul: (in, out)
        "proj_bias": rng.standard_normal(5),
        "tok.weight": rng.standard_normal((10, 4)),
    }
    dw_const = helper.make_node(
        "Constant", [], ["dw_out"], name="dw_const", value=onnx_initializer("dw_value", w["dw"])
    )
    nodes = [
        helper.make_node(
            "Conv", ["x", "features.0.0.weight", "features.0.0.bias"], ["c0"], name="/c0"
        ),
        helper.make_node(
            "BatchNormalization",
            [
                "c0",
                *(f"features.0.1.{k}" for k in ("weight", "bias", "running_mean", "running_var")),
            ],
            ["b0"],
            name="/bn0",
        ),
        helper.make_node("Conv", ["g", "gray.weight"], ["gc"], name="/gray", group=1),
        dw_const,
        helper.make_node("Conv", ["b0", "dw_out"], ["d0"], name="dw_conv", group=8),
        helper.make_node("Conv", ["d0", "onnx::Conv_7"], ["p0"], name="/pw/Conv"),
        helper.make_node("GlobalAveragePool", ["p0"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["f0"]),
        helper.make_node("Gemm", ["f0", "fc1.weight", "fc1.bias"], ["h1"], name="/fc1", transB=1),
        helper.make_node("Gemm", ["h1", "fc2.weight"], ["h2"], name="/fc2/Gemm"),
        helper.make_node("MatMul", ["h2", "proj"], ["h3"], name="/proj/MatMul"),
        helper.make_node("Add", ["h3", "proj_bias"], ["y"]),
        helper.make_node("Gather", ["tok.weight", "ids"], ["emb"]),
    ]
    inits = [onnx_initializer(k, v) for k, v in w.items() if k != "dw"]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [1, 1, 8, 8]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5]),
            helper.make_tensor_value_info("gc", TensorProto.FLOAT, [1, 8, 6, 6]),
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, [2, 4]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path, w

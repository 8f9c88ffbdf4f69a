"""Reading ONNX models (service.ingest.onnx_file): layers, groups, recurrent nodes, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphs.errors import (
    CheckpointError,
)
from service.ingest.checkpoint import (
    read_checkpoint,
)
from tests.service.ingest.helpers import (
    by_name,
    message,
    onnx_initializer,
    onnx_model,
    skip_reasons,
)

Tensors = dict[str, torch.Tensor]


def test_onnx_layers_orientation_names_and_groups(tmp_path: Path) -> None:
    path, w = onnx_model(tmp_path)
    parsed = read_checkpoint(path)
    layers = by_name(parsed)
    assert list(layers) == [
        "features.0.0",
        "gray",
        "dw_conv",
        "/pw/Conv",
        "fc1",
        "fc2",
        "/proj/MatMul",
    ]
    c0, gray, dw, pw = (layers[n] for n in ["features.0.0", "gray", "dw_conv", "/pw/Conv"])
    assert (c0.groups, c0.groups_source, c0.bn, c0.extra_params) == (1, "onnx", "features.0.1", 16)
    assert c0.bias is not None
    np.testing.assert_allclose(c0.bias, w["features.0.0.bias"], rtol=1e-6)
    # ONNX says group=1 although a (8, 1, 3, 3) conv after 8 outputs would be inferred depthwise
    assert (gray.groups, gray.groups_source) == (1, "onnx")
    assert (dw.groups, dw.groups_source, dw.is_depthwise) == (8, "onnx", True)
    np.testing.assert_allclose(dw.weight, w["dw"], rtol=1e-6)
    assert pw.shape == (16, 8, 1, 1)
    np.testing.assert_allclose(layers["fc1"].weight, w["fc1.weight"], rtol=1e-6)
    np.testing.assert_allclose(layers["fc2"].weight, w["fc2.weight"].T, rtol=1e-6)
    proj = layers["/proj/MatMul"]
    np.testing.assert_allclose(proj.weight, w["proj"].T, rtol=1e-6)
    assert proj.bias is not None
    np.testing.assert_allclose(proj.bias, w["proj_bias"], rtol=1e-6)
    assert all(x.kind == "linear" for x in (layers["fc1"], layers["fc2"], proj))
    assert "embedding" in skip_reasons(parsed)["tok"]
    info = parsed.info
    assert info.format == "onnx" and info.n_tensors == len(w)
    buffers = sum(v.size for k, v in w.items() if k.endswith(("running_mean", "running_var")))
    assert info.n_params == sum(v.size for v in w.values()) - buffers


def test_onnx_manifest_groups_win(tmp_path: Path) -> None:
    path, _ = onnx_model(tmp_path)
    dw = by_name(read_checkpoint(path, groups={"dw_conv": 1}))["dw_conv"]
    assert (dw.groups, dw.groups_source) == (1, "manifest")


def test_onnx_recurrent_nodes_are_recurrent_layers(tmp_path: Path) -> None:
    """An ONNX LSTM's W/R become torch's weight_ih_l0/weight_hh_l0, gates i,o,f,c -> i,f,g,o
    (service.ingest.onnx_recurrent; tests/service/ingest/test_onnx_shapes.py checks exported torch
    models)."""
    rng = np.random.default_rng(0)
    inits = [
        onnx_initializer("lstm.W", rng.standard_normal((1, 20, 3))),
        onnx_initializer("lstm.R", rng.standard_normal((1, 20, 5))),
        onnx_initializer("head.weight", rng.standard_normal((4, 5))),
    ]
    nodes = [
        helper.make_node("LSTM", ["x", "lstm.W", "lstm.R"], ["ys"], hidden_size=5),
        helper.make_node("Squeeze", ["ys"], ["s"]),
        helper.make_node("Gemm", ["s", "head.weight"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7, 1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    path = tmp_path / "rnn.onnx"
    onnx.save(helper.make_model(graph), str(path))
    parsed = read_checkpoint(path)
    layers = {x.name: x.weight for x in parsed.layers}
    assert set(layers) == {"head", "lstm.weight_ih_l0", "lstm.weight_hh_l0"}
    assert skip_reasons(parsed) == {}
    torch_order = np.r_[0:5, 10:15, 15:20, 5:10]  # ONNX i, o, f, c -> torch i, f, g, o
    for name, onnx_w in (("ih", inits[0]), ("hh", inits[1])):
        w = numpy_helper.to_array(onnx_w)[0]
        np.testing.assert_array_equal(layers[f"lstm.weight_{name}_l0"], w[torch_order])


def test_onnx_external_data_is_refused(tmp_path: Path) -> None:
    path, _ = onnx_model(tmp_path)
    model = onnx.load(str(path))
    ext = tmp_path / "ext.onnx"
    onnx.save(model, str(ext), save_as_external_data=True, size_threshold=0, location="ext.bin")
    with pytest.raises(CheckpointError, match="external data") as ei:
        read_checkpoint(ext)
    assert str(ext) in message(ei)


def test_truncated_onnx_is_corrupt(tmp_path: Path) -> None:
    path, _ = onnx_model(tmp_path)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as ei:
        read_checkpoint(cut)
    assert str(cut) in message(ei)


def test_bytes_that_look_like_onnx_but_are_not(tmp_path: Path) -> None:
    path = tmp_path / "fake.onnx"
    path.write_bytes(b"\x08\x07" + bytes(range(256)) * 4)
    with pytest.raises(CheckpointError) as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


def _onnx_dw_graph(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    inits = [
        onnx_initializer("a.weight", rng.standard_normal((8, 3, 1, 1))),
        onnx_initializer("b.weight", rng.standard_normal((8, 3, 1, 1))),
        onnx_initializer("dw1.weight", rng.standard_normal((8, 1, 3, 3))),
        onnx_initializer("dw2.weight", rng.standard_normal((8, 1, 3, 3))),
        onnx_initializer("dw3.weight", rng.standard_normal((8, 1, 3, 3))),
        *(onnx_initializer(f"bn.{k}", rng.random(8) + 0.5) for k in ("w", "b", "m", "v")),
        onnx_initializer("lo", np.zeros(())),
        onnx_initializer("hi", np.full((), 6.0)),
    ]
    conv = helper.make_node
    nodes = [
        conv("Conv", ["x", "a.weight"], ["a"], name="/a"),
        conv("Conv", ["x", "b.weight"], ["b"], name="/b"),  # between a and dw1 in graph order
        conv("BatchNormalization", ["a", "bn.w", "bn.b", "bn.m", "bn.v"], ["an"], name="/bn"),
        conv("Clip", ["an", "lo", "hi"], ["ac"]),
        conv("Sigmoid", ["ac"], ["as"]),
        conv("Mul", ["ac", "as"], ["aw"]),  # swish: both inputs come from a
        conv("Conv", ["aw", "dw1.weight"], ["d1"], name="/dw1", group=8, pads=[1, 1, 1, 1]),
        conv("Conv", ["d1", "dw2.weight"], ["d2"], name="/dw2", group=8, pads=[1, 1, 1, 1]),
        conv("Add", ["a", "b"], ["ab"]),  # a residual sum: no single producer
        conv("Conv", ["ab", "dw3.weight"], ["d3"], name="/dw3", group=8, pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, 8, 8]) for n in ("d2", "d3")]
    graph = helper.make_graph(nodes, "g", [x], outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "dw.onnx"
    onnx.save(model, str(path))
    return path


def test_onnx_depthwise_producers_come_from_the_graph(tmp_path: Path) -> None:
    layers = by_name(read_checkpoint(_onnx_dw_graph(tmp_path)))
    assert [layers[n].groups_source for n in ("dw1", "dw2", "dw3")] == ["onnx"] * 3
    assert layers["dw1"].producer == "a"  # through BN, Clip and swish, not b (nearer in order)
    assert layers["dw2"].producer == "a"  # through dw1
    assert layers["dw3"].producer is None
    path, _ = onnx_model(tmp_path)
    assert by_name(read_checkpoint(path))["dw_conv"].producer == "features.0.0"


def test_onnx_names_that_are_not_utf8_are_corrupt_not_a_crash(tmp_path: Path) -> None:
    path, _ = onnx_model(tmp_path)
    data = path.read_bytes()
    assert data.count(b"tok.weight") >= 1
    path.write_bytes(data.replace(b"tok.weight", b"tok.weigh\xff"))
    with pytest.raises(CheckpointError, match="corrupt") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)

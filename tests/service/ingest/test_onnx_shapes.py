"""ONNX models exported with symbolic (dynamic) dims: analysed from their weights, FLOPs and a
manifest once the input shape is given (service.ingest.onnx_shapes,
service.ingest.checkpoint.derived_manifest).

The models are plain torch, exported here with the TorchScript exporter (``dynamo=False``: the
default exporter of torch 2.9+ needs onnxscript, which the project does not install) with
``dynamic_axes``, with constant folding on and off. FLOPs are checked against MACs counted by
forward hooks on the torch model itself (conv/linear: weight size × output positions; GRU: the
sizes of its weight_ih/weight_hh × (sequence × batch) positions), per sample.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from graphs.errors import InvalidInputError
from graphs.report import Report
from service.ingest.checkpoint import derived_manifest, read_checkpoint
from service.ingest.onnx_manifest import manifest_from_onnx
from service.ingest.onnx_shapes import parse_input_shapes
from tests.service.onnx_models import (
    MODELS,
    OTHER_SHAPE,
    assert_every_weight_accounted_for,
    model_of,
    plain_layers,
    reference_macs,
    run_cli,
    shape_arg,
)


def test_analyze_without_input_shape(exported: dict[str, Path]) -> None:
    """Weights are enough: every model is analysed; symbolic sizes give a note and no FLOPs."""
    for name, path in exported.items():
        model = model_of(name)
        parsed = read_checkpoint(path)
        assert_every_weight_accounted_for(path, parsed)
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert len(plain_layers(parsed)) == len(convs) and parsed.skipped == ()
        recurrent = {la.name for la in parsed.layers} - set(plain_layers(parsed))
        gru = {n for n, _ in model.named_parameters() if n.startswith("gru.weight")}
        assert recurrent == gru  # ih and hh of both directions, as torch names them

        code, out, err = run_cli("analyze", str(path), "--methods", "mrp,l1", "--json")
        assert code == 0, err
        report = Report.model_validate_json(out)
        members = {m for la in report.layers for m in la.members}  # weight_hh: rows and column
        assert members == {la.name for la in parsed.layers}
        batch_only = set(MODELS[name][1]) == {0}
        if batch_only:  # a symbolic batch is set to 1: FLOPs per sample, no note
            assert report.notes == [] and "notes" not in json.loads(out)
            assert report.summary.flops == reference_macs(model, MODELS[name][2])
            assert "note:" not in err
        else:
            assert report.summary.flops is None
            assert len(report.notes) == 1 and "no manifest" in report.notes[0]
            assert "x [batch, " in report.notes[0] and "--input-shape" in report.notes[0]
            assert "note:" in err and "no manifest" in err


@pytest.mark.parametrize("name", list(MODELS))
def test_input_shape_gives_the_reference_flops(exported: dict[str, Path], name: str) -> None:
    path, model = exported[name], model_of(name)
    for shape in (MODELS[name][2], OTHER_SHAPE[name]):
        code, out, err = run_cli(
            "analyze", str(path), "--methods", "mrp", "--json", "--input-shape", shape_arg(shape)
        )
        assert code == 0, err
        report = Report.model_validate_json(out)
        assert report.notes == [] and "note:" not in err
        assert report.summary.flops == reference_macs(model, shape), shape
        manifest = manifest_from_onnx(path, input_shapes=[list(shape)])
        assert manifest.input_shapes == [list(shape)]
        assert manifest.macs_total == report.summary.flops
        layers = {la.name for la in manifest.layers}
        assert layers == set(
            plain_layers(read_checkpoint(path))
        )  # recurrent units: no manifest group


def test_the_same_model_with_static_shapes_gives_the_same_manifest(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    """Exported with the shape fixed, or dynamic and made concrete: one manifest."""
    for name in ("convnet", "crnn"):
        shape = OTHER_SHAPE[name]
        static = tmp_path / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folded = "unfolded" not in str(exported[name])
            torch.onnx.export(model_of(name), (torch.randn(*shape),), str(static), dynamo=False,
                              do_constant_folding=folded, input_names=["x"],
                              output_names=["y"])  # fmt: skip
        fixed = manifest_from_onnx(static)
        made = manifest_from_onnx(exported[name], input_shapes=[list(shape)])
        assert fixed.macs_total == made.macs_total == reference_macs(model_of(name), shape)
        assert [g.producers for g in fixed.groups] == [g.producers for g in made.groups]
        assert fixed.costs == made.costs and fixed.layers == made.layers


def test_plan_reaches_a_flops_target_once_the_shape_is_given(exported: dict[str, Path]) -> None:
    path = exported["convnet"]
    code, _, err = run_cli("plan", str(path), "--target-flops", "0.3", "--method", "l1")
    assert code == 2 and "note:" in err and "no manifest" in err
    code, out, err = run_cli("plan", str(path), "--target-flops", "0.3", "--method", "l1",
                          "--input-shape", "1,3,32,32", "--json")  # fmt: skip
    assert code == 0, err
    plan = json.loads(out)
    assert plan["flops_before"] == reference_macs(model_of("convnet"), (1, 3, 32, 32))
    assert plan["coupling"] == "manifest" and plan["achieved"]["flops"] >= 0.3


def test_plans_keep_the_hidden_units_of_onnx_recurrent_nodes(exported: dict[str, Path]) -> None:
    """The manifest covers the GRU (one group of hidden units, both directions, unprunable from
    ONNX), so a plan is made, with the GRU's units kept."""
    path = exported["crnn"]
    manifest = manifest_from_onnx(path, input_shapes=[[1, 1, 16, 32]])
    hidden = [g for g in manifest.groups if g.unit == "hidden"]
    assert [(g.producers, g.channels, g.prunable) for g in hidden] == [(["gru"], 12, False)]
    assert manifest.params_total == sum(p.numel() for p in model_of("crnn").parameters()) - sum(
        p.numel() for n, p in model_of("crnn").named_parameters() if n.startswith("bn1.")
    ) * ("unfolded" not in str(path))  # folded: BatchNorm merged into conv1
    code, out, err = run_cli("plan", str(path), "--target-params", "0.3", "--method", "l1",
                          "--input-shape", "1,1,16,32", "--json")  # fmt: skip
    assert code == 0, err
    plan = json.loads(out)
    assert plan["coupling"] == "manifest"
    gru = [g for g in plan["groups"] if g["name"].startswith("gru.")]
    assert len(gru) == 1 and gru[0]["channels_after"] == gru[0]["channels_before"] == 12


def test_check_reads_dynamic_onnx(exported: dict[str, Path]) -> None:
    code, _, err = run_cli("check", str(exported["crnn"]), "--max-layer-redundancy", "1.0")
    assert code == 0, err
    assert "note:" in err
    code, _, err = run_cli("check", str(exported["crnn"]), "--max-layer-redundancy", "1.0",
                        "--input-shape", "1,1,16,32")  # fmt: skip
    assert code == 0, err
    assert "note:" not in err


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("1,1,16", "has 3 dims, but the model's input x has 4: x [batch, 1, 16, width]"),
        ("1,3,16,32", "gives 3 at axis 1, but the model's input x fixes it to 1"),
        ("1,1,16,32;1,4", "2 input shape(s) given, but the model has 1 input(s)"),
        ("1,1,16,0", "every dim at least 1"),
        ("1,one,16,32", "not a comma-separated list of integers"),
    ],
)
def test_a_wrong_input_shape_is_a_clear_error(
    exported: dict[str, Path], shape: str, expected: str
) -> None:
    code, _, err = run_cli(
        "analyze", str(exported["crnn"]), "--methods", "l1", "--input-shape", shape
    )
    assert code == 2
    flat = " ".join(err.split())
    assert "error:" in flat and expected in flat, flat


def test_shapes_the_graph_cannot_take_are_clear_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    conv = [helper.make_node("Conv", ["x", "c.weight"], ["y"], name="c")]
    path = _graph_model(conv, {"c.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)},
                        tmp_path, x)  # fmt: skip
    code, _, err = run_cli("analyze", str(path), "--methods", "l1", "--input-shape", "1,3,2,2")
    flat = " ".join(err.split())
    assert code == 2 and "Conv node 'c' would be empty" in flat and "x [N, 3, H, W]" in flat
    assert run_cli("analyze", str(path), "--methods", "l1", "--input-shape", "1,3,3,3")[0] == 0

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "fc.weight"], ["y"], name="fc")]  # fmt: skip
    inits: dict[str, np.ndarray] = {
        "shape": np.array([-1, 4]),
        "fc.weight": rng.standard_normal((4, 3)).astype(np.float32),
    }
    path = _graph_model(nodes, inits, tmp_path, x)
    code, _, err = run_cli("analyze", str(path), "--methods", "l1", "--input-shape", "1,6")
    flat = " ".join(err.split())
    assert code == 2 and "shape inference fails with input shape(s) 1,6" in flat
    assert "The model's inputs are x [N, K]" in flat
    code, out, err = run_cli(
        "analyze", str(path), "--methods", "l1", "--input-shape", "2,6", "--json"
    )
    assert code == 0 and json.loads(out)["summary"]["flops"] == 4 * 3 * 3 // 2, err


def test_input_shape_needs_onnx_and_no_manifest(exported: dict[str, Path], tmp_path: Path) -> None:
    pt = tmp_path / "model.pt"
    torch.save(model_of("convnet").state_dict(), pt)
    code, _, err = run_cli("analyze", str(pt), "--methods", "l1", "--input-shape", "1,3,8,8")
    assert code == 2 and "ONNX models only" in err
    parsed = read_checkpoint(pt)
    with pytest.raises(InvalidInputError, match="ONNX models only"):
        derived_manifest(pt, parsed, input_shapes=[[1, 3, 8, 8]])
    assert derived_manifest(pt, parsed) == (None, [])
    man = tmp_path / "m.json"
    man.write_text(manifest_from_onnx(exported["view"]).model_dump_json())
    code, _, err = run_cli("analyze", str(exported["view"]), "--manifest", str(man),
                        "--input-shape", "1,3,8,8")  # fmt: skip
    assert code == 2 and "only one of them" in err


def test_parse_input_shapes() -> None:
    assert parse_input_shapes("1,3,64,256") == [[1, 3, 64, 256]]
    assert parse_input_shapes("1,3,8,8;1,10") == [[1, 3, 8, 8], [1, 10]]
    for bad in ("", "1,,2", "1,2;", "-1,3", ",".join(["1"] * 9), "2147483648"):
        with pytest.raises(InvalidInputError):
            parse_input_shapes(bad)


def test_reports_are_the_same_embedded_and_after_a_shape_is_given(
    exported: dict[str, Path],
) -> None:
    """derived_manifest is what the CLI and the service use: the note is path-free, so the
    same file gives the same report wherever it is read."""
    path = exported["convnet"]
    moved = path.with_name("elsewhere.onnx")
    moved.write_bytes(path.read_bytes())
    notes = [derived_manifest(p, read_checkpoint(p))[1] for p in (path, moved)]
    assert notes[0] == notes[1] and len(notes[0]) == 1
    assert str(path.parent) not in notes[0][0]


@pytest.mark.parametrize("folding", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_recurrent_nodes_are_read_as_torch_saves_them(
    tmp_path: Path, cell: type[nn.Module], folding: bool
) -> None:
    """ONNX gate order (GRU z,r,h; LSTM i,o,f,c) back to torch's, for both directions of both
    layers, with the torch parameter names: the tensors equal the module's state_dict."""

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = cell(6, 5, num_layers=2, bidirectional=True)
            self.head = nn.Linear(10, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0])

    torch.manual_seed(0)
    model = Seq().eval()
    path = tmp_path / "seq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(7, 1, 6),), str(path), dynamo=False,
                          do_constant_folding=folding, input_names=["x"],
                          dynamic_axes={"x": {0: "time", 1: "batch"}})  # fmt: skip
    parsed = read_checkpoint(path)
    by_name = {la.name: la for la in parsed.layers}
    state = {k: v.numpy() for k, v in model.rnn.state_dict().items()}
    assert len(state) == 16 and parsed.skipped == ()
    for key, value in state.items():
        layer = by_name[f"rnn.{key.replace('bias', 'weight')}"]
        got = layer.weight if key.startswith("weight") else layer.bias
        assert got is not None, key
        np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-7, err_msg=key)
    manifest = manifest_from_onnx(path, input_shapes=[[7, 2, 6]])
    weights = sum(v.size for k, v in state.items() if k.startswith("weight"))
    head = model.head.weight.numel() * 7  # per sample: 7 time steps
    assert manifest.macs_total == weights * 7 + head  # every layer's W and R, each step


# --- weights the reader cannot use are reported by what they feed --------------------------------


def _graph_model(
    nodes: list[Any], inits: dict[str, np.ndarray], tmp_path: Path, x: Any = None
) -> Path:
    x = x or helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    tensors = [numpy_helper.from_array(a, n) for n, a in inits.items()]
    graph = helper.make_graph(nodes, "g", [x], [y], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return path


def test_quantized_and_computed_weights_are_skipped_with_reasons(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    inits: dict[str, np.ndarray] = {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "q.weight": rng.integers(-127, 127, (8, 8, 1, 1)).astype(np.int8),
        "q.scale": np.array(0.02, np.float32),
        "m.weight": rng.standard_normal((8, 8, 1, 1)).astype(np.float32),
        "m.scale": np.array(0.5, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["h"], name="conv", pads=[1] * 4),
        helper.make_node("DequantizeLinear", ["q.weight", "q.scale"], ["qw"], name="dq"),
        helper.make_node("Conv", ["h", "qw"], ["h2"], name="qconv"),
        helper.make_node("Mul", ["m.weight", "m.scale"], ["mw"], name="scale"),
        helper.make_node("Conv", ["h2", "mw"], ["y"], name="mconv"),
    ]
    parsed = read_checkpoint(_graph_model(nodes, inits, tmp_path))
    assert [la.name for la in parsed.layers] == ["conv"]
    skipped = {s.name: s.reason for s in parsed.skipped}
    assert "DequantizeLinear" in skipped["qconv"] and "quantized" in skipped["qconv"]
    assert "computed by Mul" in skipped["m"] and "'mconv'" in skipped["m"]

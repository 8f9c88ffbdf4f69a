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
import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from clients import PruneGraphClient
from graphs import analyze
from graphs.errors import InvalidInputError
from graphs.recurrent import parse
from graphs.report import Report
from prunegraph.cli import app
from service.ingest.checkpoint import ParsedCheckpoint, derived_manifest, read_checkpoint
from service.ingest.onnx_manifest import manifest_from_onnx
from service.ingest.onnx_shapes import parse_input_shapes
from service.main import create_app
from service.settings import Settings

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


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.get_buffer("running_mean"), -0.5, 0.5)
                nn.init.uniform_(m.get_buffer("running_var"), 0.5, 2.0)
    return model


def _export(name: str, folding: bool, path: Path) -> Path:
    _, axes, shape = MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _model(name),
            (torch.randn(*shape),),
            str(path),
            dynamo=False,  # the TorchScript exporter: works offline, no onnxscript needed
            do_constant_folding=folding,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": axes},
        )
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["folded", "unfolded"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx-folded" if request.param else "onnx-unfolded")
    return {n: _export(n, request.param, folder / f"{n}.onnx") for n in MODELS}


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


def _run(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def _shape_arg(shape: tuple[int, ...]) -> str:
    return ",".join(map(str, shape))


def _assert_every_weight_accounted_for(path: Path, parsed: ParsedCheckpoint) -> None:
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
    assert len(_plain(parsed)) == n_weight_nodes  # every conv/linear of these models is a layer


def _plain(parsed: ParsedCheckpoint) -> list[str]:
    """The checkpoint's layers that are not recurrent matrices."""
    return [la.name for la in parsed.layers if parse(la.name) is None]


def test_analyze_without_input_shape(exported: dict[str, Path]) -> None:
    """Weights are enough: every model is analysed; symbolic sizes give a note and no FLOPs."""
    for name, path in exported.items():
        model = _model(name)
        parsed = read_checkpoint(path)
        _assert_every_weight_accounted_for(path, parsed)
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert len(_plain(parsed)) == len(convs) and parsed.skipped == ()
        recurrent = {la.name for la in parsed.layers} - set(_plain(parsed))
        gru = {n for n, _ in model.named_parameters() if n.startswith("gru.weight")}
        assert recurrent == gru  # ih and hh of both directions, as torch names them

        code, out, err = _run("analyze", str(path), "--methods", "mrp,l1", "--json")
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
    path, model = exported[name], _model(name)
    for shape in (MODELS[name][2], OTHER_SHAPE[name]):
        code, out, err = _run(
            "analyze", str(path), "--methods", "mrp", "--json", "--input-shape", _shape_arg(shape)
        )
        assert code == 0, err
        report = Report.model_validate_json(out)
        assert report.notes == [] and "note:" not in err
        assert report.summary.flops == reference_macs(model, shape), shape
        manifest = manifest_from_onnx(path, input_shapes=[list(shape)])
        assert manifest.input_shapes == [list(shape)]
        assert manifest.macs_total == report.summary.flops
        layers = {la.name for la in manifest.layers}
        assert layers == set(_plain(read_checkpoint(path)))  # recurrent units: no manifest group


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
            torch.onnx.export(_model(name), (torch.randn(*shape),), str(static), dynamo=False,
                              do_constant_folding=folded, input_names=["x"],
                              output_names=["y"])  # fmt: skip
        fixed = manifest_from_onnx(static)
        made = manifest_from_onnx(exported[name], input_shapes=[list(shape)])
        assert fixed.macs_total == made.macs_total == reference_macs(_model(name), shape)
        assert [g.producers for g in fixed.groups] == [g.producers for g in made.groups]
        assert fixed.costs == made.costs and fixed.layers == made.layers


def test_plan_reaches_a_flops_target_once_the_shape_is_given(exported: dict[str, Path]) -> None:
    path = exported["convnet"]
    code, _, err = _run("plan", str(path), "--target-flops", "0.3", "--method", "l1")
    assert code == 2 and "note:" in err and "no manifest" in err
    code, out, err = _run("plan", str(path), "--target-flops", "0.3", "--method", "l1",
                          "--input-shape", "1,3,32,32", "--json")  # fmt: skip
    assert code == 0, err
    plan = json.loads(out)
    assert plan["flops_before"] == reference_macs(_model("convnet"), (1, 3, 32, 32))
    assert plan["coupling"] == "manifest" and plan["achieved"]["flops"] >= 0.3


def test_plans_keep_the_hidden_units_of_onnx_recurrent_nodes(exported: dict[str, Path]) -> None:
    """The manifest covers the GRU (one group of hidden units, both directions, unprunable from
    ONNX), so a plan is made, with the GRU's units kept."""
    path = exported["crnn"]
    manifest = manifest_from_onnx(path, input_shapes=[[1, 1, 16, 32]])
    hidden = [g for g in manifest.groups if g.unit == "hidden"]
    assert [(g.producers, g.channels, g.prunable) for g in hidden] == [(["gru"], 12, False)]
    assert manifest.params_total == sum(p.numel() for p in _model("crnn").parameters()) - sum(
        p.numel() for n, p in _model("crnn").named_parameters() if n.startswith("bn1.")
    ) * ("unfolded" not in str(path))  # folded: BatchNorm merged into conv1
    code, out, err = _run("plan", str(path), "--target-params", "0.3", "--method", "l1",
                          "--input-shape", "1,1,16,32", "--json")  # fmt: skip
    assert code == 0, err
    plan = json.loads(out)
    assert plan["coupling"] == "manifest"
    gru = [g for g in plan["groups"] if g["name"].startswith("gru.")]
    assert len(gru) == 1 and gru[0]["channels_after"] == gru[0]["channels_before"] == 12


def test_check_reads_dynamic_onnx(exported: dict[str, Path]) -> None:
    code, _, err = _run("check", str(exported["crnn"]), "--max-layer-redundancy", "1.0")
    assert code == 0, err
    assert "note:" in err
    code, _, err = _run("check", str(exported["crnn"]), "--max-layer-redundancy", "1.0",
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
    code, _, err = _run("analyze", str(exported["crnn"]), "--methods", "l1", "--input-shape", shape)
    assert code == 2
    flat = " ".join(err.split())
    assert "error:" in flat and expected in flat, flat


def test_shapes_the_graph_cannot_take_are_clear_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    conv = [helper.make_node("Conv", ["x", "c.weight"], ["y"], name="c")]
    path = _graph_model(conv, {"c.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)},
                        tmp_path, x)  # fmt: skip
    code, _, err = _run("analyze", str(path), "--methods", "l1", "--input-shape", "1,3,2,2")
    flat = " ".join(err.split())
    assert code == 2 and "Conv node 'c' would be empty" in flat and "x [N, 3, H, W]" in flat
    assert _run("analyze", str(path), "--methods", "l1", "--input-shape", "1,3,3,3")[0] == 0

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "fc.weight"], ["y"], name="fc")]  # fmt: skip
    inits: dict[str, np.ndarray] = {
        "shape": np.array([-1, 4]),
        "fc.weight": rng.standard_normal((4, 3)).astype(np.float32),
    }
    path = _graph_model(nodes, inits, tmp_path, x)
    code, _, err = _run("analyze", str(path), "--methods", "l1", "--input-shape", "1,6")
    flat = " ".join(err.split())
    assert code == 2 and "shape inference fails with input shape(s) 1,6" in flat
    assert "The model's inputs are x [N, K]" in flat
    code, out, err = _run("analyze", str(path), "--methods", "l1", "--input-shape", "2,6", "--json")
    assert code == 0 and json.loads(out)["summary"]["flops"] == 4 * 3 * 3 // 2, err


def test_input_shape_needs_onnx_and_no_manifest(exported: dict[str, Path], tmp_path: Path) -> None:
    pt = tmp_path / "model.pt"
    torch.save(_model("convnet").state_dict(), pt)
    code, _, err = _run("analyze", str(pt), "--methods", "l1", "--input-shape", "1,3,8,8")
    assert code == 2 and "ONNX models only" in err
    parsed = read_checkpoint(pt)
    with pytest.raises(InvalidInputError, match="ONNX models only"):
        derived_manifest(pt, parsed, input_shapes=[[1, 3, 8, 8]])
    assert derived_manifest(pt, parsed) == (None, [])
    man = tmp_path / "m.json"
    man.write_text(manifest_from_onnx(exported["view"]).model_dump_json())
    code, _, err = _run("analyze", str(exported["view"]), "--manifest", str(man),
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


# --- the job API ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("svc"), tokens="alice:s1", workers=1)
    with TestClient(create_app(settings)) as c:
        yield c


AUTH = {"Authorization": "Bearer s1"}


def _job(c: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post("/v1/jobs", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job: dict[str, Any] = c.get(f"/v1/jobs/{r.json()['id']}", headers=AUTH).json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError("job did not finish")


def test_jobs_take_an_input_shape(service: TestClient, exported: dict[str, Path]) -> None:
    path = exported["crnn"]
    with path.open("rb") as f:
        ckpt = service.post("/v1/checkpoints", files={"file": ("m.onnx", f)}, headers=AUTH)
    cid = ckpt.json()["id"]
    base = {"checkpoint_id": cid, "methods": ["mrp"]}

    job = _job(service, base)
    assert job["status"] == "done", job
    report = Report.model_validate_json(
        service.get(f"/v1/jobs/{job['id']}/report", headers=AUTH).text
    )
    code, out, _ = _run("analyze", str(path), "--methods", "mrp", "--json")
    assert code == 0 and report.to_json() == out.strip()  # note included, same bytes
    assert report.summary.flops is None and len(report.notes) == 1
    graph = service.get(f"/v1/jobs/{job['id']}/layers/conv2/graph", headers=AUTH)
    assert graph.status_code == 200 and graph.json()["n_filters"] == 16, graph.text

    client = PruneGraphClient("http://testserver", token="s1", http=service)
    job_id = client.submit(cid, methods=["mrp"], input_shape=(1, 1, 16, 32))
    client.wait(job_id, timeout=120)
    shaped = client.report(job_id)
    assert shaped.notes == []
    assert shaped.summary.flops == reference_macs(_model("crnn"), (1, 1, 16, 32))

    job = _job(service, {**base, "input_shape": [[1, 1, 16]]})
    assert job["status"] == "failed" and "x [batch, 1, 16, width]" in job["error"]
    for bad in ([[0, 1, 16, 32]], [[1] * 9], "1,1,16,32"):
        r = service.post("/v1/jobs", json={**base, "input_shape": bad}, headers=AUTH)
        assert r.status_code == 422, r.text
    r = service.post(
        "/v1/jobs",
        json={**base, "input_shape": [1, 1, 16, 32],
              "manifest": json.loads(manifest_from_onnx(path, input_shapes=[[1, 1, 16, 32]])
                                     .model_dump_json())},
        headers=AUTH,
    )  # fmt: skip
    assert r.status_code == 422 and "either manifest or input_shape" in r.text


def test_analysis_is_the_library_s_without_a_manifest(exported: dict[str, Path]) -> None:
    """No manifest: the report is the one of the weights alone, plus the note."""
    path = exported["convnet"]
    parsed = read_checkpoint(path)
    plain = analyze(parsed.layers, checkpoint=parsed.info, skipped=parsed.skipped, methods=["l1"])
    code, out, _ = _run("analyze", str(path), "--methods", "l1", "--json")
    data = json.loads(out)
    assert code == 0 and data.pop("notes")
    assert data == json.loads(plain.to_json())

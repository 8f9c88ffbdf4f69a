"""`prunegraph analyze`: output, determinism and every bad input (exit code 2, file named)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from prunegraph.cli import app

runner = CliRunner()


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.fc = nn.Linear(32, 10)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "small.pt"
    torch.save(SmallNet().state_dict(), path)
    return path


def _run(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def test_analyze_prints_a_table(ckpt: Path) -> None:
    code, out, err = _run("analyze", str(ckpt), "--methods", "mrp,srr,l1")
    assert code == 0, err
    for name in ("conv1", "conv2", "fc", "mrp", "srr", "l1", "params-weighted redundancy"):
        assert name in out
    assert "analysed 3 groups" in err  # timings go to stderr


def test_json_is_the_report_and_byte_identical(ckpt: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "r.json"
    code, out1, _ = _run("analyze", str(ckpt), "--json", "--seed", "3", "-o", str(out_file))
    assert code == 0
    _, out2, _ = _run("analyze", str(ckpt), "--json", "--seed", "3")
    assert out1 == out2
    assert out_file.read_text() == out1
    data = json.loads(out1)
    assert data["schema_version"] == "1.1" and data["seed"] == 3
    assert len(data["checkpoint"]["sha256"]) == 64
    layer = data["layers"][0]
    assert {"name", "kind", "shape", "n_filters", "methods"} <= set(layer)
    assert set(layer["methods"]) == {"mrp", "srr", "hsc", "l1", "fpgm"}
    assert layer["methods"]["l1"]["redundancy"] is None
    assert 0 <= layer["methods"]["mrp"]["redundancy"] <= 1


def _bad(path: Path, *args: str) -> str:
    code, out, err = _run("analyze", str(path), *args)
    assert code == 2, (out, err)
    text = " ".join(err.split())  # rich may wrap long lines
    assert "error:" in text and "what to do:" in text
    return text


def test_missing_file(tmp_path: Path) -> None:
    assert "missing.pt" in _bad(tmp_path / "missing.pt")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty.pt" in _bad(tmp_path / "empty.pt")


def test_random_bytes(tmp_path: Path) -> None:
    (tmp_path / "noise.bin").write_bytes(os.urandom(4096))
    assert "noise.bin" in _bad(tmp_path / "noise.bin")


def test_truncated_zip(ckpt: Path, tmp_path: Path) -> None:
    data = ckpt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert "cut.pt" in _bad(tmp_path / "cut.pt")


class _Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"w": _Evil(sentinel)}))
    zipped = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "x": _Evil(sentinel)}, zipped)
    for path in (raw, zipped):
        text = _bad(path)
        assert path.name in text and "weights_only" in text
    assert not sentinel.exists(), "the payload ran"


def test_no_prunable_layer(tmp_path: Path) -> None:
    path = tmp_path / "bn_only.pt"
    torch.save(nn.BatchNorm2d(8).state_dict(), path)
    assert "bn_only.pt" in _bad(path)


def test_nan_layer_is_skipped_others_analysed(tmp_path: Path) -> None:
    sd = SmallNet().state_dict()
    sd["conv2.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(sd, path)
    code, out, err = _run("analyze", str(path), "--json", "--methods", "mrp")
    assert code == 0, err
    data = json.loads(out)
    assert [s["name"] for s in data["skipped"]] == ["conv2"]
    assert "NaN" in data["skipped"][0]["reason"]
    assert {layer["name"] for layer in data["layers"]} == {"conv1", "fc"}


def test_zero_filters_and_single_filter_layer(tmp_path: Path) -> None:
    sd = SmallNet().state_dict()
    sd["conv2.weight"][:4] = 0.0  # four dead filters
    sd["head.weight"] = torch.randn(1, 10)  # a 1-filter linear layer
    path = tmp_path / "odd.pt"
    torch.save(sd, path)
    code, out, err = _run("analyze", str(path), "--json", "--methods", "mrp,srr")
    assert code == 0, err
    data = json.loads(out)
    conv2 = next(layer for layer in data["layers"] if layer["name"] == "conv2")
    assert conv2["methods"]["mrp"]["n_zero"] == 4
    assert conv2["methods"]["mrp"]["redundancy"] >= 4 / 32
    assert any(s["name"] == "head" and "1 filter" in s["reason"] for s in data["skipped"])


def test_unknown_method_is_a_usage_error(ckpt: Path) -> None:
    assert "unknown" in _bad(ckpt, "--methods", "mrp,bogus")


def test_output_into_a_missing_directory_fails_before_work(ckpt: Path, tmp_path: Path) -> None:
    text = _bad(ckpt, "-o", str(tmp_path / "nope" / "r.json"))
    assert "r.json" in text and "writable" in text


def test_bad_options_are_usage_errors(ckpt: Path) -> None:
    assert "min-explained" in _bad(ckpt, "--min-explained", "1.5")
    code, _, err = _run("analyze", str(ckpt), "--seed", "-5")
    assert code == 2 and "seed" in err.lower()


def test_checkpoint_whose_only_layer_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "nan_only.pt"
    torch.save({"fc.weight": torch.full((4, 3), float("nan"))}, path)
    text = _bad(path)
    assert "fc" in text and "NaN" in text


def test_report_is_identical_across_processes_and_thread_counts(ckpt: Path) -> None:
    """Byte-identical JSON in fresh interpreters with other hash seeds and BLAS thread counts."""
    import subprocess
    import sys

    outs = []
    for threads, hashseed in (("1", "1"), ("2", "12345")):
        env = {
            **os.environ,
            "OPENBLAS_NUM_THREADS": threads,
            "OMP_NUM_THREADS": threads,
            "PYTHONHASHSEED": hashseed,
        }
        res = subprocess.run(
            [sys.executable, "-m", "prunegraph", "analyze", str(ckpt), "--json", "--seed", "9"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        outs.append(res.stdout)
    assert outs[0] == outs[1]
    assert json.loads(outs[0])["seed"] == 9


def _onnx_of(sd: dict[str, torch.Tensor], path: Path) -> None:
    """SmallNet's conv1 → conv2 → fc as an ONNX graph (weights as initializers)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def init(name: str) -> TensorProto:
        return numpy_helper.from_array(sd[name].numpy(), name)

    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["h2"]),
        helper.make_node("GlobalAveragePool", ["h2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "smallnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [
            init(k)
            for k in (
                "conv1.weight",
                "conv1.bias",
                "conv2.weight",
                "conv2.bias",
                "fc.weight",
                "fc.bias",
            )
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_every_format_gives_the_same_analysis(ckpt: Path, tmp_path: Path) -> None:
    """The same weights as .pt, .safetensors (under a misleading name) and ONNX."""
    from safetensors.torch import save_file

    sd = torch.load(ckpt, weights_only=True)
    conv_fc = {k: v for k, v in sd.items() if k.split(".")[0] in ("conv1", "conv2", "fc")}
    torch.save(conv_fc, tmp_path / "plain.pt")
    save_file(conv_fc, str(tmp_path / "weights.bin"))
    _onnx_of(conv_fc, tmp_path / "model.onnx")
    layers = []
    for name, fmt in (("plain.pt", "pytorch"), ("weights.bin", "safetensors"),
                      ("model.onnx", "onnx")):  # fmt: skip
        code, out, err = _run("analyze", str(tmp_path / name), "--json")
        assert code == 0, err
        data = json.loads(out)
        assert data["checkpoint"]["format"] == fmt
        layers.append(data["layers"])
    assert [layer["name"] for layer in layers[0]] == ["conv1", "conv2", "fc"]
    assert layers[0] == layers[1]
    # ONNX carries its graph: the coupling comes from it (a manifest), the figures are the same
    assert {layer["coupling"] for layer in layers[2]} == {"manifest"}
    strip = [[{k: v for k, v in la.items() if k != "coupling"} for la in ls] for ls in layers]
    assert strip[0] == strip[2]


def test_plan_prints_before_after_and_writes_json(ckpt: Path, tmp_path: Path) -> None:
    from graphs.plan import PruningPlan

    out_file = tmp_path / "plan.json"
    code, out, err = _run("plan", str(ckpt), "--method", "l1", "--target-params", "0.3",
                          "-o", str(out_file))  # fmt: skip
    assert code == 0, err
    assert "→" in out and "rule:" in out and "conv2" in out
    plan = PruningPlan.model_validate_json(out_file.read_text())
    assert plan.achieved["params"] >= 0.3 and plan.coupling == "unknown"
    code, out2, _ = _run("plan", str(ckpt), "--method", "l1", "--target-params", "0.3", "--json")
    assert code == 0 and out2 == out_file.read_text()


def test_plan_fallback_option(ckpt: Path) -> None:
    """--fallback reaches the planner: recorded in the plan, and 'uniform' takes the rest of
    the target by one uniform ratio (random weights have no strict redundancy)."""
    from graphs.plan import PruningPlan

    plans = {}
    for fallback in ("anneal", "uniform"):
        code, out, err = _run("plan", str(ckpt), "--method", "mrp", "--target-params", "0.5",
                              "--fallback", fallback, "--json")  # fmt: skip
        assert code == 0, err
        plans[fallback] = PruningPlan.model_validate_json(out)
        assert plans[fallback].parameters["fallback"] == fallback
    assert "uniform fallback" in plans["uniform"].rule and "softer" not in plans["uniform"].rule
    assert "softer calibration levels" in plans["anneal"].rule


def test_plan_usage_errors(ckpt: Path, tmp_path: Path) -> None:
    for args, needle in [
        (("--target-params", "0.3", "--target-flops", "0.3"), "exactly one"),
        ((), "exactly one"),
        (("--target-flops", "0.5"), "manifest"),
        (("--target-params", "0.3", "--method", "magic"), "unknown method"),
        (("--target-params", "0.3", "--fallback", "greedy"), "--fallback"),
    ]:
        code, _, err = _run("plan", str(ckpt), *args)
        assert code == 2, (args, err)
        assert needle in " ".join(err.split()), (args, err)
    bad = tmp_path / "m.json"
    bad.write_text('{"schema_version": "1.0"}')
    code, _, err = _run("plan", str(ckpt), "--target-flops", "0.3", "--manifest", str(bad))
    assert code == 2 and "not a valid prunegraph manifest" in " ".join(err.split())


def test_onnx_checkpoints_plan_flops_without_a_manifest(ckpt: Path, tmp_path: Path) -> None:
    from graphs.plan import PruningPlan

    sd = torch.load(ckpt, weights_only=True)
    _onnx_of({k: v for k, v in sd.items() if not k.startswith("bn1")}, tmp_path / "m.onnx")
    code, out, err = _run("plan", str(tmp_path / "m.onnx"), "--method", "mrp",
                          "--target-flops", "0.3", "--json")  # fmt: skip
    assert code == 0, err
    plan = PruningPlan.model_validate_json(out)
    assert plan.coupling == "manifest" and plan.achieved["flops"] >= 0.3


def test_manifest_then_flops_plan(tmp_path: Path) -> None:
    from graphs.manifest import Manifest
    from graphs.plan import PruningPlan
    from tests.clients.models import vgg16_bn

    man_path = tmp_path / "m.json"
    code, _, err = _run("manifest", "--model", "tests.clients.models:vgg16_bn",
                        "--input-shape", "1,3,32,32", "-o", str(man_path))  # fmt: skip
    assert code == 0, err
    man = Manifest.model_validate_json(man_path.read_text())
    roles = {layer.role for layer in man.layers}
    assert man.macs_total > 0 and {"stem", "classifier"} <= roles
    assert {layer.name for layer in man.layers if layer.role != "body"} <= set(man.ignored)
    torch.manual_seed(0)
    torch.save(vgg16_bn().state_dict(), tmp_path / "vgg.pt")
    code, out, err = _run("plan", str(tmp_path / "vgg.pt"), "--method", "hsc", "--target-flops",
                          "0.5", "--manifest", str(man_path), "--json")  # fmt: skip
    assert code == 0, err
    plan = PruningPlan.model_validate_json(out)
    assert plan.coupling == "manifest" and 0.5 <= plan.achieved["flops"] <= 0.52


def test_manifest_of_an_unknown_factory(tmp_path: Path) -> None:
    for spec in ("no_such_pkg.models:net", "tests.clients.models:no_such_factory", "nocolon"):
        code, _, err = _run("manifest", "--model", spec, "--input-shape", "1,3,32,32",
                            "-o", str(tmp_path / "m.json"))  # fmt: skip
        assert code == 2, (spec, err)
        assert "pkg.module:factory" in " ".join(err.split())

"""Manifests derived from ONNX graphs (service.ingest.onnx_manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs.grouping import build_groups
from graphs.manifest import Manifest, ParamAxis
from graphs.plan import Target
from graphs.planner import plan_layers
from service.ingest.checkpoint import read_checkpoint
from service.ingest.onnx_manifest import manifest_from_onnx


class _Net:
    """A tiny ONNX graph builder: conv/bn/gemm helpers that register their initializers."""

    def __init__(self, channels: int = 3, size: int = 8) -> None:
        self.rng = np.random.default_rng(0)
        self.nodes: list[Any] = []
        self.inits: dict[str, np.ndarray] = {}
        self.input = helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, ["N", channels, size, size]
        )

    def _init(self, name: str, shape: tuple[int, ...]) -> str:
        self.inits[name] = self.rng.standard_normal(shape).astype(np.float32)
        return name

    def node(self, op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, name: str, c_in: int, c_out: int, k: int = 3, group: int = 1,
             stride: int = 1) -> str:  # fmt: skip
        w = self._init(f"{name}.weight", (c_out, c_in // group, k, k))
        b = self._init(f"{name}.bias", (c_out,))
        return self.node("Conv", [x, w, b], name, pads=[k // 2] * 4, group=group,
                         strides=[stride, stride])  # fmt: skip

    def bn(self, x: str, name: str, c: int) -> str:
        ins = [self._init(f"{name}.{s}", (c,)) for s in ("weight", "bias", "mean", "var")]
        self.inits[f"{name}.var"] = np.abs(self.inits[f"{name}.var"]) + 1
        return self.node("BatchNormalization", [x, *ins], name)

    def gemm(self, x: str, name: str, c_in: int, c_out: int, trans_b: int = 1) -> str:
        w = self._init(f"{name}.weight", (c_out, c_in) if trans_b else (c_in, c_out))
        b = self._init(f"{name}.bias", (c_out,))
        return self.node("Gemm", [x, w, b], name, transB=trans_b)

    def head(self, x: str, c: int, classes: int = 10) -> str:
        pooled = self.node("GlobalAveragePool", [x], "gap")
        return self.gemm(self.node("Flatten", [pooled], "flat"), "fc", c, classes)

    def save(self, tmp_path: Path, out: str, rank: int = 2) -> Path:
        y = helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", *"TK"[3 - rank :]])
        inits = [numpy_helper.from_array(a, n) for n, a in self.inits.items()]
        graph = helper.make_graph(self.nodes, "net", [self.input], [y], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model)
        path = tmp_path / "net.onnx"
        onnx.save(model, str(path))
        return path


def _group(m: Manifest, producer: str) -> Any:
    return next(g for g in m.groups if producer in g.producers)


def _axes(group: Any) -> set[tuple[str, int, int]]:
    return {(p.param, p.axis, p.per_channel) for p in group.params}


def _chain(tmp_path: Path) -> Path:
    net = _Net()
    h = net.node("Relu", [net.bn(net.conv("x", "conv0", 3, 8), "bn0", 8)], "r0")
    return net.save(tmp_path, net.head(net.conv(h, "conv1", 8, 16, stride=2), 16))


def test_plain_chain_groups_params_and_macs(tmp_path: Path) -> None:
    path = _chain(tmp_path)
    m = manifest_from_onnx(path)
    Manifest.model_validate_json(m.model_dump_json())  # round trip through the validator
    assert [g.producers for g in m.groups] == [["conv0"], ["conv1"], ["fc"]]
    assert [g.channels for g in m.groups] == [8, 16, 10]
    g0, g1, fc = m.groups
    assert _axes(g0) == {
        ("conv0.weight", 0, 1), ("conv0.bias", 0, 1), ("bn0.weight", 0, 1), ("bn0.bias", 0, 1),
        ("conv1.weight", 1, 1),
    }  # fmt: skip
    assert _axes(g1) == {("conv1.weight", 0, 1), ("conv1.bias", 0, 1), ("fc.weight", 1, 1)}
    assert _axes(fc) == {("fc.weight", 0, 1), ("fc.bias", 0, 1)}
    assert (g0.prunable, g0.reason, g1.prunable, fc.prunable, fc.reason) == (
        False, "stem", True, False, "classifier",
    )  # fmt: skip
    assert m.ignored == ["conv0", "fc"]
    assert [(lay.role, lay.out_spatial, lay.kind) for lay in m.layers] == [
        ("stem", 64, "conv2d"), ("body", 16, "conv2d"), ("classifier", 1, "linear"),
    ]  # fmt: skip
    macs = {"conv0": 8 * 3 * 9 * 64, "conv1": 16 * 8 * 9 * 16, "fc": 10 * 16}
    assert {c.name: c.macs for c in m.costs} == macs
    assert [(c.out_group, c.in_group) for c in m.costs] == [(0, None), (1, 0), (2, 1)]
    assert m.macs_total == sum(macs.values())
    assert m.input_shapes == [[1, 3, 8, 8]]
    assert "bn0.mean" not in m.param_shapes and m.param_shapes["fc.weight"] == [10, 16]
    assert m.params_total == read_checkpoint(path).info.n_params
    free = manifest_from_onnx(path, ignore_stem=False, ignore_classifier=False)
    assert all(g.prunable for g in free.groups) and free.ignored == []


def test_residual_add_merges_groups(tmp_path: Path) -> None:
    net = _Net()
    r0 = net.node("Relu", [net.conv("x", "conv0", 3, 8)], "r0")
    h = net.node("Relu", [net.conv(r0, "conv1", 8, 8)], "r1")
    s = net.node("Relu", [net.node("Add", [net.conv(h, "conv2", 8, 8), r0], "add")], "r2")
    m = manifest_from_onnx(net.save(tmp_path, net.head(s, 8)), ignore_stem=False)
    assert [g.producers for g in m.groups] == [["conv0", "conv2"], ["conv1"], ["fc"]]
    res = m.groups[0]
    assert res.prunable and {"conv0.weight", "conv2.weight", "conv2.bias"} <= {
        p.param for p in res.params
    }
    assert {("conv1.weight", 1, 1), ("fc.weight", 1, 1)} <= _axes(res)
    costs = {c.name: (c.out_group, c.in_group) for c in m.costs}
    assert costs == {"conv0": (0, None), "conv1": (1, 0), "conv2": (0, 1), "fc": (2, 0)}
    assert manifest_from_onnx(tmp_path / "net.onnx").groups[0].reason == "stem"


def test_depthwise_conv_joins_its_producer(tmp_path: Path) -> None:
    net = _Net()
    h = net.node("Relu", [net.conv("x", "stem", 3, 8)], "r0")
    h = net.node("Relu", [net.bn(net.conv(h, "pw1", 8, 16, k=1), "bn1", 16)], "r1")
    h = net.node("Relu", [net.conv(h, "dw", 16, 16, group=16)], "r2")
    path = net.save(tmp_path, net.head(net.conv(h, "pw2", 16, 8, k=1), 8))
    m = manifest_from_onnx(path)
    g = _group(m, "pw1")
    assert g.producers == ["pw1", "dw"] and g.channels == 16 and g.prunable
    assert {("dw.weight", 0, 1), ("dw.bias", 0, 1), ("pw2.weight", 1, 1)} <= _axes(g)
    assert ("dw.weight", 1, 1) not in _axes(g)
    dw = next(c for c in m.costs if c.name == "dw")
    assert (dw.macs, dw.out_group, dw.in_group) == (16 * 9 * 64, g.id, None)
    assert next(c for c in m.costs if c.name == "pw2").in_group == g.id


@pytest.mark.parametrize(("flatten", "trans_b"), [("Flatten", 1), ("Flatten", 0), ("Reshape", 1)])
def test_flatten_before_gemm_gives_per_channel(tmp_path: Path, flatten: str, trans_b: int) -> None:
    net = _Net()
    h = net.node("Relu", [net.conv("x", "stem", 3, 4)], "r0")
    h = net.conv(h, "conv1", 4, 8, stride=2)
    if flatten == "Flatten":
        flat = net.node("Flatten", [h], "flat")
    else:
        net.inits["shape"] = np.array([1, -1], dtype=np.int64)
        flat = net.node("Reshape", [h, "shape"], "flat")
    m = manifest_from_onnx(net.save(tmp_path, net.gemm(flat, "fc", 8 * 16, 5, trans_b)))
    g = _group(m, "conv1")
    assert ParamAxis(param="fc.weight", axis=trans_b, per_channel=16) in g.params
    assert ParamAxis(param="fc.weight", axis=1 - trans_b, per_channel=1) in m.groups[-1].params
    fc = m.costs[-1]
    assert (fc.macs, fc.in_group) == (5 * 128, g.id)


def test_concat_and_unknown_ops_make_groups_unprunable(tmp_path: Path) -> None:
    net = _Net()
    r0 = net.node("Relu", [net.conv("x", "stem", 3, 8)], "r0")
    cat = net.node("Concat", [net.conv(r0, "a", 8, 4), net.conv(r0, "b", 8, 4)], "cat", axis=1)
    t = net.node("Transpose", [net.conv(cat, "c", 8, 8)], "t", perm=[0, 1, 3, 2])
    m = manifest_from_onnx(net.save(tmp_path, net.head(net.conv(t, "d", 8, 8), 8)))
    for name in ("a", "b"):
        assert (_group(m, name).prunable, _group(m, name).reason) == (
            False, "feeds a Concat (not supported yet)",
        )  # fmt: skip
    c, d = _group(m, "c"), _group(m, "d")
    assert (c.prunable, c.reason, d.prunable) == (False, "feeds Transpose", True)
    assert all(p.param != "c.weight" or p.axis == 0 for p in _group(m, "a").params)
    assert {(x.name, x.in_group) for x in m.costs if x.name in "cd"} == {("c", None), ("d", None)}


def test_manifest_drives_grouping_and_flops_plan(tmp_path: Path) -> None:
    net = _Net(size=16)
    x = net.node("Relu", [net.bn(net.conv("x", "stem", 3, 16), "bn0", 16)], "r0")
    for i in range(3):
        h = net.node("Relu", [net.bn(net.conv(x, f"b{i}.conv1", 16, 32), f"b{i}.bn1", 32)], f"h{i}")
        h = net.bn(net.conv(h, f"b{i}.conv2", 32, 16), f"b{i}.bn2", 16)
        x = net.node("Relu", [net.node("Add", [h, x], f"add{i}")], f"out{i}")
    path = net.save(tmp_path, net.head(x, 16))
    ckpt, manifest = read_checkpoint(path), manifest_from_onnx(path)
    groups, skipped = build_groups(ckpt.layers, manifest)
    assert skipped == [] and {g.coupling for g in groups} == {"manifest"}
    assert {m.name for g in groups for m in g.members} == {lay.name for lay in ckpt.layers}
    plan = plan_layers(
        ckpt.layers, method="l1", target=Target(flops=0.3),
        params_total=ckpt.info.n_params, manifest=manifest,
    )  # fmt: skip
    assert plan.coupling == "manifest" and plan.flops_before == manifest.macs_total
    assert plan.flops_after is not None and plan.achieved["flops"] >= 0.3
    assert 1 - plan.flops_after / plan.flops_before >= 0.3
    assert all(g.channels_after == g.channels_before for g in plan.groups if g.name == "stem")


def test_matmul_weights_keep_their_onnx_layout(tmp_path: Path) -> None:
    net = _Net()
    net.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, 16])
    for name, shape in {"l1.weight": (16, 32), "l1.bias": (32,), "l2.weight": (32, 10)}.items():
        net._init(name, shape)
    h = net.node("Relu", [net.node("Add", [net.node("MatMul", ["x", "l1.weight"], "m1"),
                                            "l1.bias"], "a1")], "r1")  # fmt: skip
    m = manifest_from_onnx(net.save(tmp_path, net.node("MatMul", [h, "l2.weight"], "y"), rank=3))
    assert _axes(m.groups[0]) == {("l1.weight", 1, 1), ("l1.bias", 0, 1), ("l2.weight", 0, 1)}
    assert [(c.name, c.macs) for c in m.costs] == [("l1", 16 * 32 * 7), ("l2", 32 * 10 * 7)]
    assert [lay.weight_shape for lay in m.layers] == [[32, 16], [10, 32]]

"""Transformer blocks as neuron graphs: FFN neurons and attention heads (GQA groups) as vertices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graphs import analyze
from graphs.grouping import build_groups
from graphs.layers import LayerWeights
from graphs.manifest import Heads
from graphs.plan import Target
from graphs.planner import plan_layers
from graphs.report import CheckpointInfo
from graphs.transformer import NO_HEADS_REASON, attach_heads, heads_for

INFO = CheckpointInfo(sha256="0" * 64, format="safetensors", size_bytes=1, n_tensors=1, n_params=1)


def _lin(name: str, w: np.ndarray, bias: bool = True) -> LayerWeights:
    b = np.linspace(-1, 1, w.shape[0]) if bias else None
    return LayerWeights(name=name, kind="linear", weight=w, bias=b)


def _bert(
    rng: np.random.Generator, hidden: int = 32, heads: int = 4, inter: int = 64, n_layers: int = 2
) -> list[LayerWeights]:
    out: list[LayerWeights] = []
    for i in range(n_layers):
        p = f"encoder.layer.{i}"
        out += [
            _lin(f"{p}.attention.self.query", rng.standard_normal((hidden, hidden))),
            _lin(f"{p}.attention.self.key", rng.standard_normal((hidden, hidden))),
            _lin(f"{p}.attention.self.value", rng.standard_normal((hidden, hidden))),
            _lin(f"{p}.attention.output.dense", rng.standard_normal((hidden, hidden))),
            _lin(f"{p}.intermediate.dense", rng.standard_normal((inter, hidden))),
            _lin(f"{p}.output.dense", rng.standard_normal((hidden, inter))),
        ]
    return attach_heads(out, heads_for(out, heads, None, None))


def _llama(
    rng: np.random.Generator, h: int = 8, kv: int = 2, d: int = 4, hidden: int = 24, inter: int = 40
) -> list[LayerWeights]:
    p = "model.layers.0"
    layers = [
        _lin(f"{p}.self_attn.q_proj", rng.standard_normal((h * d, hidden)), bias=False),
        _lin(f"{p}.self_attn.k_proj", rng.standard_normal((kv * d, hidden)), bias=False),
        _lin(f"{p}.self_attn.v_proj", rng.standard_normal((kv * d, hidden)), bias=False),
        _lin(f"{p}.self_attn.o_proj", rng.standard_normal((hidden, h * d)), bias=False),
        _lin(f"{p}.mlp.gate_proj", rng.standard_normal((inter, hidden)), bias=False),
        _lin(f"{p}.mlp.up_proj", rng.standard_normal((inter, hidden)), bias=False),
        _lin(f"{p}.mlp.down_proj", rng.standard_normal((hidden, inter)), bias=False),
    ]
    return attach_heads(layers, heads_for(layers, h, kv, d))


def _unit(a: np.ndarray) -> np.ndarray:
    return a / math.sqrt(float(np.mean(a * a)))


def test_ffn_neurons_are_rows_of_up_and_columns_of_down() -> None:
    layers = _bert(np.random.default_rng(0))
    groups, skipped = build_groups(layers)
    assert not skipped
    ffn = next(g for g in groups if g.unit == "neurons")
    up, down = ffn.members
    assert (ffn.name, ffn.n_filters, ffn.fan_in) == (up.name, 64, 32 + 32)
    assert [m.name for m in ffn.producers] == [up.name]
    X = ffn.vectors()
    want = np.concatenate([_unit(up.weight)[5], _unit(down.weight)[:, 5]])
    np.testing.assert_allclose(X[5], want)


def test_a_head_is_its_rows_of_q_k_v_and_columns_of_o() -> None:
    layers = _bert(np.random.default_rng(1))
    groups, _ = build_groups(layers)
    attn = next(g for g in groups if g.unit == "heads")
    q, k, v, o = attn.members
    assert attn.heads == Heads(num_heads=4, num_kv_heads=4, head_dim=8)
    assert (attn.n_filters, attn.fan_in) == (4, 4 * 8 * 32)
    X = attn.vectors()
    h = 2
    rows = slice(h * 8, (h + 1) * 8)
    want = [_unit(m.weight)[rows].ravel() for m in (q, k, v)] + [_unit(o.weight)[:, rows].ravel()]
    np.testing.assert_allclose(X[h], np.concatenate(want))


def test_gqa_vertices_are_kv_heads_with_their_q_heads() -> None:
    groups, _ = build_groups(_llama(np.random.default_rng(2)))
    attn, ffn = groups
    assert attn.unit == "heads" and attn.n_filters == 2  # 8 q heads share 2 k/v heads
    assert attn.axes == ((0, 16), (0, 4), (0, 4), (1, 16))
    assert [m.name.rsplit(".", 1)[1] for m in ffn.members] == ["up_proj", "gate_proj", "down_proj"]
    assert ffn.n_filters == 40 and ffn.fan_in == 24 * 3


def test_without_heads_attention_is_skipped_and_ffn_still_grouped() -> None:
    layers = [
        LayerWeights(x.name, x.kind, x.weight, bias=x.bias) for x in _bert(np.random.default_rng(3))
    ]
    groups, skipped = build_groups(layers)
    assert [g.unit for g in groups] == ["neurons", "neurons"]
    assert len(skipped) == 8 and {s.reason for s in skipped} == {NO_HEADS_REASON}
    report = analyze(layers, checkpoint=INFO, methods=["mrp"])
    assert [r.kind for r in report.layers] == ["ffn", "ffn"]
    assert "config.json" in report.skipped[0].reason


def test_heads_that_do_not_fit_the_weights_are_a_reason() -> None:
    layers = _bert(np.random.default_rng(4))
    bad = Heads(num_heads=5, num_kv_heads=5, head_dim=8)
    layers = [LayerWeights(x.name, x.kind, x.weight, bias=x.bias, heads=bad) for x in layers]
    _, skipped = build_groups(layers)
    assert skipped and "q rows 32 ≠ 40" in skipped[0].reason


def test_duplicated_heads_and_neurons_are_redundant() -> None:
    rng = np.random.default_rng(5)
    layers = _bert(rng, hidden=32, heads=8, inter=64, n_layers=1)
    byname = {x.name: x for x in layers}
    planted = []
    for x in layers:
        w = np.array(x.weight)
        if x.name.endswith(("query", "key", "value")):
            w[4:8] = w[0:4] + 0.01 * rng.standard_normal((4, 32))  # head 1 ≈ head 0 (d = 4)
        elif x.name.endswith("attention.output.dense"):
            w[:, 4:8] = w[:, 0:4]
        elif x.name.endswith("intermediate.dense"):
            w[32:] = w[:32] * 1.01  # 32 duplicated neurons …
        elif x.name.endswith("output.dense"):
            w[:, 32:] = w[:, :32]  # … with duplicated down columns
        planted.append(LayerWeights(x.name, x.kind, w, bias=byname[x.name].bias, heads=x.heads))
    report = analyze(planted, checkpoint=INFO, methods=["mrp", "hsc"])
    attn, ffn = report.layers
    assert (attn.kind, attn.n_filters, ffn.kind, ffn.n_filters) == ("attention", 8, "ffn", 64)
    assert attn.methods["mrp"].redundancy == pytest.approx(1 / 8)
    assert ffn.methods["mrp"].redundancy == pytest.approx(0.5)
    clean = analyze(layers, checkpoint=INFO, methods=["mrp"])
    assert [r.methods["mrp"].redundancy for r in clean.layers] == [0.0, 0.0]


def _shapes(layers: list[LayerWeights]) -> dict[str, list[int]]:
    out = {f"{x.name}.weight": list(x.shape) for x in layers}
    out |= {f"{x.name}.bias": [x.shape[0]] for x in layers if x.bias is not None}
    return out


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_plans_remove_whole_heads_and_neurons_with_exact_shapes(family: str) -> None:
    rng = np.random.default_rng(6)
    layers = _bert(rng) if family == "bert" else _llama(rng)
    total = sum(x.params for x in layers)
    plan = plan_layers(layers, method="l1", target=Target(params=0.4), params_total=total, seed=0)
    before = _shapes(layers)
    assert set(plan.expected_shapes) == set(before)
    for gp in plan.groups:
        assert gp.unit in ("heads", "neurons") and gp.params and gp.remove
        removed = len(gp.remove)
        for pa in gp.params:
            want = list(before[pa.param])
            want[pa.axis] -= removed * pa.per_channel
            assert plan.expected_shapes[pa.param] == want
        if gp.unit == "heads":
            assert gp.heads is not None and gp.channels_before == gp.heads.num_kv_heads
            d, rep = gp.heads.head_dim, gp.heads.n_rep
            q = plan.expected_shapes[f"{gp.producers[0]}.weight"]
            assert q[0] == gp.channels_after * rep * d  # whole GQA groups: the ratio holds
        else:
            assert gp.heads is None
    kept = sum(math.prod(s) for s in plan.expected_shapes.values())
    assert plan.params_after == kept and plan.achieved["params"] >= 0.4
    assert all("heads" not in g.model_dump(exclude_defaults=True) for g in plan.groups[1:2])


def test_plain_plans_are_unchanged_by_the_new_fields() -> None:
    rng = np.random.default_rng(7)
    layers = [_lin("a", rng.standard_normal((8, 4))), _lin("b", rng.standard_normal((6, 8)))]
    layers.append(_lin("c", rng.standard_normal((3, 6))))
    plan = plan_layers(layers, method="l1", target=Target(params=0.2), params_total=200)
    dumped = plan.to_json()
    assert '"unit"' not in dumped and '"heads"' not in dumped

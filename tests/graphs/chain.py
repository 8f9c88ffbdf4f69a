"""Small checkpoints for the planner's tests: a conv chain with one planted layer and a tiny
model with its manifest (numpy only)."""

from __future__ import annotations

import numpy as np

from graphs import LayerWeights
from graphs.manifest import ChannelGroup, Manifest, ManifestLayer, ModuleCost, ParamAxis
from graphs.plan import PruningPlan, Target
from graphs.planner import plan_layers
from tests.graphs.planted import planted_layer, random_layer


def conv(name: str, X: np.ndarray, k: int = 3) -> LayerWeights:
    """A conv2d layer of k×k kernels from filters X (n, c·k·k)."""
    return LayerWeights(name=name, kind="conv2d", weight=X.reshape(X.shape[0], -1, k, k))


def chain() -> list[LayerWeights]:
    """stem 16 → a 32 (random) → b 32 (8 prototypes × 4 copies) → c 64 (random) → fc 10."""
    planted, _ = planted_layer(8, 4, 32 * 9, seed=0)
    return [
        conv("stem", random_layer(16, 27, seed=1)),
        conv("a", random_layer(32, 16 * 9, seed=2)),
        conv("b", planted),
        conv("c", random_layer(64, 32 * 9, seed=3)),
        LayerWeights(name="fc", kind="linear", weight=random_layer(10, 64, seed=4)),
    ]


def plan_chain(method: str, target: Target, **kw: object) -> PruningPlan:
    """The plan of :func:`chain` by ``method`` (``kw``: plan_layers' options)."""
    layers = chain()
    total = sum(layer.params for layer in layers)
    return plan_layers(layers, method=method, target=target, params_total=total, **kw)  # type: ignore[arg-type]


def tiny_manifest() -> tuple[Manifest, list[LayerWeights]]:
    """conv a (8×3×3×3) → bn → conv b (6×8×3×3) → flatten (6×2×2) → fc (4×24)."""
    layers = [
        conv("a", random_layer(8, 27, seed=0)),
        conv("b", planted_layer(3, 2, 72, seed=1)[0]),
        LayerWeights(name="fc", kind="linear", weight=random_layer(4, 24, seed=2)),
    ]
    shapes = {
        "a.weight": [8, 3, 3, 3], "a.bias": [8], "bn.weight": [8], "bn.bias": [8],
        "b.weight": [6, 8, 3, 3], "b.bias": [6], "fc.weight": [4, 24], "fc.bias": [4],
    }  # fmt: skip
    groups = [
        ChannelGroup(
            id=0, channels=8, producers=["a"],
            params=[ParamAxis(param="a.weight", axis=0), ParamAxis(param="a.bias", axis=0),
                    ParamAxis(param="bn.weight", axis=0), ParamAxis(param="bn.bias", axis=0),
                    ParamAxis(param="b.weight", axis=1)],
        ),
        ChannelGroup(
            id=1, channels=6, producers=["b"],
            params=[ParamAxis(param="b.weight", axis=0), ParamAxis(param="b.bias", axis=0),
                    ParamAxis(param="fc.weight", axis=1, per_channel=4)],
        ),
        ChannelGroup(id=2, channels=4, producers=["fc"], params=[], prunable=False,
                     reason="classifier"),
    ]  # fmt: skip
    man = Manifest(
        input_shapes=[[1, 3, 6, 6]],
        params_total=sum(int(np.prod(s)) for s in shapes.values()),
        macs_total=8 * 27 * 16 + 6 * 72 * 4 + 4 * 24 + 100,
        param_shapes=shapes,
        layers=[
            ManifestLayer(name="a", kind="conv2d", weight_shape=[8, 3, 3, 3], out_spatial=16),
            ManifestLayer(name="b", kind="conv2d", weight_shape=[6, 8, 3, 3], out_spatial=4),
            ManifestLayer(
                name="fc", kind="linear", weight_shape=[4, 24], out_spatial=1, role="classifier"
            ),
        ],
        groups=groups,
        costs=[
            ModuleCost(name="a", macs=8 * 27 * 16, out_group=0),
            ModuleCost(name="b", macs=6 * 72 * 4, out_group=1, in_group=0),
            ModuleCost(name="fc", macs=4 * 24, in_group=1),
        ],
        ignored=["fc"],
    )
    return man, layers

"""The tiny model (tests.graphs.chain.tiny_manifest) with planted activation statistics: 3 of
conv a's 8 channels are exact combinations of the others at b's input."""

from __future__ import annotations

import numpy as np

from graphs.plan import PruningPlan, Target
from graphs.planner import plan_layers
from tests.graphs.chain import tiny_manifest
from tests.graphs.test_functional import gram

REMOVABLE = [1, 4, 6]  # 3 of a's 8 channels are exact combinations of 5 others at b's input
# (so b's input has rank 5: any 3 channels whose rest spans it are removable exactly)


def planted_maps(seed: int = 0) -> np.ndarray:
    """b's input: 40 samples of a's 8 channels on 4×4 (after BN/ReLU), 3 channels planted."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 8, 4, 4)) + 0.3
    others = [i for i in range(8) if i not in REMOVABLE]
    mix = rng.normal(size=(3, 5))
    x[:, REMOVABLE] = np.einsum("rk,nkhw->nrhw", mix, x[:, others]) + 0.2
    return x


def planted_stats(seed: int = 0) -> dict[str, np.ndarray]:
    """Second moments at b's input (of :func:`planted_maps`) and at fc's (random)."""
    rng = np.random.default_rng(seed + 1)
    x = planted_maps(seed)
    fc_in = rng.normal(size=(40, 6, 4)).reshape(40, 24)
    return {"b": gram(x.transpose(0, 2, 3, 1).reshape(-1, 8)), "fc": gram(fc_in)}


def plan_tiny(method: str, **kw: object) -> PruningPlan:
    """The tiny model's plan at -25 % FLOPs by ``method`` (``kw``: plan_layers' options)."""
    man, layers = tiny_manifest()
    return plan_layers(
        layers, method=method, target=Target(flops=0.25), params_total=man.params_total,  # type: ignore[arg-type]
        manifest=man, **kw,  # type: ignore[arg-type]
    )  # fmt: skip

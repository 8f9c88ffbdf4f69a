"""What the executor tests share: random layers, their group tasks, a small llama-shaped sharded
safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from graphs.grouping import build_groups
from graphs.layers import LayerWeights
from graphs.options import AnalysisOptions
from service.jobs.executors.local import (
    GroupTask,
)
from service.store.cache import code_namespace


def random_layers(seed: int) -> list[LayerWeights]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(6, 27))
    w1 = np.concatenate([base, base + 0.01 * rng.normal(size=(6, 27))]).reshape(12, 3, 3, 3)
    return [
        LayerWeights("conv1", "conv2d", w1.astype(np.float32), bn="bn1", extra_params=24),
        LayerWeights("dw", "conv2d", rng.normal(size=(12, 1, 3, 3)), groups=12),
        LayerWeights("conv2", "conv2d", rng.normal(size=(16, 12, 1, 1))),
        LayerWeights("fc", "linear", rng.normal(size=(1, 16))),  # one filter: every method says so
    ]


def group_tasks(layers: list[LayerWeights], methods: tuple[str, ...], **kw: Any) -> list[GroupTask]:
    groups, _ = build_groups(layers)
    base: dict[str, Any] = {
        "methods": methods,
        "options": AnalysisOptions(),
        "seed": 3,
        "activations": None,
        "cache_dir": None,
        "namespace": code_namespace(),
    }
    return [GroupTask.of(g, **{**base, **kw}) for g in groups]


def llama_checkpoint(folder: Path, hidden: int, inter: int, blocks: int = 2) -> Path:
    """A Llama-shaped sharded safetensors checkpoint (one shard a block) with its config.json."""
    import json

    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    rng = np.random.default_rng(hidden)
    weight_map: dict[str, str] = {}
    for b in range(blocks):
        p = f"model.layers.{b}"
        shapes = {f"{p}.self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"}
        shapes |= {f"{p}.mlp.{x}_proj.weight": (inter, hidden) for x in ("up", "gate")}
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
        tensors = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
        file = f"model-{b + 1:05d}-of-{blocks:05d}.safetensors"
        save_file(tensors, str(folder / file))
        weight_map |= dict.fromkeys(tensors, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"model_type": "llama", "hidden_size": hidden, "num_attention_heads": 4}
    (folder / "config.json").write_text(json.dumps(config))
    return folder

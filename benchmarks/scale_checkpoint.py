"""Llama-7B shapes and the generated sharded checkpoint of the scale benchmark
(:mod:`benchmarks.scale`): random bf16 weights, 2 blocks a safetensors shard, the index and a
``config.json`` beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN, INTERMEDIATE, HEADS, BLOCKS = 4096, 11008, 32, 8
QUICK = 8  # --quick divides every dimension by this
STD = 0.02  # Llama's initializer range


def _bf16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> 16).astype(
        np.uint16
    )


def block_tensors(b: int, h: int, inter: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{b}"
    return [
        (f"{p}.input_layernorm.weight", (h,)),
        (f"{p}.mlp.down_proj.weight", (h, inter)),
        (f"{p}.mlp.gate_proj.weight", (inter, h)),
        (f"{p}.mlp.up_proj.weight", (inter, h)),
        (f"{p}.post_attention_layernorm.weight", (h,)),
        *[(f"{p}.self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"],
    ]


def write_checkpoint(folder: Path, quick: bool, blocks: int = BLOCKS, per_shard: int = 2) -> int:
    """The sharded bf16 checkpoint, written tensor by tensor (one float32 tensor in memory at a
    time); returns its size in bytes."""
    d = QUICK if quick else 1
    h, inter = HIDDEN // d, INTERMEDIATE // d
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = -(-blocks // per_shard)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        entries = [
            t
            for b in range(s * per_shard, min((s + 1) * per_shard, blocks))
            for t in block_tensors(b, h, inter)
        ]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape in entries:
            n = 2 * int(np.prod(shape))
            header[key] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
            weight_map[key] = shard
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / shard, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for j, (_key, shape) in enumerate(entries):
                if len(shape) == 1:
                    x = np.ones(shape, dtype=np.float32)
                else:
                    rng = np.random.default_rng([7, s, j])
                    x = rng.standard_normal(shape, dtype=np.float32)
                    x *= STD
                f.write(_bf16_bytes(x).data)
                del x
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": blocks,
        "torch_dtype": "bfloat16",
        "note": "prunegraph benchmarks/scale.py: random weights, Llama-7B shapes",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return total

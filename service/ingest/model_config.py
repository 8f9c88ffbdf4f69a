"""A model's ``config.json`` next to its checkpoint: the attention heads the weights cannot tell.

Hugging Face configs name them ``num_attention_heads``, ``num_key_value_heads`` (grouped-query
attention; absent means one k/v head per q head) and ``head_dim`` (absent means q's rows /
num_attention_heads); ``n_head``/``n_kv_heads`` and a nested ``text_config`` are understood too.
The file is optional metadata: a missing, oversized or malformed one is ignored (attention
blocks are then skipped with the reason), never an error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from graphs.layers import LayerWeights
from graphs.transformer import attach_heads, heads_for

CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 1 << 20
_HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
_KV = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")


def config_heads(folder: Path) -> tuple[int, int | None, int | None] | None:
    """``(num_heads, num_kv_heads or None, head_dim or None)`` from ``folder/config.json``."""
    path = folder / CONFIG_NAME
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    for cfg in (data, data.get("text_config") if isinstance(data, dict) else None):
        if not isinstance(cfg, dict):
            continue
        heads = _first_int(cfg, _HEADS)
        if heads is not None:
            return heads, _first_int(cfg, _KV), _first_int(cfg, ("head_dim",))
    return None


def _first_int(cfg: dict[str, object], keys: Sequence[str]) -> int | None:
    for k in keys:
        v = cfg.get(k)
        if type(v) is int and v >= 1:
            return v
    return None


def with_config_heads(layers: Sequence[LayerWeights], folder: Path) -> list[LayerWeights]:
    """``layers`` with the heads of ``folder/config.json`` set on every attention projection
    whose block they fit (others stay without heads)."""
    found = config_heads(folder)
    if found is None:
        return list(layers)
    return attach_heads(layers, heads_for(layers, *found))

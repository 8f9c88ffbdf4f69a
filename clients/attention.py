"""Transformer blocks in live models: their heads for manifests, and removing neurons and heads.

:func:`attention_blocks` finds attention blocks by name (:mod:`graphs.transformer`) among the
model's ``nn.Linear`` layers and reads their heads from the attention module (the parent of q):
``num_heads``/``num_attention_heads``/``n_heads``, ``num_key_value_heads``/``num_kv_heads``,
``head_dim``/``attention_head_size``, or its ``config`` (Hugging Face modules), completed from the
projections' shapes.

:func:`check_unit_group` and :func:`prune_unit_group` apply a plan group whose unit is
``neurons`` or ``heads``: its ``params`` say which (parameter, axis) loses ``per_channel``
consecutive entries per removed index, so the rows of q/k/v (up/gate) and the columns of o
(down) go with torch-pruning's per-layer functions. Removing heads also updates the attention
module's head counts (and ``all_head_size``) where it keeps them; the head size stays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch_pruning as tp
from torch import nn

from clients.errors import PlanMismatchError
from graphs.layers import LayerWeights
from graphs.manifest import AttentionBlock, Heads
from graphs.plan import GroupPlan
from graphs.transformer import block_group, find_blocks

__all__ = ["attention_blocks", "check_unit_group", "prune_unit_group"]

_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_DIM = ("head_dim", "attention_head_size", "d_head")
_WIDTH = ("all_head_size", "inner_dim")


def _attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    config = getattr(module, "config", None)
    for owner in (module, config):
        for n in names:
            v = getattr(owner, n, None) if owner is not None else None
            if type(v) is int and v >= 1:
                return v
    return None


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """The model's attention blocks whose heads its modules tell, checked against the shapes."""
    shell = [
        LayerWeights(n, "linear", np.broadcast_to(np.float32(0), tuple(m.weight.shape)))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    out: list[AttentionBlock] = []
    for block in find_blocks(shell):
        if block.unit != "heads":
            continue
        q, k, v, o = (block.parts[p] for p in ("q", "k", "v", "o"))
        module = _parent(model, q.name)
        d, h, kv = _attr(module, _DIM), _attr(module, _HEADS), _attr(module, _KV)
        if d is None and h is not None and q.shape[0] % h == 0:
            d = q.shape[0] // h
        if d is None:
            continue
        h = h or q.shape[0] // d
        kv = kv or k.shape[0] // d
        if h < 1 or kv < 1 or h % kv:
            continue
        heads = Heads(num_heads=h, num_kv_heads=kv, head_dim=d)
        block.parts = {p: _with(block.parts[p], heads) for p in ("q", "k", "v", "o")}
        if not isinstance(block_group(block), str):  # the shapes fit these heads
            out.append(AttentionBlock(q=q.name, k=k.name, v=v.name, o=o.name, heads=heads))
    return out


def _with(layer: LayerWeights, heads: Heads) -> LayerWeights:
    return LayerWeights(layer.name, "linear", layer.weight, heads=heads)


def check_removal(gp: GroupPlan, where: str, keep: str) -> None:
    """A plan group's indices lie in range and leave ``channels_after`` units, at least one.

    ``keep`` ends the message when a group would lose every unit (what must stay).
    """
    remove = gp.remove
    if remove and (remove[0] < 0 or remove[-1] >= gp.channels_before):
        raise PlanMismatchError(f"{where}: indices out of range [0, {gp.channels_before})")
    if len(remove) >= gp.channels_before or gp.channels_after != gp.channels_before - len(remove):
        raise PlanMismatchError(
            f"{where} removes {len(remove)} of {gp.channels_before} and says "
            f"{gp.channels_after} remain; {keep}"
        )


def check_unit_group(gp: GroupPlan, model: nn.Module) -> None:
    """A neuron/head plan group against the model, before anything changes."""
    params = dict(model.named_parameters())
    where = f"plan group {gp.id} ({gp.name}, {gp.unit})"
    if not gp.params:
        raise PlanMismatchError(f"{where} lists no parameters to shrink; the plan is corrupt")
    for pa in gp.params:
        module_name, _, kind = pa.param.rpartition(".")
        p = params.get(pa.param)
        module = dict(model.named_modules()).get(module_name)
        if p is None or not isinstance(module, nn.Linear) or kind not in ("weight", "bias"):
            raise PlanMismatchError(
                f"{where} shrinks {pa.param!r}, which is not the weight or bias of a Linear "
                "layer of this model: the plan was made for another model"
            )
        if pa.axis >= p.dim() or p.shape[pa.axis] != gp.channels_before * pa.per_channel:
            raise PlanMismatchError(
                f"{where}: {pa.param} has shape {list(p.shape)} here, the plan expects "
                f"{gp.channels_before} × {pa.per_channel} entries on axis {pa.axis}: the plan "
                "was made for another model (or this one is pruned already)"
            )
    check_removal(gp, where, "a block must keep at least one")
    if gp.unit == "heads":
        if gp.heads is None or gp.heads.num_kv_heads != gp.channels_before:
            raise PlanMismatchError(f"{where}: its heads do not match its {gp.channels_before}")
        module = _parent(model, gp.producers[0])
        for names, want in _counts(gp.heads, gp.heads.num_kv_heads):
            for n in names:
                have = getattr(module, n, None)
                if type(have) is int and have != want:
                    raise PlanMismatchError(
                        f"{where}: the attention module has {n} = {have}, the plan's heads "
                        f"say {want}: the plan was made for another model"
                    )


def _counts(heads: Heads, kv: int) -> list[tuple[tuple[str, ...], int]]:
    """Head-count attributes and their values with ``kv`` k/v heads kept."""
    h = kv * heads.n_rep
    return [(_HEADS, h), (_KV, kv), (_WIDTH, h * heads.head_dim)]


def prune_unit_group(gp: GroupPlan, model: nn.Module) -> None:
    """Remove the group's neurons or heads (checked by :func:`check_unit_group`)."""
    if not gp.remove:
        return
    done: set[tuple[str, int]] = set()
    for pa in gp.params:
        module_name = pa.param.rpartition(".")[0]
        axis = 0 if pa.param.endswith(".bias") else pa.axis
        if (module_name, axis) in done:
            continue  # the weight's function also prunes the bias
        done.add((module_name, axis))
        module = model.get_submodule(module_name)
        per = pa.per_channel
        idxs = [i * per + j for i in gp.remove for j in range(per)]
        prune: Any = tp.prune_linear_out_channels if axis == 0 else tp.prune_linear_in_channels
        prune(module, idxs)
    if gp.unit == "heads" and gp.heads is not None:
        module = _parent(model, gp.producers[0])
        for names, want in _counts(gp.heads, gp.channels_after):
            for n in names:
                if type(getattr(module, n, None)) is int:
                    setattr(module, n, want)

"""Recurrent modules in live models: their hidden units in manifests, and removing them.

torch-pruning 1.6's ``LSTMPruner`` slices the wrong axes (rows of ``weight_hh`` without their
gates, columns of ``weight_ih``) and knows no GRU, RNN or cell; prunegraph therefore does its own
surgery on ``nn.LSTM``/``nn.GRU``/``nn.RNN`` and ``nn.LSTMCell``/``nn.GRUCell``/``nn.RNNCell``
and lets torch-pruning's dependency graph treat them as opaque (:func:`opaque_pruners`): a group
of conv/linear channels that reaches one is reported unprunable by the manifest.

:func:`hidden_groups` gives one :class:`~graphs.manifest.ChannelGroup` (``unit="hidden"``) per
recurrent module run by the forward pass, with ``hidden_size`` channels. Unit j is unit j of every
layer and direction (an ``nn.LSTM`` has one ``hidden_size``): its rows in every gate of
``weight_ih_l{k}``/``weight_hh_l{k}`` and their biases (``blocks`` = gates), its column of
``weight_hh_l{k}``, its columns of the next layer's ``weight_ih`` (``blocks`` = directions), and
its columns in every consumer, found by value: a ``nn.Linear`` or recurrent module whose input
features are exactly the module's output features (``out[..., k]`` or a cell's ``h``, possibly
sliced by time or reshaped). The group is unprunable, with the reason, when ``proj_size`` is set,
when something reads only part of the features or mixes them with others, or when removing one
unit on a copy of the model breaks its forward pass (a consumer the manifest cannot follow).

:func:`check_hidden_group` and :func:`prune_hidden_group` apply a plan group of hidden units.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from clients.attention import check_removal
from clients.errors import PlanMismatchError
from graphs.manifest import ChannelGroup, ModuleCost, ParamAxis
from graphs.plan import GroupPlan
from graphs.recurrent import parse

__all__ = ["check_hidden_group", "hidden_groups", "opaque_pruners", "prune_hidden_group"]

RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_MATCH_VALUES = 64  # values per feature compared when matching consumers
_MAX_ROWS = 4096  # rows (samples × time steps) of each recorded output used for matching


class _Opaque(tp.pruner.BasePruningFunc):
    """Lets the dependency graph trace through a recurrent module without pruning it."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("recurrent modules are pruned by clients.recurrent")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: Any) -> int:
        return int(layer.hidden_size) * _directions(layer)

    def get_in_channels(self, layer: Any) -> int:
        return int(layer.input_size)


def opaque_pruners() -> dict[type[nn.Module], Any]:
    """``customized_pruners`` for ``tp.DependencyGraph.build_dependency``."""
    kinds = (nn.LSTM, nn.GRU, nn.RNN)
    return {k: _Opaque() for k in kinds}


def _directions(m: Any) -> int:
    return 2 if getattr(m, "bidirectional", False) else 1


def _gates(m: Any) -> int:
    if isinstance(m, nn.RNNBase):
        return _GATES[m.mode]
    gates: dict[type, int] = {nn.LSTMCell: 4, nn.GRUCell: 3}
    return gates.get(type(m), 1)


def _suffixes(m: Any) -> list[tuple[int, str]]:
    """(layer, parameter suffix) of every layer and direction; ``""`` for a cell."""
    if isinstance(m, nn.RNNCellBase):
        return [(0, "")]
    dirs = ["", "_reverse"][: _directions(m)]
    return [(k, f"_l{k}{d}") for k in range(m.num_layers) for d in dirs]


def _own_params(name: str, m: Any) -> list[ParamAxis]:
    g, d = _gates(m), _directions(m)
    params = dict(m.named_parameters())
    out: list[ParamAxis] = []
    for layer, sfx in _suffixes(m):
        for what in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            if f"{what}{sfx}" in params:
                out.append(ParamAxis(param=f"{name}.{what}{sfx}", axis=0, blocks=g))
            if what == "weight_ih" and layer > 0:  # reads the previous layer's directions
                out.append(ParamAxis(param=f"{name}.{what}{sfx}", axis=1, blocks=d))
            if what == "weight_hh":
                out.append(ParamAxis(param=f"{name}.{what}{sfx}", axis=1))
    return out


def _recorded(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Outputs (hidden features, last axis) of recurrent modules and inputs of linear and
    recurrent modules, per call, from one forward pass."""
    seen: dict[str, Any] = {"out": {}, "in": {}}
    names = {m: n for n, m in model.named_modules()}

    def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        name = names[m]
        if isinstance(m, RECURRENT_TYPES):
            h = out[0] if isinstance(out, tuple) else out
            seen["out"].setdefault(name, []).append(h.detach().reshape(-1, h.shape[-1]))
        if args and isinstance(args[0], torch.Tensor):
            x = args[0].detach()
            seen["in"].setdefault(name, []).append(x.reshape(-1, x.shape[-1]))

    kinds: tuple[type[nn.Module], ...] = (nn.Linear, *RECURRENT_TYPES)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    flags = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()  # no BatchNorm statistics change
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    return seen


def _feature_of(values: list[torch.Tensor], width: int) -> dict[float, int]:
    """Output value -> the feature that produced it; -1 for values several features share."""
    owner: dict[float, int] = {}
    for v in values:
        for f in range(width):
            for x in v[:_MAX_ROWS, f].tolist():
                if owner.setdefault(x, f) != f:
                    owner[x] = -1
    return owner


def _consumers(
    name: str, m: Any, model: nn.Module, seen: dict[str, Any]
) -> tuple[list[ParamAxis], list[str]]:
    """The consumers' (parameter, axis) of ``m``'s hidden units, and problems."""
    width = int(m.hidden_size) * _directions(m)
    owner = _feature_of(seen["out"].get(name, []), width)
    params: list[ParamAxis] = []
    problems: list[str] = []
    modules = dict(model.named_modules())
    for other, xs in seen["in"].items():
        if other == name:
            continue
        feats = xs[0].shape[-1]
        found = [
            {owner.get(x) for x in xs[0][:_MATCH_VALUES, k].tolist()} - {-1} for k in range(feats)
        ]
        hits = [k for k, f in enumerate(found) if f and None not in f]
        if not hits:
            continue
        if (
            len(hits) != feats
            or feats % width
            or any(found[k] != {k % width} for k in range(feats))
        ):
            problems.append(
                f"{other} reads {name}'s hidden units in a layout the manifest cannot express "
                "(part of them, reordered, or together with other inputs)"
            )
            continue
        blocks = feats // int(m.hidden_size)
        consumer: Any = modules[other]
        if isinstance(consumer, nn.Linear):
            params.append(ParamAxis(param=f"{other}.weight", axis=1, blocks=blocks))
        else:
            sfx = ["", "_reverse"][: _directions(consumer)]
            ih = (
                ["weight_ih"]
                if isinstance(consumer, nn.RNNCellBase)
                else [f"weight_ih_l0{s}" for s in sfx]
            )
            params += [ParamAxis(param=f"{other}.{p}", axis=1, blocks=blocks) for p in ih]
    return params, problems


def hidden_groups(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    first_id: int,
    ignored: Sequence[str] = (),
) -> list[ChannelGroup]:
    """One group of hidden units per recurrent module the forward pass runs (ids from
    ``first_id``, in ``model.named_modules()`` order); see the module docstring. Modules in
    ``ignored`` (or inside an ignored container) are unprunable."""
    if not any(isinstance(m, RECURRENT_TYPES) for m in model.modules()):
        return []
    seen = _recorded(model, inputs)
    out: list[ChannelGroup] = []
    for name, module in model.named_modules():
        if not isinstance(module, RECURRENT_TYPES) or name not in seen["out"]:
            continue
        m: Any = module
        own = _own_params(name, m)
        if getattr(m, "proj_size", 0):  # weight_hh reads the projection: list what fits
            shapes = {n: list(p.shape) for n, p in model.named_parameters()}
            h = int(m.hidden_size)
            own = [pa for pa in own if shapes[pa.param][pa.axis] == h * pa.blocks]
            consumers: list[ParamAxis] = []
            problems = ["LSTM with proj_size: its hidden state is a projection"]
        else:
            consumers, problems = _consumers(name, m, model, seen)
        if m.hidden_size < 2:
            problems.append("a single hidden unit cannot be pruned")
        if any(name == n or name.startswith(f"{n}.") for n in ignored):
            problems.append("ignored by the user")
        group = ChannelGroup(
            id=first_id + len(out),
            channels=int(m.hidden_size),
            producers=[name],
            params=own + consumers,
            unit="hidden",
        )
        if not problems:
            problems = _trial(model, inputs, group)
        if problems:
            group = group.model_copy(update={"prunable": False, "reason": "; ".join(problems)})
        out.append(group)
    return out


def _trial(model: nn.Module, inputs: tuple[torch.Tensor, ...], group: ChannelGroup) -> list[str]:
    """Remove the last unit on a copy of the model and run it: what fails, if anything."""
    trial = copy.deepcopy(model)
    last = group.channels - 1
    gp = GroupPlan(
        id=group.id,
        name=group.producers[0],
        producers=group.producers,
        channels_before=group.channels,
        channels_after=last,
        remove=[last],
        redundancy=None,
        rationale="trial",
        unit="hidden",
        params=group.params,
    )
    try:
        with torch.no_grad():
            trial.eval()
            before = [t.shape for t in _flat(trial(*inputs))]
            prune_hidden_group(gp, trial)
            after = [t.shape for t in _flat(trial(*inputs))]
    except Exception as exc:  # any failure makes the group unprunable
        return [
            f"removing a hidden unit of {group.producers[0]} breaks the forward pass ({exc}): a "
            "consumer of its units is not a Linear or recurrent layer the manifest can follow"
        ]
    if before != after:
        return [f"{group.producers[0]}'s hidden units are (part of) the model's output"]
    return []


def _flat(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flat(o)]
    return []


def hidden_costs(
    model: nn.Module, calls: Sequence[Any], groups: Sequence[ChannelGroup]
) -> list[ModuleCost]:
    """MACs of the recurrent modules split so that they scale with their groups: the input part
    (``weight_ih``) with the units, the recurrent part (``weight_hh``) with the units squared.
    ``calls``: the traced module calls (``.name``, ``.macs`` per sample)."""
    by_name = {g.producers[0]: g for g in groups}
    modules = dict(model.named_modules())
    total: dict[str, float] = {}
    for c in calls:
        if c.name in by_name:
            total[c.name] = total.get(c.name, 0.0) + c.macs
    out: list[ModuleCost] = []
    for name, macs in total.items():
        m, g = modules[name], by_name[name]
        ih = hh = 0
        for _, sfx in _suffixes(m):
            ih += getattr(m, f"weight_ih{sfx}").numel()
            hh += getattr(m, f"weight_hh{sfx}").numel()
        share = macs * ih / max(ih + hh, 1)
        out.append(ModuleCost(name=name, macs=round(share), out_group=g.id))
        out.append(ModuleCost(name=name, macs=round(macs - share), out_group=g.id, in_group=g.id))
    return out


# --------------------------------------------------------------------------- plans


def check_hidden_group(gp: GroupPlan, model: nn.Module) -> None:
    """A plan group of hidden units against the model, before anything changes."""
    where = f"plan group {gp.id} ({gp.name}, hidden units)"
    name = _module_of(gp)
    module: Any = dict(model.named_modules()).get(name) if name is not None else None
    if not isinstance(module, RECURRENT_TYPES):
        raise PlanMismatchError(
            f"{where} prunes {gp.producers}, which are not the weights of a recurrent module "
            "(LSTM, GRU, RNN or a cell) of this model: the plan was made for another model"
        )
    if module.hidden_size != gp.channels_before:
        raise PlanMismatchError(
            f"{where}: {name} has hidden_size {module.hidden_size} here, the plan "
            f"expects {gp.channels_before}: the plan was made for another model (or this one "
            "is pruned already)"
        )
    params = dict(model.named_parameters())
    for pa in gp.params:
        p = params.get(pa.param)
        want = gp.channels_before * pa.per_channel * pa.blocks
        if p is None or pa.axis >= p.dim() or p.shape[pa.axis] != want:
            raise PlanMismatchError(
                f"{where}: {pa.param} has no axis {pa.axis} of {want} entries here: the plan was "
                "made for another model"
            )
    check_removal(gp, where, "a layer must keep at least one unit")


def _module_of(gp: GroupPlan) -> str | None:
    """The recurrent module whose units the group removes: the owner of its first recurrent
    weight (``rnn.weight_ih_l0`` -> ``rnn``)."""
    for pa in gp.params:
        parsed = parse(pa.param)
        if parsed is not None and parsed[1] == "weight":
            return parsed[0]
    return None


def prune_hidden_group(gp: GroupPlan, model: nn.Module) -> None:
    """Remove the group's hidden units (checked by :func:`check_hidden_group`): slice every
    listed (parameter, axis), then update ``hidden_size``, consumers' ``in_features`` and
    ``input_size``."""
    owner_name = _module_of(gp)
    if not gp.remove or owner_name is None:
        return
    for pa in gp.params:
        module_name, _, attr = pa.param.rpartition(".")
        module: Any = model.get_submodule(module_name)
        p = getattr(module, attr)
        drop = set(pa.indices(gp.channels_before, gp.remove))
        keep = torch.tensor([i for i in range(p.shape[pa.axis]) if i not in drop])
        new = nn.Parameter(p.data.index_select(pa.axis, keep), requires_grad=p.requires_grad)
        setattr(module, attr, new)  # nn.RNNBase's __setattr__ refreshes its flat weights
        if isinstance(module, nn.Linear) and attr == "weight" and pa.axis == 1:
            module.in_features = int(new.shape[1])
        elif (
            isinstance(module, RECURRENT_TYPES)
            and pa.axis == 1
            and module_name != owner_name
            and attr in ("weight_ih", "weight_ih_l0")
        ):
            consumer: Any = module
            consumer.input_size = int(new.shape[1])
    owner: Any = model.get_submodule(owner_name)
    owner.hidden_size = gp.channels_after
    if isinstance(owner, nn.RNNBase):
        owner._init_flat_weights()

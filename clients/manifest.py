"""Manifests from a live model: coupling groups, shapes and MACs (design §2, §6).

:func:`build_manifest` traces the model once with torch-pruning's ``DependencyGraph`` (coupling)
while forward hooks record every module call (output shapes, MACs, and the autograd node that
ties an activation or pooling call to its channel group). Each torch-pruning group rooted at a
conv/linear layer becomes one :class:`graphs.manifest.ChannelGroup`:

- ``producers``: the conv/linear layers whose output channels the group removes (depthwise
  convs included: their in and out channels are the group's channels);
- ``params``: every ``(parameter, axis, per_channel)`` that shrinks, read from the group's
  pruning handlers: conv/linear weight axis 0 (out) or 1 (in), biases, BatchNorm/GroupNorm/
  InstanceNorm/LayerNorm affine parameters, per-channel PReLU weights, unwrapped parameters; a
  linear layer after a flatten of C×H×W gets ``per_channel = H·W``.
- ``attention``: the attention blocks (q/k/v/o by name) with the heads their modules keep
  (:func:`clients.attention.attention_blocks`), so that plans remove whole heads.

A group is marked ``prunable=False`` (with the reason) when one of its members cannot be written
as a whole axis of ``channels × per_channel`` entries (a zero-padding shortcut or a concatenation
couples channel ranges of different widths), when it touches a grouped (non-depthwise) conv or a
layer type without a supported handler, or when it produces the outputs of the stem, the
classifier or a layer the user ignored.

MACs are counted with the hooks of ``tp.utils.count_ops_and_params`` (same formulas, per sample)
found by ``isinstance`` (:func:`clients.flops.cost_macs`: subclasses of ``nn.Conv2d`` with their
own ``forward`` are counted), cross-checked against an independent count by forward hooks on every
conv/linear layer (:class:`~clients.errors.ManifestError` beyond 1 %), one
:class:`~graphs.manifest.ModuleCost` per module and channel group
(a module called several times on different channels, like ResNet-50's shared ReLU, gets one
entry per group), so that a planner predicts the MACs of any pruned model from kept channels.

:func:`build_manifest` is this module's; the trace is :mod:`clients.tracing`'s and the channel
groups :mod:`clients.channel_groups`' (both shared with :mod:`clients.apply`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from clients.attention import attention_blocks
from clients.channel_groups import GroupStructure, all_group_structures, flatten_layout_problems
from clients.flops import check_cost_model, count_layer_macs
from clients.recurrent import hidden_costs, hidden_groups
from clients.tracing import (
    ROOT_TYPES,
    ExampleInputs,
    TracedModel,
    as_input_tuple,
    find_roles,
    is_depthwise,
    out_channels,
    trace_model,
)
from graphs.manifest import ChannelGroup, Manifest, ManifestLayer, ModuleCost

__all__ = ["build_manifest", "manifest_from_factory"]

_KINDS: dict[type[nn.Module], Literal["conv1d", "conv2d", "conv3d", "linear"]] = {
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
    nn.Linear: "linear",
}


# --------------------------------------------------------------------------- MACs


def checked_macs_total(traced: TracedModel, example_inputs: ExampleInputs) -> int:
    """The traced calls' MACs per sample, after checking their conv/linear part against an
    independent hook count (:func:`clients.flops.check_cost_model`; ManifestError beyond 1 %)."""
    modules = dict(traced.model.named_modules())
    ours: dict[str, float] = {}
    for call in traced.calls:
        if isinstance(modules[call.name], (nn.modules.conv._ConvNd, nn.Linear)):
            ours[call.name] = ours.get(call.name, 0.0) + call.macs
    counted = count_layer_macs(traced.model, as_input_tuple(example_inputs))
    check_cost_model(ours, counted, {n: type(modules[n]).__name__ for n in {*ours, *counted}})
    return round(sum(call.macs for call in traced.calls))


def _costs(traced: TracedModel, structures: list[GroupStructure]) -> list[ModuleCost]:
    """Per-module (and per-group) MACs with the groups that scale their output/input channels."""
    out_group: dict[str, int] = {}
    in_group: dict[str, int] = {}
    node_group: dict[Any, int] = {}
    for gid, s in enumerate(structures):
        for name in s.out_of:
            out_group.setdefault(name, gid)
        for name in s.in_of:
            in_group.setdefault(name, gid)
        for node in s.nodes:
            node_group.setdefault(node, gid)
    by_grad_fn = {n.grad_fn: n for n in traced.dg.module2node.values() if n.grad_fn is not None}

    merged: dict[tuple[str, int | None, int | None], float] = {}
    for call in traced.calls:
        if call.macs <= 0:
            continue
        module = traced.model.get_submodule(call.name)
        og = out_group.get(call.name)
        ig = None if is_depthwise(module) else in_group.get(call.name)
        if og is None and not isinstance(module, ROOT_TYPES):
            # activations, pools, ...: the group whose channels this call's output carries
            node = by_grad_fn.get(call.grad_fn) if call.grad_fn is not None else None
            carrier = node_group.get(node) if node is not None else None
            shape = call.shape
            if carrier is not None and structures[carrier].channels in shape[1:]:
                og = carrier
        if og is None and ig is None:
            continue
        key = (call.name, og, ig)
        merged[key] = merged.get(key, 0.0) + call.macs
    return [
        ModuleCost(name=name, macs=round(macs), out_group=og, in_group=ig)
        for (name, og, ig), macs in sorted(
            merged.items(), key=lambda kv: (traced.order[kv[0][0]], kv[0][1] or 0, kv[0][2] or 0)
        )
    ]


# --------------------------------------------------------------------------- the manifest


def _expand_ignored(model: nn.Module, ignored_layers: Iterable[str]) -> list[str]:
    modules = dict(model.named_modules())
    out: list[str] = []
    for name in ignored_layers:
        if name not in modules:
            raise ValueError(
                f"ignored layer {name!r} is not a module of the model; use names from "
                "model.named_modules(), e.g. 'layer1.0.conv1'"
            )
        for sub, m in modules[name].named_modules(prefix=name):
            if isinstance(m, ROOT_TYPES) and sub not in out:
                out.append(sub)
    return out


def _layers(traced: TracedModel, stems: list[str], classifiers: list[str]) -> list[ManifestLayer]:
    role: dict[str, Literal["stem", "body", "classifier"]] = {n: "stem" for n in stems}
    role |= {n: "classifier" for n in classifiers}
    layers: list[ManifestLayer] = []
    for name, module in traced.model.named_modules():
        shape = traced.first_output(name)
        kind = next((k for t, k in _KINDS.items() if isinstance(module, t)), None)
        if kind is None or shape is None:
            continue
        per_sample = torch.Size(shape).numel() // max(1, shape[0])
        layers.append(
            ManifestLayer(
                name=name,
                kind=kind,
                weight_shape=list(module.weight.shape),
                groups=int(getattr(module, "groups", 1)),
                out_spatial=max(1, per_sample // out_channels(module)),
                role=role.get(name, "body"),
            )
        )
    return layers


def build_manifest(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    ignored_layers: Iterable[str] = (),
    ignore_stem: bool = True,
    ignore_classifier: bool = True,
) -> Manifest:
    """The manifest of ``model`` for ``example_inputs`` (e.g. ``torch.zeros(1, 3, 32, 32)``).

    Args:
        model: the live model; weights are not changed and training flags are restored.
        example_inputs: a tensor or a sequence of positional input tensors, batch first, e.g.
            (N, C, H, W) for 2-d convs; MACs are reported per sample.
        ignored_layers: module names whose output channels must never be pruned (a container
            name ignores every conv/linear layer inside it).
        ignore_stem / ignore_classifier: also never prune the output channels of the layers
            that read the model input / write the model output.

    Returns:
        A validated :class:`graphs.manifest.Manifest`: groups with ids 0..G-1 in the order of
        their first producer in ``model.named_modules()``, every conv/linear layer run by the
        forward pass (weight shape, groups, output positions per channel, role), MACs per module
        and group, and the ignored layers.
    """
    ignored_layers = list(ignored_layers)
    traced = trace_model(model, example_inputs)
    stems, classifiers = find_roles(traced)

    reasons: dict[str, str] = {}
    for name in stems if ignore_stem else []:
        reasons.setdefault(name, "stem")
    for name in classifiers if ignore_classifier else []:
        reasons.setdefault(name, "classifier")
    for name in _expand_ignored(model, ignored_layers):
        reasons.setdefault(name, "ignored by the user")

    structures = all_group_structures(traced)
    modules = dict(model.named_modules())
    groups: list[ChannelGroup] = []
    for gid, s in enumerate(structures):
        why = list(s.problems) + flatten_layout_problems(modules, example_inputs, s)
        why += list(dict.fromkeys(reasons[p] for p in s.producers if p in reasons))
        if s.channels < 2:
            why.append("a single channel cannot be pruned")
        groups.append(
            ChannelGroup(
                id=gid,
                channels=s.channels,
                producers=s.producers,
                params=s.params,
                prunable=not why,
                reason="; ".join(why) if why else None,
            )
        )
    hidden = hidden_groups(model, as_input_tuple(example_inputs), len(groups), ignored_layers)

    return Manifest(
        input_shapes=[list(x.shape) for x in as_input_tuple(example_inputs)],
        params_total=sum(p.numel() for p in model.parameters()),
        macs_total=checked_macs_total(traced, example_inputs),
        param_shapes={n: list(p.shape) for n, p in model.named_parameters()},
        layers=_layers(traced, stems, classifiers),
        groups=groups + hidden,
        costs=_costs(traced, structures) + hidden_costs(model, traced.calls, hidden),
        ignored=sorted(reasons, key=traced.order.__getitem__),
        attention=attention_blocks(model),
    )


def manifest_from_factory(spec: str, input_shape: tuple[int, ...]) -> Manifest:
    """Build the model with ``factory()`` from ``spec = "pkg.module:factory"`` and its manifest.

    The model is put in eval mode and traced on ``torch.zeros(input_shape)``, e.g.
    ``manifest_from_factory("tests.clients.models:resnet50", (1, 3, 224, 224))``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model factory {spec!r} must look like 'package.module:factory'")
    factory: Callable[[], nn.Module] = getattr(importlib.import_module(module_name), attr)
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    model.eval()
    return build_manifest(model, torch.zeros(input_shape))

"""Channel groups of a traced model: what removing one layer's output channels touches.

:func:`group_structure` reads torch-pruning's group of all of a root layer's output channels
(its pruning handlers) as a :class:`GroupStructure`:

- ``producers``: the conv/linear layers whose output channels the group removes (depthwise
  convs included: their in and out channels are the group's channels);
- ``params``: every ``(parameter, axis, per_channel)`` that shrinks: conv/linear weight axis 0
  (out) or 1 (in), biases, BatchNorm/GroupNorm/InstanceNorm/LayerNorm affine parameters,
  per-channel PReLU weights, unwrapped parameters; a linear layer after a flatten of C×H×W gets
  ``per_channel = H·W``;
- ``problems``: why the group cannot be pruned safely: a member that is not a whole axis of
  ``channels × per_channel`` entries (a zero-padding shortcut or a concatenation couples channel
  ranges of different widths), a grouped (non-depthwise) conv, a layer type without a supported
  handler. :func:`flatten_layout_problems` adds the flattens whose channel blocks are
  interleaved (a permute before the flatten).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from clients.tracing import (
    ROOT_TYPES,
    ExampleInputs,
    TracedModel,
    as_input_tuple,
    is_depthwise,
    keep_training_flags,
    out_channels,
)
from graphs.manifest import ParamAxis

__all__ = ["GroupStructure", "all_group_structures", "flatten_layout_problems", "group_structure"]

_TP_OPS: tuple[type, ...] = (
    tp.ops._ElementWiseOp,
    tp.ops._OutputOp,
    tp.ops._ConcatOp,
    tp.ops._SplitOp,
    tp.ops._ReshapeOp,
    tp.ops._SliceOp,
    tp.ops._ExpandOp,
    tp.ops._UnbindOp,
)


@dataclass
class GroupStructure:
    """One coupled group of output channels, seen from its root layer.

    ``params`` lists the whole axes that lose ``per_channel`` entries per removed channel;
    ``problems`` says why the group cannot be pruned safely (empty when it can). ``out_of`` /
    ``in_of`` name the modules whose output / input channels are exactly the group's channels,
    ``nodes`` the dependency-graph nodes (activations, pools, adds) that carry them one to one.
    """

    root: str
    channels: int
    producers: list[str]
    params: list[ParamAxis]
    problems: list[str]
    out_of: list[str]
    in_of: list[str]
    nodes: list[Any]


def _item_params(
    module: Any, is_out: bool, same_fn: bool, node: Any
) -> tuple[list[tuple[nn.Parameter, int]], str | None]:
    """The (parameter, axis) pairs one torch-pruning handler shrinks, or why it is unsupported."""
    if isinstance(module, nn.Parameter):  # an unwrapped parameter, pruned on node.pruning_dim
        return [(module, int(node.pruning_dim) % module.dim())], None
    pairs: list[tuple[Any, int]] = []
    if isinstance(module, nn.modules.conv._ConvNd):
        transposed = bool(module.transposed)
        if is_depthwise(module):
            pairs = [(module.weight, 0), (module.bias, 0)]
        elif module.groups > 1:
            return [], (
                f"grouped convolution (groups={module.groups}): its channels cannot be removed "
                "one by one"
            )
        elif is_out:
            pairs = [(module.weight, 1 if transposed else 0), (module.bias, 0)]
        else:
            pairs = [(module.weight, 0 if transposed else 1)]
    elif isinstance(module, nn.Linear):
        pairs = [(module.weight, 0), (module.bias, 0)] if is_out else [(module.weight, 1)]
    elif isinstance(module, nn.GroupNorm):
        if module.num_groups > 1:
            return [], f"GroupNorm with {module.num_groups} groups removes channels by groups"
        pairs = [(module.weight, 0), (module.bias, 0)]
    elif isinstance(
        module, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm
    ):
        pairs = [(module.weight, 0), (module.bias, 0)]
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            last = module.weight.dim() - 1
            pairs = [(module.weight, last), (module.bias, last)]
    elif isinstance(module, nn.PReLU):
        if module.num_parameters > 1:
            pairs = [(module.weight, 0)]
    elif isinstance(module, nn.Embedding):
        pairs = [(module.weight, 1)]
    elif not same_fn or any(True for _ in module.parameters()):
        return [], f"layer type {type(module).__name__} is not supported by the manifest"
    return [(p, a) for p, a in pairs if isinstance(p, nn.Parameter)], None


def group_structure(traced: TracedModel, root: nn.Module) -> GroupStructure:
    """Analyse the torch-pruning group of all of ``root``'s output channels."""
    dg = traced.dg
    names = traced.module_names
    channels = out_channels(root)
    pruner = dg.get_pruner_of_module(root)
    identity = list(range(channels))
    try:
        group = dg.get_pruning_group(root, pruner.prune_out_channels, identity)
    except (IndexError, KeyError, RecursionError) as exc:  # torch-pruning inside a GRU or cell
        return GroupStructure(
            root=names[root], channels=channels, producers=[names[root]], params=[],
            problems=[
                f"torch-pruning cannot trace the channels of {names[root]} ({type(exc).__name__}: "
                f"{exc}); they reach a module it does not follow (e.g. a GRU or a recurrent cell)"
            ],
            out_of=[], in_of=[], nodes=[],
        )  # fmt: skip

    producers: list[str] = []
    params: list[ParamAxis] = []
    problems: list[str] = []
    out_of: list[str] = []
    in_of: list[str] = []
    nodes: list[Any] = []
    seen: set[tuple[str, int]] = set()
    for item in group.items:
        dep = item.dep
        idxs = [int(i) for i in item.idxs]
        roots = [int(r) for r in item.root_idxs]
        node, module = dep.target, dep.target.module
        one_to_one = idxs == identity and roots == identity
        if isinstance(module, _TP_OPS):
            if one_to_one:
                nodes.append(node)
            continue
        is_out = bool(dg.is_out_channel_pruning_fn(dep.handler))
        same_fn = bool(dg.is_in_channel_pruning_fn(dep.handler)) and is_out
        if isinstance(module, ROOT_TYPES) and is_out and names[module] not in producers:
            producers.append(names[module])
        pairs, problem = _item_params(module, is_out, same_fn, node)
        label = names.get(module) or traced.param_names.get(id(module), type(module).__name__)
        if problem is not None:
            problems.append(f"{label}: {problem}")
            continue
        whole = True
        for param, axis in pairs:
            pname = traced.param_names[id(param)]
            size = int(param.shape[axis])
            per = size // channels if size % channels == 0 else 0
            if not (
                per > 0
                and sorted(idxs) == list(range(size))
                and all(i // per == r for i, r in zip(idxs, roots, strict=True))
            ):
                whole = False
                problems.append(
                    f"{pname} axis {axis} ({size} entries) is coupled to only part of the "
                    f"{channels} channels of {names[root]} (zero-padding shortcut, concatenation "
                    "or split): the manifest cannot express channel offsets"
                )
            elif (pname, axis) not in seen:
                seen.add((pname, axis))
                params.append(ParamAxis(param=pname, axis=axis, per_channel=per))
        if not whole or not isinstance(module, nn.Module) or module not in names:
            continue
        if one_to_one:
            nodes.append(node)
        if is_out:
            out_of.append(names[module])
        elif isinstance(module, ROOT_TYPES):
            in_of.append(names[module])

    pos = {n: i for i, n in enumerate(traced.param_names.values())}
    return GroupStructure(
        root=names[root],
        channels=channels,
        producers=sorted(producers, key=traced.order.__getitem__),
        params=sorted(params, key=lambda pa: (pos[pa.param], pa.axis)),
        problems=list(dict.fromkeys(problems)),
        out_of=out_of,
        in_of=in_of,
        nodes=nodes,
    )


def all_group_structures(traced: TracedModel) -> list[GroupStructure]:
    """Every group rooted at a traced conv/linear layer, in ``model.named_modules()`` order.

    The same groups as ``DG.get_all_groups(root_module_types=ROOT_TYPES)`` without ignored
    layers, but each rooted at its first producer in model order: deterministic ids, and channel
    indices that are that layer's output indices.
    """
    visited: set[str] = set()
    groups: list[GroupStructure] = []
    for name, module in traced.model.named_modules():
        traced_root = isinstance(module, ROOT_TYPES) and module in traced.dg.module2node
        if traced_root and name not in visited:
            g = group_structure(traced, module)
            visited.update(g.producers)
            groups.append(g)
    return groups


def flatten_layout_problems(
    modules: dict[str, nn.Module], example_inputs: ExampleInputs, s: GroupStructure
) -> list[str]:
    """Check, by perturbing the first and last channel, that a flattened group reaches each
    linear consumer as contiguous blocks of ``per_channel`` inputs (channel c owning entries
    [c·p, (c+1)·p)). A permute or transpose before the flatten interleaves the channels; the
    manifest (and torch-pruning's index mapping) would then remove the wrong inputs, so such a
    group is reported unprunable."""
    checks = [
        (pa.param.rsplit(".", 1)[0], pa.per_channel)
        for pa in s.params
        if pa.per_channel > 1 and isinstance(modules.get(pa.param.rsplit(".", 1)[0]), nn.Linear)
    ]
    if not checks or not s.producers:
        return []
    inputs = as_input_tuple(example_inputs)
    producer = modules[s.producers[0]]
    problems = []
    for consumer_name, per in checks:
        consumer = modules[consumer_name]
        for c in (0, s.channels - 1):
            seen: list[torch.Tensor] = []

            def grab(_m: nn.Module, args: tuple[Any, ...], out: list[torch.Tensor] = seen) -> None:
                out.append(args[0].detach().reshape(args[0].shape[0], -1)[0].clone())

            def bump(_m: nn.Module, _a: Any, y: torch.Tensor, ch: int = c) -> torch.Tensor:
                y = y.clone()
                y[:, ch] += 1e3 * (1.0 + y.detach().abs().max())
                return y

            h_in = consumer.register_forward_pre_hook(grab)
            try:
                with torch.no_grad(), keep_training_flags(modules[""]):
                    modules[""].eval()
                    modules[""](*inputs)
                    h_out = producer.register_forward_hook(bump)
                    try:
                        modules[""](*inputs)
                    finally:
                        h_out.remove()
            finally:
                h_in.remove()
            base, bumped = seen[0], seen[1]
            changed = torch.nonzero((bumped - base).abs() > 1e-6 * (1 + base.abs().max()))
            owned = set(range(c * per, (c + 1) * per))
            if not changed.numel() or not set(changed.flatten().tolist()) <= owned:
                problems.append(
                    f"the channels of {s.producers[0]} reach {consumer_name} interleaved (a "
                    "permute or transpose before the flatten): removing them there is not "
                    "supported"
                )
                break
    return list(dict.fromkeys(problems))

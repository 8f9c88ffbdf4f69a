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

:func:`trace_model`, :func:`group_structure` and friends are shared with :mod:`clients.apply`;
the package's public surface is :func:`build_manifest` and :func:`manifest_from_factory`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from clients.attention import attention_blocks
from clients.flops import check_cost_model, cost_macs, count_layer_macs
from clients.recurrent import hidden_costs, hidden_groups, opaque_pruners
from graphs.manifest import ChannelGroup, Manifest, ManifestLayer, ModuleCost, ParamAxis

__all__ = ["ExampleInputs", "build_manifest", "manifest_from_factory"]

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]
"""One input tensor, or a sequence of positional input tensors (batch first)."""

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_KINDS: dict[type[nn.Module], Literal["conv1d", "conv2d", "conv3d", "linear"]] = {
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
    nn.Linear: "linear",
}
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


# --------------------------------------------------------------------------- tracing


@dataclass(frozen=True)
class ModuleCall:
    """One call of a module during the traced forward pass."""

    name: str
    shape: tuple[int, ...]  # the output's shape
    grad_fn: Any  # the output's autograd node (None without grad)
    macs: float  # per sample, as torch-pruning's op counter counts this call (0 if it does not)
    reads_input: bool  # no tensor argument depends on a parameter (the model input, maybe
    # after parameter-free ops)


@dataclass
class TracedModel:
    """A model traced once: torch-pruning's dependency graph plus what forward hooks saw."""

    model: nn.Module
    dg: Any  # tp.DependencyGraph (the package is untyped)
    module_names: dict[nn.Module, str]
    param_names: dict[int, str]  # id(parameter) -> name in model.named_parameters()
    order: dict[str, int]  # module name -> position in model.named_modules()
    calls: list[ModuleCall] = field(default_factory=list)
    output_grad_fns: list[Any] = field(default_factory=list)  # autograd nodes of the outputs

    def first_output(self, name: str) -> tuple[int, ...] | None:
        return next((c.shape for c in self.calls if c.name == name), None)


def as_input_tuple(example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    """The positional inputs, detached: a tensor becomes a 1-tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs.detach(),)
    return tuple(x.detach() for x in example_inputs)


@contextmanager
def keep_training_flags(model: nn.Module) -> Iterator[None]:
    """torch-pruning switches the model to eval(); restore every module's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _call_macs(module: nn.Module, inputs: Any, output: Any) -> float:
    """MACs of one call: torch-pruning's counting hook for the module's type or a base class."""
    return cost_macs(module, inputs, output)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in a (nested) tuple/list/dict output."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def trace_model(model: nn.Module, example_inputs: ExampleInputs) -> TracedModel:
    """Build the dependency graph of ``model`` on ``example_inputs`` (one forward pass, grad on).

    Weights are not changed; BatchNorm statistics are not updated (torch-pruning traces in eval
    mode) and every module's training flag is restored afterwards.
    """
    inputs = as_input_tuple(example_inputs)
    batch = len(inputs[0]) if inputs and inputs[0].dim() > 0 else 1
    names = {m: n for n, m in model.named_modules()}
    traced = TracedModel(
        model=model,
        dg=None,
        module_names=names,
        param_names={id(p): n for n, p in model.named_parameters()},
        order={n: i for i, n in enumerate(names.values())},
    )

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if module is model:
            traced.output_grad_fns = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(out, torch.Tensor):
            return
        with torch.no_grad():
            macs = _call_macs(module, args, output) / batch
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        reads_input = bool(tensors) and not any(a.requires_grad for a in tensors)
        traced.calls.append(
            ModuleCall(names[module], tuple(out.shape), out.grad_fn, macs, reads_input)
        )

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    try:
        with keep_training_flags(model), torch.enable_grad():
            traced.dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=inputs, verbose=False, customized_pruners=opaque_pruners()
            )
    finally:
        for h in hooks:
            h.remove()
    return traced


# --------------------------------------------------------------------------- groups


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


def out_channels(module: nn.Module) -> int:
    """Output channels of a conv or linear layer."""
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    assert isinstance(module, nn.modules.conv._ConvNd)
    return int(module.out_channels)


def is_depthwise(module: nn.Module) -> bool:
    """torch-pruning's notion: a conv with groups == out_channels > 1."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups == module.out_channels
        and module.out_channels > 1
    )


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


# --------------------------------------------------------------------------- roles


def find_roles(traced: TracedModel) -> tuple[list[str], list[str]]:
    """``(stems, classifiers)``: the conv/linear layers that read the model input (possibly after
    parameter-free ops) and those that write the model output (possibly through norms,
    activations, pools or reshapes), in model order."""
    names = traced.module_names
    stems = {
        c.name
        for c in traced.calls
        if c.reads_input and isinstance(traced.model.get_submodule(c.name), ROOT_TYPES)
    }
    classifiers: set[str] = set()
    seen: set[Any] = set()
    ends = set(traced.output_grad_fns)
    stack = [n for n in traced.dg.module2node.values() if n.grad_fn in ends]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node.module, ROOT_TYPES):
            classifiers.add(names[node.module])
        else:
            stack.extend(node.inputs)
    order = traced.order.__getitem__
    return sorted(stems, key=order), sorted(classifiers, key=order)


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
        why = list(s.problems) + _layout_problems(modules, example_inputs, s)
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


def _layout_problems(
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

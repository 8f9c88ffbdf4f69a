"""Tracing a live model once: torch-pruning's dependency graph plus what forward hooks saw.

:func:`trace_model` runs one forward pass (grad on) through torch-pruning's ``DependencyGraph``
(coupling) while forward hooks record every module call: output shape, MACs per sample
(:func:`clients.flops.cost_macs`) and the autograd node that ties an activation or pooling call to
its channel group. :func:`find_roles` reads the stems (layers that read the model input) and the
classifiers (layers that write its output) from the trace.

Shared by :mod:`clients.manifest`, :mod:`clients.channel_groups`, :mod:`clients.apply` and
:mod:`clients.group_sensitivity`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from clients.flops import cost_macs
from clients.recurrent import opaque_pruners

__all__ = [
    "ROOT_TYPES",
    "ExampleInputs",
    "ModuleCall",
    "TracedModel",
    "as_input_tuple",
    "find_roles",
    "is_depthwise",
    "keep_training_flags",
    "out_channels",
    "trace_model",
]

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]
"""One input tensor, or a sequence of positional input tensors (batch first)."""

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""The layers whose output channels root a channel group."""


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
            macs = cost_macs(module, args, output) / batch
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

"""MACs of a live model by module instance, and the cross-check of the manifest's cost model.

Two counts that :func:`clients.manifest.build_manifest` compares:

- :func:`cost_macs`, the manifest's cost model for one module call: torch-pruning's counting hook
  (``tp.utils.op_counter``) for the module's type **or the nearest base class that has one**, so
  that subclasses of ``nn.Conv2d``/``nn.Linear``/... with their own ``forward`` (timm's
  ``Conv2dSame``, EfficientNet-PyTorch's ``Conv2dStaticSamePadding``, weight-standardized convs)
  are counted like their base class. torch-pruning's own ``count_ops_and_params`` matches types
  exactly and counts none of their MACs. Transposed convolutions are counted on their input
  positions (torch-pruning counts their output positions, ``stride^d`` times too many).
- :func:`count_layer_macs`, an independent count: forward hooks on every ``isinstance`` conv
  (``nn.modules.conv._ConvNd``: 1/2/3-d, grouped, depthwise, dilated, strided, transposed) and
  ``nn.Linear``, with the MACs of each call computed from the call's actual output (or input)
  shape and the layer's weight shape, which already encodes ``groups`` and the kernel.

Convention (torch-pruning's, so both agree on plain models): one multiply-accumulate per weight
use, plus one add per output element for a conv's bias and ``out_features`` adds per call for a
linear layer's bias. MACs are per sample: a call's count divided by the batch size of the model's
input (the first dimension of the first example input), whatever layout the layer sees (a linear
layer on a flattened (N·T, F) tensor or a sequence-first (T, N, F) one).

:func:`check_cost_model` raises :class:`~clients.errors.ManifestError` when the cost model's
conv/linear MACs and the independent count differ by more than 1 %.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch_pruning.utils import op_counter

from clients.errors import ManifestError

__all__ = [
    "COUNTED",
    "check_cost_model",
    "cost_macs",
    "count_layer_macs",
    "count_model_macs",
    "layer_macs",
]

COUNTED: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
"""The layer types the independent count sees (by ``isinstance``)."""

TOLERANCE = 0.01
"""Largest relative difference between the cost model and the independent count."""

Hook = Callable[[nn.Module, Any, Any], None]


def _first_tensor(args: Any) -> torch.Tensor | None:
    if isinstance(args, torch.Tensor):
        return args
    if isinstance(args, (tuple, list)):
        return next((a for a in args if isinstance(a, torch.Tensor)), None)
    return None


def batch_size(args: Any) -> int:
    """The first dimension of the first tensor argument (1 if none): the batch size of the
    model's inputs."""
    x = _first_tensor(args)
    return int(x.shape[0]) if x is not None and x.dim() > 0 and x.shape[0] > 0 else 1


def _hook_for(module: nn.Module) -> Hook | None:
    """torch-pruning's counting hook for the module's type or its nearest base class."""
    for cls in type(module).__mro__:
        hook = op_counter.CUSTOM_MODULES_MAPPING.get(cls) or op_counter.MODULES_MAPPING.get(cls)
        if hook is not None:
            return hook
    return None


def _transposed_macs(module: nn.modules.conv._ConvNd, args: Any, output: torch.Tensor) -> float:
    """A transposed conv, from its attributes: every input position meets the whole kernel."""
    x = _first_tensor(args)
    if x is None:
        return 0.0
    spatial = len(module.kernel_size)
    batch = x.shape[0] if x.dim() == spatial + 2 else 1
    positions = batch * int(torch.Size(x.shape[-spatial:]).numel())
    per_position = module.in_channels * (module.out_channels // module.groups)
    kernel = int(torch.Size(module.kernel_size).numel())
    bias = output.numel() if module.bias is not None else 0
    return float(positions * per_position * kernel + bias)


def cost_macs(module: nn.Module, args: Any, output: Any) -> float:
    """MACs of one call (whole batch) as the manifest's cost model counts them; 0 for modules
    without a counting rule (containers, parameter-free ops torch-pruning does not count)."""
    out = output[0] if isinstance(output, (tuple, list)) and output else output
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        return _transposed_macs(module, args, out) if isinstance(out, torch.Tensor) else 0.0
    hook = _hook_for(module)
    if hook is None:
        return 0.0
    had = "__flops__" in vars(module)
    saved = vars(module).get("__flops__")
    module.__flops__ = 0  # type: ignore[assignment]
    try:
        hook(module, args, output)
        return float(module.__flops__)  # type: ignore[arg-type]
    finally:
        if had:
            module.__flops__ = saved  # type: ignore[assignment]
        else:
            del module.__flops__


def layer_macs(module: nn.Module, args: Any, output: Any) -> float:
    """MACs of one call (whole batch) of a conv or linear layer, from the call's tensors' shapes
    and the weight's shape; 0 for other modules.

    A conv's weight is ``(out, in/groups, *kernel)`` (transposed: ``(in, out/groups, *kernel)``),
    so every output element of a conv costs ``weight[0].numel()`` MACs and every input element of
    a transposed conv ``weight[0].numel()``; a linear layer's output element costs
    ``in_features``.
    """
    out = output[0] if isinstance(output, (tuple, list)) and output else output
    weight = getattr(module, "weight", None)
    if not isinstance(out, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return 0.0
    if isinstance(module, nn.modules.conv._ConvNd):
        per_element = int(weight[0].numel())
        x = _first_tensor(args)
        elements = x.numel() if module.transposed and x is not None else out.numel()
        bias = out.numel() if module.bias is not None else 0
        return float(elements * per_element + bias)
    if isinstance(module, nn.Linear):
        bias = int(out.shape[-1]) if module.bias is not None else 0
        return float(out.numel() * int(weight.shape[-1]) + bias)
    return 0.0


def _count(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    count: Callable[[nn.Module, Any, Any], float],
    modules: Iterable[tuple[str, nn.Module]],
) -> dict[str, float]:
    """Per-sample MACs per module name over one eval-mode forward pass (flags restored)."""
    macs: dict[str, float] = {}
    batch = batch_size(tuple(example_inputs))  # of the model's input, as torch-pruning does

    def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            macs[name] = macs.get(name, 0.0) + count(module, args, output) / batch

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    return macs


def count_layer_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, float]:
    """MACs per sample of every conv/linear layer (``isinstance`` of :data:`COUNTED`) that the
    forward pass on ``example_inputs`` (positional inputs, batch first) calls, by module name,
    summed over the layer's calls; computed by :func:`layer_macs`. Weights are not changed."""
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, COUNTED)]
    return _count(model, example_inputs, layer_macs, named)


def count_model_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> float:
    """All MACs per sample of one forward pass as the cost model counts them (:func:`cost_macs`
    on every module call): ``torch_pruning.utils.count_ops_and_params`` by ``isinstance``."""
    return sum(_count(model, example_inputs, cost_macs, model.named_modules()).values())


def check_cost_model(
    cost_model: Mapping[str, float],
    counted: Mapping[str, float],
    types: Mapping[str, str],
    *,
    tolerance: float = TOLERANCE,
) -> None:
    """Refuse a cost model whose conv/linear MACs miss the independent count by > ``tolerance``.

    Args:
        cost_model: per-sample MACs of each conv/linear layer as the cost model counts them.
        counted: the same from :func:`count_layer_macs`.
        types: module name -> type name, for the message.
        tolerance: the largest relative difference of the totals accepted.

    Raises:
        ManifestError: the totals differ by more than ``tolerance`` of the independent count;
            the message names the layers (and their types) that differ most.
    """
    ours, theirs = sum(cost_model.values()), sum(counted.values())
    if abs(ours - theirs) <= tolerance * max(theirs, 1.0):
        return
    names = sorted(set(cost_model) | set(counted))
    diffs = sorted(
        ((abs(cost_model.get(n, 0.0) - counted.get(n, 0.0)), n) for n in names), reverse=True
    )
    worst = [
        f"{n} ({types.get(n, '?')}: cost model {cost_model.get(n, 0.0):,.0f}, "
        f"hooks {counted.get(n, 0.0):,.0f})"
        for d, n in diffs[:5]
        if d > 0
    ]
    raise ManifestError(
        f"the manifest's cost model counts {ours:,.0f} MACs per sample in the conv/linear layers, "
        f"an independent count by forward hooks {theirs:,.0f}: they differ by "
        f"{abs(ours - theirs) / max(theirs, 1.0):.1%}, more than {tolerance:.0%}, so FLOPs "
        f"targets planned with this manifest would be missed. Layers that differ most: "
        f"{'; '.join(worst)}. No manifest was built: the cost model does not count these "
        "layer types correctly; please report it to prunegraph with the types named above."
    )

"""Where a prunable layer's post-activation maps are in a forward pass (for
:func:`clients.capture_activations`).

One traced forward pass on one sample lists every module call as pre/post events; a layer's
maps are its output followed through element-wise modules (BatchNorm, activations, Dropout,
Identity) and, where only functional code reads that tensor (``F.relu``, a residual add), the
first tensor that code makes of it, or the enclosing block's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ELEMENTWISE", "capture_points", "trace"]

ELEMENTWISE = (
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)  # fmt: skip


@dataclass(eq=False)
class _Event:
    """A module call starting (``pre``: its input) or ending (``post``: its output)."""

    kind: str  # "pre" or "post"
    name: str
    index: int  # how many times this module had run before in this forward pass
    tensor: torch.Tensor | None  # the first input (pre) or the output (post)


def trace(model: nn.Module, x: torch.Tensor) -> list[_Event]:
    """Every module call of one forward pass as pre/post events, in order. The events hold
    their tensors, so tensor ids are unique for the whole trace."""
    events: list[_Event] = []
    counts: dict[str, int] = {}

    def pre(name: str) -> Callable[[nn.Module, tuple[object, ...]], None]:
        def record(_: nn.Module, args: tuple[object, ...]) -> None:
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            events.append(_Event("pre", name, counts.get(name, 0), first))

        return record

    def post(name: str) -> Callable[[nn.Module, tuple[object, ...], object], None]:
        def record(_: nn.Module, __: tuple[object, ...], out: object) -> None:
            index = counts.get(name, 0)
            counts[name] = index + 1
            events.append(
                _Event("post", name, index, out if isinstance(out, torch.Tensor) else None)
            )

        return record

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name)))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return events


def _point(e: _Event) -> str:
    return f"{'in' if e.kind == 'pre' else 'out'}:{e.name}#{e.index}"


def _follow(events: list[_Event], pos: int, modules: dict[str, nn.Module]) -> int:
    """From the tensor of event ``pos``, through element-wise modules applied to it."""
    out = events[pos].tensor
    k = pos + 1
    while k < len(events) and out is not None:
        e = events[k]
        if e.kind == "pre" and e.tensor is out and isinstance(modules[e.name], ELEMENTWISE):
            end = next(
                j for j in range(k + 1, len(events))
                if events[j].kind == "post" and events[j].name == e.name
                and events[j].index == e.index
            )  # fmt: skip
            nxt = events[end].tensor
            if nxt is None or nxt.shape != out.shape:
                break
            pos, out, k = end, nxt, end
        k += 1
    return pos


def capture_points(model: nn.Module, events: list[_Event], layers: Sequence[str]) -> dict[str, str]:
    """layer name -> where its post-activation maps are: ``out:module#k`` or ``in:module#k``."""
    modules = dict(model.named_modules())
    points: dict[str, str] = {}
    for layer in layers:
        pos = next(
            (k for k, e in enumerate(events)
             if e.kind == "post" and e.name == layer and e.index == 0 and e.tensor is not None),
            None,
        )  # fmt: skip
        if pos is None:
            continue
        pos = _follow(events, pos, modules)
        out = events[pos].tensor
        assert out is not None
        if not any(e.kind == "pre" and e.tensor is out for e in events[pos + 1 :]):
            # Only functional code reads it (F.relu, a residual add): take the first tensor made
            # after it by such code, with its shape, that a module then reads; else the
            # enclosing block's output.
            new = _made_from(events, pos, layer)
            pos = _follow(events, new, modules) if new is not None else _block_output(events, pos)
        points[layer] = _point(events[pos])
    return points


def _made_from(events: list[_Event], pos: int, layer: str) -> int | None:
    """The first tensor with the shape of the one at ``pos`` that did not exist before it, that
    a module then reads, and that no module outside the layer's own ancestors made: what the
    functional code after the layer (F.relu, a residual add, then the block) made of it."""
    out = events[pos].tensor
    assert out is not None
    seen = {id(e.tensor) for e in events[: pos + 1] if e.tensor is not None}
    made_by: dict[int, str] = {}
    for k in range(pos + 1, len(events)):
        e = events[k]
        if e.tensor is None:
            continue
        if e.kind == "post":
            made_by.setdefault(id(e.tensor), e.name)
            continue
        maker = made_by.get(id(e.tensor))
        ours = maker is None or maker == "" or layer.startswith(maker + ".")
        if e.tensor.shape == out.shape and id(e.tensor) not in seen and ours:
            return k
    return None


def _block_output(events: list[_Event], pos: int) -> int:
    """Position of the innermost enclosing module's output that has the same shape as the
    tensor at ``pos`` but is a new tensor (the block's output after a functional add)."""
    out = events[pos].tensor
    assert out is not None
    prefix = events[pos].name
    while "." in prefix:
        prefix = prefix.rsplit(".", 1)[0]
        parent = next(
            (k for k in range(pos + 1, len(events))
             if events[k].kind == "post" and events[k].name == prefix),
            None,
        )  # fmt: skip
        found = events[parent].tensor if parent is not None else None
        if parent is None or found is None or found.shape != out.shape:
            return pos
        if found is not out:
            return parent
    return pos

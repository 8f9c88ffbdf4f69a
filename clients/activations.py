"""Feature maps of a live model for the data-aware methods (design §4 ci, §6).

:func:`capture_activations` runs calibration batches through the model (eval mode, no grad) and
keeps, for every prunable layer (Conv1d/2d/3d, Linear), its **post-activation** output: the
layer's output followed through the element-wise modules that come right after it (BatchNorm,
activations such as ReLU/ReLU6/PReLU/SiLU, Dropout, Identity). Where that tensor then only
feeds a functional residual add, the block's output (after the add, and its activation) is kept
instead: in a residual stage the block output is the unit whose channels are pruned together.
An activation applied functionally (``F.relu``) is invisible to hooks; such a layer's output is
kept as it is (the report of the capture says which module each layer was taken from).

Memory is bounded: at most ``max_samples`` samples and ``max_pixels`` positions per sample and
layer are kept, both chosen deterministically from ``seed`` (the same pixel positions for every
sample of a layer). A linear layer's output (N, C) is stored as one sample whose "pixels" are
the N inputs.

The result saves to safetensors: one float32 tensor (samples, channels, pixels) per capture
point and, in the metadata, which layer reads which tensor and its original shape::

    acts = capture_activations(model, loader, max_samples=256, seed=0)
    acts.save("acts.safetensors")                 # upload with PruneGraphClient.upload_activations
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["FORMAT", "Activations", "capture_activations"]

FORMAT = "prunegraph-activations"
VERSION = "1"
_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_ELEMENTWISE = (
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)  # fmt: skip


@dataclass
class Activations:
    """Captured feature maps.

    Attributes:
        tensors: capture key -> float32 tensor (samples, channels, pixels).
        layers: prunable layer name -> capture key (several layers may share one, e.g. the
            convs whose outputs a residual block adds).
        sources: capture key -> where the tensor was taken: ``out:module#k`` (the output of
            the module's k-th call in a forward pass) or ``in:module#k`` (its input).
        shapes: capture key -> the captured output's shape per sample, e.g. [C, H, W].
    """

    tensors: dict[str, torch.Tensor]
    layers: dict[str, str]
    sources: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    seed: int = 0

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "layers": json.dumps(self.layers, sort_keys=True),
            "sources": json.dumps(self.sources, sort_keys=True),
            "shapes": json.dumps(self.shapes, sort_keys=True),
            "seed": str(self.seed),
        }

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (tensors + metadata); returns the path.

        The bytes are a function of the content alone (keys in sorted order; the safetensors
        library orders metadata at random), so the same capture is the same upload id.
        """
        out = Path(path)
        out.write_bytes(_safetensors_bytes(self.tensors, self.metadata()))
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Layer name -> numpy maps (layers of one capture point share one array): what
        ``graphs.analyze`` and ``graphs.planner.plan_layers`` take as ``activations``."""
        shared = {k: t.numpy() for k, t in self.tensors.items()}
        return {layer: shared[key] for layer, key in self.layers.items()}

    def __getitem__(self, layer: str) -> torch.Tensor:
        """The (samples, channels, pixels) maps of a prunable layer."""
        return self.tensors[self.layers[layer]]


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding of float32 tensors, header keys sorted."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        array = tensors[name].detach().to("cpu", torch.float32).contiguous().numpy()
        data = array.astype("<f4", copy=False).tobytes()
        end = offset + len(data)
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, end]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


@dataclass(eq=False)
class _Event:
    """A module call starting (``pre``: its input) or ending (``post``: its output)."""

    kind: str  # "pre" or "post"
    name: str
    index: int  # how many times this module had run before in this forward pass
    tensor: torch.Tensor | None  # the first input (pre) or the output (post)


def _trace(model: nn.Module, x: torch.Tensor) -> list[_Event]:
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
        if e.kind == "pre" and e.tensor is out and isinstance(modules[e.name], _ELEMENTWISE):
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


def _capture_points(
    model: nn.Module, events: list[_Event], layers: Sequence[str]
) -> dict[str, str]:
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


def _inputs(batch: object) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]  # (inputs, labels) from a DataLoader
    raise TypeError(
        f"each batch must be a tensor or an (inputs, labels) pair; got {type(batch).__name__}"
    )


def _keep(shape: torch.Size, max_pixels: int, generator: torch.Generator) -> torch.Tensor | None:
    """Pixel positions kept for maps of this per-sample shape (None: all)."""
    pixels = int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1
    if pixels <= max_pixels:
        return None
    return torch.randperm(pixels, generator=generator)[:max_pixels].sort().values


@torch.no_grad()
def capture_activations(
    model: nn.Module,
    batches: Iterable[object],
    layers: Sequence[str] | None = None,
    *,
    max_samples: int = 256,
    max_pixels: int = 256,
    seed: int = 0,
) -> Activations:
    """Post-activation feature maps of the prunable layers of ``model``.

    Args:
        model: the live model (put in eval mode for the capture, restored afterwards).
        batches: input tensors, or (inputs, labels) pairs (a DataLoader works as it is).
        layers: names of prunable layers (as in ``model.named_modules()`` and the report);
            default: every Conv/Linear.
        max_samples: samples kept in all (the first ones, in batch order).
        max_pixels: positions kept per sample and layer (a seeded random subset).
        seed: seed of the pixel subsets.

    Returns:
        :class:`Activations`; tensors are float32 (samples, channels, pixels) on the CPU.
    """
    if max_samples < 1 or max_pixels < 1:
        raise ValueError("max_samples and max_pixels must be at least 1")
    named = dict(model.named_modules())
    wanted = list(layers) if layers is not None else [
        n for n, m in named.items() if isinstance(m, _PRUNABLE)
    ]  # fmt: skip
    unknown = [n for n in wanted if not isinstance(named.get(n), _PRUNABLE)]
    if unknown:
        raise ValueError(f"not Conv/Linear layers of the model: {', '.join(unknown[:5])}")
    was_training = model.training
    model.eval()
    try:
        return _capture(model, batches, wanted, max_samples, max_pixels, seed)
    finally:
        model.train(was_training)


class _Sink:
    """Keeps the subsampled maps of the capture points as the model runs, written straight
    into buffers of the final size (no concatenation: peak memory ≈ the kept maps)."""

    def __init__(
        self, points: dict[str, str], max_pixels: int, max_samples: int, seed: int
    ) -> None:
        self.keys = {p: f"capture.{i}" for i, p in enumerate(sorted(set(points.values())))}
        self.max_pixels = max_pixels
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.buffers: dict[str, torch.Tensor] = {}
        self.filled: dict[str, int] = {}
        self.pixels: dict[str, torch.Tensor | None] = {}
        self.shapes: dict[str, list[int]] = {}
        self.n_take = 0

    def add(self, point: str, out: torch.Tensor) -> None:
        key = self.keys[point]
        x = out[: self.n_take].detach()
        if key not in self.pixels:
            self.shapes[key] = list(out.shape[1:])
            self.pixels[key] = _keep(out.shape, self.max_pixels, self.generator)
        if x.dim() == 2:  # linear: (N, C) -> one sample whose pixels are the N inputs
            maps = x.T.unsqueeze(0)
            size = (1, x.shape[1], self.max_samples)
        else:
            maps = x.reshape(x.shape[0], x.shape[1], -1)
            idx = self.pixels[key]
            if idx is not None:
                maps = maps[:, :, idx.to(maps.device)]
            size = (self.max_samples, maps.shape[1], maps.shape[2])
        if key not in self.buffers:
            self.buffers[key] = torch.empty(size, dtype=torch.float32)
            self.filled[key] = 0
        at, n = self.filled[key], maps.shape[2] if x.dim() == 2 else maps.shape[0]
        # a copy: later in-place ops (out += identity, ReLU(inplace=True)) must not change it
        if x.dim() == 2:
            self.buffers[key][:, :, at : at + n].copy_(maps)
        else:
            self.buffers[key][at : at + n].copy_(maps)
        self.filled[key] = at + n

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, buf in self.buffers.items():
            n = self.filled[key]
            kept = buf[:, :, :n] if len(self.shapes[key]) == 1 else buf[:n]
            out[key] = kept.clone() if n < self.max_samples else kept  # frees the rest
        return out


def _hooks(model: nn.Module, sink: _Sink) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that hand the capture points' tensors to ``sink`` during one forward pass."""
    wanted: dict[str, set[str]] = {}
    for point in sink.keys:
        side, rest = point.split(":", 1)
        name, index = rest.rsplit("#", 1)
        wanted.setdefault(name, set()).add(f"{side}#{index}")
    modules = dict(model.named_modules())
    handles = []
    for name, points in wanted.items():
        count = [0]

        def pre(_: nn.Module, args: tuple[object, ...], name: str = name,
                points: set[str] = points, count: list[int] = count) -> None:  # fmt: skip
            if f"in#{count[0]}" in points and args and isinstance(args[0], torch.Tensor):
                sink.add(f"in:{name}#{count[0]}", args[0])

        def post(_: nn.Module, __: object, out: object, name: str = name,
                 points: set[str] = points, count: list[int] = count) -> None:  # fmt: skip
            if f"out#{count[0]}" in points and isinstance(out, torch.Tensor):
                sink.add(f"out:{name}#{count[0]}", out)
            count[0] += 1

        handles.append(modules[name].register_forward_pre_hook(pre))
        handles.append(modules[name].register_forward_hook(post))
    return handles


def _capture(
    model: nn.Module,
    batches: Iterable[object],
    wanted: list[str],
    max_samples: int,
    max_pixels: int,
    seed: int,
) -> Activations:
    sink: _Sink | None = None
    points: dict[str, str] = {}
    taken = 0
    for batch in batches:
        if taken >= max_samples:
            break
        x = _inputs(batch)
        if sink is None:  # find the capture points on one sample (all outputs are kept)
            points = _capture_points(model, _trace(model, x[:1]), wanted)
            missing = [n for n in wanted if n not in points]
            if missing:
                raise ValueError(f"layers that did not run in the forward pass: {missing[:5]}")
            sink = _Sink(points, max_pixels, max_samples, seed)
        sink.n_take = min(x.shape[0], max_samples - taken)
        handles = _hooks(model, sink)
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        taken += sink.n_take
    if sink is None or taken == 0:
        raise ValueError("no calibration batch was given")
    return Activations(
        tensors=sink.tensors(),
        layers={layer: sink.keys[p] for layer, p in points.items()},
        sources={key: point for point, key in sink.keys.items()},
        shapes=sink.shapes,
        seed=seed,
    )

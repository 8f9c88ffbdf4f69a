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

It also records, for every channel-mixing consumer (a conv that is not depthwise, or a linear
layer), the second moment S = Σ [x, 1]ᵀ[x, 1] of its input over every position of every sample
read (:mod:`clients.gram`): what compensated pruning folds with. ``maps=False`` records only
those statistics (the maps are the large part of the file). By default every second batch is
also held out: its rows go into a second S per consumer, so the planner can measure each fold's
error on data it was not fitted on (cross-fitted error curves, :mod:`graphs.crossfit`). The split
is by batch, so the held-out part is an independent sample only if the batches are: shuffle
them, or let each batch come from other source images than the others (never crops of one image
spread over every batch).

The result saves to the activations file the service reads, defined once in
:mod:`graphs.contracts.activations` (safetensors, format version 3 with a held-out part, else
version 2, which older readers read): one float32 tensor (samples,
channels, pixels) per capture point, one float64 tensor ``gram/<module>`` per consumer, its
held-out part ``holdout/<module>`` and, in the metadata, which layer reads which tensor, its
original shape, the consumers without statistics (``gram_skipped``) and the numbers of samples
read (``samples``, ``holdout_samples``)::

    acts = capture_activations(model, loader, max_samples=256, seed=0)
    acts.save("acts.safetensors")                 # upload with PruneGraphClient.upload_activations
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clients.capture_points import capture_points, trace
from clients.gram import MAX_BYTES, MAX_LINEAR_INPUTS, GramAccumulator, safetensors_bytes
from graphs.contracts import activations as activations_file

__all__ = ["Activations", "capture_activations"]

_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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
        statistics: consumer module name -> its input's S, float64 (c + 1, c + 1), constant last.
        statistics_skipped: consumer module name -> why it has no S.
        samples: how many samples were read from the batches.
        holdout: consumer module name -> the S of the held-out batches only, float64
            (c + 1, c + 1), for every consumer of ``statistics``, or empty (none held out).
        holdout_samples: how many of the samples were held out (0 without ``holdout``).
    """

    tensors: dict[str, torch.Tensor]
    layers: dict[str, str]
    sources: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    seed: int = 0
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)
    statistics_skipped: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    holdout: dict[str, torch.Tensor] = field(default_factory=dict)
    holdout_samples: int = 0

    def metadata(self) -> dict[str, str]:
        """The file's header metadata (:func:`graphs.contracts.activations.metadata`)."""
        return activations_file.metadata(
            layers=self.layers,
            sources=self.sources,
            shapes=self.shapes,
            seed=self.seed,
            skipped=self.statistics_skipped,
            samples=self.samples,
            holdout_samples=self.holdout_samples if self.holdout else None,
        )

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (tensors + metadata); returns the path.

        The bytes are a function of the content alone (keys in sorted order; the safetensors
        library orders metadata at random), so the same capture is the same upload id.
        """
        out = Path(path)
        grams = {
            activations_file.gram_key(n): s.to(torch.float64) for n, s in self.statistics.items()
        }
        held = {
            activations_file.holdout_key(n): s.to(torch.float64) for n, s in self.holdout.items()
        }
        out.write_bytes(safetensors_bytes({**self.tensors, **grams, **held}, self.metadata()))
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Layer name -> numpy maps (layers of one capture point share one array): what
        ``graphs.analyze`` and ``graphs.planner.plan_layers`` take as ``activations``."""
        shared = {k: t.numpy() for k, t in self.tensors.items()}
        return {layer: shared[key] for layer, key in self.layers.items()}

    def stats(self) -> dict[str, np.ndarray]:
        """Consumer module name -> S as float64 numpy (c + 1, c + 1): what the planner takes as
        ``stats``."""
        return {name: s.numpy() for name, s in self.statistics.items()}

    def holdout_stats(self) -> dict[str, np.ndarray]:
        """Consumer module name -> the held-out S as float64 numpy (c + 1, c + 1): what the
        planner takes as ``holdout_stats`` (empty: nothing held out)."""
        return {name: s.numpy() for name, s in self.holdout.items()}

    def __getitem__(self, layer: str) -> torch.Tensor:
        """The (samples, channels, pixels) maps of a prunable layer."""
        return self.tensors[self.layers[layer]]


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
    maps: bool = True,
    statistics: bool = True,
    max_linear_inputs: int = MAX_LINEAR_INPUTS,
    max_statistics_bytes: int | None = None,
    holdout_every: int = 2,
) -> Activations:
    """Post-activation feature maps of the prunable layers of ``model``, and the second moments
    of the inputs of its channel-mixing consumers.

    Args:
        model: the live model (put in eval mode for the capture, restored afterwards).
        batches: input tensors, or (inputs, labels) pairs (a DataLoader works as it is).
        layers: names of prunable layers whose maps are kept (as in ``model.named_modules()``
            and the report); default: every Conv/Linear. Statistics cover every consumer.
        max_samples: samples read in all (the first ones, in batch order), for the maps and the
            statistics alike.
        max_pixels: positions kept per sample and layer in the maps (a seeded random subset);
            the statistics use every position.
        seed: seed of the pixel subsets.
        maps: keep feature maps (needed by ``ci`` and ``vectors="activations"``).
        statistics: record S = Σ [x, 1]ᵀ[x, 1] of every consumer input (compensation).
        max_linear_inputs: linear consumers with more inputs get no S (see ``statistics_skipped``).
        max_statistics_bytes: budget of all S together, the held-out copies included (with a
            holdout each consumer takes twice its S); in module order, a consumer whose S would
            exceed it gets none (see ``statistics_skipped``). Default: ``clients.gram.MAX_BYTES``
            per copy (twice it with a holdout), so the same consumers get statistics either way.
        holdout_every: batch i (from 0, counting the batches that contribute samples) is also
            added to a held-out S of every consumer when ``i % holdout_every ==
            holdout_every - 1`` (2: every second batch); 0: no held-out part. Nothing is held out
            (no error) when fewer than 2 batches contribute or the held-out part has no rows or
            every row of a consumer: the plan is then not cross-fitted. The split is by batch:
            shuffle the batches, or let each hold other source images than the others.

    Returns:
        :class:`Activations`; maps are float32 (samples, channels, pixels), statistics float64
        (c + 1, c + 1), on the CPU.

    Raises:
        ValueError: bad limits, nothing to capture, ``holdout_every`` not an int >= 0 or 1
            (the held-out part would be all the data), layers that are not Conv/Linear or did
            not run, no batch.
    """
    if max_samples < 1 or max_pixels < 1:
        raise ValueError("max_samples and max_pixels must be at least 1")
    if isinstance(holdout_every, bool) or not isinstance(holdout_every, int) or holdout_every < 0:
        raise ValueError(
            f"holdout_every must be an int >= 0 (0: no held-out part), got {holdout_every!r}"
        )
    if holdout_every == 1:
        raise ValueError(
            "holdout_every=1 would hold out every batch: the held-out part must be a strict part "
            "of the data; use 2 (every second batch, the default) or more, or 0 for none"
        )
    if not maps and not statistics:
        raise ValueError("nothing to capture: set maps=True, statistics=True or both")
    named = dict(model.named_modules())
    wanted = list(layers) if layers is not None else [
        n for n, m in named.items() if isinstance(m, _PRUNABLE)
    ]  # fmt: skip
    unknown = [n for n in wanted if not isinstance(named.get(n), _PRUNABLE)]
    if unknown:
        raise ValueError(f"not Conv/Linear layers of the model: {', '.join(unknown[:5])}")
    copies = 2 if holdout_every else 1
    budget = MAX_BYTES * copies if max_statistics_bytes is None else max_statistics_bytes
    gram = (
        GramAccumulator(
            model, max_linear_inputs=max_linear_inputs, max_bytes=budget, holdout=copies == 2
        )
        if statistics
        else None
    )
    was_training = model.training
    model.eval()
    try:
        acts, held = _capture(
            model, batches, wanted if maps else [], max_samples, max_pixels, seed, gram,
            holdout_every,
        )  # fmt: skip
    finally:
        model.train(was_training)
    if gram is not None:
        acts.statistics = gram.grams()
        acts.statistics_skipped = dict(sorted(gram.skipped.items()))
        if held[0] >= 1 and held[1] >= 2:  # some batch held out, some not
            acts.holdout = gram.held_out_grams(acts.statistics)
            acts.holdout_samples = held[2] if acts.holdout else 0
    return acts


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
    gram: GramAccumulator | None,
    holdout_every: int,
) -> tuple[Activations, tuple[int, int, int]]:
    """The capture and (held-out batches, contributing batches, held-out samples)."""
    sink: _Sink | None = None
    points: dict[str, str] = {}
    taken = 0
    batch_no = held_batches = held_samples = 0
    for batch in batches:
        if taken >= max_samples:
            break
        x = _inputs(batch)
        if sink is None and wanted:  # find the capture points on one sample (all outputs kept)
            points = capture_points(model, trace(model, x[:1]), wanted)
            missing = [n for n in wanted if n not in points]
            if missing:
                raise ValueError(f"layers that did not run in the forward pass: {missing[:5]}")
            sink = _Sink(points, max_pixels, max_samples, seed)
        n_take = min(x.shape[0], max_samples - taken)
        handles = []
        if sink is not None:
            sink.n_take = n_take
            handles = _hooks(model, sink)
        held = bool(holdout_every) and n_take > 0 and batch_no % holdout_every == holdout_every - 1
        if gram is not None:
            gram.held_out = held
            gram.__enter__()
        try:
            model(x[:n_take] if n_take < x.shape[0] else x)
        finally:
            for h in handles:
                h.remove()
            if gram is not None:
                gram.__exit__()
        taken += n_take
        if n_take > 0:
            batch_no += 1
            held_batches += held
            held_samples += n_take if held else 0
    if taken == 0:
        raise ValueError("no calibration batch was given")
    return Activations(
        tensors=sink.tensors() if sink is not None else {},
        layers={layer: sink.keys[p] for layer, p in points.items()} if sink else {},
        sources={key: point for point, key in sink.keys.items()} if sink else {},
        shapes=sink.shapes if sink is not None else {},
        seed=seed,
        samples=taken,
    ), (held_batches, batch_no, held_samples)

"""Captured feature maps: reading an activations file and checking it against its checkpoint.

The file is what ``clients.capture_activations(...).save(path)`` writes
(:mod:`graphs.contracts.activations`, the one definition of the format both sides use):
safetensors with one float tensor (samples, channels, pixels) per capture point and metadata
``format = prunegraph-activations``, ``version`` (1, 2 or 3) and ``layers`` (layer name ->
tensor name). Version 2 adds second-moment statistics per consumer (``gram/<module>``,
:mod:`service.ingest.statistics`) and may hold only those (no maps); version 3 adds the
statistics of a held-out part of the same data (``holdout/<module>``, ``holdout_samples``), for
cross-fitted error curves. It is parsed by the same validating safetensors reader as
checkpoints: no pickle, bounded, every offset checked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphs.contracts.activations import HOLDOUT_PREFIX, VERSION, WRITE_HINT, read_header
from graphs.errors import CheckpointError, InvalidInputError
from graphs.features import Activations
from graphs.layers import LayerWeights
from service.ingest import detect
from service.ingest.safetensors_file import read_safetensors
from service.ingest.statistics import (
    check_statistics,
    read_holdout,
    read_statistics,
    skipped_statistics,
)


@dataclass
class Capture:
    """Everything an activations file holds, checked on its own.

    Attributes:
        maps: layer name -> feature maps (samples, channels, pixels); may be empty (version 2 and 3
            files captured with ``maps=False``).
        statistics: consumer module name -> S, float64 (c + 1, c + 1), constant last.
        skipped: consumer module name -> why it has no statistics.
        samples: samples the capture read (0 when the file does not say).
        holdout: consumer module name -> S of a held-out part of the same data, float64
            (c + 1, c + 1), a strict part of ``statistics`` for each of its consumers; empty
            when the file holds none (versions 1 and 2, ``holdout_every=0``, one batch).
        holdout_samples: samples in the held-out part (0 when the file does not say).
    """

    maps: Activations
    statistics: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    holdout: dict[str, np.ndarray] = field(default_factory=dict)
    holdout_samples: int = 0

    @property
    def n_samples(self) -> int:
        return max([int(m.shape[0]) for m in self.maps.values()] + [self.samples])


def read_capture(path: str | os.PathLike[str], *, name: str | None = None) -> Capture:
    """Maps, statistics and held-out statistics of an activations file.

    Raises:
        CheckpointError: not a (valid) activations file, maps that are not 3-D finite arrays,
            statistics that are not second-moment matrices, held-out statistics in a file of
            version 1 or 2 or that are not a part of the statistics
            (:func:`service.ingest.statistics.read_holdout`), or neither maps nor statistics.
    """
    p = Path(path)
    display = name or os.fspath(path)
    try:
        try:
            kind = detect.detect_format(p, display, p.stat().st_size)
        except CheckpointError as e:  # with the checkpoint reader's hint, which misleads here
            raise CheckpointError(e.message, hint=WRITE_HINT) from None
        if kind != "safetensors":
            raise CheckpointError(f"{display} is not a safetensors file", hint=WRITE_HINT)
        header = read_header(p, display=display)
        raw = read_safetensors(p, display)
    except OSError as e:
        raise CheckpointError(f"{display} cannot be read: {e.strerror or e}.") from e
    meta = header.metadata
    if header.has_holdout and header.version in ("1", "2"):
        raise CheckpointError(
            f"{display} claims version {header.version} but holds held-out statistics "
            f"({HOLDOUT_PREFIX}<module> tensors), which version {VERSION} introduced",
            hint="Capture it again with clients.capture_activations(model, batches)"
            ".save('acts.safetensors').",
        )
    maps = _maps(raw.tensors, meta, display)
    stats = read_statistics(raw.tensors, display)
    if not maps and not stats:
        raise CheckpointError(f"{display} holds no feature maps and no statistics", hint=WRITE_HINT)
    holdout = read_holdout(raw.tensors, stats, display)
    skipped = skipped_statistics(meta, display)
    return Capture(
        maps, stats, skipped, _count(meta, "samples"), holdout, _count(meta, "holdout_samples")
    )


def _count(meta: dict[str, str], key: str) -> int:
    """A sample count of the metadata; 0 when missing or not an integer (it is informative)."""
    try:
        return max(0, int(meta.get(key, "0")))
    except ValueError:
        return 0


def read_activations(path: str | os.PathLike[str], *, name: str | None = None) -> Activations:
    """Layer name -> feature maps (samples, channels, pixels), float32 or float64.

    Raises:
        CheckpointError: not a (valid) activations file, tensors that are not 3-D finite maps,
            or a file with statistics only (no maps).
    """
    display = name or os.fspath(path)
    capture = read_capture(path, name=name)
    if not capture.maps:
        raise CheckpointError(
            f"{display} holds only second-moment statistics, no feature maps (captured with "
            "maps=False); ci and vectors='activations' compare feature maps",
            hint="Capture with clients.capture_activations(model, batches, maps=True).",
        )
    return capture.maps


def _maps(tensors: dict[str, np.ndarray], meta: dict[str, str], display: str) -> Activations:
    try:
        layers = json.loads(meta.get("layers", ""))
        if not isinstance(layers, dict):
            raise ValueError
    except ValueError:
        raise CheckpointError(f"{display}: its 'layers' metadata is not a JSON object") from None
    out: dict[str, np.ndarray] = {}
    for layer, key in sorted(layers.items()):
        maps = tensors.get(str(key))
        if maps is None:
            raise CheckpointError(f"{display}: layer {layer!r} names a missing tensor {key!r}")
        if maps.ndim != 3 or 0 in maps.shape:
            raise CheckpointError(
                f"{display}: maps of {layer!r} have shape {list(maps.shape)}, not "
                "(samples, channels, pixels)",
                hint=WRITE_HINT,
            )
        if not np.isfinite(maps).all():
            raise CheckpointError(
                f"{display}: maps of {layer!r} contain NaN or Inf",
                hint="Capture them from a model whose forward pass is finite on the batches.",
            )
        out[str(layer)] = maps
    return out


def check_capture(capture: Capture, layers: Sequence[LayerWeights]) -> None:
    """:func:`check_activations` on the maps and :func:`service.ingest.statistics.check_statistics`
    on the statistics and the held-out statistics (the same names and shapes, when read with
    :func:`read_capture`; checked again for a Capture built otherwise)."""
    check_activations(capture.maps, layers)
    check_statistics(capture.statistics, layers)
    check_statistics(capture.holdout, layers)


def check_activations(activations: Activations, layers: Sequence[LayerWeights]) -> None:
    """Refuse maps that do not belong to the checkpoint: unknown layers or other widths.

    Raises:
        InvalidInputError: naming the first mismatches and what to do.
    """
    width = {layer.name: layer.n_filters for layer in layers}
    unknown = sorted(set(activations) - set(width))
    if unknown:
        raise InvalidInputError(
            f"the activations name layers the checkpoint does not have: {', '.join(unknown[:5])}"
            + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""),
            hint="Capture the activations from the model this checkpoint was saved from.",
        )
    wrong = [
        f"{n} has {m.shape[1]} channels, the checkpoint {width[n]}"
        for n, m in sorted(activations.items())
        if m.shape[1] != width[n]
    ]
    if wrong:
        raise InvalidInputError(
            f"the activations do not fit the checkpoint: {'; '.join(wrong[:3])}",
            hint="Capture the activations from the model this checkpoint was saved from.",
        )

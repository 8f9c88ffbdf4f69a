"""The activations file: what ``clients.capture_activations(...).save(path)`` writes and the
service (or the CLI) reads.

A safetensors file: an 8-byte little-endian header length, a JSON header, the tensor bytes.

- Tensors: one float32 (samples, channels, pixels) per capture point (any name), one
  float64 (c + 1, c + 1) second moment S = Σ [x, 1]ᵀ[x, 1] per channel-mixing consumer, named
  ``gram/<module>`` (:func:`gram_key`), and, for cross-fitting, the second moment of a
  held-out part of the same rows (every ``holdout_every``-th batch), same shape, named
  ``holdout/<module>`` (:func:`holdout_key`): ``gram − holdout`` is the rest of the data.
  A file holds a ``holdout/`` tensor for every ``gram/`` tensor or none.
- Header metadata (all strings): ``format`` = :data:`FORMAT`; ``version`` (:data:`VERSION`
  is written for a file with held-out statistics, :data:`PLAIN_VERSION` for one without, so
  that readers of versions 1 and 2 read what holds nothing new; :data:`VERSIONS` are read; a
  file without one is version 1); ``layers`` (JSON:
  prunable layer name -> capture tensor name; may be empty: a capture with statistics only);
  ``sources``, ``shapes`` (JSON, per capture tensor); ``seed``; ``gram_skipped`` (JSON:
  consumer name -> why it has no statistics); ``samples`` (samples read);
  ``holdout_samples`` (samples in the held-out part; only with ``holdout/`` tensors).
  Version 2 added the statistics, ``gram_skipped`` and ``samples``; version 3 the held-out
  statistics and ``holdout_samples`` (a file of version 1 or 2 that holds ``holdout/`` tensors
  is refused by the reader; a version 3 file without them reads as a version 2 file).

:func:`metadata` writes the header metadata, :func:`read_header` reads and checks it (without
reading a tensor), :func:`has_maps` tells from the header alone whether a file holds feature maps.
Standard library only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from graphs.contracts.safetensors import decode_header
from graphs.errors import CheckpointError, corrupt

__all__ = [
    "FORMAT",
    "GRAM_PREFIX",
    "HOLDOUT_PREFIX",
    "MAX_HEADER_BYTES",
    "PLAIN_VERSION",
    "VERSION",
    "VERSIONS",
    "WRITE_HINT",
    "ActivationsHeader",
    "gram_key",
    "has_maps",
    "holdout_key",
    "metadata",
    "parse_header",
    "read_header",
]

FORMAT = "prunegraph-activations"
"""The ``format`` metadata of every activations file."""
VERSION = "3"
"""The version written for a file with held-out statistics: 2 adds second moments
(``gram/<module>``, ``gram_skipped``, ``samples``), 3 the held-out second moments
(``holdout/<module>``, ``holdout_samples``)."""
PLAIN_VERSION = "2"
"""The version written for a file without held-out statistics (the same bytes as before version
3 existed, so that readers of versions 1 and 2 still read it)."""
VERSIONS = ("1", "2", "3")
"""The versions read."""
GRAM_PREFIX = "gram/"
"""Tensor names of the second moments: ``gram/<module name>``."""
HOLDOUT_PREFIX = "holdout/"
"""Tensor names of the held-out part's second moments: ``holdout/<module name>``."""
MAX_HEADER_BYTES = 100 * 2**20
"""The largest safetensors header read (as for checkpoints)."""
WRITE_HINT = "Write it with clients.capture_activations(model, batches).save('acts.safetensors')."


def gram_key(module: str) -> str:
    """The tensor name of ``module``'s input second moment."""
    return GRAM_PREFIX + module


def holdout_key(module: str) -> str:
    """The tensor name of the second moment of ``module``'s input over the held-out part."""
    return HOLDOUT_PREFIX + module


def metadata(
    *,
    layers: Mapping[str, str],
    sources: Mapping[str, str],
    shapes: Mapping[str, list[int]],
    seed: int,
    skipped: Mapping[str, str],
    samples: int,
    holdout_samples: int | None = None,
) -> dict[str, str]:
    """The header metadata of a capture (JSON values with sorted keys: the same capture, the
    same bytes). Arguments as in the module docstring (``skipped``: ``gram_skipped``;
    ``holdout_samples``: None for a file without held-out statistics, then not written and the
    version is :data:`PLAIN_VERSION`, else :data:`VERSION`)."""
    meta = {
        "format": FORMAT,
        "version": PLAIN_VERSION if holdout_samples is None else VERSION,
        "layers": json.dumps(dict(layers), sort_keys=True),
        "sources": json.dumps(dict(sources), sort_keys=True),
        "shapes": json.dumps(dict(shapes), sort_keys=True),
        "seed": str(seed),
        "gram_skipped": json.dumps(dict(skipped), sort_keys=True),
        "samples": str(samples),
    }
    if holdout_samples is not None:
        meta["holdout_samples"] = str(holdout_samples)
    return meta


@dataclass(frozen=True)
class ActivationsHeader:
    """What the header of an activations file says.

    Attributes:
        version: the file's version (one of :data:`VERSIONS`).
        metadata: the header metadata, every value a string.
        tensors: the names of the tensors in the file, sorted.
    """

    version: str
    metadata: dict[str, str]
    tensors: tuple[str, ...]

    @property
    def has_maps(self) -> bool:
        """Whether the ``layers`` metadata names any feature maps (True when it cannot be
        parsed: the full reader then says why)."""
        try:
            return bool(json.loads(self.metadata.get("layers", "{}")))
        except ValueError:
            return True

    @property
    def has_statistics(self) -> bool:
        """Whether the file holds any second moment (``gram/<module>`` tensor)."""
        return any(name.startswith(GRAM_PREFIX) for name in self.tensors)

    @property
    def has_holdout(self) -> bool:
        """Whether the file holds held-out statistics (``holdout/<module>`` tensors)."""
        return any(name.startswith(HOLDOUT_PREFIX) for name in self.tensors)


def parse_header(raw: bytes, *, display: str) -> ActivationsHeader:
    """The header of an activations file from its JSON bytes (after the 8-byte length).

    Raises:
        CheckpointError: not a JSON object, not a prunegraph activations file (``format``), or
            a version this code does not read.
    """
    header = decode_header(raw, display=display)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{display} is not a prunegraph activations file (no format={FORMAT} metadata)",
            hint=WRITE_HINT,
        )
    version = str(meta.get("version", "1"))
    if version not in VERSIONS:
        raise CheckpointError(
            f"{display} is an activations file of version {version}; this service reads "
            f"versions {', '.join(VERSIONS)}",
            hint="Upgrade the service, or capture with the client that matches it.",
        )
    tensors = tuple(sorted(str(k) for k in header if k != "__metadata__"))
    return ActivationsHeader(version, {str(k): str(v) for k, v in meta.items()}, tensors)


def read_header(path: str | os.PathLike[str], *, display: str | None = None) -> ActivationsHeader:
    """The checked header of the activations file at ``path``; no tensor is read.

    ``display``: how errors name the file (default: the path).

    Raises:
        CheckpointError: a file that cannot be read, is not safetensors, ends inside its
            header, or whose header :func:`parse_header` refuses.
    """
    shown = display or os.fspath(path)
    try:
        with Path(path).open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if n <= 0 or n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{shown} is not a safetensors file", hint=WRITE_HINT)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{shown} cannot be read: {e.strerror or e}.") from e
    if len(raw) < n:
        raise corrupt(shown, f"its safetensors header is cut short ({len(raw)} of {n} bytes)")
    return parse_header(raw, display=shown)


def has_maps(path: str | os.PathLike[str]) -> bool:
    """Whether the activations file at ``path`` holds feature maps, not only second moments,
    from its header alone; True when that cannot be told (the reader then says why)."""
    try:
        return read_header(path).has_maps
    except CheckpointError:
        return True

"""A job's inputs, loaded in one place: the checkpoint, its manifest, its activations file.

The worker (:mod:`service.jobs.tasks`), the dashboard's layer page
(:mod:`service.dashboard.layer_graph`) and the CLI's embedded mode all call :func:`load_inputs`,
so they read the same layers, derive the same manifest (the given one; else, for an ONNX model,
the one its graph gives) and check the activations against the same layers. The checkpoint is
read once and hashed at most once (not at all when its sha256 is known, as in the service's
content-addressed store); everything comes back as objects, never as JSON.

Pure of the web and the database: importable with the base install (no server extra).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphs.contracts.jobs import JobRequest
from graphs.features import Activations
from graphs.manifest import Manifest
from service.ingest.activations import Capture, check_capture, read_capture
from service.ingest.checkpoint import ParsedCheckpoint, derived_manifest, read_checkpoint

__all__ = ["JobInputs", "load_inputs", "load_job_inputs"]


@dataclass(frozen=True)
class JobInputs:
    """What a job analyses and plans.

    Attributes:
        checkpoint: the layers (checkpoint order), what was skipped and why, and the file's
            info (sha256, format, size, tensor and parameter counts).
        manifest: the given manifest, or the one an ONNX graph gives; None when unknown.
        notes: why there is no manifest (ONNX with symbolic shapes), for the report and the user.
        capture: the activations file (feature maps, second-moment statistics and those of a
            held-out part), checked against the layers; None without one.
    """

    checkpoint: ParsedCheckpoint
    manifest: Manifest | None
    notes: list[str]
    capture: Capture | None

    @property
    def maps(self) -> Activations | None:
        """Layer name -> feature maps (samples, channels, pixels); None when there are none."""
        return (self.capture.maps or None) if self.capture is not None else None

    @property
    def stats(self) -> dict[str, np.ndarray] | None:
        """Consumer module name -> S (c + 1, c + 1) float64; None when there are none."""
        return (self.capture.statistics or None) if self.capture is not None else None

    @property
    def holdout(self) -> dict[str, np.ndarray] | None:
        """Consumer module name -> S (c + 1, c + 1) float64 of a held-out part of the data (a
        strict part of :attr:`stats`, for cross-fitted plans); None when there are none."""
        return (self.capture.holdout or None) if self.capture is not None else None


def load_inputs(
    checkpoint: str | os.PathLike[str],
    *,
    manifest: Manifest | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
    activations: str | os.PathLike[str] | None = None,
    checkpoint_name: str | None = None,
    activations_name: str | None = None,
    sha256: str | None = None,
) -> JobInputs:
    """Read a job's checkpoint, its manifest and its activations file, each checked.

    Args:
        checkpoint: the checkpoint file (or sharded safetensors folder).
        manifest: the model's manifest; its conv groups win over inference. None: derived from
            an ONNX graph (with ``input_shapes`` for symbolic dims), else none.
        input_shapes: ONNX only: one shape per graph input, e.g. ``[[1, 3, 64, 256]]``.
        activations: an activations file (``clients.capture_activations(...).save``).
        checkpoint_name: how the checkpoint is called in error messages (default: its path).
        activations_name: how the activations file is called in error messages.
        sha256: the checkpoint's known sha256 (a content-addressed file): not hashed again.

    Raises:
        CheckpointError: the checkpoint or the activations file cannot be used (and subclasses:
            unsupported format, unsafe pickle, no prunable layers).
        InvalidInputError: the manifest's groups, the input shapes or the activations do not
            fit the checkpoint.
    """
    groups = {layer.name: layer.groups for layer in manifest.layers} if manifest else None
    parsed = read_checkpoint(checkpoint, groups=groups, name=checkpoint_name, sha256=sha256)
    capture = None
    if activations is not None:
        capture = read_capture(activations, name=activations_name)
        check_capture(capture, parsed.layers)
    notes: list[str] = []
    if manifest is None:
        manifest, notes = derived_manifest(Path(checkpoint), parsed, input_shapes=input_shapes)
    return JobInputs(checkpoint=parsed, manifest=manifest, notes=notes, capture=capture)


def load_job_inputs(
    request: JobRequest,
    checkpoint: str | os.PathLike[str],
    activations: str | os.PathLike[str] | None,
) -> JobInputs:
    """:func:`load_inputs` for a stored job: its manifest, input shapes and content addresses.

    The checkpoint's id is its sha256 (not hashed again); errors name the checkpoint and the
    activations file by their ids, never by their paths in the data directory.
    """
    return load_inputs(
        checkpoint,
        manifest=request.manifest,
        input_shapes=request.input_shape,
        activations=activations,
        checkpoint_name=f"checkpoint {request.checkpoint_id[:12]}",
        activations_name=f"activations {request.activations_id}",
        sha256=request.checkpoint_id,
    )

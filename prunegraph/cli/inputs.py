"""The embedded commands' inputs: the checkpoint, its manifest and the activations file, loaded
by the service's one loader of a job's inputs (:func:`service.jobs.inputs.load_inputs`), so that
the CLI reads, derives and checks them exactly as a job on the service does."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prunegraph.cli.options import existing, input_shapes, load_manifest

if TYPE_CHECKING:
    from service.jobs.inputs import JobInputs


def read_inputs(
    checkpoint: Path, manifest: Path | None, input_shape: str | None, activations: Path | None
) -> JobInputs:
    """The checkpoint, its manifest (the given file, or for ONNX the one its graph gives), the
    notes on what is missing (for stderr; ONNX with symbolic shapes has no manifest) and the
    activations file checked against the checkpoint's layers.

    Imported here: torch is only needed once a checkpoint is actually read.
    """
    from service.jobs.inputs import load_inputs

    shapes = input_shapes(input_shape, manifest)
    man = load_manifest(manifest)
    return load_inputs(
        checkpoint,
        manifest=man,
        input_shapes=shapes,
        activations=existing(activations) if activations is not None else None,
    )

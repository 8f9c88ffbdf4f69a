"""The embedded commands' inputs: the checkpoint, its manifest and the activations file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from graphs.manifest import Manifest
from prunegraph.cli.options import input_shapes, load_manifest

if TYPE_CHECKING:
    from service.ingest.checkpoint import ParsedCheckpoint


def read_inputs(
    checkpoint: Path, manifest: Path | None, input_shape: str | None
) -> tuple[ParsedCheckpoint, Manifest | None, list[str]]:
    """The checkpoint, its manifest (the given file, or for ONNX the one its graph gives) and
    notes on what is missing (for stderr; ONNX with symbolic shapes has no manifest).

    Imported here: torch is only needed once a checkpoint is actually read.
    """
    from service.ingest.checkpoint import derived_manifest, read_checkpoint

    shapes = input_shapes(input_shape, manifest)
    man = load_manifest(manifest)
    parsed = read_checkpoint(checkpoint)
    notes: list[str] = []
    if man is None:
        man, notes = derived_manifest(checkpoint, parsed, input_shapes=shapes)
    return parsed, man, notes

"""Errors raised by prunegraph's analysis library.

Every error carries a ``hint``: one sentence telling the user what to do. The service maps these
classes to HTTP status codes in one place; the CLI prints ``message`` and ``hint`` and exits 2.

::

    PruneGraphError
    ├── CheckpointError            the file cannot be used as a checkpoint
    │   ├── UnsupportedFormatError   not a .pt/.pth, safetensors or ONNX file
    │   ├── UnsafeCheckpointError    the file would run code when loaded (refused, never executed)
    │   └── NoPrunableLayersError    readable, but holds no conv or linear layer
    └── InvalidInputError          an array or option handed to the library is unusable
"""

from __future__ import annotations


class PruneGraphError(Exception):
    """Base class: a message saying what is wrong and a hint saying what to do."""

    default_hint = "See the prunegraph README for the supported inputs."

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}"


class CheckpointError(PruneGraphError):
    default_hint = (
        "Pass a state_dict saved with torch.save (.pt/.pth), a .safetensors file or an ONNX model."
    )


def corrupt(display: str, what: str) -> CheckpointError:
    """The error for a file of a known format whose content is damaged."""
    return CheckpointError(f"{display} is truncated or corrupt: {what}.")


class UnsupportedFormatError(CheckpointError):
    pass


class UnsafeCheckpointError(CheckpointError):
    default_hint = (
        "prunegraph loads .pt files with torch.load(weights_only=True) and refuses anything that "
        "would execute code: save only tensors, e.g. torch.save(model.state_dict(), path), or "
        "convert the checkpoint to safetensors."
    )


class NoPrunableLayersError(CheckpointError):
    default_hint = (
        "prunegraph analyses conv (1d/2d/3d) and linear weights; check that the file holds the "
        "model's state_dict and not only optimizer state or buffers."
    )


class InvalidInputError(PruneGraphError, ValueError):
    default_hint = "Check the shapes and values of the arrays passed to prunegraph."

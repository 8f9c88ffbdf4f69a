"""What :class:`clients.PruneGraphClient` does with a live torch model before it talks to the
service: its manifest, its feature maps on calibration batches, its weights as a checkpoint.

The HTTP client imports this module (and so torch) only when it is given a live model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clients.activations import Activations, capture_activations
from clients.manifest import build_manifest
from clients.tracing import ExampleInputs
from graphs.manifest import Manifest

__all__ = ["capture", "manifest", "save_state_dict"]


def manifest(model: nn.Module, example_inputs: ExampleInputs) -> Manifest:
    """The model's manifest (:func:`clients.build_manifest` with its defaults)."""
    return build_manifest(model, example_inputs)


def capture(model: nn.Module, calibration: Any, *, seed: int) -> Activations:
    """Feature maps and second moments on ``calibration``: a single tensor is one batch,
    anything else (a list, a DataLoader) is iterated as batches."""
    batches: Iterable[Any] = [calibration] if isinstance(calibration, torch.Tensor) else calibration
    return capture_activations(model, batches, seed=seed)


def save_state_dict(model: nn.Module, path: Path) -> Path:
    """Write the model's state dict to ``path`` (``torch.save``); returns the path."""
    torch.save(model.state_dict(), path)
    return path

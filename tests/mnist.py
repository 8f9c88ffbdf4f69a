"""The 5,000 real MNIST digits of ../shared/realdata (500 per class), normalized as trained."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

MEAN, STD = 0.1307, 0.3081


def load_mnist(realdata: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (5000, 1, 28, 28) float32, normalized; labels (5000,) int64."""
    with gzip.open(realdata / "mnist_5k.csv.gz", "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(rows[:, :784].reshape(-1, 1, 28, 28) / 255.0)
    return (x - MEAN) / STD, torch.from_numpy(rows[:, 784].astype(np.int64))


def split(n: int, seed: int = 0, test: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed seeded permutation split: (train indices, test indices)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(n * (1 - test))
    return perm[:cut], perm[cut:]

"""FLOPs (MACs) and parameters of a torch model, as every benchmark counts them."""

from __future__ import annotations

import torch
from torch import nn


def macs_params(model: nn.Module, example: torch.Tensor) -> tuple[float, float]:
    """(MACs, params) of ``model`` on ``example``, by torch-pruning's
    ``utils.count_ops_and_params``."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return float(macs), float(params)

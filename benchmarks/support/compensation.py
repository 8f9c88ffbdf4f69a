"""Compensated plans on a torch model, as the compensation benchmarks apply and count them."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def apply_variant(model: nn.Module, plan: Any, example: torch.Tensor, *, folds: bool) -> nn.Module:
    """``plan`` (a ``graphs.plan.PruningPlan``) applied to a copy of ``model``: with its
    least-squares folds, or (``folds=False``) the same channels removed without them. A plan
    without compensation is applied as it is."""
    from clients import apply_plan
    from graphs.compensated import plan_sidecar
    from graphs.plan import PruningPlan

    model = copy.deepcopy(model)
    if plan.compensation is None:
        return apply_plan(model, plan, example)
    if folds:
        return apply_plan(model, plan, example, compensation=plan_sidecar(plan))
    bare = PruningPlan.model_validate({**plan.model_dump(), "compensation": None})
    return apply_plan(model, bare, example)


def without_created_biases(pruned: nn.Module, original: nn.Module) -> nn.Module:
    """A copy of ``pruned`` without the biases its plan's folds created: a fold gives a bias-free
    conv/linear consumer a bias, whose adds torch-pruning's counter counts though pruning did
    not cause them (they could be absorbed into the following BN)."""
    had = {n for n, _ in original.named_parameters()}
    bare = copy.deepcopy(pruned)
    for name, m in bare.named_modules():
        if (
            isinstance(m, nn.Conv2d | nn.Linear)
            and m.bias is not None
            and f"{name}.bias" not in had
        ):
            m.bias = None
    return bare

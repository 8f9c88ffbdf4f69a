"""Torch-Pruning's global magnitude pruner with its ``pruning_ratio`` bisected to a FLOPs
reduction: the Torch-Pruning baseline of the fidelity and plan-quality benchmarks."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.support.flops import macs_params


def last_linear(model: nn.Module) -> nn.Module:
    """The layer that writes the logits: the last Linear in module order."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def magnitude_prune(
    model: nn.Module, example: torch.Tensor, ratio: float, *, p: int, max_ratio: float | None
) -> nn.Module:
    """A copy of ``model`` pruned by ``MagnitudePruner(global_pruning=True,
    MagnitudeImportance(p))`` at ``pruning_ratio=ratio``, the classifier (last Linear) ignored;
    ``max_ratio``: its ``max_pruning_ratio`` (None: the tool's default)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    cap = {} if max_ratio is None else {"max_pruning_ratio": max_ratio}
    pruner = tp.pruner.MagnitudePruner(
        pruned,
        example,
        importance=tp.importance.MagnitudeImportance(p=p),
        global_pruning=True,
        pruning_ratio=ratio,
        ignored_layers=[last_linear(pruned)],
        **cap,
    )
    pruner.step()
    return pruned


@dataclass
class Found:
    """The closest pruning the bisection found."""

    model: nn.Module
    ratio: float
    reduction: float  # FLOPs (MACs) reduction, 1 - pruned / unpruned
    steps: int  # prunings the search made


class RatioSearch:
    """Bisection of the global ``pruning_ratio`` until the FLOPs reduction is within
    ``tolerance`` of the target (FLOPs only, no data), at most ``max_steps`` prunings; returns
    the closest model found. Every evaluated ratio is remembered: the reductions seen bracket
    the next search (start: ratio 0 → 0, and ``hi`` above every target)."""

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        *,
        p: int,
        tolerance: float,
        max_steps: int,
        hi: float,
        max_ratio: float | None = None,
        macs: float | None = None,
    ) -> None:
        self.model, self.example = model, example
        self.p, self.max_ratio = p, max_ratio
        self.tolerance, self.max_steps, self.hi = tolerance, max_steps, hi
        self.macs = macs if macs is not None else macs_params(model, example)[0]
        self.seen: dict[float, float] = {0.0: 0.0}

    def reduction(self, ratio: float) -> tuple[float, nn.Module]:
        pruned = magnitude_prune(
            self.model, self.example, ratio, p=self.p, max_ratio=self.max_ratio
        )
        red = 1.0 - macs_params(pruned, self.example)[0] / self.macs
        self.seen[ratio] = red
        return red, pruned

    def find(self, target: float) -> Found:
        lo = max((r for r, v in self.seen.items() if v < target), default=0.0)
        hi = min((r for r, v in self.seen.items() if v >= target), default=self.hi)
        best: Found | None = None
        for steps in range(1, self.max_steps + 1):
            mid = (lo + hi) / 2
            red, pruned = self.reduction(mid)
            if best is None or abs(red - target) < abs(best.reduction - target):
                best = Found(pruned, mid, red, steps)
            best.steps = steps
            if abs(red - target) <= self.tolerance:
                break
            lo, hi = (mid, hi) if red < target else (lo, mid)
        assert best is not None
        return best

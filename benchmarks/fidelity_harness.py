"""The model side of the zero-shot fidelity benchmarks (:mod:`benchmarks.fidelity`): the real
MobileNetV2 and its manifest, forwards to log-probabilities, BN re-estimation, the fidelity
metrics, and the pruning by each method (prunegraph's plans; Torch-Pruning's magnitude pruner
bisected to a FLOPs target)."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.fidelity_images import BATCH, SIZE, batches, normalize, spread
from benchmarks.support.flops import macs_params
from benchmarks.support.tp_search import RatioSearch

WEIGHTS = "mobilenet_v2_imagenet.pth"
PG_METHODS = ("mrp", "srr", "hsc", "ci", "random", "l1", "fpgm")
TP_METHOD = "tp_magnitude"
METHODS = (*PG_METHODS, TP_METHOD)
REDUNDANCY_AWARE = ("mrp", "srr", "hsc")
TP_TOLERANCE = 0.002  # stop the ratio bisection within ±0.2 point (the requirement is ±1)
CI_MAX_PIXELS = 64  # positions per calibration input and layer kept for ci
CI_SAMPLES = 128  # calibration inputs (spread over all calibration sources) for ci: ≈1.2 GB maps
CONFIDENT = 0.5  # "confident" inputs: the unpruned model's top-1 probability at least this


def channels_last(model: nn.Module) -> nn.Module:
    """The model's 4-d weights in channels_last (faster depthwise convs on CPU), in place."""
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return model


# ------------------------------------------------------------------------------------- models


@torch.no_grad()
def log_probs(model: nn.Module, x_u8: torch.Tensor) -> torch.Tensor:
    """log-softmax of the model's logits on the inputs, float64 (N, classes); eval mode."""
    model.eval()
    channels_last(model)
    out = [
        F.log_softmax(model(normalize(x_u8[i : i + BATCH])).double(), dim=1)
        for i in range(0, x_u8.shape[0], BATCH)
    ]
    return torch.cat(out)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, calib_u8: torch.Tensor) -> None:
    """Re-estimate every BatchNorm's running stats on the calibration inputs (cumulative average
    over the batches), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    channels_last(model)
    model.train()
    for i in range(0, calib_u8.shape[0], BATCH):
        model(normalize(calib_u8[i : i + BATCH]))
    model.eval()


def example() -> torch.Tensor:
    """The input the manifest, the plans and the counts use: zeros (1, 3, 224, 224)."""
    return torch.zeros(1, 3, SIZE, SIZE)


def count(model: nn.Module) -> tuple[float, float]:
    """(MACs, params) at 1×3×224×224."""
    return macs_params(model, example())


def fidelity(ref: torch.Tensor, lp: torch.Tensor, groups: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement and mean KL(ref ‖ lp) from log-probabilities, plus agreement on the inputs
    the reference is confident on and a 95 % interval for agreement from a bootstrap over the
    source images (crops of one image are not independent)."""
    same = (ref.argmax(1) == lp.argmax(1)).numpy().astype(np.float64)
    kl = (ref.exp() * (ref - lp)).sum(1).clamp_min(0).numpy()
    confident = (ref.max(1).values.exp() >= CONFIDENT).numpy()
    rng = np.random.default_rng(0)
    labels = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in labels]
    boot = []
    for _ in range(1000):
        pick = rng.integers(0, len(labels), len(labels))
        idx = np.concatenate([members[p] for p in pick])
        boot.append(same[idx].mean())
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "agreement": round(float(same.mean()), 4),
        "kl": round(float(kl.mean()), 5),
        "agreement_ci95": [round(float(lo), 4), round(float(hi), 4)],
        "agreement_confident": round(float(same[confident].mean()), 4) if confident.any() else None,
    }


# ---------------------------------------------------------------------------------- pruning


@dataclass
class Setup:
    model: nn.Module  # the unpruned model, eval mode, never changed
    parsed: Any  # service.ingest.checkpoint.ParsedCheckpoint
    manifest: Any  # graphs.manifest.Manifest
    macs: float
    params: float


def setup(realdata: Path) -> Setup:
    from clients import build_manifest
    from service.ingest.checkpoint import read_checkpoint
    from tests.clients import models

    path = realdata / WEIGHTS
    model = models.mobilenet_v2()
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    manifest = build_manifest(model, example())
    macs, params = count(model)
    return Setup(model, read_checkpoint(path), manifest, macs, params)


def make_plan(
    s: Setup,
    method: str,
    target: float,
    seed: int,
    *,
    stats: dict[str, np.ndarray] | None,
    maps: dict[str, np.ndarray] | None,
    allocation: str = "uniform",
    cache: Any = None,
    ignored: Sequence[str] = (),
) -> tuple[Any, float]:
    """A prunegraph plan of the model (``stats``: compensated, with ``allocation``; ``maps``
    and ``cache``: ci's activations and per-group cache, ignored by the other methods;
    ``ignored``: layers never pruned) and the seconds it took."""
    from graphs.plan import Constraints, Target
    from graphs.planner import plan_layers

    t = time.perf_counter()
    plan = plan_layers(
        s.parsed.layers,
        method=method,  # type: ignore[arg-type]
        target=Target(flops=target),
        params_total=s.parsed.info.n_params,
        manifest=s.manifest,
        seed=seed,
        checkpoint_sha256=s.parsed.info.sha256,
        activations=maps if method == "ci" else None,
        cache=cache if method == "ci" else None,
        stats=stats,
        allocation=allocation if stats is not None else None,  # type: ignore[arg-type]
        constraints=Constraints(ignored=list(ignored)) if ignored else None,
    )
    return plan, time.perf_counter() - t


def prune_prunegraph(
    s: Setup,
    method: str,
    target: float,
    seed: int,
    activations: dict[str, np.ndarray] | None,
    cache: Any = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Plan with prunegraph and apply the plan; ``cache`` (a graphs.cache.MemoryCache) lets ci
    reuse its per-group CI across targets."""
    from clients import apply_plan

    plan, plan_s = make_plan(s, method, target, seed, stats=None, maps=activations, cache=cache)
    t = time.perf_counter()
    pruned = apply_plan(copy.deepcopy(s.model), plan, example())
    apply_s = time.perf_counter() - t
    removed = sum(len(g.remove) for g in plan.groups)
    return pruned, {
        "plan_s": round(plan_s, 3),
        "apply_s": round(apply_s, 3),
        "planned_flops_reduction": plan.achieved.get("flops"),
        "channels_removed": removed,
        "rule": plan.rule,
    }


class TpSearch:
    """Torch-Pruning's global MagnitudePruner (L1: ``MagnitudeImportance(p=1)``, the classifier
    ignored) with its ratio bisected to a FLOPs reduction within ±``TP_TOLERANCE``; evaluated
    ratios are remembered across targets (their reductions bracket the next search)."""

    def __init__(self, s: Setup) -> None:
        self.s = s
        self.search = RatioSearch(
            s.model, example(), p=1, tolerance=TP_TOLERANCE, max_steps=40, hi=0.9, macs=s.macs
        )

    def find(self, target: float) -> tuple[nn.Module, dict[str, Any]]:
        t = time.perf_counter()
        found = self.search.find(target)
        ratio, steps = found.ratio, found.steps
        return found.model, {
            "plan_s": round(time.perf_counter() - t, 3),
            "apply_s": 0.0,
            "tp_pruning_ratio": round(ratio, 6),
            "tp_bisection_steps": steps,
            "within_1_point": abs(found.reduction - target) <= 0.01,
            "rule": "Torch-Pruning MagnitudePruner, global_pruning=True, "
            f"MagnitudeImportance(p=1), pruning_ratio={ratio:.4f} (bisection, {steps} prunings)",
        }


def capture(s: Setup, calib_u8: torch.Tensor) -> tuple[dict[str, np.ndarray], float]:
    from clients import capture_activations

    t = time.perf_counter()
    model = channels_last(copy.deepcopy(s.model))
    x = calib_u8[spread(calib_u8.shape[0], CI_SAMPLES)]
    acts = capture_activations(
        model, batches(x), max_samples=x.shape[0], max_pixels=CI_MAX_PIXELS
    ).arrays()
    return acts, time.perf_counter() - t

"""Zero-shot fidelity of pruned real MobileNetV2 (ImageNet) on natural images, no labels (issue 7).

The real torchvision-layout MobileNetV2 (``realdata/mobilenet_v2_imagenet.pth``) is pruned to
10 / 20 / 30 % fewer FLOPs (MACs) by each method, and every pruned model is compared with the
unpruned one on natural images that scikit-image and scikit-learn ship: **top-1 agreement** (the
pruned model's top class equals the unpruned model's) and **mean KL(p_unpruned ‖ p_pruned)**
(nats) over the evaluation inputs, without and with **BN re-estimation** (running stats reset,
momentum None, the calibration inputs forwarded in train mode without grad, then eval). No labels
are needed: the unpruned model's predictions are the reference.

Images: 20 source images (``skimage.data`` photographs, textures and scientific images, gray ones
stacked to RGB; ``sklearn.datasets.load_sample_images`` china and flower), split **by source**
into evaluation and calibration sources (a fixed list, never the same image on both sides); each
source gives deterministic square crops (scales 1.0, 0.75, 0.5 of its short side at the centre
and the four corners, duplicates dropped) and their horizontal flips, resized to 224×224
(bilinear, antialias), ImageNet-normalized: 292 evaluation and 196 calibration inputs.
Calibration inputs feed ``ci``'s activations and the BN re-estimation; evaluation inputs only the
metrics.

Methods: prunegraph's plans (``mrp``, ``srr``, ``hsc``: redundancy-aware; ``ci``: CHIP's channel
independence on activations of the calibration inputs; ``l1``, ``fpgm``, ``random``: one uniform
ratio), made with a manifest at 1×3×224×224 (stem and classifier kept whole) and applied with
``clients.apply_plan``; and ``tp_magnitude``: Torch-Pruning's ``MagnitudePruner`` with global
pruning and ``MagnitudeImportance(p=1)`` (the tool's defaults otherwise; only the classifier
ignored), its ``pruning_ratio`` found by bisection so that its FLOPs reduction is within ±1 point
of the target. FLOPs and params are counted by ``torch_pruning.utils.count_ops_and_params`` at
1×3×224×224. Seeds only matter for ``random`` (each seed is a run; the table gives mean ± std);
the other methods are deterministic for a seed and run once, with the first seed.

Speed: forwards run in batches of 16 under ``torch.no_grad`` in channels_last with
``torch.set_num_threads(--threads)`` (default 1: on the shared 2-core machine two OpenMP threads
were several times slower than one while other work ran; the previous setting is restored
afterwards).

Usage:  python benchmarks/fidelity.py [--quick] [--seeds 0 1 2] [--targets 0.1 0.2 0.3]
            [--methods mrp srr ...] [--out-dir DIR] [--no-bn-recalibration] [--threads 1]
Writes DIR/fidelity.json, DIR/fidelity.md and DIR/fidelity.png (default DIR:
benchmarks/fidelity/) and prints the markdown tables.

Compensated plans (issue 14: statistics from the calibration inputs, least-squares folds, the
allocation rules): ``python benchmarks/fidelity.py --compensation [--quick] ...`` runs
``benchmarks/fidelity_compensation.py`` with the remaining options.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine_busy, run_meta  # noqa: E402

WEIGHTS = "mobilenet_v2_imagenet.pth"
SIZE = 224
BATCH = 16
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALES = (1.0, 0.75, 0.5)
POSITIONS = ((0.5, 0.5), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))  # (y, x) fractions
EVAL_SOURCES = (
    "astronaut", "chelsea", "rocket", "motorcycle", "china", "camera", "coins", "page",
    "grass", "brick", "hubble_deep_field", "retina",
)  # fmt: skip
CALIB_SOURCES = (
    "coffee", "flower", "clock", "moon", "text", "gravel", "immunohistochemistry", "cell",
)  # fmt: skip
PG_METHODS = ("mrp", "srr", "hsc", "ci", "random", "l1", "fpgm")
TP_METHOD = "tp_magnitude"
METHODS = (*PG_METHODS, TP_METHOD)
REDUNDANCY_AWARE = ("mrp", "srr", "hsc")
TARGETS = (0.1, 0.2, 0.3)
QUICK_METHODS = ("l1", "mrp")
QUICK_N = 16
TP_TOLERANCE = 0.002  # stop the ratio bisection within ±0.2 point (the requirement is ±1)
CI_MAX_PIXELS = 64  # positions per calibration input and layer kept for ci
CI_SAMPLES = 128  # calibration inputs (spread over all calibration sources) for ci: ≈1.2 GB maps
CONFIDENT = 0.5  # "confident" inputs: the unpruned model's top-1 probability at least this


def realdata_dir() -> Path:
    return Path(
        os.environ.get("PRUNEGRAPH_REALDATA", Path.home() / ".cache" / "prunegraph-realdata")
    )


# ------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Crop:
    source: str
    top: int
    left: int
    side: int
    flip: bool


def load_source(name: str) -> np.ndarray:
    """A source image as (H, W, 3) uint8 (gray stacked to RGB, alpha dropped)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image  # type: ignore[import-untyped]

        img = np.asarray(load_sample_image(f"{name}.jpg"))
    else:
        import skimage.data

        img = (
            skimage.data.stereo_motorcycle()[0]
            if name == "motorcycle"
            else getattr(skimage.data, name)()
        )
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    if img.dtype != np.uint8:
        raise ValueError(f"source image {name} is {img.dtype}, expected uint8")
    return np.ascontiguousarray(img)


def crops_of(name: str, h: int, w: int) -> list[Crop]:
    """Deterministic square crops of one source (scales × positions, duplicates dropped), each
    unflipped and flipped."""
    boxes: list[tuple[int, int, int]] = []
    for scale in SCALES:
        side = round(scale * min(h, w))
        for fy, fx in POSITIONS:
            box = (round(fy * (h - side)), round(fx * (w - side)), side)
            if box not in boxes:
                boxes.append(box)
    return [Crop(name, t, left, s, flip) for t, left, s in boxes for flip in (False, True)]


def materialize(crops: Sequence[Crop], sources: dict[str, np.ndarray]) -> torch.Tensor:
    """The crops resized to 224×224 (bilinear, antialias), uint8 (N, 3, 224, 224)."""
    out = torch.empty((len(crops), 3, SIZE, SIZE), dtype=torch.uint8)
    for i, c in enumerate(crops):
        patch = sources[c.source][c.top : c.top + c.side, c.left : c.left + c.side]
        x = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)[None].float()
        y = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True)
        if c.flip:
            y = y.flip(-1)
        out[i] = y[0].round().clamp(0, 255).to(torch.uint8)
    return out


def spread(n: int, k: int | None) -> list[int]:
    """k indices spread evenly over range(n) (all when k is None or ≥ n)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, k).round()})


@dataclass
class ImageSet:
    eval_u8: torch.Tensor
    calib_u8: torch.Tensor
    eval_sources: list[str]  # per evaluation input, its source image
    info: dict[str, Any]


def image_set(n_eval: int | None, n_calib: int | None) -> ImageSet:
    t = time.perf_counter()
    names = [*EVAL_SOURCES, *CALIB_SOURCES]
    sources = {n: load_source(n) for n in names}
    crops = {n: crops_of(n, *sources[n].shape[:2]) for n in names}
    ev = [c for n in EVAL_SOURCES for c in crops[n]]
    ca = [c for n in CALIB_SOURCES for c in crops[n]]
    ev = [ev[i] for i in spread(len(ev), n_eval)]
    ca = [ca[i] for i in spread(len(ca), n_calib)]
    info = {
        "eval_sources": list(EVAL_SOURCES),
        "calib_sources": list(CALIB_SOURCES),
        "n_eval": len(ev),
        "n_calib": len(ca),
        "crops_per_source": {n: len(crops[n]) for n in names},
        "crops": f"square, scales {list(SCALES)} of the short side at the centre and the four "
        "corners (duplicates dropped), each also flipped; 224×224 bilinear antialias",
    }
    out = ImageSet(materialize(ev, sources), materialize(ca, sources), [c.source for c in ev], info)
    out.info["prepare_s"] = round(time.perf_counter() - t, 2)
    return out


def channels_last(model: nn.Module) -> nn.Module:
    """The model's 4-d weights in channels_last (faster depthwise convs on CPU), in place."""
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return model


def normalize(x_u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    x = (x_u8.float() / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def batches(x_u8: torch.Tensor) -> list[torch.Tensor]:
    return [normalize(x_u8[i : i + BATCH]) for i in range(0, x_u8.shape[0], BATCH)]


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


def count(model: nn.Module) -> tuple[float, float]:
    """(MACs, params) at 1×3×224×224."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, SIZE, SIZE))
    return float(macs), float(params)


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
    parsed: Any  # service.ingest.ParsedCheckpoint
    manifest: Any  # graphs.manifest.Manifest
    macs: float
    params: float


def setup(realdata: Path) -> Setup:
    from clients import build_manifest
    from service.ingest import read_checkpoint
    from tests.clients import models

    path = realdata / WEIGHTS
    model = models.mobilenet_v2()
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    manifest = build_manifest(model, torch.zeros(1, 3, SIZE, SIZE))
    macs, params = count(model)
    return Setup(model, read_checkpoint(path), manifest, macs, params)


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
    from graphs.plan import Target
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
        activations=activations if method == "ci" else None,
        cache=cache,
    )
    plan_s = time.perf_counter() - t
    t = time.perf_counter()
    pruned = apply_plan(copy.deepcopy(s.model), plan, torch.zeros(1, 3, SIZE, SIZE))
    apply_s = time.perf_counter() - t
    removed = sum(len(g.remove) for g in plan.groups)
    return pruned, {
        "plan_s": round(plan_s, 3),
        "apply_s": round(apply_s, 3),
        "planned_flops_reduction": plan.achieved.get("flops"),
        "channels_removed": removed,
        "rule": plan.rule,
    }


def tp_prune(model: nn.Module, ratio: float) -> nn.Module:
    """Torch-Pruning's global MagnitudePruner (L1) at ``ratio``; the classifier ignored."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    classifier = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(
        pruned,
        torch.zeros(1, 3, SIZE, SIZE),
        importance=tp.importance.MagnitudeImportance(p=1),
        global_pruning=True,
        pruning_ratio=ratio,
        ignored_layers=[classifier],
    )
    pruner.step()
    return pruned


class TpSearch:
    """Bisection of Torch-Pruning's global ratio to a FLOPs reduction; evaluated ratios are
    remembered across targets (their reductions bracket the next search)."""

    def __init__(self, s: Setup) -> None:
        self.s = s
        self.seen: dict[float, float] = {0.0: 0.0}

    def reduction(self, ratio: float) -> tuple[float, nn.Module]:
        pruned = tp_prune(self.s.model, ratio)
        red = 1.0 - count(pruned)[0] / self.s.macs
        self.seen[ratio] = red
        return red, pruned

    def find(self, target: float) -> tuple[nn.Module, dict[str, Any]]:
        t = time.perf_counter()
        lo = max((r for r, v in self.seen.items() if v < target), default=0.0)
        hi = min((r for r, v in self.seen.items() if v >= target), default=0.9)
        best: tuple[float, float, nn.Module] | None = None
        steps = 0
        for _ in range(40):
            mid = (lo + hi) / 2
            red, pruned = self.reduction(mid)
            steps += 1
            if best is None or abs(red - target) < abs(best[1] - target):
                best = (mid, red, pruned)
            if abs(red - target) <= TP_TOLERANCE:
                break
            lo, hi = (mid, hi) if red < target else (lo, mid)
        assert best is not None
        ratio, red, pruned = best
        return pruned, {
            "plan_s": round(time.perf_counter() - t, 3),
            "apply_s": 0.0,
            "tp_pruning_ratio": round(ratio, 6),
            "tp_bisection_steps": steps,
            "within_1_point": abs(red - target) <= 0.01,
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


# ---------------------------------------------------------------------------------- reporting


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and std over seeds) per (target, method)."""
    keys = sorted({(r["target"], r["method"]) for r in rows}, key=lambda k: (k[0], _rank(k[1])))
    out = []
    for target, method in keys:
        rs = [r for r in rows if r["target"] == target and r["method"] == method]
        entry: dict[str, Any] = {"target": target, "method": method, "n_seeds": len(rs)}
        for k in ("flops_reduction", "params_reduction", "agreement", "kl", "agreement_bn",
                  "kl_bn", "plan_s"):  # fmt: skip
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                entry[k] = round(float(np.mean(vals)), 5)
                entry[k + "_std"] = round(float(np.std(vals)), 5) if len(vals) > 1 else None
        out.append(entry)
    return out


def _rank(method: str) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS)


def _cell(e: dict[str, Any] | None, agree: str, kl: str) -> str:
    if e is None or agree not in e:
        return "–"
    a, k = 100 * e[agree], e[kl]
    if e.get(agree + "_std") is not None:
        return f"{a:.1f} ± {100 * e[agree + '_std']:.1f} % / {k:.3f} ± {e[kl + '_std']:.3f}"
    return f"{a:.1f} % / {k:.3f}"


def markdown(summary: list[dict[str, Any]], reference: dict[str, Any], bn: bool) -> str:
    targets = sorted({e["target"] for e in summary})
    methods = sorted({e["method"] for e in summary}, key=_rank)
    at = {(e["target"], e["method"]): e for e in summary}
    head = "| method | " + " | ".join(f"{100 * t:.0f} % FLOPs" for t in targets) + " |"
    rule = "|---|" + "---:|" * len(targets)

    def table(agree: str, kl: str) -> list[str]:
        lines = [head, rule]
        for m in methods:
            cells = [_cell(at.get((t, m)), agree, kl) for t in targets]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return lines

    parts = ["Top-1 agreement with the unpruned model / mean KL(unpruned ‖ pruned) in nats, "
             "without BN re-estimation:", "", *table("agreement", "kl")]  # fmt: skip
    if bn:
        ref = reference.get("bn_recalibrated_unpruned") or {}
        parts += [
            "",
            "With BN re-estimation on the calibration inputs (the unpruned model re-estimated "
            f"the same way: {100 * ref.get('agreement', float('nan')):.1f} % / "
            f"{ref.get('kl', float('nan')):.3f}):",
            "",
            *table("agreement_bn", "kl_bn"),
        ]
    parts += ["", "Achieved FLOPs / params reduction and planning time (s):", "", head, rule]
    for m in methods:
        cells = []
        for t in targets:
            e = at.get((t, m))
            cells.append(
                "–"
                if e is None
                else f"{100 * e['flops_reduction']:.1f} / "
                f"{100 * e['params_reduction']:.1f} % · {e['plan_s']:.1f} s"
            )
        lines = f"| {m} | " + " | ".join(cells) + " |"
        parts.append(lines)
    return "\n".join(parts)


def plot(summary: list[dict[str, Any]], reference: dict[str, Any], bn: bool, path: Path) -> Path:
    """Agreement (top) and KL (bottom) against the achieved FLOPs reduction, per method; a
    column without and, with ``bn``, one with BN re-estimation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("", "without BN re-estimation")]
    if bn:
        columns.append(("_bn", "with BN re-estimation"))
    rows = [("agreement", "top-1 agreement with the unpruned model (%)", 100.0),
            ("kl", "mean KL(unpruned ‖ pruned), nats", 1.0)]  # fmt: skip
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(6.5 * len(columns), 4.2 * len(rows)), squeeze=False
    )
    methods = sorted({e["method"] for e in summary}, key=_rank)
    ref_bn = reference.get("bn_recalibrated_unpruned")
    for i, (metric, label, scale) in enumerate(rows):
        for j, (suffix, title) in enumerate(columns):
            ax, key = axes[i][j], metric + suffix
            for m in methods:
                es = sorted((e for e in summary if e["method"] == m and key in e),
                            key=lambda e: e["flops_reduction"])  # fmt: skip
                if not es:
                    continue
                x = [100 * e["flops_reduction"] for e in es]
                y = [scale * e[key] for e in es]
                err = [scale * (e.get(key + "_std") or 0.0) for e in es]
                style = "-" if m in (*REDUNDANCY_AWARE, "ci") else "--"
                ax.errorbar(x, y, yerr=err, fmt=style + "o", label=m, capsize=3, markersize=4)
            if suffix and ref_bn is not None:
                ax.axhline(scale * ref_bn[metric], color="gray", lw=1, ls=":",
                           label="unpruned, BN re-estimated")  # fmt: skip
            ax.set_xlabel("FLOPs reduction (%)")
            ax.set_ylabel(label)
            ax.set_title(f"MobileNetV2 (ImageNet), {title}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------- run


def run_fidelity(
    *,
    quick: bool,
    seeds: list[int],
    out_dir: Path,
    targets: Sequence[float] | None = None,
    methods: Sequence[str] | None = None,
    bn_recalibration: bool | None = None,
    realdata: Path | None = None,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Prune the real MobileNetV2 by each method to each FLOPs target and measure how closely
    it keeps the unpruned model's predictions; returns JSON-able results (``rows``, ``summary``,
    ``markdown``, ``plots``: the PNG paths written to ``out_dir``).

    ``quick``: target 0.1, methods l1 and mrp, 16 evaluation (and 16 calibration) inputs, no BN
    re-estimation (each overridable by the keyword arguments).
    """
    from graphs.cache import MemoryCache

    t_start = time.perf_counter()
    targets = list(targets if targets is not None else ((0.1,) if quick else TARGETS))
    methods = list(methods if methods is not None else (QUICK_METHODS if quick else METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if not seeds:
        raise ValueError("at least one seed")
    bn = (not quick) if bn_recalibration is None else bn_recalibration
    root = realdata or realdata_dir()
    if not (root / WEIGHTS).is_file():
        raise FileNotFoundError(f"{root / WEIGHTS} is missing: run ../shared/realdata/fetch.sh")
    out_dir.mkdir(parents=True, exist_ok=True)
    busy = machine_busy(1.0)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timings: dict[str, float] = {}
        n = QUICK_N if quick else None
        images = image_set(n, n)
        timings["images_s"] = images.info["prepare_s"]
        log(f"images: {images.info['n_eval']} evaluation, {images.info['n_calib']} calibration")
        t = time.perf_counter()
        s = setup(root)
        timings["setup_s"] = round(time.perf_counter() - t, 2)
        groups = np.array(images.eval_sources)
        t = time.perf_counter()
        ref = log_probs(copy.deepcopy(s.model), images.eval_u8)
        timings["reference_forward_s"] = round(time.perf_counter() - t, 2)
        ref_conf = float((ref.max(1).values.exp() >= CONFIDENT).double().mean())
        reference: dict[str, Any] = {
            "macs": s.macs,
            "params": s.params,
            "confident_fraction": round(ref_conf, 4),
            "top1_classes": len(set(ref.argmax(1).tolist())),
        }
        ref_bn = None
        if bn:  # the unpruned model re-estimated the same way: what re-estimation alone does
            model = copy.deepcopy(s.model)
            t = time.perf_counter()
            recalibrate_bn(model, images.calib_u8)
            ref_bn = log_probs(model, images.eval_u8)
            reference["bn_recalibrated_unpruned"] = fidelity(ref, ref_bn, groups)
            timings["bn_reference_s"] = round(time.perf_counter() - t, 2)
        acts = None
        ci_cache = MemoryCache()
        if "ci" in methods:
            acts, capture_s = capture(s, images.calib_u8)
            timings["ci_capture_s"] = round(capture_s, 2)
        search = TpSearch(s) if TP_METHOD in methods else None
        rows: list[dict[str, Any]] = []
        for target in targets:
            for method in methods:
                for seed in seeds if method == "random" else seeds[:1]:
                    t = time.perf_counter()
                    if method == TP_METHOD:
                        assert search is not None
                        pruned, extra = search.find(target)
                    else:
                        hits = ci_cache.hits
                        cache = ci_cache if method == "ci" else None
                        pruned, extra = prune_prunegraph(s, method, target, seed, acts, cache)
                        extra["plan_cached"] = ci_cache.hits > hits
                    macs, params = count(pruned)
                    row: dict[str, Any] = {
                        "target": target,
                        "method": method,
                        "seed": seed,
                        "flops_reduction": round(1 - macs / s.macs, 5),
                        "params_reduction": round(1 - params / s.params, 5),
                        **extra,
                    }
                    lp = log_probs(pruned, images.eval_u8)
                    row.update(fidelity(ref, lp, groups))
                    if bn:
                        recalibrate_bn(pruned, images.calib_u8)
                        lp = log_probs(pruned, images.eval_u8)
                        row.update({f"{k}_bn": v for k, v in fidelity(ref, lp, groups).items()})
                        assert ref_bn is not None
                        rel = fidelity(ref_bn, lp, groups)
                        row["agreement_bn_vs_bn_unpruned"] = rel["agreement"]
                        row["kl_bn_vs_bn_unpruned"] = rel["kl"]
                    row["total_s"] = round(time.perf_counter() - t, 2)
                    rows.append(row)
                    log(
                        f"{100 * target:.0f}% {method:12s} seed {seed}: FLOPs "
                        f"-{100 * row['flops_reduction']:.1f}% agree "
                        f"{100 * row['agreement']:.1f}% KL {row['kl']:.3f}"
                        + (
                            f" | BN agree {100 * row['agreement_bn']:.1f}% KL {row['kl_bn']:.3f}"
                            if bn
                            else ""
                        )
                        + f" ({row['total_s']:.1f} s)"
                    )
                    del pruned
        summary = summarize(rows)
        md = markdown(summary, reference, bn)
        png = plot(summary, reference, bn, out_dir / "fidelity.png")
        timings["total_s"] = round(time.perf_counter() - t_start, 2)
        return {
            "meta": {**run_meta(), "machine_busy": busy, "torch_threads": threads},
            "config": {
                "model": "MobileNetV2 (torchvision layout), ImageNet weights " + WEIGHTS,
                "quick": quick,
                "targets": targets,
                "methods": methods,
                "seeds": seeds,
                "seeds_note": "random runs once per seed (table: mean ± std); every other "
                "method is deterministic for a seed and runs once with the first seed",
                "bn_recalibration": bn,
                "flops": "MACs by torch_pruning.utils.count_ops_and_params at 1x3x224x224",
                "kl": "mean over evaluation inputs of KL(p_unpruned || p_pruned), nats",
                "prunegraph": "plan_layers with a manifest at 1x3x224x224 (stem and classifier "
                "kept whole), default constraints and step, applied by clients.apply_plan",
                "tp_magnitude": "torch_pruning MagnitudePruner, global_pruning=True, "
                "MagnitudeImportance(p=1), classifier ignored, pruning_ratio by bisection to "
                f"±{100 * TP_TOLERANCE:.1f} point of the FLOPs target",
                "ci": f"activations of {min(CI_SAMPLES, images.info['n_calib'])} calibration "
                f"inputs (spread over all calibration sources), {CI_MAX_PIXELS} positions per "
                "input and layer; per-group CI cached across targets (plan_cached: the plan "
                "reused it, so its plan_s is the re-planning time)",
                "bn_vs_bn_unpruned": "agreement/KL of the BN-re-estimated pruned model against "
                "the BN-re-estimated unpruned model (what pruning changes when both see the "
                "same re-estimation)",
                "confident": f"agreement_confident: on inputs whose unpruned top-1 probability "
                f">= {CONFIDENT}",
            },
            "images": images.info,
            "reference": reference,
            "rows": rows,
            "summary": summary,
            "timings": timings,
            "markdown": md,
            "plots": [str(png)],
        }
    finally:
        torch.set_num_threads(old_threads)


def main(argv: Sequence[str] | None = None) -> None:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--compensation" in args_in:  # compensated plans: benchmarks/fidelity_compensation.py
        from fidelity_compensation import main as compensation_main

        args_in.remove("--compensation")
        compensation_main(args_in)
        return
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="--compensation: measure compensated plans instead (options of "
        "benchmarks/fidelity_compensation.py)",
    )
    parser.add_argument("--quick", action="store_true", help="target 0.1, l1 + mrp, 16 inputs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "fidelity")
    parser.add_argument(
        "--bn-recalibration", action=argparse.BooleanOptionalAction, default=None,
        help="BN re-estimation on the calibration inputs (default: on, off with --quick)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--realdata", type=Path, default=None)
    args = parser.parse_args(args_in)
    result = run_fidelity(
        quick=args.quick,
        seeds=args.seeds,
        out_dir=args.out_dir,
        targets=args.targets,
        methods=args.methods,
        bn_recalibration=args.bn_recalibration,
        realdata=args.realdata,
        threads=args.threads,
    )
    (args.out_dir / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "fidelity.md").write_text(result["markdown"] + "\n")
    print()
    print(result["markdown"])
    print(f"\nwrote {args.out_dir / 'fidelity.json'}, fidelity.md, {', '.join(result['plots'])}")
    print(f"total {result['timings']['total_s']:.1f} s")


if __name__ == "__main__":
    main()

"""The calibration data of the zero-shot currency and default-path benchmarks
(:mod:`benchmarks.fidelity_currency`, :mod:`benchmarks.crossfit_rho`): the halves of the
calibration source images, the first K of them, the product's own capture with its held-out
part, and a check of statistics against a cached file. Evaluation inputs are never touched."""

from __future__ import annotations

import copy
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.fidelity_harness import Setup, channels_last
from benchmarks.fidelity_images import ImageSet, normalize


def compare_golden(stats: dict[str, np.ndarray], path: Path | None) -> dict[str, Any] | None:
    """Largest relative difference between our calibration statistics and a cached file."""
    if path is None or not path.exists():
        return None
    from safetensors.numpy import load_file

    cached = load_file(str(path))
    common = [k for k in stats if f"gram/{k}" in cached or k in cached]
    worst = 0.0
    for k in common:
        other = cached.get(f"gram/{k}", cached.get(k))
        assert other is not None
        d = np.abs(other.astype(np.float64) - stats[k]).max() / max(np.abs(stats[k]).max(), 1e-30)
        worst = max(worst, float(d))
    return {
        "file": str(path),
        "consumers_compared": len(common),
        "of": len(stats),
        "max_rel": worst,
    }


def split_calibration(images: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration inputs of the first half of the calibration source images, and of the
    second half (crops are in source order)."""
    per = images.info["crops_per_source"]
    names = images.info["calib_sources"]
    cut = sum(per[n] for n in names[: len(names) // 2])
    return images.calib_u8[:cut], images.calib_u8[cut:]


def first_sources(images: ImageSet, k: int | None) -> ImageSet:
    """The image set with only the first ``k`` calibration sources (all when None); the
    evaluation inputs are untouched."""
    names = images.info["calib_sources"]
    if k is None or k >= len(names):
        return images
    per = images.info["crops_per_source"]
    n = sum(per[name] for name in names[:k])
    info = {**images.info, "calib_sources": names[:k], "n_calib": n}
    return ImageSet(images.eval_u8, images.calib_u8[:n], images.eval_sources, info)


def product_capture(
    s: Setup, images: ImageSet
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """Statistics and their held-out part as the product captures them
    (``capture_activations(..., holdout_every=2)``), with one batch per calibration source image
    in source order: the held-out part is every second source image (4 of 8)."""
    from clients import capture_activations

    per = images.info["crops_per_source"]
    cuts = np.cumsum([0] + [per[n] for n in images.info["calib_sources"]])
    chunks = [normalize(images.calib_u8[lo:hi]) for lo, hi in itertools.pairwise(cuts)]
    t = time.perf_counter()
    model = channels_last(copy.deepcopy(s.model))
    acts = capture_activations(
        model, chunks, max_samples=images.calib_u8.shape[0], maps=False, holdout_every=2
    )
    return acts.stats(), acts.holdout_stats(), time.perf_counter() - t

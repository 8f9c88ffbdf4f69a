"""The natural images of the zero-shot fidelity benchmarks (:mod:`benchmarks.fidelity`): 20
source images that scikit-image and scikit-learn ship, split by source into evaluation and
calibration sources, deterministic square crops of each and their flips, 224×224 uint8, and their
ImageNet normalization."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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
QUICK_N = 16  # evaluation and calibration inputs of a --quick run


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


DENSE_SCALES = (1.0, 0.85, 0.7, 0.55, 0.4)
DENSE_POSITIONS = tuple((y, x) for y in (0.0, 0.5, 1.0) for x in (0.0, 0.5, 1.0))


def crops_of(name: str, h: int, w: int, *, dense: bool = False) -> list[Crop]:
    """Deterministic square crops of one source (scales × positions, duplicates dropped), each
    unflipped and flipped; ``dense``: 5 scales × a 3×3 grid (calibration augmentation)."""
    boxes: list[tuple[int, int, int]] = []
    for scale in DENSE_SCALES if dense else SCALES:
        side = round(scale * min(h, w))
        for fy, fx in DENSE_POSITIONS if dense else POSITIONS:
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


def image_set(n_eval: int | None, n_calib: int | None, *, dense_calib: bool = False) -> ImageSet:
    """Evaluation and calibration crops; ``dense_calib``: more crops of the same calibration
    sources (:func:`crops_of` ``dense``), the evaluation crops unchanged."""
    t = time.perf_counter()
    names = [*EVAL_SOURCES, *CALIB_SOURCES]
    sources = {n: load_source(n) for n in names}
    crops = {
        n: crops_of(n, *sources[n].shape[:2], dense=dense_calib and n in CALIB_SOURCES)
        for n in names
    }
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
        "corners (duplicates dropped), each also flipped; 224×224 bilinear antialias"
        + (
            f"; calibration: scales {list(DENSE_SCALES)} on a 3×3 grid of positions"
            if dense_calib
            else ""
        ),
    }
    out = ImageSet(materialize(ev, sources), materialize(ca, sources), [c.source for c in ev], info)
    out.info["prepare_s"] = round(time.perf_counter() - t, 2)
    return out


def normalize(x_u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    x = (x_u8.float() / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def batches(x_u8: torch.Tensor) -> list[torch.Tensor]:
    return [normalize(x_u8[i : i + BATCH]) for i in range(0, x_u8.shape[0], BATCH)]

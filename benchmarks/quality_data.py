"""Data, models, training and the model cache of the plan-quality benchmark
(:mod:`benchmarks.quality`).

Datasets (every split fixed, seeded and stratified by class; nothing is ever tuned on ``test``):

* ``mnist``: the 5,000 real MNIST digits (``tests.mnist.load_mnist``): 4,000 train / 1,000 test;
  the train part is split again into 3,500 ``fit`` (all training) and 500 ``val`` (tuning);
* ``sklearn``: scikit-learn's 1,797 8×8 digits, resized to 20×20 and centred in 28×28 like MNIST,
  normalized with MNIST's mean and std: 1,437 train (1,294 fit / 143 val) / 360 test.

Models (input 1×28×28, 10 classes):

* ``resnet20``: the CIFAR ResNet-20 of ``tests.clients.models`` (16/32/64 channels, 3 blocks a
  stage) with a 1-channel stem and option-B (1×1 conv) shortcuts — Torch-Pruning cannot prune
  option A's zero-padded shortcuts (its dependency graph does not see the channel padding);
* ``vgg_bn``: a small VGG with BatchNorm: 6 convs (32, 64, 128, 128, 256, 256), 4 max-pools,
  classifier 256 → 128 → 10;
* ``digit_cnn``: the real pretrained MNIST CNN (``digit_cnn.pth`` of the realdata folder,
  trained by someone else on MNIST): used as it is on ``mnist``, fine-tuned from those weights
  on ``sklearn``.

Base models are trained once (seed 0) and cached by a digest of their configuration.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.support.paths import realdata_dir
from clients import PCCLoss
from tests.clients import models
from tests.mnist import MEAN, STD, load_mnist

CACHE_VERSION = "1"
DATASETS = ("mnist", "sklearn")
MODELS = ("resnet20", "vgg_bn", "digit_cnn")
EXAMPLE = (1, 1, 28, 28)


# --------------------------------------------------------------------------------- datasets


@dataclass
class Split:
    """One dataset's fixed split; x are (N, 1, 28, 28) float32 normalized, y int64."""

    name: str
    x_fit: torch.Tensor
    y_fit: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {"fit": len(self.y_fit), "val": len(self.y_val), "test": len(self.y_test)}


def stratified(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, part): ``part`` holds round(fraction · n_c) of every class c, seeded."""
    rng = np.random.default_rng(seed)
    rest: list[np.ndarray] = []
    part: list[np.ndarray] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = round(fraction * len(idx))
        part.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(part))


def _sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]  # bundled

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    x = F.pad(x, (4, 4, 4, 4))  # MNIST digits sit in a 20×20 box centred in 28×28
    return (x - MEAN) / STD, torch.from_numpy(d.target.astype(np.int64))


@functools.lru_cache(maxsize=4)
def load_split(name: str, limit: int | None = None) -> Split:
    """The fixed split of ``name``; ``limit`` first keeps a stratified subset of that size."""
    if name == "mnist":
        x, y = load_mnist(realdata_dir())
        test_fraction, val_fraction = 0.2, 0.125  # 4,000 / 1,000; 3,500 / 500
    elif name == "sklearn":
        x, y = _sklearn_digits()
        test_fraction, val_fraction = 0.2, 0.1
    else:
        raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    labels = y.numpy()
    if limit is not None and limit < len(labels):
        _, keep = stratified(labels, limit / len(labels), seed=1)
        x, y, labels = x[keep], y[keep], labels[keep]
    train, test = stratified(labels, test_fraction, seed=0)
    fit_rel, val_rel = stratified(labels[train], val_fraction, seed=0)
    fit, val = train[fit_rel], train[val_rel]
    return Split(name, x[fit], y[fit], x[val], y[val], x[test], y[test])


# --------------------------------------------------------------------------------- models


class SmallVGG(nn.Module):
    """VGG-style with BN for 1×28×28: ``features`` (conv-BN-ReLU ×6, 4 pools), ``classifier``."""

    CFG = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M")

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)  # 28 → 14 → 7 → 3 → 1
        self.classifier = nn.Sequential(
            nn.Linear(c, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def make_model(name: str) -> nn.Module:
    """A fresh model (random init from the current torch seed; digit_cnn: the real weights)."""
    if name == "resnet20":
        m = models.CifarResNet(3, "B")
        m.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        return m
    if name == "vgg_bn":
        return SmallVGG()
    if name == "digit_cnn":
        cnn = models.digit_cnn()
        weights = realdata_dir() / "digit_cnn.pth"
        cnn.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
        return cnn
    raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODELS)}")


# --------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Adam, cosine learning-rate decay from ``lr`` to 0 over the run, batches of ``batch``."""

    epochs: float
    lr: float = 1e-3
    batch: int = 64
    max_steps: int | None = None


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    seed: int,
    pcc: PCCLoss | None = None,
) -> dict[str, float]:
    """Adam on cross-entropy (+ the PCC term), cosine-decayed learning rate, batches of
    ``cfg.batch`` in a seeded order (incomplete last batches dropped: BN needs 2 samples)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = len(y)
    per_epoch = max(n // cfg.batch, 1)
    total = max(1, round(cfg.epochs * per_epoch))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    model.train()
    t0 = time.perf_counter()
    step, loss_sum = 0, 0.0
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            if step >= total:
                break
            idx = perm[b * cfg.batch : (b + 1) * cfg.batch]
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if pcc is not None:
                loss = loss + pcc()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss)
            step += 1
    model.eval()
    return {"steps": step, "loss": loss_sum / max(step, 1), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch: int = 64) -> nn.Module:
    """BN re-estimation: every BatchNorm's running stats reset and re-averaged (momentum None)
    over ``x`` in train mode, no gradients; returns the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for i in range(0, len(x), batch):
        model(x[i : i + batch])
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(y), batch):
        hits += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return hits / max(len(y), 1)


# --------------------------------------------------------------------------------- cache


def digest(config: dict[str, Any]) -> str:
    text = json.dumps({**config, "cache_version": CACHE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_config(dataset: str, model: str, base: TrainConfig, limit: int | None) -> dict[str, Any]:
    """What a base model depends on (the cache key). digit_cnn on mnist is the real weights."""
    if dataset == "mnist" and model == "digit_cnn":
        return {"dataset": dataset, "model": model, "limit": limit, "train": None}
    return {"dataset": dataset, "model": model, "limit": limit, "train": base.__dict__, "seed": 0}


def model_paths(cache: Path, tag: str, config: dict[str, Any]) -> tuple[Path, Path]:
    key = digest(config)
    return cache / f"{tag}-{key}.pt", cache / f"{tag}-{key}.json"


def load_cached(model: str, path: Path) -> nn.Module:
    m = make_model(model) if model != "digit_cnn" else models.digit_cnn()
    m.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return m.eval()


def ensure_base(
    cache: Path, dataset: str, model: str, base: TrainConfig, limit: int | None
) -> dict[str, Any]:
    """Train (or find) the base model; returns its meta (path, accuracies, train seconds)."""
    config = base_config(dataset, model, base, limit)
    pt, meta_path = model_paths(cache, f"base-{dataset}-{model}", config)
    if pt.is_file() and meta_path.is_file():
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        return {**meta, "cached": True}
    split = load_split(dataset, limit)
    torch.manual_seed(0)
    net = make_model(model)
    stats: dict[str, float] = {"steps": 0, "seconds": 0.0}
    if config["train"] is not None:
        stats = train(net, split.x_fit, split.y_fit, base, seed=0)
    meta = {
        "path": str(pt),
        "config": config,
        "val_acc": accuracy(net, split.x_val, split.y_val),
        "test_acc": accuracy(net, split.x_test, split.y_test),
        "train_steps": stats["steps"],
        "train_s": round(stats["seconds"], 2),
    }
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), pt)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "cached": False}


def ensure_pcc(
    cache: Path,
    dataset: str,
    model: str,
    base: TrainConfig,
    pcc_train: TrainConfig,
    weight: float,
    limit: int | None,
) -> dict[str, Any]:
    """The base model further trained with cross-entropy + λ·PCC (all convs, decorrelate)."""
    config = {
        "base": base_config(dataset, model, base, limit),
        "pcc_train": pcc_train.__dict__,
        "weight": weight,
        "seed": 0,
    }
    pt, meta_path = model_paths(cache, f"pcc-{dataset}-{model}", config)
    if pt.is_file() and meta_path.is_file():
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        return {**meta, "cached": True}
    base_meta = ensure_base(cache, dataset, model, base, limit)
    split = load_split(dataset, limit)
    net = load_cached(model, Path(base_meta["path"]))
    with PCCLoss(net, weight=weight) as pcc:
        stats = train(net, split.x_fit, split.y_fit, pcc_train, seed=0, pcc=pcc)
    meta = {
        "path": str(pt),
        "config": config,
        "weight": weight,
        "val_acc": accuracy(net, split.x_val, split.y_val),
        "test_acc": accuracy(net, split.x_test, split.y_test),
        "train_steps": stats["steps"],
        "train_s": round(stats["seconds"], 2),
    }
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), pt)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "cached": False}

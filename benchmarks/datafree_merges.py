"""How often data-free merges of near-duplicate filters apply on the real checkpoints.

For every conv/linear layer: how many filter pairs have an effective-filter cosine (BN folded,
``γ/σ · W``; ``[W, b]`` without BN) above each threshold, and how many merge components
``clients.datafree.datafree_merges`` finds where a merge applies (BN → ReLU/none → consumer).
Then, on the digit CNN (no BN, so outside the data-free path), a Kim-style merge (``B[j, i] =
‖v_j‖/‖v_i‖`` into the most similar kept filter, taken in decreasing norm) against plain removal
of the same channels, on the first 1,000 digits of mnist_5k.csv.gz.

Usage: python -m benchmarks.datafree_merges [--realdata DIR] [--quality-cache DIR]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clients.datafree import datafree_merges
from graphs.merge import filter_cosines
from tests.clients import models
from tests.mnist import load_mnist

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
DIGIT_CHAIN = (("conv_layers.0", "conv_layers.3", 1), ("conv_layers.3", "conv_layers.6", 1),
               ("conv_layers.6", "fc_layers.0", 9), ("fc_layers.0", "fc_layers.2", 1))  # fmt: skip


def effective_filters(net: nn.Module) -> dict[str, np.ndarray]:
    """Layer name -> rows γ/σ·W (a conv/linear followed by a BN module) or [W, b] (no BN)."""
    mods = list(net.named_modules())
    out: dict[str, np.ndarray] = {}
    for (name, m), (_, nxt) in zip(mods, [*mods[1:], ("", nn.Identity())], strict=True):
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or getattr(m, "groups", 1) > 1:
            continue
        W = m.weight.detach().double().reshape(m.weight.shape[0], -1).numpy()
        if isinstance(nxt, nn.BatchNorm2d) and nxt.running_var is not None:
            g = nxt.weight.detach().double().numpy()
            out[name] = W * (g / np.sqrt(nxt.running_var.double().numpy() + nxt.eps))[:, None]
        elif m.bias is not None:
            out[name] = np.concatenate([W, m.bias.detach().double().numpy()[:, None]], axis=1)
    return out


def pair_counts(net: nn.Module, x: torch.Tensor, label: str) -> None:
    total = {t: 0 for t in THRESHOLDS}
    pairs = 0
    for name, V in effective_filters(net).items():
        cos = filter_cosines(V)
        iu = np.triu_indices(cos.shape[0], 1)
        pairs += iu[0].size
        above = [int((cos[iu] >= t).sum()) for t in THRESHOLDS]
        for t, k in zip(THRESHOLDS, above, strict=True):
            total[t] += k
        print(f"  {name:24s} c={V.shape[0]:5d} d={V.shape[1]:5d} max cos {cos[iu].max():.3f} "
              f"pairs >= {above}")  # fmt: skip
    print(f"{label}: {pairs:,} pairs; cos >= {list(THRESHOLDS)}: {list(total.values())}")
    for t in THRESHOLDS:
        found = datafree_merges(net, x, merge_threshold=t)
        comps = [c for v in found.values() for c in v]
        print(f"  datafree_merges threshold {t}: {len(found)} consumers, {len(comps)} components")


def kim_merges(layer: Any, t: float) -> list[tuple[int, int, float]]:
    """(removed j, kept i, s) for filters (in decreasing norm) whose best kept match has cos ≥ t."""
    W = layer.weight.detach().double().reshape(layer.weight.shape[0], -1).numpy()
    V = np.concatenate([W, layer.bias.detach().double().numpy()[:, None]], axis=1)
    cos, norm = filter_cosines(V), np.linalg.norm(V, axis=1)
    kept: list[int] = []
    merges = []
    for j in (int(k) for k in np.argsort(-norm, kind="stable")):
        if kept:
            i = kept[int(np.argmax(cos[j, kept]))]
            if cos[j, i] >= t:
                merges.append((j, i, float(norm[j] / norm[i])))
                continue
        kept.append(j)
    return merges


def digit_kim(realdata: Path) -> None:
    net = models.digit_cnn()
    net.load_state_dict(torch.load(realdata / "digit_cnn.pth", weights_only=True))
    net.eval()
    x, y = load_mnist(realdata)
    x, y = x[:1000], y[:1000]
    with torch.no_grad():
        base = net(x)
    print(
        "| cos ≥ | merges conv0/conv3/conv6/fc0 | acc. removal | acc. merged "
        "| agreement removal | merged | rel. logit error removal | merged |"
    )
    for t in (0.95, 0.9, 0.8, 0.7, 0.6, 0.5):
        mods = dict(net.named_modules())
        plan = [kim_merges(mods[p], t) for p, _, _ in DIGIT_CHAIN]
        cells = []
        for fold in (False, True):
            m = copy.deepcopy(net)
            layers = dict(m.named_modules())
            with torch.no_grad():
                for (_, cons, per), merges in zip(DIGIT_CHAIN, plan, strict=True):
                    W = layers[cons].weight
                    view = W.view(W.shape[0], -1, per) if per > 1 else W.view(*W.shape[:2], -1)
                    for j, i, s in merges:
                        if fold:
                            view[:, i] += s * view[:, j]
                        view[:, j] = 0.0
                out = m(x)
            cells.append((float((out.argmax(1) == y).float().mean()),
                          float((out.argmax(1) == base.argmax(1)).float().mean()),
                          float((out - base).norm() / base.norm())))  # fmt: skip
        (a0, g0, e0), (a1, g1, e1) = cells
        counts = "/".join(str(len(p)) for p in plan)
        print(f"| {t} | {counts} | {a0:.3f} | {a1:.3f} | {g0:.3f} | {g1:.3f} | {e0:.4f} "
              f"| {e1:.4f} |")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--realdata", type=Path, default=Path.home() / ".cache/prunegraph-realdata")
    p.add_argument("--quality-cache", type=Path,
                   default=Path(__file__).parent / ".cache" / "quality")  # fmt: skip
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    mbv2 = models.mobilenet_v2()
    mbv2.load_state_dict(torch.load(a.realdata / "mobilenet_v2_imagenet.pth", weights_only=True))
    pair_counts(mbv2.eval(), torch.zeros(1, 3, 64, 64), "mobilenet_v2")
    digit = models.digit_cnn()
    digit.load_state_dict(torch.load(a.realdata / "digit_cnn.pth", weights_only=True))
    pair_counts(digit.eval(), torch.zeros(1, 1, 28, 28), "digit_cnn")
    from benchmarks import quality_data as qd

    for model in ("vgg_bn", "resnet20"):
        for path in sorted(a.quality_cache.glob(f"base-mnist-{model}-*.pt")):
            pair_counts(qd.load_cached(model, path), torch.zeros(1, 1, 28, 28), path.stem)
    digit_kim(a.realdata)


if __name__ == "__main__":
    main()

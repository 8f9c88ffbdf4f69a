"""Planning and apply time (issue 3 goals, on 2 cores); run by `make bench` after speed.py.

For a ResNet-56-shaped (CIFAR, 32×32) and a ResNet-50-shaped (ImageNet, 224×224) model, and an
EfficientNet/BiT-like model whose convs are nn.Conv2d subclasses with their own ``forward``
(``subclass``: timm-style Conv2dSame, Conv2dStaticSamePadding, StdConv2d; 64×64), once with
random weights and once with redundancy planted (in every conv of ≥ 8 filters, a quarter of the
filters replaced by noisy, rescaled copies of others, so that the greedy SRP loop has work):
build the manifest, read the checkpoint, plan every method to 50 % FLOPs with the default step
and with step=1 (exact SRP), and apply the default mrp plan with torch-pruning; the applied
model's FLOPs reduction is measured again by forward hooks (``clients.flops.count_model_macs``,
by ``isinstance``), next to the plan's own figure.
Goals: planning ≤ 5 s (ResNet-56) and ≤ 30 s (ResNet-50) with default settings.

Usage:  python -m benchmarks.planning [--models resnet56,resnet50,subclass] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.support.meta import machine_busy, run_meta, write_json

METHODS = ["mrp", "srr", "hsc", "l1", "fpgm", "random"]


def _plant(model: Any, seed: int = 0) -> None:
    """Replace a quarter of every conv's filters by noisy, rescaled copies of other filters."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and module.out_channels >= 8:
                w = module.weight
                n = w.shape[0]
                perm = torch.randperm(n, generator=g)
                dst, src = perm[: n // 4], perm[n // 4 : n // 2]
                scale = 0.5 + 1.5 * torch.rand(n // 4, 1, 1, 1, generator=g)
                noise = 0.02 * w.std() * torch.randn(w[dst].shape, generator=g)
                w[dst] = w[src] * scale + noise


def bench(name: str, planted: bool) -> list[dict[str, Any]]:
    import torch

    from clients import apply_plan, build_manifest
    from clients.flops import count_model_macs
    from graphs.plan import Target
    from graphs.planner import plan_layers
    from service.ingest.checkpoint import read_checkpoint
    from tests.clients import models

    factories = {
        "resnet56": (lambda: models.resnet56("B"), 32),
        "resnet50": (models.resnet50, 224),
        "subclass": (models.subclass_convnet, 64),
    }
    factory, size = factories[name]
    torch.manual_seed(0)
    model = factory()
    if planted:
        _plant(model)
    model.eval()
    x = torch.zeros(1, 3, size, size)
    t = time.perf_counter()
    manifest = build_manifest(model, x)
    t_manifest = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.pt"
        torch.save(model.state_dict(), path)
        parsed = read_checkpoint(path)
    rows = []
    for method in METHODS:
        for step in (0.05, 1):
            if step == 1 and method not in ("mrp", "srr", "hsc"):
                continue
            t = time.perf_counter()
            plan = plan_layers(
                parsed.layers,
                method=method,  # type: ignore[arg-type]
                target=Target(flops=0.5),
                params_total=parsed.info.n_params,
                manifest=manifest,
                step=step,
                checkpoint_sha256=parsed.info.sha256,
            )
            seconds = time.perf_counter() - t
            row: dict[str, Any] = {
                "model": name,
                "weights": "planted" if planted else "random",
                "method": method,
                "step": step,
                "plan_s": round(seconds, 3),
                "flops_removed": plan.achieved.get("flops"),
                "params_removed": plan.achieved["params"],
                "manifest_s": round(t_manifest, 3),
            }
            if method == "mrp" and step == 0.05:
                pruned = copy.deepcopy(model)
                t = time.perf_counter()
                apply_plan(pruned, plan, x)
                row["apply_s"] = round(time.perf_counter() - t, 3)
                macs = count_model_macs(pruned, (x,)) / count_model_macs(model, (x,))
                row["flops_removed_hooks"] = round(1 - macs, 4)
            rows.append(row)
            print(
                f"{name:9s} {row['weights']:7s} {method:6s} step={step!s:5s} plan={seconds:6.2f}s "
                f"flops-{row['flops_removed']:.3f} params-{row['params_removed']:.3f} "
                f"| {plan.rule}"
                + (
                    f" apply={row['apply_s']:.2f}s hooks: flops-{row['flops_removed_hooks']:.3f}"
                    if "apply_s" in row
                    else ""
                ),
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default="resnet56,resnet50,subclass")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    busy = machine_busy()
    rows = [r for m in args.models.split(",") for p in (False, True) for r in bench(m, p)]
    meta = {**run_meta(), "busy_before": str(busy)}
    if args.out:
        write_json(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()

"""One pruning run of the plan-quality benchmark, and the PCC λ tuning run (worker tasks).

A run = (dataset, model, FLOPs target, method, seed): plan the base model (prunegraph in-process,
or Torch-Pruning's global magnitude pruner), apply, measure FLOPs/params with torch-pruning's
counter, test accuracy before fine-tuning, fine-tune (the same budget for every method), test
accuracy after. The seed sets the plan seed (random's choice, Leiden, k-means), the calibration
digits of the data-aware methods and the fine-tune batch order.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from benchmarks import quality_data as qd
from benchmarks.support.flops import macs_params as count_macs_params
from benchmarks.support.tp_search import RatioSearch
from clients import apply_plan, build_manifest, capture_activations
from graphs.options import AnalysisOptions
from graphs.plan import Constraints, PlanMethod, Target
from graphs.planner import plan_layers
from service.ingest.checkpoint import read_checkpoint


@dataclass(frozen=True)
class Method:
    """A row of the tables: how its plan is made."""

    name: str
    plan: str  # a prunegraph plan method, or "tp"
    vectors: Literal["weights", "activations"] = "weights"  # what graph methods compare
    pcc: bool = False  # plan the PCC-pretrained model instead of the base model
    aware: bool = True  # a prunegraph redundancy-aware method (else a baseline)

    @property
    def data_aware(self) -> bool:
        return self.plan == "ci" or self.vectors == "activations"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("mrp", "mrp"),
        Method("srr", "srr"),
        Method("hsc", "hsc"),
        Method("mrp-act", "mrp", vectors="activations"),
        Method("hsc-act", "hsc", vectors="activations"),
        Method("ci", "ci"),
        Method("ci+pcc", "ci", pcc=True),
        Method("random", "random", aware=False),
        Method("l1", "l1", aware=False),
        Method("fpgm", "fpgm", aware=False),
        Method("tp", "tp", aware=False),
    )
}


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on besides its own (dataset, model, target, method, seed)."""

    cache: Path
    base: dict[str, qd.TrainConfig]  # per dataset
    finetune: dict[str, qd.TrainConfig]  # per dataset
    pcc_train: dict[str, qd.TrainConfig]  # per dataset
    limit: dict[str, int | None] = field(default_factory=dict)
    calib_samples: int = 256
    bn_samples: int = 512
    calib_pixels: int = 256
    tp_p: int = 2
    tp_tolerance: float = 0.01
    max_ratio: float = 0.9  # prunegraph's default Constraints.max_ratio, also given to TP


def worker_init(threads: int) -> None:
    """Each worker uses ``threads`` cores for torch *and* for numpy's BLAS/LAPACK: without the
    latter limit two workers' BLAS pools oversubscribe the cores, and ci's many small eigh calls
    ran 25× slower (38 s instead of 1.4 s per ResNet-20 plan; RESULTS.md, issue 7)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)
    import warnings

    warnings.filterwarnings("ignore")  # torch-pruning's warnings about unwrapped parameters


def macs_params(model: nn.Module) -> tuple[float, float]:
    """(MACs, params) at ``qd.EXAMPLE`` (1×1×28×28)."""
    return count_macs_params(model, torch.zeros(qd.EXAMPLE))


def calibration(split: qd.Split, n: int, seed: int) -> torch.Tensor:
    """``n`` train (fit) digits in a seeded order: the data-aware methods' calibration set."""
    perm = torch.randperm(len(split.y_fit), generator=torch.Generator().manual_seed(1000 + seed))
    return split.x_fit[perm[:n]]


def tp_prune(
    model: nn.Module, target: float, *, p: int, max_ratio: float, tolerance: float
) -> tuple[nn.Module, dict[str, Any]]:
    """Torch-Pruning's MagnitudePruner, global pruning, classifier ignored; ``pruning_ratio`` by
    bisection in [0, ``max_ratio``] until the FLOPs reduction is within ``tolerance`` of the
    target (FLOPs only, no data, at most 30 prunings). Returns the closest model found."""
    search = RatioSearch(
        model,
        torch.zeros(qd.EXAMPLE),
        p=p,
        tolerance=tolerance,
        max_steps=30,
        hi=max_ratio,
        max_ratio=max_ratio,
    )
    found = search.find(target)
    return found.model, {"tp_ratio": round(found.ratio, 6), "tp_tries": found.steps}


def run_one(
    settings: Settings,
    dataset: str,
    model: str,
    target: float,
    method: str,
    seed: int,
    pcc_weight: float | None = None,
    evaluate_on: str = "test",
) -> dict[str, Any]:
    """One row of one seed. ``evaluate_on="val"`` is the tuning mode (PCC λ): accuracies are on
    the validation digits, never the test digits."""
    model_name, spec = model, METHODS[method]
    limit = settings.limit.get(dataset)
    split = qd.load_split(dataset, limit)
    if spec.pcc:
        assert pcc_weight is not None, "ci+pcc needs the chosen PCC weight"
        meta = qd.ensure_pcc(
            settings.cache,
            dataset,
            model_name,
            settings.base[dataset],
            settings.pcc_train[dataset],
            pcc_weight,
            limit,
        )
    else:
        meta = qd.ensure_base(settings.cache, dataset, model_name, settings.base[dataset], limit)
    path = Path(meta["path"])
    net = qd.load_cached(model_name, path)
    if evaluate_on == "val":
        x_eval, y_eval = split.x_val, split.y_val
    else:
        x_eval, y_eval = split.x_test, split.y_test
    macs0, params0 = macs_params(net)
    row: dict[str, Any] = {
        "dataset": dataset,
        "model": model_name,
        "target": target,
        "method": method,
        "seed": seed,
        "evaluated_on": evaluate_on,
        "pcc_weight": pcc_weight if spec.pcc else None,
        "acc_unpruned": meta["val_acc"] if evaluate_on == "val" else meta["test_acc"],
    }
    t_all = time.perf_counter()
    if spec.plan == "tp":
        t0 = time.perf_counter()
        pruned, info = tp_prune(
            net,
            target,
            p=settings.tp_p,
            max_ratio=settings.max_ratio,
            tolerance=settings.tp_tolerance,
        )
        row.update(info, plan_s=time.perf_counter() - t0, capture_s=0.0, manifest_s=0.0)
    else:
        x = torch.zeros(qd.EXAMPLE)
        t0 = time.perf_counter()
        parsed = read_checkpoint(path)
        manifest = build_manifest(net, x)
        row["manifest_s"] = time.perf_counter() - t0
        acts = None
        t0 = time.perf_counter()
        if spec.data_aware:
            calib = calibration(split, settings.calib_samples, seed)
            acts = capture_activations(
                net,
                torch.split(calib, 64),
                max_samples=settings.calib_samples,
                max_pixels=settings.calib_pixels,
                seed=seed,
            ).arrays()
        row["capture_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan_method: PlanMethod = spec.plan  # type: ignore[assignment]
        plan = plan_layers(
            parsed.layers,
            method=plan_method,
            target=Target(flops=target),
            params_total=parsed.info.n_params,
            manifest=manifest,
            constraints=Constraints(max_ratio=settings.max_ratio),
            options=AnalysisOptions(vectors=spec.vectors),
            seed=seed,
            checkpoint_sha256=parsed.info.sha256,
            activations=acts,
        )
        row["plan_s"] = time.perf_counter() - t0 + row["capture_s"]
        row["rule"] = plan.rule
        row["plan_flops_reduction"] = plan.achieved.get("flops")
        pruned = apply_plan(copy.deepcopy(net), plan, x, checkpoint_sha256=parsed.info.sha256)
    row["prune_total_s"] = time.perf_counter() - t_all
    macs1, params1 = macs_params(pruned)
    row["flops_reduction"] = 1.0 - macs1 / macs0
    row["params_reduction"] = 1.0 - params1 / params0
    row["acc_before_ft"] = qd.accuracy(pruned, x_eval, y_eval)
    recal = qd.recalibrate_bn(copy.deepcopy(pruned), calibration(split, settings.bn_samples, seed))
    row["acc_bn_recal"] = qd.accuracy(recal, x_eval, y_eval)
    ft = qd.train(pruned, split.x_fit, split.y_fit, settings.finetune[dataset], seed=seed)
    row["ft_steps"] = ft["steps"]
    row["ft_s"] = ft["seconds"]
    row["acc_after_ft"] = qd.accuracy(pruned, x_eval, y_eval)
    for k in ("plan_s", "capture_s", "manifest_s", "prune_total_s", "ft_s"):
        row[k] = round(float(row[k]), 4)
    return row


def fidelity_task(quick: bool, seeds: list[int], out_dir: Path) -> dict[str, Any]:
    """:func:`benchmarks.fidelity.run_fidelity`, when it can be imported (run in a worker, so
    it shares the two cores with the quality runs)."""
    t0 = time.perf_counter()
    try:
        from benchmarks.fidelity import run_fidelity
    except ImportError as exc:
        return {"status": f"fidelity: not run ({exc})"}
    try:
        out = run_fidelity(quick=quick, seeds=seeds, out_dir=out_dir)
    except Exception as exc:  # the quality numbers are still worth writing
        return {"status": f"fidelity: failed ({type(exc).__name__}: {exc})"}
    return {"status": "run", "wall_s": round(time.perf_counter() - t0, 1), "result": out}


def task(kind: str, settings: Settings, args: dict[str, Any]) -> dict[str, Any]:
    """The pool's entry point: ``base`` (train a base model), ``pcc`` (a PCC-pretrained model),
    ``run`` (one row), ``tune`` (one PCC λ candidate: ci+pcc rows scored on the val digits)."""
    t0 = time.perf_counter()
    try:
        if kind == "base":
            out = qd.ensure_base(
                settings.cache,
                args["dataset"],
                args["model"],
                settings.base[args["dataset"]],
                settings.limit.get(args["dataset"]),
            )
        elif kind == "pcc":
            d = args["dataset"]
            out = qd.ensure_pcc(
                settings.cache,
                d,
                args["model"],
                settings.base[d],
                settings.pcc_train[d],
                args["weight"],
                settings.limit.get(d),
            )
        elif kind == "run":
            out = run_one(settings, **args)
        elif kind == "tune":
            out = run_one(settings, **args, evaluate_on="val")
        else:
            raise ValueError(kind)
    except Exception as exc:  # a failing row is recorded, never the end of the benchmark
        import traceback

        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    return {"kind": kind, "args": args, "wall_s": round(time.perf_counter() - t0, 3), **out}

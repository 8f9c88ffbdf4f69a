"""Plan quality (issue 7): do redundancy-aware plans beat L1, FPGM, random and Torch-Pruning?

For each dataset (the 5,000 real MNIST digits; scikit-learn's 8×8 digits), model (ResNet-20
adapted to 1×28×28, a small VGG-BN, the real pretrained digit CNN), FLOPs target (50 %, 70 %),
method and seed: plan, apply, test accuracy before fine-tuning, fine-tune with the same budget
for every method, test accuracy after. Methods: prunegraph's mrp, srr, hsc (on weights), mrp-act,
hsc-act (on feature maps), ci and ci+pcc (ci after a PCC-loss pre-training whose λ is chosen on a
validation split carved from train); baselines random, l1, fpgm (uniform ratio) and Torch-Pruning's
global magnitude pruner (pruning ratio found by bisection on FLOPs). Data, models and budgets:
:mod:`benchmarks.quality_data`; one run: :mod:`benchmarks.quality_run`; the worker pool and PCC's
λ: :mod:`benchmarks.quality_pool`; tables: :mod:`benchmarks.quality_report`; plots:
:mod:`benchmarks.quality_plot`. The zero-shot MobileNetV2 fidelity benchmark
(:mod:`benchmarks.fidelity`) runs beside them.

Writes OUT_DIR/quality.json (every run, the summary, the winners), OUT_DIR/quality.md, one PNG
per (dataset, model); with --latest also benchmarks/quality-latest.md and .json and the plots in
benchmarks/quality-plots/ (the copy that is committed). Base and
PCC-pretrained models are cached under --cache-dir (benchmarks/.cache/quality) by a digest of
their configuration; every finished row goes to OUT_DIR/quality-journal.jsonl, from which
--resume takes the rows of a stopped run with the same settings. Datasets run one after the other.

Usage:  python -m benchmarks.quality [--quick] [--seeds 0 1 2] [--models ...] [--methods ...]
            [--targets 0.5 0.7] [--datasets mnist sklearn] [--out-dir benchmarks/quality-out]
            [--jobs 2] [--threads 1] [--latest] [--resume] [--no-fidelity]
        python -m benchmarks.quality --rerender OUT_DIR/quality.json [--out-dir DIR]
--quick (CI smoke test, < 2 minutes): digit CNN on 500 MNIST digits, target 50 %, l1 + mrp + ci +
ci+pcc + tp, one seed, 50 fine-tune steps; it checks the harness, not the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import quality_data as qd
from benchmarks import quality_plot
from benchmarks import quality_report as qrep
from benchmarks import quality_run as qr
from benchmarks.quality_pool import Pool, choose_pcc
from benchmarks.support.meta import machine_busy, run_meta, write_json
from benchmarks.support.paths import BENCHMARKS as HERE

TC = qd.TrainConfig
FULL = {
    "datasets": ["mnist", "sklearn"],
    "models": list(qd.MODELS),
    "targets": [0.5, 0.7],
    "methods": [m for m in qr.METHODS if m != "hsc-act"],  # hsc-act: only by --methods (time)
    "seeds": [0, 1, 2],
    "pcc_weights": [0.1, 1.0],
}
QUICK = {
    "datasets": ["mnist"],
    "models": ["digit_cnn"],
    "targets": [0.5],
    "methods": ["l1", "mrp", "ci", "ci+pcc", "tp"],
    "seeds": [0],
    "pcc_weights": [1.0],
}
# Relative cost of a run, to start the long ones first (two workers share the cores).
COST = {"resnet20": 3.0, "vgg_bn": 2.0, "digit_cnn": 1.0}


def settings(args: argparse.Namespace) -> qr.Settings:
    if args.quick:
        tiny = TC(epochs=1000, max_steps=50)
        return qr.Settings(
            cache=args.cache_dir,
            base={"mnist": TC(6), "sklearn": TC(12)},
            finetune={"mnist": tiny, "sklearn": tiny},
            pcc_train={"mnist": TC(epochs=1000, max_steps=20), "sklearn": tiny},
            limit={"mnist": 500, "sklearn": None},
            calib_samples=128,
        )
    return qr.Settings(
        cache=args.cache_dir,
        base={"mnist": TC(6, lr=2e-3), "sklearn": TC(12, lr=2e-3)},
        finetune={"mnist": TC(1), "sklearn": TC(2)},
        pcc_train={"mnist": TC(1), "sklearn": TC(2)},
    )


def fidelity_markdown(fid: dict[str, Any], image_prefix: str = "") -> str:
    lines = ["", "## Fidelity: zero-shot MobileNetV2 (benchmarks/fidelity.py)", ""]
    if fid.get("status") != "run":
        return "\n".join([*lines, f"{fid.get('status')}", ""])
    res = fid["result"]
    text = None
    if isinstance(res, dict):
        for key in ("markdown", "tables", "table", "md"):
            v = res.get(key)
            if isinstance(v, str):
                text = v
            elif isinstance(v, list) and all(isinstance(t, str) for t in v):
                text = "\n\n".join(v)
            if text:
                break
    if text is None:
        text = "```json\n" + json.dumps(res, indent=2, default=str)[:20000] + "\n```"
    plots = res.get("plots", []) if isinstance(res, dict) else []
    images = [f"![fidelity]({image_prefix}{Path(p).name})" for p in plots if isinstance(p, str)]
    return "\n".join(
        [*lines, f"(wall time {fid['wall_s']} s, in a worker beside the quality runs)", "",
         text.strip(), "", *images, ""]
    )  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI smoke test (< 2 minutes)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--models", nargs="+", choices=qd.MODELS)
    p.add_argument("--methods", nargs="+", choices=list(qr.METHODS))
    p.add_argument("--targets", type=float, nargs="+")
    p.add_argument("--datasets", nargs="+", choices=qd.DATASETS)
    p.add_argument("--pcc-weights", type=float, nargs="+")
    p.add_argument("--out-dir", "--out", type=Path, default=HERE / "quality-out")
    p.add_argument("--cache-dir", type=Path, default=HERE / ".cache" / "quality")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument(
        "--latest",
        action="store_true",
        help="also write benchmarks/quality-latest.md/.json and benchmarks/quality-plots/*.png",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the rows of OUT_DIR/quality-journal.jsonl (same settings) of a stopped run",
    )
    p.add_argument("--no-fidelity", action="store_true", help="skip the fidelity benchmark")
    p.add_argument(
        "--rerender",
        type=Path,
        metavar="JSON",
        help="no run: tables, winners and plots again from this quality.json into --out-dir",
    )
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.rerender is not None:
        return rerender(args.rerender, args.out_dir, latest=args.latest)
    t_start = time.perf_counter()
    meta: dict[str, Any] = dict(run_meta())
    meta["busy_before"] = machine_busy(2.0)
    import numpy
    import torch
    import torch_pruning

    meta["versions"] = {
        "torch": torch.__version__,
        "torch_pruning": torch_pruning.__version__,
        "numpy": numpy.__version__,
    }
    s = settings(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    settings_key = qd.digest({k: v for k, v in dataclasses.asdict(s).items() if k != "cache"})
    pool = Pool(args.jobs, args.threads, args.out_dir / "quality-journal.jsonl", settings_key)
    resumed = 0
    if args.resume:
        resumed = pool.resume()
        print(f"resume: {resumed} rows in the journal", file=sys.stderr)
    elif pool.journal.is_file():
        pool.journal.unlink()
    fid: dict[str, Any] = {"status": "not run (--no-fidelity)"}
    try:
        fid_future = pool.submit_fidelity(args)  # the longest task: first, beside the others
        # one dataset after the other (mnist first), so a stopped run has whole datasets done
        bases, pcc_tasks, rows = [], [], []
        pcc: dict[tuple[str, str], dict[str, Any]] = {}
        for d in args.datasets:
            pairs = sorted(((d, m) for m in args.models), key=_cost_pair)
            bases += pool.map("base", s, [{"dataset": d, "model": m} for d, m in pairs])
            if "ci+pcc" in args.methods:
                chosen, tasks = choose_pcc(pool, s, args, pairs)
                pcc.update(chosen)
                pcc_tasks += tasks
            runs = [
                {"dataset": d, "model": m, "target": t, "method": k, "seed": seed,
                 "pcc_weight": pcc[(d, m)]["weight"] if qr.METHODS[k].pcc else None}
                for _, m in pairs for t in args.targets for k in args.methods
                for seed in args.seeds
            ]  # fmt: skip
            rows += pool.map("run", s, runs)
        if fid_future is not None:
            fid = fid_future.result()
            print(f"fidelity: {fid['status']} ({fid.get('wall_s')} s)", file=sys.stderr)
    finally:
        pool.close()

    base_rows = []
    for b in bases:
        if "error" in b:
            continue
        d, m = b["args"]["dataset"], b["args"]["model"]
        macs, params = qr.macs_params(qd.load_cached(m, Path(b["path"])))
        base_rows.append(
            {"dataset": d, "model": m, "macs": macs, "params": params, "pcc": pcc.get((d, m)),
             **{k: b[k] for k in ("test_acc", "val_acc", "train_s", "train_steps", "path")}}
        )  # fmt: skip
    ok_rows = [{k: v for k, v in r.items() if k not in ("args", "kind")} for r in rows]
    data = {d: qd.load_split(d, s.limit.get(d)).sizes() for d in args.datasets}
    result: dict[str, Any] = {
        "meta": meta,
        "config": {
            "quick": args.quick,
            "datasets": args.datasets,
            "models": args.models,
            "targets": args.targets,
            "methods": args.methods,
            "seeds": args.seeds,
            "pcc_weights": args.pcc_weights,
            "jobs": args.jobs,
            "threads": args.threads,
            "base": {d: s.base[d].__dict__ for d in args.datasets},
            "finetune": {d: s.finetune[d].__dict__ for d in args.datasets},
            "pcc_train": {d: s.pcc_train[d].__dict__ for d in args.datasets},
            "limit": s.limit,
            "calib_samples": s.calib_samples,
            "bn_samples": s.bn_samples,
            "calib_pixels": s.calib_pixels,
            "tp_p": s.tp_p,
            "tp_tolerance": s.tp_tolerance,
            "max_ratio": s.max_ratio,
        },
        "data": data,
        "bases": base_rows,
        "pcc_tasks": [{k: v for k, v in r.items() if k != "traceback"} for r in pcc_tasks],
        "rows": ok_rows,
        "errors": [r for r in [*bases, *pcc_tasks, *rows] if "error" in r],
        "fidelity": fid,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "resumed_rows": resumed,
    }
    return write_outputs(result, args.out_dir, latest=args.latest)


def write_outputs(result: dict[str, Any], out_dir: Path, *, latest: bool) -> int:
    """Summary, winners, plots and markdown from the raw rows; writes quality.json/.md (and
    benchmarks/quality-latest.* with ``latest``). Returns the exit status (1: a task failed)."""
    summary = qrep.aggregate(result["rows"])
    n_test = {d: sizes["test"] for d, sizes in result["data"].items()}
    wins = [w for metric in qrep.WINNER_METRICS for w in qrep.winners(summary, metric, n_test)]
    plots = quality_plot.plot(summary, out_dir)
    result.update(summary=summary, winners=wins, plots=[p.name for p in plots])
    errors, fid = result["errors"], result["fidelity"]

    def report(image_prefix: str) -> str:
        md = qrep.markdown(result, image_prefix)
        if errors:
            md += f"\n**{len(errors)} task(s) failed**; see `errors` in the JSON.\n"
        return md + fidelity_markdown(fid, image_prefix)

    md = report("")
    write_json(out_dir / "quality.json", result, default=str)
    (out_dir / "quality.md").write_text(md)
    if latest:  # the committed copy: markdown and JSON in benchmarks/, plots in quality-plots/
        plots_dir = HERE / "quality-plots"
        plots_dir.mkdir(exist_ok=True)
        for png in plots:
            shutil.copyfile(png, plots_dir / png.name)
        (HERE / "quality-latest.md").write_text(report("quality-plots/"))
        shutil.copyfile(out_dir / "quality.json", HERE / "quality-latest.json")
    print(md)
    print(
        f"wrote {out_dir / 'quality.md'}, quality.json and {len(plots)} plot(s); the run took "
        f"{result['wall_s'] / 60:.1f} min",
        file=sys.stderr,
    )
    return 1 if errors else 0


def rerender(path: Path, out_dir: Path, *, latest: bool) -> int:
    """Tables, winners and plots again from a quality.json's raw rows (no run)."""
    result = json.loads(path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_outputs(result, out_dir, latest=latest)


def _cost_pair(pair: tuple[str, str]) -> float:
    return -COST[pair[1]] * (0.5 if pair[0] == "sklearn" else 1)


if __name__ == "__main__":
    sys.exit(main())

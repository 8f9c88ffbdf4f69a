"""Scale: Llama-7B-shaped layers, an 8-block 7B-shaped checkpoint on Dask, and the real MiniLM.

Parts (``--part``, default ``all``):

* ``layers``: the seven matrices of a Llama-7B block with random float32 weights (seeded):
  q/k/v/o 4096 × 4096, gate/up 11008 × 4096, down 4096 × 11008; the filter matrix is the weight
  itself (rows = output neurons). Each (matrix, method) runs in a fresh ``spawn`` process, which
  reports the method's wall time and its peak RSS (``ru_maxrss``) beside the RSS it had after its
  imports (the baseline). Methods: ``graphs.mrp``, ``graphs.hsc``, ``mrp+hsc`` (both in one
  ``graphs.analyze`` call, as ``prunegraph analyze --methods mrp,hsc`` runs them: they share the
  calibrated graph), then ``srr``, ``l1``, ``fpgm``.
  Goal (2 cores): mrp+hsc ≤ 30 s per layer, peak ≤ 4 GB.
* ``dask``: an 8-block slice of a Llama-7B-shaped checkpoint (hidden 4096, intermediate 11008,
  32 heads, no GQA; random bf16 weights, ≈ 3.2 GB) written block by block as sharded safetensors
  (2 blocks a shard, ``model.safetensors.index.json``, ``config.json`` beside it), then analysed
  the way a service job does it (:func:`service.jobs.tasks.analyze_on` with
  :class:`service.jobs.executors.dask.DaskExecutor`: the driver reads the checkpoint lazily, one
  task per group: 8 attention groups of 32 heads, 8 FFN groups of 11008 neurons) on a cluster of
  real ``dask scheduler`` / ``dask worker --nthreads 1 --no-nanny`` processes (1 BLAS thread
  each), with 1 worker and with 2. Reported: wall time, speed-up, each task's compute time (the
  scheduler's task stream), peak RSS of every worker, the scheduler and the driver
  (``ru_maxrss`` from inside, and the peak RssAnon/RssFile sampled from /proc every 0.2 s).
  After its tasks the driver plans (mrp, 30 % of the params, from the cache the workers
  filled), as a job with a target does: its time and the driver's VmHWM before and after.
  Before the clusters, block 0's two tasks run once without Dask (the same
  :func:`service.jobs.executors.local.analyze_group_task`, fresh process, 1 BLAS thread) as the
  reference for a task's own time and memory; ``--workers ""`` runs only that reference.
* ``minilm``: ``prunegraph analyze`` (embedded, all methods) on the real MiniLM-L6 from
  ``$PRUNEGRAPH_REALDATA/minilm`` (default ``~/.cache/prunegraph-realdata/minilm``): wall time
  of the command and the in-process times it prints.

``--quick`` shrinks every dimension by 8 (512, 1376; 32 heads of 16) and runs in < 2 minutes.
Generated data lives in a temporary folder that is deleted at the end (``--keep`` keeps it).
Modules: :mod:`benchmarks.scale_layers` (part 1), :mod:`benchmarks.scale_dask` with
:mod:`benchmarks.scale_checkpoint` and :mod:`benchmarks.scale_cluster` (part 2); part 3 here.

Usage:  python -m benchmarks.scale [--quick] [--part layers|dask|minilm|all] [--out JSON]
                                   [--methods mrp,hsc,mrp+hsc,srr,l1,fpgm]
                                   [--dask-methods mrp,l1] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.scale_cluster import BIN
from benchmarks.scale_dask import part_dask
from benchmarks.scale_layers import LAYER_METHODS, part_layers
from benchmarks.support.meta import load_avg, machine_busy, run_meta, write_json
from benchmarks.support.paths import realdata_dir


def part_minilm(repeats: int) -> dict[str, Any]:
    folder = realdata_dir() / "minilm"
    if not (folder / "model.safetensors").is_file():
        print(f"\n== minilm: skipped, {folder} has no model.safetensors (run make) ==")
        return {"skipped": f"{folder} missing"}
    print(f"\n== minilm: prunegraph analyze {folder} (load {load_avg()}) ==", flush=True)
    load, busy = load_avg(), machine_busy()
    runs = []
    summary: dict[str, Any] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(BIN / "prunegraph"), "analyze", str(folder), "--json"],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
            check=True,
        )
        wall = time.perf_counter() - t0
        m = re.search(r"read ([\d.]+) s · analysed (\d+) groups in ([\d.]+) s", proc.stderr)
        if m is None:
            raise RuntimeError(f"no timing line in: {proc.stderr[-500:]}")
        runs.append(
            {
                "wall_s": round(wall, 3),
                "read_s": float(m.group(1)),
                "groups": int(m.group(2)),
                "analyse_s": float(m.group(3)),
            }
        )
        print(
            f"wall {wall:.2f} s · read {m.group(1)} s · analysed {m.group(2)} groups in "
            f"{m.group(3)} s",
            flush=True,
        )
        report = json.loads(proc.stdout)
        summary = {
            k: v.get("redundancy_params_weighted") for k, v in report["summary"]["methods"].items()
        }
        summary["n_skipped"] = report["summary"]["n_skipped"]
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "read_s", "analyse_s")}
    print(
        f"median: wall {med['wall_s']:.2f} s · read {med['read_s']:.2f} s · analyse "
        f"{med['analyse_s']:.2f} s · {summary}"
    )
    return {
        "folder": str(folder),
        "runs": runs,
        "median": med,
        "summary": summary,
        "load_before": load,
        "busy_before": busy,
        "load_after": load_avg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every dimension / 8 (< 2 min)")
    parser.add_argument("--part", choices=["layers", "dask", "minilm", "all"], default="all")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--methods", default=",".join(LAYER_METHODS), help="part layers")
    parser.add_argument("--dask-methods", default="mrp,l1", help="part dask")
    parser.add_argument("--workers", default="1,2", help="part dask: cluster sizes")
    parser.add_argument("--repeats", type=int, default=None, help="part minilm (3; 1 if quick)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    args = parser.parse_args()
    t0 = time.perf_counter()
    meta: dict[str, Any] = {
        **run_meta(),
        "quick": args.quick,
        "load_start": load_avg(),
        "busy_start": machine_busy(),
    }
    print(
        f"{meta['date']} · {meta['machine']} · load {meta['load_start']} · busy "
        f"{meta['busy_start']}",
        flush=True,
    )
    results: dict[str, Any] = {"meta": meta}
    tmp = Path(tempfile.mkdtemp(prefix="prunegraph-scale-"))
    try:
        if args.part in ("layers", "all"):
            results["layers"] = part_layers(args.quick, args.methods.split(","))
        if args.part in ("dask", "all"):
            workers = [int(k) for k in args.workers.split(",") if k]
            methods = args.dask_methods.split(",")
            results["dask"] = part_dask(args.quick, methods, workers, tmp)
        if args.part in ("minilm", "all"):
            repeats = args.repeats or (1 if args.quick else 3)
            results["minilm"] = part_minilm(repeats)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    meta["load_end"], meta["busy_end"] = load_avg(), machine_busy()
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"\ndone in {meta['wall_s']:.0f} s · load at end {meta['load_end']}")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()

"""Part ``dask`` of the scale benchmark (:mod:`benchmarks.scale`): an 8-block Llama-7B-shaped
checkpoint (:mod:`benchmarks.scale_checkpoint`) analysed on a real Dask cluster of 1 and of 2
workers (:mod:`benchmarks.scale_cluster`), with block 0's two tasks once without Dask as the
reference; wall times, speed-up, per-task compute and the peak memory of every process."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.scale_checkpoint import write_checkpoint
from benchmarks.scale_cluster import dask_cluster, dask_driver, local_task
from benchmarks.support.meta import load_avg, machine_busy
from benchmarks.support.procfs import Sampler, mb, peak_rss_kib


def run_dask(n_workers: int, ckpt: Path, methods: list[str], tmp: Path) -> dict[str, Any]:
    sampler = Sampler()
    sampler.start()
    work = tmp / f"dask{n_workers}"
    work.mkdir()
    load, busy = load_avg(), machine_busy()
    t0 = time.perf_counter()
    try:
        with dask_cluster(n_workers, work, sampler) as cluster:
            out = work / "driver.json"
            proc = mp.get_context("spawn").Process(
                target=dask_driver,
                args=(cluster.address, str(ckpt), methods, str(work / "cache"), str(out)),
            )
            t1 = time.perf_counter()
            proc.start()
            assert proc.pid is not None
            sampler.pids["driver"] = proc.pid
            proc.join()
            wall = time.perf_counter() - t1
            if proc.exitcode != 0 or not out.exists():
                logs = {p.name: p.read_text()[-2000:] for p in work.glob("*.log")}
                raise RuntimeError(f"dask driver failed ({proc.exitcode}); logs: {logs}")
            result: dict[str, Any] = json.loads(out.read_text())
    finally:
        sampler.stop.set()
        sampler.join()
    result["driver_process_wall_s"] = round(wall, 3)
    result["cluster_and_run_wall_s"] = round(time.perf_counter() - t0, 3)
    result["sampled_peaks_mb"] = sampler.peaks
    result["load_before"], result["busy_before"], result["load_after"] = load, busy, load_avg()
    shutil.rmtree(work / "cache", ignore_errors=True)
    return result


def part_dask(quick: bool, methods: list[str], workers: list[int], tmp: Path) -> dict[str, Any]:
    ckpt = tmp / "llama7b-8blocks"
    print(f"\n== dask: writing the checkpoint to {ckpt} ==", flush=True)
    t0 = time.perf_counter()
    size = write_checkpoint(ckpt, quick)
    t_write = time.perf_counter() - t0
    print(
        f"wrote {size / 1e9:.2f} GB ({len(list(ckpt.glob('*.safetensors')))} shards) in "
        f"{t_write:.1f} s; write peak RSS {mb(peak_rss_kib()):.0f} MB",
        flush=True,
    )
    local = []
    for index in (0, 1):  # block 0's FFN neurons and attention heads
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            row = pool.submit(local_task, str(ckpt), methods, index).result()
        local.append(row)
        print(
            f"local reference (no Dask, 1 BLAS thread): {row['group']} ({row['unit']}, "
            f"{row['n']} × {row['fan_in']}) {row['seconds']:.1f} s, peak RSS "
            f"{row['peak_rss_mb']:.0f} MB (before the task {row['rss_before_mb']:.0f} MB)",
            flush=True,
        )
    runs = []
    for k in workers:
        print(f"-- {k} worker(s), methods {','.join(methods)} (load {load_avg()}) --", flush=True)
        r = run_dask(k, ckpt, methods, tmp)
        runs.append(r)
        print(
            f"groups {r['groups']} (skipped {len(r['skipped'])}) · read {r['read_s']:.2f} s · "
            f"tasks {r['tasks_s']:.1f} s · total {r['total_s']:.1f} s · redundancy "
            f"{r['redundancy']}",
            flush=True,
        )
        print(
            f"peak RSS MB: workers {r['workers_peak_rss_mb']} (after imports "
            f"{r['workers_rss_after_imports_mb']}) · scheduler {r['scheduler_peak_rss_mb']} · "
            f"driver {r['driver_peak_rss_mb']} (after imports "
            f"{r['driver_rss_after_imports_mb']}, after read {r['driver_rss_after_read_mb']})"
        )
        pl = r["plan"]
        print(
            f"plan mrp 30 % params in the driver: {pl['seconds']:.1f} s, cache misses "
            f"{pl['cache_misses']}, driver VmHWM {pl['driver_hwm_before_mb']:.0f} → "
            f"{pl['driver_hwm_after_mb']:.0f} MB · {pl['rule']}",
            flush=True,
        )
        print(
            "sampled peaks MB (VmRSS / RssAnon / RssFile): "
            + "; ".join(
                f"{n} {p.get('VmRSS')}/{p.get('RssAnon')}/{p.get('RssFile')}"
                for n, p in sorted(r["sampled_peaks_mb"].items())
            )
        )
        starts = [t["start_at_s"] for t in r["tasks"] if t.get("start_at_s") is not None]
        busy: dict[str, float] = {}
        for t in r["tasks"]:
            busy[t["worker"]] = busy.get(t["worker"], 0.0) + t.get("compute_s", 0.0)
        r["first_task_start_s"] = min(starts) if starts else None
        r["worker_busy_s"] = {w: round(b, 1) for w, b in sorted(busy.items())}
        print(
            f"first task started {r['first_task_start_s']} s after submission; compute per "
            f"worker {r['worker_busy_s']} s of {r['tasks_s']:.1f} s; warnings {r['warnings']}"
        )
        by_kind: dict[str, list[float]] = {}
        for t in r["tasks"]:
            by_kind.setdefault(t["kind"], []).append(t.get("compute_s", 0.0))
        for kind, secs in sorted(by_kind.items()):
            print(
                f"  {kind} tasks: {len(secs)}, compute s min {min(secs):.1f} median "
                f"{statistics.median(secs):.1f} max {max(secs):.1f}"
            )
    out: dict[str, Any] = {
        "checkpoint_bytes": size,
        "write_s": round(t_write, 2),
        "local_reference": local,
        "runs": runs,
    }
    one = next((r for r in runs if r["n_workers"] == 1), None)
    for r in runs:
        if one is not None and r is not one:
            r["speedup_total"] = round(one["total_s"] / r["total_s"], 3)
            r["speedup_tasks"] = round(one["tasks_s"] / r["tasks_s"], 3)
            print(
                f"speed-up {r['n_workers']} workers vs 1: total {r['speedup_total']}× · "
                f"tasks {r['speedup_tasks']}×"
            )
            if one["report_sha256"] != r["report_sha256"]:
                print("WARNING: the reports differ between cluster sizes")
    return out

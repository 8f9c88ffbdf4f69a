"""Time and peak memory of a compensated plan of the real MobileNetV2 from captured statistics
(issue 14 "Speed": goal ≤ 10 s and ≤ 2 GB on 2 cores).

Prepared once (not timed): the second moments of every consumer input over the 196 calibration
inputs of :mod:`benchmarks.fidelity` (``clients.capture_activations(..., maps=False).save``) and
the model's manifest (JSON); the capture holds out every second batch (the default), and
``--crossfit on`` plans cross-fitted with it (the default path), ``off`` in-sample. Each
measurement is a **fresh process** with 2 BLAS/OpenMP threads
doing what the service or ``prunegraph plan --activations`` does: read the checkpoint, the
manifest and the statistics file (validated), then ``plan_layers(stats=...)`` with compensation
and the sidecar bytes. Reported: the planning time alone (``plan_s``), everything after the
imports (``total_s``), the process's resident memory before planning and its peak (``VmHWM``,
which includes the Python interpreter, numpy, torch's import by the checkpoint reader and the
checkpoint itself: an upper bound of what planning needs).

Usage:  python -m benchmarks.compensation_speed [--methods mrp l1] [--targets 0.1 0.3]
            [--repeats 1] [--threads 2] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.support.meta import machine_busy, run_meta, write_json
from benchmarks.support.paths import BENCHMARKS, ROOT, realdata_dir

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from graphs.compensated import plan_sidecar
from graphs.manifest import Manifest
from graphs.plan import Target
from graphs.planner import plan_layers
from service.ingest.activations import check_capture, read_capture
from service.ingest.checkpoint import read_checkpoint

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None

ckpt, manifest, acts, method, target, xfit = sys.argv[1:7]
t1 = time.perf_counter()
parsed = read_checkpoint(ckpt)
man = Manifest.model_validate_json(Path(manifest).read_text())
cap = read_capture(acts)
check_capture(cap, parsed.layers)
t2 = time.perf_counter()
before = rss("VmRSS")
plan = plan_layers(parsed.layers, method=method, target=Target(flops=float(target)),
                   params_total=parsed.info.n_params, manifest=man, seed=0,
                   checkpoint_sha256=parsed.info.sha256, stats=cap.statistics,
                   holdout_stats=(cap.holdout or None) if xfit == "on" else None)
side = plan_sidecar(plan)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "read_s": t2 - t1, "plan_s": t3 - t2,
                  "total_s": t3 - t1, "rss_before_plan": before, "peak_rss": rss("VmHWM"),
                  "folds": len(plan.compensation.folds), "sidecar_bytes": len(side),
                  "crossfit": "cross-fitted" in plan.rule,
                  "achieved": plan.achieved}))
"""


def prepare(out: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    """The checkpoint path, a manifest JSON and a statistics file of the calibration inputs."""
    import copy

    from benchmarks.fidelity_harness import WEIGHTS, channels_last, setup
    from benchmarks.fidelity_images import batches, image_set
    from clients import capture_activations

    images = image_set(1, None)  # calibration inputs only matter here
    s = setup(realdata_dir())
    t = time.perf_counter()
    model = channels_last(copy.deepcopy(s.model))
    acts = capture_activations(
        model, batches(images.calib_u8), max_samples=images.calib_u8.shape[0], maps=False
    )
    capture_s = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    stats = acts.save(out / "mobilenet_v2.stats.safetensors")
    manifest = out / "mobilenet_v2.manifest.json"
    manifest.write_text(s.manifest.model_dump_json())
    info = {
        "n_calib": images.info["n_calib"],
        "capture_s": round(capture_s, 2),
        "stats_file_bytes": stats.stat().st_size,
        "consumers": len(acts.statistics),
        "held_out_consumers": len(acts.holdout),
        "held_out_samples": acts.holdout_samples,
    }
    return realdata_dir() / WEIGHTS, manifest, stats, info


def measure(
    paths: tuple[Path, Path, Path], method: str, target: float, threads: int, xfit: str = "on"
) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, paths), method, str(target), xfit],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - t
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["mrp", "l1"])
    p.add_argument("--targets", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--crossfit",
        nargs="+",
        choices=("on", "off"),
        default=["on", "off"],
        help="on: cross-fitted with the file's held-out part (the default path); off: in-sample",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=BENCHMARKS / "fidelity" / "speed")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/prunegraph-compensation-speed"))
    a = p.parse_args(argv)
    ckpt, manifest, stats, info = prepare(a.work_dir)
    rows = []
    runs = [
        (m, t, x, r)
        for m in a.methods
        for t in a.targets
        for x in a.crossfit
        for r in range(a.repeats)
    ]
    for method, target, xfit, rep in runs:
        busy = machine_busy(1.0)
        row = {
            "method": method,
            "target": target,
            "repeat": rep,
            "machine_busy": busy,
            **measure((ckpt, manifest, stats), method, target, a.threads, xfit),
        }
        rows.append(row)
        print(
            f"{method} {target} crossfit {xfit}: plan {row['plan_s']:.2f} s, "
            f"read {row['read_s']:.2f} s, "
            f"peak {row['peak_rss'] / 2**20:.0f} MiB (before plan "
            f"{row['rss_before_plan'] / 2**20:.0f} MiB), busy {busy}"
        )
    lines = [
        "| method | target | cross-fitted | plan s | read s | peak RSS MiB | RSS before plan MiB | "
        "folds | sidecar KiB | others' load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {100 * r['target']:.0f} % | {'yes' if r['crossfit'] else 'no'} | "
            f"{r['plan_s']:.2f} | "
            f"{r['read_s']:.2f} | "
            f"{r['peak_rss'] / 2**20:.0f} | {r['rss_before_plan'] / 2**20:.0f} | {r['folds']} | "
            f"{r['sidecar_bytes'] / 1024:.0f} | {r['machine_busy']} |"
        )
    md = "\n".join(lines)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": {**run_meta(), "threads": a.threads},
        "prepared": info,
        "rows": rows,
        "markdown": md,
    }
    write_json(a.out_dir / "speed.json", result)
    (a.out_dir / "speed.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()

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
  the way a service job does it (:func:`service.jobs.analyze_on` with
  :class:`service.dask_executor.DaskExecutor`: the driver reads the checkpoint lazily, one task
  per group: 8 attention groups of 32 heads, 8 FFN groups of 11008 neurons) on a cluster of real
  ``dask scheduler`` / ``dask worker --nthreads 1 --no-nanny`` processes (1 BLAS thread each),
  with 1 worker and with 2. Reported: wall time, speed-up, each task's compute time (the
  scheduler's task stream), peak RSS of every worker, the scheduler and the driver
  (``ru_maxrss`` from inside, and the peak RssAnon/RssFile sampled from /proc every 0.2 s).
  After its tasks the driver plans (mrp, 30 % of the params, from the cache the workers
  filled), as a job with a target does: its time and the driver's VmHWM before and after.
  Before the clusters, block 0's two tasks run once without Dask (the same
  :func:`service.executor.analyze_group_task`, fresh process, 1 BLAS thread) as the reference
  for a task's own time and memory; ``--workers ""`` runs only that reference.
* ``minilm``: ``prunegraph analyze`` (embedded, all methods) on the real MiniLM-L6 from
  ``$PRUNEGRAPH_REALDATA/minilm`` (default ``~/.cache/prunegraph-realdata/minilm``): wall time
  of the command and the in-process times it prints.

``--quick`` shrinks every dimension by 8 (512, 1376; 32 heads of 16) and runs in < 2 minutes.
Generated data lives in a temporary folder that is deleted at the end (``--keep`` keeps it).

Usage:  python benchmarks/scale.py [--quick] [--part layers|dask|minilm|all] [--out JSON]
                                   [--methods mrp,hsc,mrp+hsc,srr,l1,fpgm]
                                   [--dask-methods mrp,l1] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine_busy, run_meta  # noqa: E402

BIN = Path(sys.executable).parent
HIDDEN, INTERMEDIATE, HEADS, BLOCKS = 4096, 11008, 32, 8
QUICK = 8  # --quick divides every dimension by this
LAYER_METHODS = ["mrp", "hsc", "mrp+hsc", "srr", "l1", "fpgm"]
GOAL_S, GOAL_MB = 30.0, 4096.0
ONE_BLAS_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STD = 0.02  # Llama's initializer range


def _mb(kib: float) -> float:
    return round(kib / 1024.0, 1)


def _rss_mb() -> float:
    return _mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _vmrss_mb() -> float:
    """This process's current resident set (ru_maxrss of a child of a large parent starts at the
    parent's peak, so baselines are read from /proc)."""
    st = _proc_status(os.getpid())
    return st["VmRSS"] if st and "VmRSS" in st else _rss_mb()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _realdata() -> Path:
    return Path(os.environ.get("PRUNEGRAPH_REALDATA", Path.home() / ".cache/prunegraph-realdata"))


# --- part 1: one layer, one method, one fresh process --------------------------------------


def layer_shapes(quick: bool) -> list[tuple[str, int, int]]:
    """(name, rows, columns) of a Llama-7B block's seven matrices (each divided by 8 if quick)."""
    d = QUICK if quick else 1
    h, i = HIDDEN // d, INTERMEDIATE // d
    return [
        ("self_attn.q_proj", h, h),
        ("self_attn.k_proj", h, h),
        ("self_attn.v_proj", h, h),
        ("self_attn.o_proj", h, h),
        ("mlp.gate_proj", i, h),
        ("mlp.up_proj", i, h),
        ("mlp.down_proj", h, i),
    ]


def run_layer(name: str, rows: int, cols: int, seed: int, method: str) -> dict[str, Any]:
    """In a fresh process: the method's wall time on a seeded random (rows, cols) float32 layer,
    and the process's peak RSS beside its RSS after the imports."""
    import graphs
    from graphs import CheckpointInfo, LayerWeights, analyze

    base = _vmrss_mb()
    w = (np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32) * STD).astype(
        np.float32, copy=False
    )
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if method == "mrp+hsc":
        info = CheckpointInfo(
            sha256="0" * 64, format="safetensors", size_bytes=w.nbytes, n_tensors=1, n_params=w.size
        )
        layer = LayerWeights(name=f"model.layers.0.{name}", kind="linear", weight=w)
        report = analyze([layer], checkpoint=info, methods=["mrp", "hsc"], seed=0)
        m = report.layers[0].methods
        extra = {"mrp": m["mrp"].redundancy, "hsc": m["hsc"].redundancy}
    elif method in ("mrp", "hsc"):
        r = graphs.mrp(w, seed=0) if method == "mrp" else graphs.hsc(w, seed=0)
        extra = {method: r.redundancy}
    elif method == "srr":
        extra = {"srr": graphs.srr(w).redundancy}
    elif method == "l1":
        graphs.l1(w)
    elif method == "fpgm":
        graphs.fpgm(w)
    else:
        raise ValueError(f"unknown method {method}")
    seconds = time.perf_counter() - t0
    peak = _rss_mb()
    return {
        "layer": name,
        "shape": [rows, cols],
        "method": method,
        "seconds": round(seconds, 3),
        "peak_rss_mb": peak,
        "baseline_rss_mb": base,
        "above_baseline_mb": round(peak - base, 1),
        "redundancy": extra,
    }


def part_layers(quick: bool, methods: list[str]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    meta = {"load_before": _load(), "busy_before": machine_busy()}
    print(f"\n== layers (load {meta['load_before']}, busy {meta['busy_before']}) ==", flush=True)
    print(f"{'layer':18s} {'shape':>12s} {'method':8s} {'s':>8s} {'peak MB':>8s} {'base MB':>8s}")
    for i, (name, r, c) in enumerate(layer_shapes(quick)):
        for method in methods:
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                row = pool.submit(run_layer, name, r, c, 1000 + i, method).result()
            rows.append(row)
            print(
                f"{name:18s} {f'{r}×{c}':>12s} {method:8s} {row['seconds']:8.2f} "
                f"{row['peak_rss_mb']:8.0f} {row['baseline_rss_mb']:8.0f}  "
                f"{row['redundancy'] or ''}",
                flush=True,
            )
    verdicts = []
    for name, r, c in layer_shapes(quick):
        got = {row["method"]: row for row in rows if row["layer"] == name}
        joint = got.get("mrp+hsc")
        split = (
            (got["mrp"]["seconds"] + got["hsc"]["seconds"]) if {"mrp", "hsc"} <= set(got) else None
        )
        graph = [row for m, row in got.items() if m in ("mrp", "hsc", "mrp+hsc")]
        peak = max((row["peak_rss_mb"] for row in graph), default=None)
        verdicts.append(
            {
                "layer": name,
                "shape": [r, c],
                "mrp+hsc_s": joint["seconds"] if joint else None,
                "mrp_s_plus_hsc_s": round(split, 3) if split is not None else None,
                "peak_rss_mb": peak,
                "peak_rss_any_method_mb": max(row["peak_rss_mb"] for row in got.values()),
                "time_goal_met": joint["seconds"] <= GOAL_S if joint else None,
                "memory_goal_met": peak <= GOAL_MB if peak is not None else None,
            }
        )
    meta["load_after"] = _load()
    print(f"\ngoal: mrp+hsc ≤ {GOAL_S:.0f} s per layer, peak ≤ {GOAL_MB:.0f} MB")
    verdict = {True: "met", False: "MISSED", None: "n/a"}
    for v in verdicts:
        print(
            f"{v['layer']:18s} mrp+hsc {v['mrp+hsc_s']} s (mrp s + hsc s: {v['mrp_s_plus_hsc_s']})"
            f" peak {v['peak_rss_mb']} MB (any method {v['peak_rss_any_method_mb']} MB) · time "
            f"{verdict[v['time_goal_met']]} · memory {verdict[v['memory_goal_met']]}"
        )
    return {"meta": meta, "rows": rows, "goals": verdicts}


# --- part 2: a sharded 7B-shaped checkpoint, analysed on 1 and 2 Dask workers -------------


def _bf16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> 16).astype(
        np.uint16
    )


def block_tensors(b: int, h: int, inter: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{b}"
    return [
        (f"{p}.input_layernorm.weight", (h,)),
        (f"{p}.mlp.down_proj.weight", (h, inter)),
        (f"{p}.mlp.gate_proj.weight", (inter, h)),
        (f"{p}.mlp.up_proj.weight", (inter, h)),
        (f"{p}.post_attention_layernorm.weight", (h,)),
        *[(f"{p}.self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"],
    ]


def write_checkpoint(folder: Path, quick: bool, blocks: int = BLOCKS, per_shard: int = 2) -> int:
    """The sharded bf16 checkpoint, written tensor by tensor (one float32 tensor in memory at a
    time); returns its size in bytes."""
    d = QUICK if quick else 1
    h, inter = HIDDEN // d, INTERMEDIATE // d
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = -(-blocks // per_shard)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        entries = [
            t
            for b in range(s * per_shard, min((s + 1) * per_shard, blocks))
            for t in block_tensors(b, h, inter)
        ]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape in entries:
            n = 2 * int(np.prod(shape))
            header[key] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
            weight_map[key] = shard
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / shard, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for j, (_key, shape) in enumerate(entries):
                if len(shape) == 1:
                    x = np.ones(shape, dtype=np.float32)
                else:
                    rng = np.random.default_rng([7, s, j])
                    x = rng.standard_normal(shape, dtype=np.float32)
                    x *= STD
                f.write(_bf16_bytes(x).data)
                del x
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": blocks,
        "torch_dtype": "bfloat16",
        "note": "prunegraph benchmarks/scale.py: random weights, Llama-7B shapes",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_status(pid: int) -> dict[str, float] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        if m:
            out[key] = _mb(float(m.group(1)))
    return out


class Sampler(threading.Thread):
    """Peak VmRSS / RssAnon / RssFile of named processes, from /proc every ``every`` seconds."""

    def __init__(self, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pids: dict[str, int] = {}
        self.peaks: dict[str, dict[str, float]] = {}
        self.every = every
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name, pid in list(self.pids.items()):
                st = _proc_status(pid)
                if st is None:
                    continue
                peak = self.peaks.setdefault(name, {})
                for k, v in st.items():
                    peak[k] = max(peak.get(k, 0.0), v)
            self.stop.wait(self.every)


@dataclass
class Cluster:
    address: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)


@contextmanager
def dask_cluster(n_workers: int, tmp: Path, sampler: Sampler) -> Iterator[Cluster]:
    """A real ``dask scheduler`` and ``n_workers`` ``dask worker`` processes on 127.0.0.1."""
    from distributed import Client

    port = _free_port()
    c = Cluster(f"tcp://127.0.0.1:{port}")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        **ONE_BLAS_THREAD,
        "DASK_TEMPORARY_DIRECTORY": str(tmp),
    }
    common = ["--host", "127.0.0.1", "--dashboard-address", ":0"]

    def start(name: str, *cmd: str) -> None:
        with (tmp / f"{name}.log").open("wb") as log:
            c.procs[name] = subprocess.Popen(
                [str(BIN / "dask"), *cmd, *common],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        sampler.pids[name] = c.procs[name].pid

    try:
        start("scheduler", "scheduler", "--port", str(port))
        for k in range(1, n_workers + 1):
            start(
                f"w{k}",
                "worker",
                c.address,
                "--name",
                f"w{k}",
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--no-nanny",
                "--local-directory",
                str(tmp / f"w{k}"),
            )
        with Client(c.address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(n_workers, timeout=120)
        yield c
    finally:
        for name, proc in reversed(c.procs.items()):
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=30)
            sampler.pids.pop(name, None)


def dask_driver(address: str, ckpt: str, methods: list[str], cache_dir: str, out: str) -> None:
    """The job's side, in a fresh process: read lazily, one Dask task per group (analyze_on)."""
    os.environ.update(ONE_BLAS_THREAD)
    import logging
    import warnings

    from distributed import get_task_stream

    from graphs.options import AnalysisOptions
    from service.cache import code_namespace
    from service.dask_executor import DaskExecutor, client_for
    from service.ingest import read_checkpoint
    from service.jobs import analyze_on

    logging.basicConfig(level=logging.WARNING)
    client = client_for(address)
    n_workers = len(client.nthreads())

    def warm() -> float:  # a service worker is warm before its first job: so are these
        import re
        from pathlib import Path

        import service.executor  # noqa: F401

        text = Path("/proc/self/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        return float(m.group(1)) if m else float("nan")

    workers_base = client.run(warm)
    namespace = code_namespace()
    base = _vmrss_mb()
    t0 = time.perf_counter()
    parsed = read_checkpoint(ckpt)
    t_read = time.perf_counter() - t0
    rss_after_read = _vmrss_mb()
    with get_task_stream(client=client) as ts, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t1, wall1 = time.perf_counter(), time.time()
        analysis = analyze_on(
            DaskExecutor(address, "scale"),
            parsed.layers,
            checkpoint=parsed.info,
            skipped=parsed.skipped,
            methods=methods,
            seed=0,
            options=AnalysisOptions(),
            manifest=None,
            activations=None,
            cache_dir=cache_dir,
            namespace=namespace,
            job_id="scale",
        )
        t_tasks = time.perf_counter() - t1
    t_total = time.perf_counter() - t0
    # Planning, as a job does after its tasks: mrp for 30 % of the params, in the driver, from
    # the cache the workers filled. The planner holds one group's float64 vectors at a time.
    from graphs.plan import Target
    from graphs.planner import plan_layers
    from service.cache import FileCache

    st = _proc_status(os.getpid()) or {}
    plan_hwm_before = st.get("VmHWM", float("nan"))
    cache = FileCache(Path(cache_dir), namespace)
    t2 = time.perf_counter()
    plan = plan_layers(
        parsed.layers, method="mrp", target=Target(params=0.3),
        params_total=parsed.info.n_params, checkpoint_sha256=parsed.info.sha256, cache=cache,
    )  # fmt: skip
    t_plan = time.perf_counter() - t2
    st = _proc_status(os.getpid()) or {}

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    workers_peak = client.run(peak)
    scheduler_peak = client.run_on_scheduler(peak)
    names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    report = analysis.report
    tasks = []
    for rec in ts.data:
        m = re.search(r"-(\d{4})-[0-9a-f]{8}$", str(rec["key"]))
        if not m:
            continue
        layer = report.layers[int(m.group(1))]
        phases: dict[str, float] = {}
        for s in rec["startstops"]:
            phases[s["action"]] = phases.get(s["action"], 0.0) + s["stop"] - s["start"]
        compute = [s for s in rec["startstops"] if s["action"] == "compute"]
        tasks.append(
            {
                "group": layer.name,
                "start_at_s": round(compute[0]["start"] - wall1, 3) if compute else None,
                "stop_at_s": round(compute[-1]["stop"] - wall1, 3) if compute else None,
                "kind": layer.kind,
                "n": layer.n_filters,
                "fan_in": layer.fan_in,
                "worker": names.get(rec["worker"], rec["worker"]),
                **{f"{k}_s": round(v, 3) for k, v in phases.items()},
            }
        )
    result = {
        "n_workers": n_workers,
        "methods": methods,
        "groups": len(report.layers),
        "skipped": [s.name for s in report.skipped],
        "read_s": round(t_read, 3),
        "tasks_s": round(t_tasks, 3),
        "total_s": round(t_total, 3),
        "driver_rss_after_imports_mb": base,
        "driver_rss_after_read_mb": rss_after_read,
        "driver_peak_rss_mb": _rss_mb(),
        "workers_rss_after_imports_mb": {
            names.get(a, a): _mb(v)
            for a, v in sorted(workers_base.items(), key=lambda kv: str(names.get(kv[0], kv[0])))
        },
        "workers_peak_rss_mb": {
            names.get(a, a): _mb(v)
            for a, v in sorted(workers_peak.items(), key=lambda kv: str(names.get(kv[0], kv[0])))
        },
        "scheduler_peak_rss_mb": _mb(scheduler_peak),
        "cache_misses": analysis.misses,
        "plan": {
            "method": "mrp",
            "target_params": 0.3,
            "seconds": round(t_plan, 3),
            "achieved": plan.achieved,
            "rule": plan.rule,
            "cache_misses": cache.misses,
            "driver_hwm_before_mb": plan_hwm_before,
            "driver_hwm_after_mb": st.get("VmHWM", float("nan")),
        },
        "warnings": dict(Counter(str(w.message).splitlines()[0] for w in caught)),
        "redundancy": {
            m: report.summary.methods[m].redundancy_params_weighted
            for m in methods
            if report.summary.methods[m].redundancy_params_weighted is not None
        },
        "tasks": sorted(tasks, key=lambda t: (t["group"], t["worker"])),
        "report_sha256": __import__("hashlib").sha256(report.to_json().encode()).hexdigest(),
    }
    Path(out).write_text(json.dumps(result, indent=2))


def local_task(ckpt: str, methods: list[str], index: int) -> dict[str, Any]:
    """Reference without Dask, in a fresh process with 1 BLAS thread: group ``index``'s task
    (:func:`service.executor.analyze_group_task`, no cache) on the lazily read checkpoint."""
    from threadpoolctl import threadpool_limits

    from graphs.grouping import build_groups
    from graphs.options import AnalysisOptions
    from service.cache import code_namespace
    from service.executor import GroupTask, analyze_group_task
    from service.ingest import read_checkpoint

    threadpool_limits(limits=1)
    parsed = read_checkpoint(ckpt)
    groups, _ = build_groups(parsed.layers)
    group = groups[index]
    task = GroupTask.of(
        group,
        methods=methods,
        options=AnalysisOptions(),
        seed=0,
        activations=None,
        cache_dir=None,
        namespace=code_namespace(),
    )
    base = _vmrss_mb()
    t0 = time.perf_counter()
    outcome = analyze_group_task(task)
    seconds = time.perf_counter() - t0
    if outcome.error is not None:
        raise outcome.error
    return {
        "group": group.name,
        "unit": group.unit,
        "n": group.n_filters,
        "fan_in": group.fan_in,
        "seconds": round(seconds, 3),
        "rss_before_mb": base,
        "peak_rss_mb": _rss_mb(),
    }


def run_dask(n_workers: int, ckpt: Path, methods: list[str], tmp: Path) -> dict[str, Any]:
    sampler = Sampler()
    sampler.start()
    work = tmp / f"dask{n_workers}"
    work.mkdir()
    load, busy = _load(), machine_busy()
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
    result["load_before"], result["busy_before"], result["load_after"] = load, busy, _load()
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
        f"{t_write:.1f} s; write peak RSS {_rss_mb():.0f} MB",
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
        print(f"-- {k} worker(s), methods {','.join(methods)} (load {_load()}) --", flush=True)
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


# --- part 3: the real MiniLM -------------------------------------------------------------


def part_minilm(repeats: int) -> dict[str, Any]:
    folder = _realdata() / "minilm"
    if not (folder / "model.safetensors").is_file():
        print(f"\n== minilm: skipped, {folder} has no model.safetensors (run make) ==")
        return {"skipped": f"{folder} missing"}
    print(f"\n== minilm: prunegraph analyze {folder} (load {_load()}) ==", flush=True)
    load, busy = _load(), machine_busy()
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
        "load_after": _load(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        "load_start": _load(),
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
    meta["load_end"], meta["busy_end"] = _load(), machine_busy()
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"\ndone in {meta['wall_s']:.0f} s · load at end {meta['load_end']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

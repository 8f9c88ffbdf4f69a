"""Service overhead: HTTP analyze vs the embedded CLI, and throughput with concurrent clients.

Everything runs in one process on one machine, so the ratios compare like with like:

* embedded: wall time of ``prunegraph analyze CKPT --json`` as a subprocess (what a user waits
  for: interpreter, imports, read, analyse, JSON out), and the in-process reference
  (``read_checkpoint`` + ``graphs.analyze``, imports excluded);
* HTTP: a real ``prunegraph serve --workers 2`` on 127.0.0.1 with a fresh data dir; the first job
  after start (cold worker: process spawn + imports) is reported apart from the later (warm) ones.
  Each repeat times the upload (POST /v1/checkpoints) apart from submit → done (GET /v1/jobs/{id}
  polled every 0.05 s) → report fetched, with its own seed so that every job is a genuine
  analysis; the embedded CLI runs with the same seed right before it. The same seed once more is
  the cache-hit row (the server caches results per (checkpoint, methods, parameters, seed) once
  that lands; until then it is one more analysis);
* goal (issue: service overhead): HTTP analyze (upload excluded) ≤ 1.2 × the embedded CLI wall;
* throughput: ``--clients`` threads, each with its own HTTP client, upload the checkpoint and run
  ``--jobs-per-client`` jobs one after another (distinct seeds), vs the same number of jobs
  through one client, in the same run, after both workers have been started.

Usage:  python -m benchmarks.service_overhead [--checkpoint CKPT] [--repeats 3] [--clients 4]
                                             [--jobs-per-client 3] [--out results.json]

The server: :mod:`benchmarks.service_server`; upload, jobs and throughput:
:mod:`benchmarks.service_http`.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.service_http import (
    POLL_S,
    fingerprint,
    http_job,
    http_upload,
    open_client,
    prewarm,
    slim,
    stats,
    throughput,
)
from benchmarks.service_server import running_server
from benchmarks.support.meta import machine_busy, run_meta, write_json
from benchmarks.support.paths import ROOT, realdata_dir
from graphs.report import Report

GOAL_RATIO = 1.2
WORKERS = 2
# seeds: every analysis is distinct, except the cache-hit row (the first repeat's seed again)
COLD_SEED, SEQ_SEED, CONC_SEED = 100_000, 300_000, 400_000  # prewarm: service_http.PREWARM_SEED


# ---- embedded ----------------------------------------------------------------------------------


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("prunegraph")
    return [str(script)] if script.exists() else [sys.executable, "-m", "prunegraph"]


def embedded_cli(checkpoint: Path, seed: int) -> dict[str, Any]:
    """``prunegraph analyze CKPT --json`` as a subprocess: wall time and its own read/analyse."""
    cmd = [*cli_command(), "analyze", str(checkpoint), "--json", "--seed", str(seed)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    report = Report.model_validate_json(proc.stdout)
    # stderr: "read 1.23 s · analysed 36 groups in 1.45 s"
    m = re.search(r"read ([\d.]+) s .* in ([\d.]+) s", proc.stderr)
    read_s, analyse_s = (float(m[1]), float(m[2])) if m else (math.nan, math.nan)
    return {
        "seed": seed,
        "wall_s": round(wall, 3),
        "cli_read_s": read_s,
        "cli_analyse_s": analyse_s,
        "startup_s": round(wall - read_s - analyse_s, 3),  # interpreter, imports, JSON out
        "groups": len(report.layers),
        "fingerprint": fingerprint(report),
    }


def embedded_in_process(checkpoint: Path, seeds: list[int]) -> dict[str, Any]:
    """read_checkpoint + graphs.analyze in this process, after one untimed first call (seed 0).

    torch, numpy and the graph libraries are already imported here (by the HTTP client); the
    first call is reported apart: it pays the lazy initialisations a fresh process pays."""
    from graphs import analyze
    from service.ingest.checkpoint import read_checkpoint

    def once(seed: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        parsed = read_checkpoint(checkpoint)
        t1 = time.perf_counter()
        analyze(parsed.layers, checkpoint=parsed.info, skipped=parsed.skipped, seed=seed)
        t2 = time.perf_counter()
        return {
            "seed": seed,
            "read_s": round(t1 - t0, 3),
            "analyze_s": round(t2 - t1, 3),
            "total_s": round(t2 - t0, 3),
        }

    first = once(0)
    runs = [once(seed) for seed in seeds]
    return {
        "first_call": first,
        "runs": runs,
        "read": stats([r["read_s"] for r in runs]),
        "analyze": stats([r["analyze_s"] for r in runs]),
        "total": stats([r["total_s"] for r in runs]),
    }


# ---- over HTTP ---------------------------------------------------------------------------------


def paired_repeats(
    client: Any, ckpt: Path, seeds: list[int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[float], str]:
    """Per seed the embedded CLI, then the same seed over HTTP (warm worker): the CLI runs, the
    HTTP jobs, the uploads' seconds and the last upload's checkpoint id."""
    cli_runs, http_runs, uploads = [], [], []
    checkpoint_id = ""
    for seed in seeds:
        cli = embedded_cli(ckpt, seed)
        checkpoint_id, up = http_upload(client, ckpt)
        job = http_job(client, checkpoint_id, seed)
        same = cli["fingerprint"] == job["fingerprint"]
        cli_runs.append(cli)
        http_runs.append(job)
        uploads.append(up)
        print(
            f"seed {seed:<6d}  cli {cli['wall_s']:.2f}s (startup {cli['startup_s']:.2f} "
            f"read {cli['cli_read_s']:.2f} analyse {cli['cli_analyse_s']:.2f})  "
            f"http upload {up:.2f}s + job {job['total_s']:.2f}s "
            f"(server {job['server_job_s']:.2f}s)  same report: {same}",
            flush=True,
        )
    return cli_runs, http_runs, uploads, checkpoint_id


def over_http(ckpt: Path, seeds: list[int], clients: int, jobs_per_client: int) -> dict[str, Any]:
    """Steps 2 to 5 on a fresh ``prunegraph serve``: the cold first upload and job, the paired
    CLI/HTTP repeats, the first request again, then throughput with 1 and ``clients`` clients."""
    with running_server(WORKERS) as server:
        print(f"server       /healthz answered {server.start_s:.2f}s after start", flush=True)
        # 2. cold: the first upload (the server imports torch) and the first job (worker spawn)
        with open_client(server.url) as client:
            checkpoint_id, cold_upload = http_upload(client, ckpt)
            cold = http_job(client, checkpoint_id, COLD_SEED)
            print(
                f"cold         upload {cold_upload:.2f}s  job {cold['total_s']:.2f}s "
                f"(server {cold['server_job_s']:.2f}s, first seen running at "
                f"{cold['first_seen_running_s']}s)",
                flush=True,
            )
            # 3. paired repeats: the embedded CLI, then the same seed over HTTP (warm worker)
            cli_runs, http_runs, uploads, checkpoint_id = paired_repeats(client, ckpt, seeds)
            # 4. the first repeat's request again: a cache hit once the server caches results
            again = http_job(client, checkpoint_id, seeds[0])
            print(f"same seed    job {again['total_s']:.2f}s (server {again['server_job_s']:.2f}s)")

        # 5. throughput: both workers started first, then 1 client vs N clients, same job count
        prewarm_s = prewarm(server.url, checkpoint_id, WORKERS)
        n_jobs = clients * jobs_per_client
        seq = throughput(server.url, ckpt, 1, [SEQ_SEED + i for i in range(n_jobs)])
        print(
            f"1 client     {seq['jobs']} jobs in {seq['wall_s']:.1f}s = "
            f"{seq['jobs_per_minute']:.1f} jobs/min, latency p50 {seq['latency']['median']:.2f}s "
            f"p95 {seq['latency']['p95']:.2f}s",
            flush=True,
        )
        conc = throughput(server.url, ckpt, clients, [CONC_SEED + i for i in range(n_jobs)])
        print(
            f"{clients} clients    {conc['jobs']} jobs in {conc['wall_s']:.1f}s = "
            f"{conc['jobs_per_minute']:.1f} jobs/min, latency p50 {conc['latency']['median']:.2f}s"
            f" p95 {conc['latency']['p95']:.2f}s",
            flush=True,
        )
        return {
            "server_start_s": server.start_s,
            "cold_upload": cold_upload,
            "cold": cold,
            "cli_runs": cli_runs,
            "http_runs": http_runs,
            "uploads": uploads,
            "again": again,
            "prewarm_s": prewarm_s,
            "seq": seq,
            "conc": conc,
        }


# ---- the run -----------------------------------------------------------------------------------


def compare(h: dict[str, Any], inproc: dict[str, Any]) -> dict[str, Any]:
    """The paths' statistics, the goal's ratios and whether the reports were identical; prints
    the table and the verdict."""
    cli_runs, http_runs, uploads = h["cli_runs"], h["http_runs"], h["uploads"]
    cold, again = h["cold"], h["again"]
    cli_wall = stats([r["wall_s"] for r in cli_runs])
    http_job_s = stats([r["total_s"] for r in http_runs])
    upload = stats(uploads)
    http_total = stats([r["total_s"] + u for r, u in zip(http_runs, uploads, strict=True)])
    emb = cli_wall["median"]
    ratio = http_job_s["median"] / emb
    ratio_total = http_total["median"] / emb
    cold_ratio = cold["total_s"] / emb
    goal = {
        "rule": f"HTTP analyze, upload excluded, ≤ {GOAL_RATIO} × embedded CLI wall (medians)",
        "ratio_http_analyze": round(ratio, 3),
        "ratio_http_total_incl_upload": round(ratio_total, 3),
        "ratio_cold_first_job": round(cold_ratio, 3),
        "met_warm": ratio <= GOAL_RATIO,
        "met_cold_first_job": cold_ratio <= GOAL_RATIO,
    }
    identical = all(
        cr["fingerprint"] == hr["fingerprint"] for cr, hr in zip(cli_runs, http_runs, strict=True)
    )

    print()
    print("| path | n | best s | median s | × embedded CLI (median) |")
    print("|---|---:|---:|---:|---:|")
    rows = [
        ("embedded CLI wall (`prunegraph analyze --json`)", cli_wall),
        ("in-process read + analyze (imports excluded)", inproc["total"]),
        ("HTTP upload", upload),
        ("HTTP analyze, warm (submit → report)", http_job_s),
        ("HTTP total, warm (upload + analyze)", http_total),
        ("HTTP first job after start (cold worker)", stats([cold["total_s"]])),
        ("HTTP same request again (cache hit once cached)", stats([again["total_s"]])),
    ]
    for name, st in rows:
        print(f"| {name} | {st['n']} | {st['best']:.2f} | {st['median']:.2f} | "
              f"{st['median'] / emb:.2f} |")  # fmt: skip
    print()
    verdict = "met" if goal["met_warm"] else "NOT met"
    print(
        f"goal ≤ {GOAL_RATIO}× + upload: {verdict} (HTTP analyze {ratio:.2f}× the CLI; "
        f"with upload {ratio_total:.2f}×; cold first job {cold_ratio:.2f}×); "
        f"reports identical to the CLI's: {identical}"
    )
    return {"cli_wall": cli_wall, "analyze": http_job_s, "upload": upload,
            "total_incl_upload": http_total, "goal": goal, "identical": identical}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=realdata_dir() / "mobilenet_v2_imagenet.pth"
    )
    parser.add_argument("--repeats", type=int, default=3, help="paired CLI/HTTP repeats")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--jobs-per-client", type=int, default=3, help="jobs of each client")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    args = parser.parse_args()
    ckpt: Path = args.checkpoint
    if not ckpt.is_file():
        parser.error(f"{ckpt} not found: run `make realdata` or pass --checkpoint")
    if args.repeats < 1 or args.clients < 1 or args.jobs_per_client < 1:
        parser.error("--repeats, --clients and --jobs-per-client must be at least 1")
    seeds = list(range(1, args.repeats + 1))
    size_mb = ckpt.stat().st_size / 1e6
    busy_before = machine_busy()
    print(
        f"checkpoint {ckpt} ({size_mb:.1f} MB), {args.repeats} repeats, poll {POLL_S} s; "
        f"machine busy before the run (others' load): {busy_before}"
    )

    # 1. the in-process reference (also warms the page cache for torch and the checkpoint)
    inproc = embedded_in_process(ckpt, seeds)
    print(
        f"in-process   first call {inproc['first_call']['total_s']:.2f}s, then read "
        f"{inproc['read']['median']:.2f}s + analyze {inproc['analyze']['median']:.2f}s "
        f"(median of {len(seeds)})",
        flush=True,
    )
    h = over_http(ckpt, seeds, args.clients, args.jobs_per_client)
    busy_after = machine_busy()
    c = compare(h, inproc)
    seq, conc = h["seq"], h["conc"]
    speedup = conc["jobs_per_minute"] / seq["jobs_per_minute"]
    print(
        f"throughput: 1 client {seq['jobs_per_minute']:.1f} jobs/min, {args.clients} clients "
        f"{conc['jobs_per_minute']:.1f} jobs/min (×{speedup:.2f}); machine busy before/after "
        f"the run (others' load): {busy_before}/{busy_after}"
    )

    if args.out:
        result = {
            "meta": {
                **run_meta(),
                "checkpoint": ckpt.name,
                "checkpoint_mb": round(size_mb, 2),
                "repeats": args.repeats,
                "clients": args.clients,
                "jobs_per_client": args.jobs_per_client,
                "server_workers": WORKERS,
                "poll_s": POLL_S,
                "machine_busy_before": busy_before,
                "machine_busy_after": busy_after,
            },
            "server_start_s": round(h["server_start_s"], 3),
            "embedded": {
                "cli": [{k: v for k, v in r.items() if k != "fingerprint"} for r in h["cli_runs"]],
                "cli_wall": c["cli_wall"],
                "in_process": inproc,
            },
            "http": {
                "cold_upload_s": round(h["cold_upload"], 3),
                "cold_first_job": slim(h["cold"]),
                "upload": c["upload"],
                "jobs": [slim(r) for r in h["http_runs"]],
                "analyze": c["analyze"],
                "total_incl_upload": c["total_incl_upload"],
                "same_request_again": slim(h["again"]),
                "reports_identical_to_cli": c["identical"],
            },
            "goal": c["goal"],
            "throughput": {
                "prewarm_s": round(h["prewarm_s"], 3),
                "sequential": seq,
                "concurrent": conc,
            },
        }
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The HTTP side of the service-overhead benchmark (:mod:`benchmarks.service_overhead`): upload,
one job from submit to report fetched (where the time went), clients in threads for throughput,
and the statistics of a list of seconds."""

from __future__ import annotations

import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from clients import PruneGraphClient
from graphs.report import Report

POLL_S = 0.05
PREWARM_SEED = 200_000


def stats(values: list[float]) -> dict[str, float]:
    """best / median / p95 (nearest rank) / worst of a list of seconds."""
    s = sorted(values)
    p95 = s[max(0, math.ceil(0.95 * len(s)) - 1)]
    return {
        "n": len(s),
        "best": round(s[0], 3),
        "median": round(statistics.median(s), 3),
        "p95": round(p95, 3),
        "worst": round(s[-1], 3),
    }


def fingerprint(report: Report) -> str:
    """The report minus nothing: identical seeds must give identical JSON in both paths."""
    return report.model_dump_json()


def open_client(url: str) -> PruneGraphClient:
    return PruneGraphClient(url, timeout=300.0)


def http_upload(client: PruneGraphClient, checkpoint: Path) -> tuple[str, float]:
    t0 = time.perf_counter()
    checkpoint_id = client.upload(checkpoint)
    return checkpoint_id, time.perf_counter() - t0


def http_job(
    client: PruneGraphClient, checkpoint_id: str, seed: int, timeout: float = 600.0
) -> dict[str, Any]:
    """submit → poll every POLL_S until done → report fetched, with where the time went."""
    t0 = time.perf_counter()
    job_id = client.submit(checkpoint_id, seed=seed)
    t_submit = time.perf_counter() - t0
    first_running: float | None = None
    while True:
        status = client.job(job_id)
        now = time.perf_counter() - t0
        if status.status == "running" and first_running is None:
            first_running = round(now, 3)
        if status.finished:
            break
        if now > timeout:
            raise RuntimeError(
                f"job {job_id} (seed {seed}) still {status.status} after {now:.0f} s"
            )
        time.sleep(POLL_S)
    if status.status != "done":
        raise RuntimeError(f"job {job_id} (seed {seed}) failed: {status.error}")
    t_done = time.perf_counter() - t0
    report = client.report(job_id)
    total = time.perf_counter() - t0
    # the server's own clock: created (submit) → last update (done)
    raw = httpx.get(f"{client.base_url}/v1/jobs/{job_id}", timeout=30).json()
    return {
        "seed": seed,
        "job_id": job_id,
        "submit_s": round(t_submit, 3),
        "first_seen_running_s": first_running,  # None: done before a poll saw it running
        "done_seen_s": round(t_done, 3),
        "report_fetch_s": round(total - t_done, 3),
        "total_s": round(total, 3),
        "server_job_s": round(float(raw["updated_at"]) - float(raw["created_at"]), 3),
        "groups": len(report.layers),
        "fingerprint": fingerprint(report),
    }


def client_run(url: str, checkpoint: Path, seeds: list[int], t_start: float) -> dict[str, Any]:
    """One client: upload, then its jobs one after another (``t_start``: the phase's clock)."""
    with open_client(url) as client:
        checkpoint_id, upload_s = http_upload(client, checkpoint)
        jobs = []
        for seed in seeds:
            job = http_job(client, checkpoint_id, seed)
            job["ended_at_s"] = round(time.perf_counter() - t_start, 3)
            jobs.append(job)
    return {"upload_s": round(upload_s, 3), "jobs": jobs}


def throughput(url: str, checkpoint: Path, n_clients: int, seeds: list[int]) -> dict[str, Any]:
    """``seeds`` split over ``n_clients`` threads (each its own client); wall incl. uploads."""
    per_client = [seeds[i::n_clients] for i in range(n_clients)]
    results: list[dict[str, Any] | None] = [None] * n_clients
    errors: list[BaseException] = []

    def work(i: int, t_start: float) -> None:
        try:
            results[i] = client_run(url, checkpoint, per_client[i], t_start)
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i, t0)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    done = [r for r in results if r is not None]
    jobs = [j for r in done for j in r["jobs"]]
    return {
        "clients": n_clients,
        "jobs": len(jobs),
        "wall_s": round(wall, 3),
        "jobs_per_minute": round(60.0 * len(jobs) / wall, 2),
        "upload": stats([r["upload_s"] for r in done]),
        "latency": stats([j["total_s"] for j in jobs]),  # submit → report fetched
        "server_job": stats([j["server_job_s"] for j in jobs]),
        "per_client": [
            {"upload_s": r["upload_s"], "jobs": [slim(j) for j in r["jobs"]]} for r in done
        ],
    }


def slim(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in ("fingerprint", "job_id")}


def prewarm(url: str, checkpoint_id: str, n: int) -> float:
    """Submit ``n`` jobs at once so that every worker process has been started (untimed jobs)."""
    t0 = time.perf_counter()
    with open_client(url) as client:
        ids = [client.submit(checkpoint_id, seed=PREWARM_SEED + i) for i in range(n)]
        for job_id in ids:
            client.wait(job_id, poll=POLL_S)
    return time.perf_counter() - t0

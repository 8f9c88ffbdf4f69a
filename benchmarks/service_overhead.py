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

Usage:  python benchmarks/service_overhead.py [--checkpoint CKPT] [--repeats 3] [--clients 4]
                                              [--jobs-per-client 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine_busy, run_meta  # noqa: E402

from clients.http import PruneGraphClient  # noqa: E402
from graphs.report import Report  # noqa: E402

POLL_S = 0.05
GOAL_RATIO = 1.2
WORKERS = 2
# seeds: every analysis is distinct, except the cache-hit row (the first repeat's seed again)
COLD_SEED, PREWARM_SEED, SEQ_SEED, CONC_SEED = 100_000, 200_000, 300_000, 400_000


def _realdata() -> Path:
    return Path(os.environ.get("PRUNEGRAPH_REALDATA", Path.home() / ".cache/prunegraph-realdata"))


def _stats(values: list[float]) -> dict[str, float]:
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


def _fingerprint(report: Report) -> str:
    """The report minus nothing: identical seeds must give identical JSON in both paths."""
    return report.model_dump_json()


# ---- embedded ----------------------------------------------------------------------------------


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("prunegraph")
    return [str(script)] if script.exists() else [sys.executable, "-m", "prunegraph"]


def embedded_cli(checkpoint: Path, seed: int) -> dict[str, Any]:
    """``prunegraph analyze CKPT --json`` as a subprocess: wall time and its own read/analyse."""
    cmd = [*_cli(), "analyze", str(checkpoint), "--json", "--seed", str(seed)]
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
        "fingerprint": _fingerprint(report),
    }


def embedded_in_process(checkpoint: Path, seeds: list[int]) -> dict[str, Any]:
    """read_checkpoint + graphs.analyze in this process, after one untimed first call (seed 0).

    torch, numpy and the graph libraries are already imported here (by the HTTP client); the
    first call is reported apart: it pays the lazy initialisations a fresh process pays."""
    from graphs import analyze
    from service.ingest import read_checkpoint

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
        "read": _stats([r["read_s"] for r in runs]),
        "analyze": _stats([r["analyze_s"] for r in runs]),
        "total": _stats([r["total_s"] for r in runs]),
    }


# ---- the server --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``prunegraph serve`` in its own session (so it and its workers are stopped together)."""

    def __init__(self, data_dir: Path, workers: int) -> None:
        self.data_dir, self.workers, self.port = data_dir, workers, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_s = math.nan

    def start(self, timeout: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "prunegraph", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--workers", str(self.workers)]  # fmt: skip
        # auth off and the default SQLite in the data dir, whatever this shell has set
        drop = ("PRUNEGRAPH_TOKENS", "PRUNEGRAPH_TOKENS_FILE", "PRUNEGRAPH_DATABASE_URL")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        t0 = time.perf_counter()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prunegraph serve exited {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    self.start_s = time.perf_counter() - t0
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(
            f"prunegraph serve did not answer /healthz in {timeout:g} s: {self.tail()}"
        )

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the whole session (server and workers), SIGKILL what is left after 15 s."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers that outlived the server
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        self.proc = None


@contextlib.contextmanager
def running_server(workers: int) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="prunegraph-bench-") as tmp:
        server = Server(Path(tmp) / "data", workers)
        try:
            server.start()
            yield server
        except BaseException:
            print(f"--- server log (tail) ---\n{server.tail()}", file=sys.stderr)
            raise
        finally:
            server.stop()


# ---- HTTP --------------------------------------------------------------------------------------


def _client(url: str) -> PruneGraphClient:
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
        "fingerprint": _fingerprint(report),
    }


def _client_run(url: str, checkpoint: Path, seeds: list[int], t_start: float) -> dict[str, Any]:
    """One client: upload, then its jobs one after another (``t_start``: the phase's clock)."""
    with _client(url) as client:
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
            results[i] = _client_run(url, checkpoint, per_client[i], t_start)
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
        "upload": _stats([r["upload_s"] for r in done]),
        "latency": _stats([j["total_s"] for j in jobs]),  # submit → report fetched
        "server_job": _stats([j["server_job_s"] for j in jobs]),
        "per_client": [
            {"upload_s": r["upload_s"], "jobs": [_slim(j) for j in r["jobs"]]} for r in done
        ],
    }


def _slim(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in ("fingerprint", "job_id")}


def prewarm(url: str, checkpoint_id: str, n: int) -> float:
    """Submit ``n`` jobs at once so that every worker process has been started (untimed jobs)."""
    t0 = time.perf_counter()
    with _client(url) as client:
        ids = [client.submit(checkpoint_id, seed=PREWARM_SEED + i) for i in range(n)]
        for job_id in ids:
            client.wait(job_id, poll=POLL_S)
    return time.perf_counter() - t0


# ---- the run -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=_realdata() / "mobilenet_v2_imagenet.pth"
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

    with running_server(WORKERS) as server:
        print(f"server       /healthz answered {server.start_s:.2f}s after start", flush=True)
        # 2. cold: the first upload (the server imports torch) and the first job (worker spawn)
        with _client(server.url) as client:
            checkpoint_id, cold_upload = http_upload(client, ckpt)
            cold = http_job(client, checkpoint_id, COLD_SEED)
            print(
                f"cold         upload {cold_upload:.2f}s  job {cold['total_s']:.2f}s "
                f"(server {cold['server_job_s']:.2f}s, first seen running at "
                f"{cold['first_seen_running_s']}s)",
                flush=True,
            )
            # 3. paired repeats: the embedded CLI, then the same seed over HTTP (warm worker)
            cli_runs, http_runs, uploads = [], [], []
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
            # 4. the first repeat's request again: a cache hit once the server caches results
            again = http_job(client, checkpoint_id, seeds[0])
            print(f"same seed    job {again['total_s']:.2f}s (server {again['server_job_s']:.2f}s)")

        # 5. throughput: both workers started first, then 1 client vs N clients, same job count
        prewarm_s = prewarm(server.url, checkpoint_id, WORKERS)
        n_jobs = args.clients * args.jobs_per_client
        seq = throughput(server.url, ckpt, 1, [SEQ_SEED + i for i in range(n_jobs)])
        print(
            f"1 client     {seq['jobs']} jobs in {seq['wall_s']:.1f}s = "
            f"{seq['jobs_per_minute']:.1f} jobs/min, latency p50 {seq['latency']['median']:.2f}s "
            f"p95 {seq['latency']['p95']:.2f}s",
            flush=True,
        )
        conc = throughput(server.url, ckpt, args.clients, [CONC_SEED + i for i in range(n_jobs)])
        print(
            f"{args.clients} clients    {conc['jobs']} jobs in {conc['wall_s']:.1f}s = "
            f"{conc['jobs_per_minute']:.1f} jobs/min, latency p50 {conc['latency']['median']:.2f}s"
            f" p95 {conc['latency']['p95']:.2f}s",
            flush=True,
        )
        server_start_s = server.start_s
    busy_after = machine_busy()

    cli_wall = _stats([r["wall_s"] for r in cli_runs])
    http_job_s = _stats([r["total_s"] for r in http_runs])
    upload = _stats(uploads)
    http_total = _stats([r["total_s"] + u for r, u in zip(http_runs, uploads, strict=True)])
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
        c["fingerprint"] == h["fingerprint"] for c, h in zip(cli_runs, http_runs, strict=True)
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
        ("HTTP first job after start (cold worker)", _stats([cold["total_s"]])),
        ("HTTP same request again (cache hit once cached)", _stats([again["total_s"]])),
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
            "server_start_s": round(server_start_s, 3),
            "embedded": {
                "cli": [{k: v for k, v in r.items() if k != "fingerprint"} for r in cli_runs],
                "cli_wall": cli_wall,
                "in_process": inproc,
            },
            "http": {
                "cold_upload_s": round(cold_upload, 3),
                "cold_first_job": _slim(cold),
                "upload": upload,
                "jobs": [_slim(r) for r in http_runs],
                "analyze": http_job_s,
                "total_incl_upload": http_total,
                "same_request_again": _slim(again),
                "reports_identical_to_cli": identical,
            },
            "goal": goal,
            "throughput": {"prewarm_s": round(prewarm_s, 3), "sequential": seq, "concurrent": conc},
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

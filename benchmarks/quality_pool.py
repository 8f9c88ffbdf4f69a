"""The worker pool of the plan-quality benchmark (:mod:`benchmarks.quality`): spawn processes
that run :func:`benchmarks.quality_run.task`, a journal of finished rows to resume from, and the
choice of PCC's λ on the validation digits."""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from benchmarks import quality_run as qr


class Pool:
    """The worker processes (spawn), with progress lines on stderr and a journal: every finished
    ``run``/``tune`` row is appended to OUT_DIR/quality-journal.jsonl, and with ``resume`` rows
    already there for the same settings are taken from it instead of being run again."""

    def __init__(self, jobs: int, threads: int, journal: Path, settings_key: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ex = ProcessPoolExecutor(
            max_workers=jobs, mp_context=ctx, initializer=qr.worker_init, initargs=(threads,)
        )
        self.t0 = time.perf_counter()
        self.journal, self.settings_key = journal, settings_key
        self.done: dict[str, dict[str, Any]] = {}

    def resume(self) -> int:
        """Load the journal's rows of these settings; returns how many."""
        if self.journal.is_file():
            for line in self.journal.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("settings") == self.settings_key:
                    self.done[entry["key"]] = entry["result"]
        return len(self.done)

    @staticmethod
    def _key(kind: str, args: dict[str, Any]) -> str:
        return json.dumps([kind, args], sort_keys=True)

    def map(self, kind: str, s: qr.Settings, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(tasks)
        futures: dict[Future[dict[str, Any]], int] = {}
        for i, a in enumerate(tasks):
            if self._key(kind, a) in self.done:
                out[i] = self.done[self._key(kind, a)]
            else:
                futures[self.ex.submit(qr.task, kind, s, a)] = i
        if len(futures) < len(tasks):
            n = len(tasks) - len(futures)
            print(f"{kind}: {n} of {len(tasks)} from the journal", file=sys.stderr, flush=True)
        for done, fut in enumerate(as_completed(futures), start=1):
            r = fut.result()
            out[futures[fut]] = r
            what = " ".join(str(v) for v in r["args"].values())
            status = f"ERROR {r['error']}" if "error" in r else f"{r['wall_s']:.1f} s"
            elapsed = time.perf_counter() - self.t0
            line = f"[{elapsed:7.1f} s] {kind} {done}/{len(futures)} {what}: {status}"
            print(line, file=sys.stderr, flush=True)
            if kind in ("run", "tune") and "error" not in r:
                entry = {"settings": self.settings_key, "key": self._key(kind, r["args"]),
                         "result": r}  # fmt: skip
                with self.journal.open("a") as f:
                    f.write(json.dumps(entry, default=str) + "\n")
        return [r for r in out if r is not None]

    def submit_fidelity(self, args: argparse.Namespace) -> Future[dict[str, Any]] | None:
        if args.no_fidelity:
            return None
        return self.ex.submit(qr.fidelity_task, args.quick, args.seeds, args.out_dir)

    def close(self) -> None:
        self.ex.shutdown()


def choose_pcc(
    pool: Pool, s: qr.Settings, args: argparse.Namespace, pairs: list[tuple[str, str]]
) -> tuple[dict[tuple[str, str], dict[str, Any]], list[dict[str, Any]]]:
    """PCC models for every λ, then λ per (dataset, model) by the val accuracy after pruning
    with ci and fine-tuning (mean over the targets, seed 0). Never looks at the test digits."""
    trained = pool.map(
        "pcc",
        s,
        [{"dataset": d, "model": m, "weight": w} for d, m in pairs for w in args.pcc_weights],
    )
    tuning: list[dict[str, Any]] = []
    if len(args.pcc_weights) > 1:
        tuning = pool.map(
            "tune",
            s,
            [
                {"dataset": d, "model": m, "target": t, "method": "ci+pcc", "seed": 0,
                 "pcc_weight": w}
                for d, m in pairs for w in args.pcc_weights for t in args.targets
            ],
        )  # fmt: skip
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for d, m in pairs:
        scores: dict[str, float] = {}
        for w in args.pcc_weights:
            vals = [
                r["acc_after_ft"]
                for r in tuning
                if "error" not in r and (r["dataset"], r["model"], r["pcc_weight"]) == (d, m, w)
            ]
            scores[f"{w:g}"] = sum(vals) / len(vals) if vals else float("nan")
        # the best val score; ties go to the smaller λ (a failed candidate scores -inf)
        best = min(args.pcc_weights, key=lambda w: (-_finite(scores[f"{w:g}"]), w))
        model = next(
            r for r in trained if (r["args"]["dataset"], r["args"]["model"]) == (d, m)
            and r["args"]["weight"] == best
        )  # fmt: skip
        chosen[(d, m)] = {
            "weight": best,
            "scores": scores if len(args.pcc_weights) > 1 else {},
            "test_acc": model.get("test_acc", float("nan")),
            "val_acc": model.get("val_acc", float("nan")),
            "train_s": model.get("train_s"),
        }
    return chosen, trained + tuning


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf

"""Benchmark what MLflow tracking costs the step loop; prints ONE JSON line.

    python tools/bench_tracking.py                 # 2000 calls and 2000 steps per case
    python tools/bench_tracking.py --steps 500     # quicker
    python tools/bench_tracking.py --no-sqlite     # only the disabled baseline and the hanging server

Each case is one rank-0 :class:`pcl_hpc.tracking.Tracker` (system metrics off), measured the same way:

* ``log_metrics``: ``--steps`` calls of ``Tracker.log_metrics`` with 3 metrics (loss, lr,
  views_per_s), back to back: per call mean, p99 and max in microseconds;
* ``step``: ``--steps`` steps of a tiny training step (a ``--matmul`` x ``--matmul`` float32
  matmul, one torch thread) plus ``log_metrics`` every step: the mean step time, and its overhead
  over the same loop with tracking disabled;
* ``start_s`` / ``end_s``: ``Tracker.start`` (the first enabled case includes importing MLflow)
  and ``Tracker.end`` (the bounded drain);
* ``sqlite_sync_step_us``: ``--sync-steps`` steps whose ``log_metrics`` is followed by
  ``Tracker.flush()``, i.e. what each step cost when tracking was synchronous.

Cases: ``disabled`` (``enabled=False``: the baseline, measured in the same run, first and last: the
faster of the two is reported), ``hanging`` (a TCP
server on 127.0.0.1 that accepts connections and never answers; MLflow's HTTP timeout
``--http-timeout`` s, no retries, the Tracker retrying every ``--retry-s`` s so its worker thread
is stuck in a request most of the time, ``end`` bounded by ``--drain-s`` s), and ``sqlite`` (a
live local store, ``sqlite:///<tmp>/mlflow.db``). Before the background queue, each call of the
hanging case blocked whenever a retry was due, for (retries + 1) x timeout (60 s with the
defaults). ``complete`` checks that nothing was lost: every step's loss is in the store (sqlite)
or in the fallback file (hanging).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pcl_hpc.config import Config  # noqa: E402
from pcl_hpc.tracking import FALLBACK_FILE, Tracker, read_fallback  # noqa: E402
from pcl_hpc.tracking.background import Worker  # noqa: E402


class SilentServer:
    """127.0.0.1: accepts TCP connections, never reads or answers."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.uri = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                self.held.append(self.server.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for conn in self.held:
            conn.close()
        self.server.close()


def _us(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"mean": round(statistics.fmean(ordered) * 1e6, 2),
            "p99": round(ordered[int(0.99 * (len(ordered) - 1))] * 1e6, 2),
            "max": round(ordered[-1] * 1e6, 2)}


def run_case(name: str, uri: str | None, folder: Path, args) -> dict:
    cfg = Config(output_dir=str(folder / name))
    cfg.tracking.uri = uri or ""
    cfg.tracking.experiment = f"bench-{name}"
    tracker = Tracker(cfg, enabled=uri is not None)
    tracker.system_metrics = False
    if name == "hanging":
        tracker.retry_interval_s = args.retry_s
    if args.drain_s is not None:
        tracker.drain_timeout_s = args.drain_s
    started = time.perf_counter()
    run_id = tracker.start("bench", {"steps": args.steps})
    start_s = time.perf_counter() - started

    calls = []
    for step in range(args.steps):
        metrics = {"loss": 1.0 / (step + 1), "lr": 0.1, "views_per_s": 1000.0 + step}
        begin = time.perf_counter()
        tracker.log_metrics(metrics, step)
        calls.append(time.perf_counter() - begin)

    torch.manual_seed(0)
    a = torch.randn(args.matmul, args.matmul)
    b = torch.randn(args.matmul, args.matmul)
    for _ in range(20):  # warm-up: allocations, the matmul kernel
        a = torch.tanh(a @ b)
    steps = []
    for step in range(args.steps, 2 * args.steps):
        begin = time.perf_counter()
        a = torch.tanh(a @ b)  # keeps the values bounded; the result feeds the next step
        tracker.log_metrics({"loss": float(a[0, 0]), "lr": 0.1, "views_per_s": 1000.0 + step}, step)
        steps.append(time.perf_counter() - begin)

    # What a synchronous Tracker cost (the call returns once its metrics were sent): a live store only.
    sync = []
    total = 2 * args.steps
    if name == "sqlite":
        tracker.flush()
        for step in range(total, total + args.sync_steps):
            begin = time.perf_counter()
            a = torch.tanh(a @ b)
            tracker.log_metrics({"loss": float(a[0, 0]), "lr": 0.1, "views_per_s": 1000.0 + step}, step)
            tracker.flush()
            sync.append(time.perf_counter() - begin)
        total += args.sync_steps

    started = time.perf_counter()
    tracker.end()
    end_s = time.perf_counter() - started

    complete = None
    if name == "sqlite":
        with sqlite3.connect(folder / "mlflow.db") as db:
            count, distinct = db.execute("SELECT COUNT(*), COUNT(DISTINCT step) FROM metrics "
                                         "WHERE run_uuid = ? AND key = 'loss'", (run_id,)).fetchone()
        complete = count == distinct == total
    elif name == "hanging":
        worker = tracker._worker.thread if tracker._worker is not None else None
        if worker is not None:
            worker.join(timeout=args.http_timeout + 5)  # its last request times out, then it ends
        records = read_fallback(Path(cfg.output_dir) / FALLBACK_FILE)
        logged = {r["step"] for r in records if r["kind"] == "metrics" and "loss" in r["metrics"]}
        complete = logged == set(range(total)) and any(r["kind"] == "end" for r in records)
    return {"log_metrics_us": _us(calls), "step_us": round(statistics.fmean(steps) * 1e6, 2),
            "sync_step_us": round(statistics.fmean(sync) * 1e6, 2) if sync else None,
            "step_p99_us": _us(steps)["p99"], "start_s": round(start_s, 3), "end_s": round(end_s, 3),
            "complete": complete, "queue_full_calls": tracker._overflowed}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="log_metrics calls, and loop steps, per case")
    parser.add_argument("--matmul", type=int, default=128, help="side of the step's matmul")
    parser.add_argument("--http-timeout", type=float, default=2.0, help="MLFLOW_HTTP_REQUEST_TIMEOUT of the hanging case")
    parser.add_argument("--retry-s", type=float, default=0.5, help="Tracker.retry_interval_s of the hanging case")
    parser.add_argument("--drain-s", type=float, default=None,
                        help="Tracker.drain_timeout_s, end's bound (default: the Tracker's)")
    parser.add_argument("--sync-steps", type=int, default=50,
                        help="sqlite: steps of log_metrics + flush() (what a synchronous Tracker cost)")
    parser.add_argument("--linger-s", type=float, default=None, help="Worker.linger_s (default: the Worker's)")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the live sqlite store")
    args = parser.parse_args(argv)

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = f"{args.http_timeout:g}"
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PCL_TRACKING_RETRY_S", "PCL_TRACKING_DRAIN_S"):
        os.environ.pop(var, None)
    warnings.filterwarnings("ignore")
    logging.getLogger("pcl_hpc").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    if args.linger_s is not None:
        Worker.linger_s = args.linger_s

    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="pcl-bench-tracking-") as tmp:
        folder = Path(tmp)
        results["disabled"] = run_case("disabled", None, folder, args)
        server = SilentServer()
        try:
            results["hanging"] = run_case("hanging", server.uri, folder, args)
        finally:
            server.close()
        if not args.no_sqlite:
            results["sqlite"] = run_case("sqlite", f"sqlite:///{folder / 'mlflow.db'}", folder, args)
        again = run_case("disabled", None, folder, args)  # the baseline once more, after the others
        if again["step_us"] < results["disabled"]["step_us"]:
            results["disabled"] = again  # the faster of the two: overheads are not flattered by noise

    base = results["disabled"]
    print(json.dumps({
        "bench": "Tracker.log_metrics per call, and a step loop (matmul + log_metrics every step)",
        "steps": args.steps, "metrics_per_call": 3, "matmul": args.matmul, "torch_threads": 1,
        "hanging": {"http_timeout_s": args.http_timeout, "retries": 0, "retry_interval_s": args.retry_s},
        "drain_timeout_s": args.drain_s if args.drain_s is not None else Tracker.drain_timeout_s,
        "host": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
        "baseline": "disabled",
        "log_metrics_us": {k: r["log_metrics_us"] for k, r in results.items()},
        "step_us": {k: r["step_us"] for k, r in results.items()},
        "step_p99_us": {k: r["step_p99_us"] for k, r in results.items()},
        "step_overhead_us": {k: round(r["step_us"] - base["step_us"], 2) for k, r in results.items() if k != "disabled"},
        "sqlite_sync_step_us": results["sqlite"]["sync_step_us"] if "sqlite" in results else None,
        "start_s": {k: r["start_s"] for k, r in results.items()},
        "end_s": {k: r["end_s"] for k, r in results.items()},
        "queue_full_calls": {k: r["queue_full_calls"] for k, r in results.items() if k != "disabled"},
        "complete": {k: r["complete"] for k, r in results.items() if k != "disabled"},
        "total_s": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()

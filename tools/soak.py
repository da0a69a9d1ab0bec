"""Soak test for crashes that happen once in many runs: K cycles of a 2-rank pretraining that is
stopped from outside at a random moment and resumed, then one JSON line with what crashed.

A cycle: ``torchrun --nproc_per_node=2 -m pcl_hpc pretrain`` on the demo store (built once under
--out), SIGTERM to every worker at a random time (as ``scontrol requeue`` sends it), then the same
command again, which resumes from the checkpoint and finishes. Any exit other than 0 (finished) or
75 (saved on the signal) is a crash; its signature is the first line that names what failed
(glibc's heap check, a fatal signal, the Python frame faulthandler printed).

``--slurm`` runs each cycle as a SLURM job through ``python -m pcl_hpc.launch pretrain`` instead and
requeues it with ``scontrol requeue`` (needs ``tools/slurm_local.sh start``).

    python tools/soak.py --cycles 20 --heap-check                # glibc's checking allocator
    python tools/soak.py --cycles 20 --set data.num_workers=2    # bisect: one suspect at a time
    python tools/soak.py --cycles 5 --slurm

``--gather`` soaks the loss's collectives alone, which is where the crash was (2 ranks, no model, no
data; a cycle is ``--iterations`` gathers of features and positions, as ``contrastive_loss`` does them,
each followed by the step's all-reduce and the backward): ``--gather --funcol`` gathers with torch's
functional ``all_gather_single_autograd``, as pcl-hpc did before the fix, and crashes within minutes
("malloc(): unaligned tcache chunk detected" in a gloo worker thread).

``--heap-check`` preloads glibc's debugging malloc (``glibc.malloc.check=3``) and fills freed and
new memory with a byte pattern (``MALLOC_PERTURB_``), so a use after free or an overrun aborts
near its cause instead of corrupting a later allocation.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MALLOC_DEBUG = "/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"
TINY = {"data.patch": 32, "model.width": 4, "model.projection_dim": 32, "pretrain.batch_size": 4,
        "pretrain.augment": "false", "pretrain.log_every": 1, "engine.precision": "fp32"}
CRASH = re.compile(r"wrong (?:gather|gradient)|malloc\(\)|free\(\)|double free|corrupted|munmap_chunk|Fatal Python error|Segmentation fault|"
                   r"SIGSEGV|SIGABRT|SIGBUS|SIGILL|SIGFPE|exitcode\s*:\s*-(?!15\b)\d+")
SIGNATURES = [  # what names a crash, most specific first
    r"wrong (?:gather|gradient)[^\n]*", r"terminate called[^\n]*",
    r"malloc\(\)[^\n]*", r"free\(\)[^\n]*", r"double free[^\n]*", r"corrupted[^\n]*", r"munmap_chunk\(\)[^\n]*",
    r"Fatal Python error: [^\n]*", r"Segmentation fault[^\n]*", r"Signal \d+ \(SIG\w+\)[^\n]*",
    r"exitcode\s*:\s*-\d+[^\n]*",
]


def demo_store(out: Path) -> str:
    store = out / "store.zarr"
    if not (store / "manifest.json").exists() and not (store / "zarr.json").exists():
        sys.path.insert(0, str(REPO))
        from pcl_hpc.config import DataConfig
        from pcl_hpc.data.demo_data import make_demo_data
        from pcl_hpc.data.preprocess import preprocess

        make_demo_data(out / "raw", spacing=3.0, seed=0)
        summary = preprocess(DataConfig(raw_dir=str(out / "raw"), store=str(store), layout="generic", folds=3),
                             workers=1, progress=False)
        assert summary.ok, summary.format()
    return str(store)


def outcome(code: int, text: str) -> str:
    """finished | saved (stopped by the signal after saving) | crash. Under torchrun the launcher's own
    exit code is 1 whenever a rank exits non-zero, 75 included, so the ranks' lines decide."""
    if CRASH.search(text) or code == -999:
        return "crash"
    if code == 0:
        return "finished"
    return "saved" if code == 75 or re.search(r"saved step \d+ after", text) else "crash"


def signature(text: str) -> str:
    """The line that names the crash, plus the innermost Python frame faulthandler printed, if any."""
    found = next((m.group(0).strip() for p in SIGNATURES for m in [re.search(p, text)] if m), "unknown")
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\w+)', text.split("Fatal Python error", 1)[-1])
    where = f" at {Path(frames[0][0]).name}:{frames[0][1]} {frames[0][2]}" if "Fatal Python error" in text and frames else ""
    return found + where


def worker_pids(parent: int) -> list[int]:
    """The processes torchrun started (children of the agent)."""
    try:
        out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True, check=False).stdout
    except OSError:
        return []
    return [int(p) for p in out.split()]


def wait_for_step(log: Path, proc: subprocess.Popen, step: int) -> bool:
    """Wait until rank 0 has printed ``step <step>/``; False if the run ended first."""
    pattern = re.compile(rf"^step {step}/", re.M)
    while proc.poll() is None:
        if pattern.search(log.read_text(errors="replace")):
            return True
        time.sleep(0.05)
    return False


def local_cycle(args, store: str, folder: Path, rng: random.Random, env: dict) -> list[tuple[int, str]]:
    """One stop-and-resume cycle under torchrun; returns (exit code, output) of each run."""
    overrides = {**TINY, "data.store": store, "output_dir": str(folder), "pretrain.max_steps": args.steps,
                 "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}", "tracking.register_name": "soak-encoder"}
    overrides.update(dict(kv.split("=", 1) for kv in args.set))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pcl_hpc",
           "pretrain", "--config", str(REPO / "configs" / "demo.yaml"), *[f"{k}={v}" for k, v in overrides.items()]]
    runs = []
    for attempt in range(args.max_runs):
        log = folder / f"run{attempt}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env)
            if attempt == 0 and wait_for_step(log, proc, rng.randint(*args.stop_at)):  # stop it from outside
                for pid in worker_pids(proc.pid):
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            try:
                code = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = -999
        runs.append((code, log.read_text(errors="replace")))
        if outcome(*runs[-1]) != "saved":
            break
    return runs


def slurm_cycle(args, store: str, folder: Path, rng: random.Random, env: dict) -> list[tuple[int, str]]:
    """One cycle as a SLURM job: ``scontrol requeue`` at a random moment, then wait for the end."""
    overrides = {**TINY, "data.store": store, "output_dir": str(folder), "pretrain.max_steps": args.steps,
                 "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}", "tracking.register_name": "soak-encoder"}
    overrides.update(dict(kv.split("=", 1) for kv in args.set))
    cmd = [sys.executable, "-m", "pcl_hpc.launch", "pretrain", "--config", str(REPO / "configs" / "demo.yaml"),
           "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10", "--max-requeues", "20",
           "--no-wait", *[f"{k}={v}" for k, v in overrides.items()]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=False)
    match = re.search(r"job (\d+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not match:
        return [(proc.returncode or 1, proc.stdout + proc.stderr)]
    job = match.group(1)
    time.sleep(rng.uniform(args.stop_after[0], args.stop_after[1]))
    subprocess.run(["scontrol", "requeue", job], capture_output=True, check=False)
    deadline = time.time() + args.timeout
    state = ""
    while time.time() < deadline:
        state = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True,
                               text=True, check=False).stdout.strip().splitlines()
        state = state[-1] if state else ""
        if state and not state.startswith(("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING")):
            break
        time.sleep(3)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(folder.rglob("*.err")))
    return [(0 if state.startswith("COMPLETED") else 1, f"state {state}\n{logs}")]


def gather_worker(iterations: int, funcol: bool) -> None:
    """One rank of a ``--gather`` cycle (started by torchrun): the loss's collectives, checked each time."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from pcl_hpc import losses

    if funcol:  # the code before the fix: torch's functional all_gather, left in flight until used
        from torch.distributed import _functional_collectives

        class Funcol:
            apply = staticmethod(lambda t, group: _functional_collectives.all_gather_single_autograd(t, 0, group))

        losses._AllGather = Funcol
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for i in range(iterations):
        features = torch.full((8, 2, 32), float(rank + i % 7), requires_grad=True)
        columns = losses.gather_with_grad(features)
        keys = losses.gather_with_grad(torch.full((8,), rank / 10, dtype=torch.float64))
        flags = torch.zeros(2)
        dist.all_reduce(flags)
        (columns * 2).sum().backward()
        expected = sum(r + i % 7 for r in range(world)) * 8 * 2 * 32
        if float(columns.detach().sum()) != expected or float(keys.sum()) != sum(r / 10 for r in range(world)) * 8:
            raise SystemExit(f"rank {rank}: wrong gather at iteration {i}")
        if float(features.grad.sum()) != 2 * world * features.numel():
            raise SystemExit(f"rank {rank}: wrong gradient at iteration {i}")
    dist.destroy_process_group()


def gather_cycle(args, folder: Path, env: dict) -> list[tuple[int, str]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--gather-worker", str(args.iterations), *(["--funcol"] if args.funcol else [])]
    log = folder / "run0.log"
    with open(log, "w") as handle:
        try:
            code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = -999
    return [(code, log.read_text(errors="replace"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--steps", type=int, default=600, help="pretraining steps of each cycle")
    parser.add_argument("--stop-at", type=int, nargs=2, default=(50, 500), metavar=("MIN", "MAX"),
                        help="the first run is stopped (SIGTERM to every rank) at a random step in this range")
    parser.add_argument("--stop-after", type=float, nargs=2, default=(20.0, 60.0), metavar=("MIN", "MAX"),
                        help="--slurm: seconds after the start at which the job is requeued")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="an environment variable")
    parser.add_argument("--heap-check", action="store_true", help="glibc's checking allocator + MALLOC_PERTURB_")
    parser.add_argument("--slurm", action="store_true", help="each cycle as a SLURM job, requeued by scontrol")
    parser.add_argument("--gather", action="store_true", help="soak the loss's collectives alone (no model, no data)")
    parser.add_argument("--iterations", type=int, default=5000, help="--gather: gathers per cycle")
    parser.add_argument("--funcol", action="store_true", help="--gather: as before the fix (torch's functional all_gather)")
    parser.add_argument("--gather-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-runs", type=int, default=4, help="runs per cycle (the stopped one and its resumes)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/pcl_soak"))
    args = parser.parse_args(argv)
    if args.gather_worker is not None:
        gather_worker(args.gather_worker, args.funcol)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    store = "" if args.gather else demo_store(args.out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           **dict(kv.split("=", 1) for kv in args.env)}
    if args.heap_check:
        env.update(LD_PRELOAD=MALLOC_DEBUG, GLIBC_TUNABLES="glibc.malloc.check=3", MALLOC_PERTURB_="165")
    rng, crashes, signatures, runs_total = random.Random(args.seed), 0, collections.Counter(), 0
    started = time.time()
    for cycle in range(args.cycles):
        folder = args.out / f"cycle{cycle:04d}"
        subprocess.run(["rm", "-rf", str(folder)], check=False)
        folder.mkdir(parents=True)
        if args.gather:
            runs = gather_cycle(args, folder, env)
        else:
            runs = (slurm_cycle if args.slurm else local_cycle)(args, store, folder, rng, env)
        runs_total += len(runs)
        bad = [(code, text) for code, text in runs if outcome(code, text) == "crash"]
        finished = outcome(*runs[-1]) == "finished"
        if bad or not finished:
            crashes += 1
            code, text = (bad or runs)[-1]
            signatures[signature(text) if code != -999 else "timeout"] += 1
            print(f"cycle {cycle}: crash (exit {code}): {signature(text)}; logs in {folder}", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", str(folder)], check=False)
    print(json.dumps({
        "cycles": args.cycles, "runs": runs_total, "crashes": crashes,
        "crashes_per_100_cycles": round(100 * crashes / max(args.cycles, 1), 1),
        "signatures": dict(signatures),
        "mode": ("gather-funcol" if args.funcol else "gather") if args.gather else "slurm" if args.slurm else "torchrun",
        "heap_check": args.heap_check, "overrides": args.set, "env": args.env,
        **({"iterations": args.iterations} if args.gather else {"steps": args.steps}),
        "seconds": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

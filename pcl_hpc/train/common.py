"""Small pieces both training loops share: seeding, atomic saves, the local metrics log, resume and logging."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_atomic(obj, path: str | Path) -> Path:
    """torch.save to a temporary name, then rename: a kill mid-save never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def append_jsonl(path: str | Path, record: dict) -> None:
    """One JSON line per logged step: the run's metrics stay readable without any tracking server."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


class Throughput:
    """Items per second since the last call (for the views/s metric)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._n = 0

    def add(self, n: int) -> None:
        self._n += n

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self._n / max(now - self._t, 1e-9)
        self._t, self._n = now, 0
        return rate


def augment_in_workers(data, device: torch.device) -> bool:
    """Where batches are augmented (``data.augment_on``): ``auto`` picks the loader workers when
    training on a CPU with workers (its cores are the accelerator: each worker reads and augments
    a whole batch), else the training device (a GPU augments a batch in well under a millisecond)."""
    from pcl_hpc.errors import UserError

    if data.augment_on not in ("auto", "workers", "device"):
        raise UserError(f"data.augment_on={data.augment_on!r} is not one of auto, workers, device")
    if data.augment_on == "auto":
        return device.type == "cpu" and data.num_workers > 0
    return data.augment_on == "workers"


def resume_or_start(ckpt, cfg, generator: torch.Generator | None = None) -> tuple[dict, dict]:
    """Load `latest` (or checkpoint.path) into the strategy and this rank's RNGs; ({}, {}) for a fresh run."""
    folder = ckpt.find(cfg.checkpoint.path, cfg.checkpoint.resume)
    if folder is None:
        return {}, {}
    meta, rank_state = ckpt.load(folder, generator)
    if ckpt.env.is_main:
        print(f"resuming from {folder} (step {meta['step']})", flush=True)
    return meta, rank_state


def log_step(tracker, out: Path, step: int, metrics: dict, total: int, is_main: bool, echo: bool = True) -> None:
    """Rank 0: one JSON line, the tracker, and (when echo) a short progress line."""
    if not is_main:
        return
    append_jsonl(out / "metrics.jsonl", {"step": step, **metrics})
    tracker.log_metrics(metrics, step)
    if echo:
        rate = f" ({metrics['views_per_s']:.0f} views/s)" if "views_per_s" in metrics else ""
        val = f" val Dice {metrics['val_dice']:.3f}" if "val_dice" in metrics else ""
        print(f"step {step}/{total} loss {metrics['loss']:.4f} lr {metrics['lr']:.3g}{rate}{val}", flush=True)


def maybe_inject_fault(step: int, rank: int) -> None:
    """Fault injection for the resume tests: PCL_HPC_FAULT=<kill|signal>:<step>:<rank>.

    After step <step>'s checkpoint decision, rank <rank> either exits hard (kill: like a dead node)
    or sends itself SIGUSR1 (signal: like SLURM before preemption). Only in the first attempt of a
    torchrun group, so a restarted group runs through.
    """
    spec = os.environ.get("PCL_HPC_FAULT", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    kind, at, who = spec.split(":")
    if int(at) != step or int(who) != rank:
        return
    if kind == "kill":
        print(f"PCL_HPC_FAULT: rank {rank} exits hard after step {step}", flush=True)
        os._exit(13)
    import signal

    os.kill(os.getpid(), signal.SIGUSR1)


@contextlib.contextmanager
def run_outcome(tracker, guard):
    """Around a loop: the tracking run ends KILLED on a preemption, FAILED on an error; signal handlers are restored."""
    from pcl_hpc.engine.loop import Preempted

    try:
        yield
    except Preempted:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        guard.close()

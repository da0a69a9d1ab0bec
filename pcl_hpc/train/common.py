"""Small pieces both training loops share: seeding, atomic saves, a local metrics log, run tags."""

from __future__ import annotations

import json
import os
import subprocess
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


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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

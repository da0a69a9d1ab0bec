"""Checkpoints that survive preemption: atomic, a stable `latest` pointer, the last K kept, exact resume.

Layout under ``<stage folder>/checkpoints/`` (e.g. ``<output_dir>/pretrain/checkpoints/``)::

    step_000000100/
        meta.json            format, step, strategy, world size, architecture, train state, config
        train_state.pt       DDP: model, optimizer, schedule            (or deepspeed/: DeepSpeed's files)
        rank00000.pt ...     per rank: RNG states (torch, CUDA, numpy, random, augmentation), sampler
    latest                   text file naming the newest complete folder (replaced atomically)

A checkpoint is written into a hidden ``.step_N.tmp`` folder by every rank and renamed once all
ranks are done, then ``latest`` is replaced: a kill at any moment leaves the previous checkpoint
usable. Our own files load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcl_hpc import dist
from pcl_hpc.atomic import save_torch, write_text
from pcl_hpc.engine.strategy import Strategy
from pcl_hpc.errors import UserError

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"  # the requeue hook and the resume both look for <output_dir>/checkpoints/latest
META_FILE = "meta.json"
FORMAT_VERSION = 2  # 2: the train state is one object, meta["train"] (pcl_hpc.engine.harness.TrainState)


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; the message names it and what to do."""


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The folder `latest` points at, or None when the run has no checkpoint yet."""
    pointer = Path(output_dir) / CHECKPOINT_DIR / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    return pointer.parent / name if name else None


def architecture(module: torch.nn.Module) -> str:
    """A fingerprint of the network: class and the name, shape and dtype of every tensor in its state."""
    text = type(module).__name__ + ";" + ";".join(
        f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in module.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    """Every random state a step draws from, as tensors/ints (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
        "generator": generator.get_state() if generator is not None else None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and restores a run: strategy state (every rank), per-rank state, shared metadata (rank 0)."""

    def __init__(self, output_dir: str | Path, strategy: Strategy, keep: int = 3):
        self.root = Path(output_dir) / CHECKPOINT_DIR
        self.strategy = strategy
        self.env = strategy.env
        self.keep = max(1, int(keep))
        self._saved: set[int] = set()

    # -- save ---------------------------------------------------------------------------------

    def save(self, step: int, meta: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Called on every rank at the same step. A folder that already exists for `step` is kept."""
        name = f"step_{step:09d}"
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        if step in self._saved:  # e.g. the end-of-run save right after a periodic one
            return final
        self._saved.add(step)
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        self.strategy.save(tmp)
        save_torch(rank_state, tmp / f"rank{self.env.rank:05d}.pt")
        dist.barrier()
        if self.env.is_main:
            record = {"format": FORMAT_VERSION, "step": step, "strategy": self.strategy.name,
                      "world_size": self.env.world_size, "architecture": architecture(self.strategy.module), **meta}
            write_text(tmp / META_FILE, json.dumps(record, indent=1, default=str))
            if final.exists():  # left by an earlier attempt that did not get to move `latest` here
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text(self.root / LATEST_FILE, name + "\n")
            self._prune(keep=name)
        dist.barrier()
        return final

    def _prune(self, keep: str) -> None:
        folders = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in folders[:-self.keep]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    # -- resume -------------------------------------------------------------------------------

    def find(self, path: str = "", resume: bool = True) -> Path | None:
        """The checkpoint to resume from: `path` if given, else `latest` (None: start fresh)."""
        if path:
            folder = Path(path)
            if not (folder / META_FILE).is_file():
                raise CheckpointError(f"checkpoint.path={path}: no {META_FILE} there; point it at a "
                                      f"{self.root}/step_* folder, or leave it empty to resume from latest")
            return folder
        if not resume:
            self._set_aside()
            return None
        pointer = self.root / LATEST_FILE
        if not pointer.exists():
            return None
        folder = latest_checkpoint(self.root.parent)
        if folder is None or not (folder / META_FILE).is_file():
            raise CheckpointError(
                f"{pointer} points at {folder}, which is not a complete checkpoint; pass --no-resume "
                f"(checkpoint.resume=false) to start fresh, or checkpoint.path=<a step_* folder> to resume from another")
        return folder

    def _set_aside(self) -> None:
        """--no-resume: the old checkpoints move to checkpoints.old-<time>, so a fresh run never mixes with them."""
        if self.env.is_main and self.root.is_dir() and any(self.root.iterdir()):
            import time

            aside = self.root.with_name(f"{CHECKPOINT_DIR}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.root, aside)
            print(f"--no-resume: previous checkpoints moved to {aside}", flush=True)
        dist.barrier()

    def load(self, folder: Path, generator: torch.Generator | None = None) -> tuple[dict, dict]:
        """Restore the strategy state and this rank's RNGs; returns (meta, this rank's state).

        Every rank checks and loads; if any rank fails, every rank raises CheckpointError (none hangs),
        and nothing on disk is changed.
        """
        hint = (f"pass --no-resume (checkpoint.resume=false) to start fresh in {self.root.parent}, "
                f"another output_dir, or checkpoint.path=<a checkpoint written by this configuration>")
        error, meta, rank_state = None, {}, {}
        try:
            meta = json.loads((folder / META_FILE).read_text())
            mine = {"format": FORMAT_VERSION, "strategy": self.strategy.name, "world_size": self.env.world_size,
                    "architecture": architecture(self.strategy.module)}
            for key, value in mine.items():
                if meta.get(key) != value:
                    what = {"architecture": "another network (model.* differs)",
                            "format": f"another version of pcl-hpc (checkpoint format {meta.get(key)})"
                            }.get(key, f"{key}={meta.get(key)}")
                    raise CheckpointError(f"checkpoint {folder} was written by {what}, but this run has "
                                          f"{key}={value}; {hint}")
            self.strategy.load(folder)
            rank_file = folder / f"rank{self.env.rank:05d}.pt"
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
            set_rng_state(rank_state["rng"], generator)
        except CheckpointError as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 - truncated zip, missing keys, shape mismatch, ...
            error = f"checkpoint {folder} cannot be loaded ({type(err).__name__}: {' '.join(str(err).split())[:300]}); {hint}"
        failed = dist.any_rank(error is not None)
        if failed >= 0:
            raise CheckpointError(error or f"rank {failed} could not load checkpoint {folder}; {hint}")
        return meta, rank_state

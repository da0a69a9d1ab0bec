"""Checkpoints that survive preemption and corruption: atomic, a stable `latest` pointer, digests,
the last K kept, exact resume.

Layout under ``<stage folder>/checkpoints/`` (e.g. ``<output_dir>/pretrain/checkpoints/``)::

    step_000000100/
        meta.json            format, step, strategy, world size, architecture, train state, config,
                             files: size and sha256 of every other file of the folder
        train_state.pt       DDP: model, optimizer, schedule            (or deepspeed/: DeepSpeed's files)
        rank00000.pt ...     per rank: RNG states (torch, CUDA, numpy, random, augmentation), sampler
    latest                   text file naming the newest complete folder (replaced atomically)
    corrupt/step_N           checkpoints found corrupt on resume, moved aside (never deleted)

A checkpoint is written into a hidden ``.step_N.tmp`` folder by every rank; rank 0 records the digest
of every file in ``meta.json`` and renames the folder once all ranks are done, then ``latest`` is
replaced: a kill at any moment leaves the previous checkpoint usable. Our own files load with
``torch.load(weights_only=True)``.

Resume (:meth:`Checkpointer.resume`) takes the newest checkpoint that verifies and loads: ``latest``
first, then the ``step_*`` folders by step, newest first. Rank 0 checks the digests (a garbage or
truncated file, DeepSpeed's included, is caught before anything reads it) and tells every rank
which folder to load; a folder that fails to verify or to load on any rank is moved to
``corrupt/`` by rank 0 once every rank has loaded the chosen one, named in one line, and ``latest``
is pointed at the chosen one. Checkpoints of format 2 have no digests: they are only loaded.
When checkpoints exist but none is usable, the run stops with one line (nothing is moved).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

from pcl_hpc import dist
from pcl_hpc.atomic import DiskFull, save_torch, sha256_file, write_text
from pcl_hpc.engine.strategy import Strategy
from pcl_hpc.errors import UserError

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"  # the requeue hook and the resume both look for <output_dir>/checkpoints/latest
META_FILE = "meta.json"
CORRUPT_DIR = "corrupt"  # <checkpoints>/corrupt/step_N: set aside on resume, kept for a post-mortem
FORMAT_VERSION = 3  # 3: meta["files"] holds the size and sha256 of every other file of the folder
READABLE_FORMATS = (2, 3)  # 2: the train state is one object, meta["train"] (no digests: loaded unverified)


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; the message names it and what to do."""


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The folder `latest` points at, or None when the run has no checkpoint yet."""
    pointer = Path(output_dir) / CHECKPOINT_DIR / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    return pointer.parent / name if name else None


def step_of(folder: Path) -> int | None:
    """N of a ``step_N`` folder name, else None."""
    match = re.fullmatch(r"step_(\d+)", folder.name)
    return int(match.group(1)) if match else None



def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``folder`` but its meta.json."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() != META_FILE}


def verify(folder: Path) -> str | None:
    """None when ``folder`` is a complete checkpoint whose files match the digests in its meta.json
    (a checkpoint written before digests only needs a readable meta.json); else why not, in a few words."""
    meta_file = folder / META_FILE
    try:
        if not folder.is_dir():
            return "no such folder"
        if not meta_file.is_file():
            return f"no {META_FILE}"
        try:
            meta = json.loads(meta_file.read_text())
        except (UnicodeDecodeError, ValueError) as err:
            return f"{META_FILE} is not readable JSON: {_short(err)}"
        if not isinstance(meta, dict):
            return f"{META_FILE} is not a mapping"
        files = meta.get("files")
        if files is None:
            return None  # format 2: no digests
        if not isinstance(files, dict):
            return f"{META_FILE} has no valid file list"
        for name, want in sorted(files.items()):
            if not isinstance(want, dict):
                return f"{META_FILE} has no valid digest of {name}"
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != want.get("size"):
                return f"{name} has {size} bytes, {want.get('size')} when saved"
            if sha256_file(path) != want.get("sha256"):
                return f"{name} does not match its sha256"
    except OSError as err:
        return _short(err)
    return None


def _short(err: BaseException, limit: int = 300) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit]}"


def _attempt(action) -> BaseException | None:
    """Run ``action``; the exception it raised, or None."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 - reported to every rank by Checkpointer._agree
        return err
    return None


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (itself without a process group)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def _from_all(obj: Any) -> list[Any]:
    """Every rank's ``obj``, by rank, on every rank."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


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
        self.keep = max(2, int(keep))  # always an older checkpoint to fall back to
        self.resumed_from: str | None = None  # never pruned by this run
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

        def write() -> None:
            self.strategy.save(tmp)
            save_torch(rank_state, tmp / f"rank{self.env.rank:05d}.pt")

        def publish() -> None:
            record = {"format": FORMAT_VERSION, "step": step, "strategy": self.strategy.name,
                      "world_size": self.env.world_size, "architecture": architecture(self.strategy.module), **meta,
                      "files": file_digests(tmp)}
            write_text(tmp / META_FILE, json.dumps(record, indent=1, default=str))
            if final.exists():  # left by an earlier attempt that did not get to move `latest` here
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text(self.root / LATEST_FILE, name + "\n")

        self._agree(_attempt(write), step, tmp)  # every rank wrote its part, or every rank stops here
        self._agree(_attempt(publish) if self.env.is_main else None, step, tmp)
        if self.env.is_main:
            self._prune(keep=name)
        dist.barrier()
        return final

    def _agree(self, failed: BaseException | None, step: int, tmp: Path) -> None:
        """Raise on every rank when any rank could not write its part of checkpoint ``step`` (a full disk:
        :class:`DiskFull`, the failing rank's line); the partial folder is removed, ``latest`` still names
        the previous checkpoint, which stays intact."""
        said = _from_all(None if failed is None else (isinstance(failed, DiskFull), str(failed)))
        reports = [s for s in said if s is not None]
        if not reports:
            return
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._saved.discard(step)
        if failed is not None and not isinstance(failed, DiskFull):
            raise failed
        disk, message = reports[0]
        if disk:
            raise DiskFull(f"{message} (checkpoint step {step} not saved; the previous one is kept)")
        raise CheckpointError(f"checkpoint step {step} not saved: another rank failed ({message})")

    def _prune(self, keep: str) -> None:
        """Keep the newest ``self.keep`` step folders, the one just saved and the one this run resumed from."""
        folders = self._step_folders()
        for old in folders[:-self.keep]:
            if old.name not in (keep, self.resumed_from):
                shutil.rmtree(old, ignore_errors=True)

    # -- resume -------------------------------------------------------------------------------

    def find(self, path: str = "", resume: bool = True) -> Path | None:
        """The checkpoint `path` or `latest` names (None: start fresh); unverified, see :meth:`resume`."""
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
            raise CheckpointError(self._dangling(pointer, folder))
        return folder

    def _dangling(self, pointer: Path, folder: Path | None) -> str:
        return (f"{pointer} points at {folder}, which is not a complete checkpoint; pass --no-resume "
                f"(checkpoint.resume=false) to start fresh, or checkpoint.path=<a step_* folder> to resume from another")

    def _set_aside(self) -> None:
        """--no-resume: the old checkpoints move to checkpoints.old-<time>, so a fresh run never mixes with them."""
        if self.env.is_main and self.root.is_dir() and any(self.root.iterdir()):
            import time

            aside = self.root.with_name(f"{CHECKPOINT_DIR}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.root, aside)
            print(f"--no-resume: previous checkpoints moved to {aside}", flush=True)
        dist.barrier()

    def candidates(self) -> list[Path]:
        """The folders a resume tries, in order: the one `latest` names, then ``step_*`` by step, newest first."""
        order: list[Path] = []
        try:
            latest = latest_checkpoint(self.root.parent)
        except (OSError, UnicodeDecodeError):
            latest = None
        if latest is not None and latest.is_dir():
            order.append(latest)
        return order + [p for p in reversed(self._step_folders()) if p not in order]

    def _step_folders(self) -> list[Path]:
        """The ``step_N`` folders, oldest first."""
        return sorted((p for p in self.root.glob("step_*") if p.is_dir() and step_of(p) is not None), key=step_of)

    def resume(self, path: str = "", resume: bool = True,
               generator: torch.Generator | None = None) -> tuple[Path, dict, dict] | None:
        """Load the checkpoint to resume from on every rank: (folder, meta, this rank's state), or None (start fresh).

        ``path`` (checkpoint.path): that folder, verified, or CheckpointError. ``resume=False``: the old
        checkpoints are set aside. Else the newest checkpoint that verifies and loads (see the module
        docstring): rank 0 verifies and decides, every rank loads the same folder; the corrupt ones are
        moved to ``corrupt/`` by rank 0 after every rank has loaded, in one printed line.
        Incompatible checkpoints (another network, strategy, world size) fail as :meth:`load` does.
        """
        if path or not resume:
            folder = self.find(path, resume)
            if folder is None:
                return None
            reason = _from_rank0(verify(folder) if self.env.is_main else None)
            if reason:
                raise CheckpointError(f"checkpoint.path={path}: {folder} is corrupt ({reason}); give another "
                                      f"step_* folder, or leave checkpoint.path empty to resume from the newest usable one")
            return (folder, *self.load(folder, generator))

        bad: list[tuple[Path, str]] = []  # rank 0: (folder, why), newest first
        tried: set[Path] = set()
        while True:
            choice = None
            if self.env.is_main:
                for folder in self.candidates():
                    if folder in tried:
                        continue
                    tried.add(folder)
                    reason = verify(folder)
                    if reason is None:
                        choice = folder
                        break
                    bad.append((folder, reason))
            choice = _from_rank0(choice)
            if choice is None:
                break
            tried.add(choice)
            meta, rank_state, errors = self._try_load(choice, generator)
            if not errors:
                self.resumed_from = choice.name
                self._move_aside(bad, choice)
                return choice, meta, rank_state
            incompatible = [message for kind, message, _ in errors if kind == "incompatible"]
            if incompatible:  # another configuration's checkpoint: the user decides, nothing is moved
                raise CheckpointError(incompatible[0])
            bad.append((choice, errors[0][2]))  # verified but cannot be loaded (or no digests): try the next one
        message = _from_rank0(self._nothing_usable(bad) if self.env.is_main else None)
        if message:
            raise CheckpointError(message)
        return None

    def _nothing_usable(self, bad: list[tuple[Path, str]]) -> str | None:
        """Rank 0, no checkpoint usable: None when there never was one (start fresh), else the error line."""
        pointer = self.root / LATEST_FILE
        if not bad:
            if not pointer.exists():
                return None
            try:
                folder = latest_checkpoint(self.root.parent)
            except (OSError, UnicodeDecodeError):
                folder = None
            return self._dangling(pointer, folder)
        listed = ", ".join(f"{folder.name} ({reason})" for folder, reason in bad)
        return (f"no usable checkpoint in {self.root}: {listed}; pass --no-resume (checkpoint.resume=false) to start "
                f"fresh (they are moved to {CHECKPOINT_DIR}.old-<time>), or checkpoint.path=<a step_* folder> to resume from another")

    def _move_aside(self, bad: list[tuple[Path, str]], chosen: Path) -> None:
        """Rank 0, after every rank has loaded `chosen`: move `bad` to corrupt/, point `latest` at `chosen`
        (atomically), and say so in one line."""
        if self.env.is_main:
            parts = []
            for folder, reason in bad:
                target = self.root / CORRUPT_DIR / folder.name
                n = 0
                while target.exists():  # set aside before: keep both
                    n += 1
                    target = target.with_name(f"{folder.name}.{n}")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(folder, target)
                parts.append(f"checkpoint {folder} is corrupt ({reason}); moved to {target}")
            pointer = self.root / LATEST_FILE
            try:
                named = latest_checkpoint(self.root.parent)
            except (OSError, UnicodeDecodeError):
                named, parts = None, [*parts, f"{pointer} is not readable"]
            if named is not None and named != chosen and not any(folder == named for folder, _ in bad):
                parts.append(f"{pointer} named {named}, which is not a checkpoint")
            if named != chosen and chosen.parent == self.root:
                write_text(pointer, chosen.name + "\n")
            if parts:
                print("; ".join(parts) + f"; resuming from {chosen}", flush=True)
        dist.barrier()

    def load(self, folder: Path, generator: torch.Generator | None = None) -> tuple[dict, dict]:
        """Restore the strategy state and this rank's RNGs; returns (meta, this rank's state).

        Every rank checks and loads; if any rank fails, every rank raises CheckpointError (none hangs),
        and nothing on disk is changed.
        """
        meta, rank_state, errors = self._try_load(folder, generator)
        if errors:
            raise CheckpointError(errors[0][1])  # the lowest failing rank's message, on every rank
        return meta, rank_state

    def _try_load(self, folder: Path, generator: torch.Generator | None) -> tuple[dict, dict, list[tuple[str, str, str]]]:
        """Load on every rank; (meta, this rank's state, errors). ``errors``, the same on every rank, has one
        (kind, message, reason) per rank that failed, by rank: kind "incompatible" (written by another
        configuration) or "corrupt" (cannot be read); reason, a few words for the line naming a corrupt one."""
        hint = (f"pass --no-resume (checkpoint.resume=false) to start fresh in {self.root.parent}, "
                f"another output_dir, or checkpoint.path=<a checkpoint written by this configuration>")
        error, meta, rank_state = None, {}, {}
        try:
            meta = json.loads((folder / META_FILE).read_text())
            mine = {"format": FORMAT_VERSION, "strategy": self.strategy.name, "world_size": self.env.world_size,
                    "architecture": architecture(self.strategy.module)}
            for key, value in mine.items():
                if meta.get(key) != value and not (key == "format" and meta.get(key) in READABLE_FORMATS):
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
            error = ("incompatible", str(err), str(err))
        except Exception as err:  # noqa: BLE001 - truncated zip, missing keys, shape mismatch, ...
            error = ("corrupt", f"checkpoint {folder} cannot be loaded ({_short(err)}); {hint}", _short(err))
        errors = []
        for rank, e in enumerate(_from_all(error)):
            if e is not None:
                kind, message, reason = e
                errors.append((kind, message, reason if rank == 0 else f"on rank {rank}: {reason}"))
        return meta, rank_state, errors

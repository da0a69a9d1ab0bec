"""The one atomic-write helper: write under a temporary name beside the target, then rename.

A kill at any moment leaves either the old file or the new one, never half of one. Every writer
of results, checkpoints, configs, pointers and sidecars goes through :func:`atomic_path`.

A full disk is one line (:class:`DiskFull`: the path and the space left), whoever raised it (``OSError``
ENOSPC/EDQUOT, or torch's and zarr's own wrappers of it); the temporary file is removed, so the file
under the final name is still the previous good one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from pcl_hpc.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL = 1 << 20  # a failed write with less than this left on the device is taken for a full disk


class DiskFull(UserError):
    """No space left where a file was being written; what was there before is kept."""


def free_bytes(path: str | Path) -> int | None:
    """Free space on the device holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def is_disk_full(err: BaseException, path: str | Path) -> bool:
    """``err`` (or what it wraps) says no space is left, or a write failed on a device that is (nearly) full."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(err, (OSError, RuntimeError)):
        return False
    free = free_bytes(path)
    return free is not None and free < NEARLY_FULL


def disk_full(path: str | Path) -> DiskFull:
    free = free_bytes(path)
    left = f"{free / 1e6:.1f} MB free" if free is not None else "free space unknown"
    return DiskFull(f"no space left on the device writing {path} ({left}); free some space or point output_dir at "
                    "a bigger disk, then run the same command again: the files written before are kept")


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` (chmod ``mode`` first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except Exception as err:
        if not isinstance(err, DiskFull) and is_disk_full(err, path.parent):
            raise disk_full(path) from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_torch(obj, path: str | Path) -> Path:
    """``torch.save`` atomically (tensors and plain containers: loadable with ``weights_only=True``)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)

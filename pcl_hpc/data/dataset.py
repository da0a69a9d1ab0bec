"""Slices out of the Zarr store, and a sampler that shards them across ranks and resumes mid-epoch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset, Sampler

from pcl_hpc.data.store import read_manifest
from pcl_hpc.errors import UserError


def center_fit(array: np.ndarray, patch: int) -> np.ndarray:
    """Centre-crop and/or zero-pad the last two axes to ``patch x patch``."""
    h, w = array.shape[-2:]
    out = np.zeros(array.shape[:-2] + (patch, patch), dtype=array.dtype)
    # Source and destination windows along one axis: crop when too big, pad when too small.
    def window(n: int) -> tuple[slice, slice]:
        if n >= patch:
            start = (n - patch) // 2
            return slice(start, start + patch), slice(0, patch)
        start = (patch - n) // 2
        return slice(0, n), slice(start, start + n)

    (sy, dy), (sx, dx) = window(h), window(w)
    out[..., dy, dx] = array[..., sy, sx]
    return out


_DTYPES = {"float32": "<f4", "uint8": "u1"}


class _ChunkReader:
    """Reads one slice of a store array straight from its chunk file: ~3x less CPU than zarr's
    (async) read path, and the loader workers are what limits the pipeline on few cores.

    Only for the layout ``store.write_volume`` writes (local folder, Zarr v3, one ``(1, H, W)``
    chunk per slice, default ``c/z/0/0`` keys, little-endian bytes + Blosc); ``make`` returns
    None for anything else, and the caller reads through zarr. A chunk file that does not exist
    is an all-zero slice (zarr does not write chunks equal to the fill value 0).
    """

    def __init__(self, folder: Path, shape: tuple[int, int], dtype: str):
        from numcodecs import blosc

        self.folder, self.shape, self.dtype, self._decompress = folder, shape, dtype, blosc.decompress

    @classmethod
    def make(cls, folder: Path, array: Any) -> "_ChunkReader | None":
        try:
            meta = json.loads((folder / "zarr.json").read_text())
            shape = meta["shape"]
            codecs = [c["name"] for c in meta["codecs"]]
            ok = (
                meta.get("zarr_format") == 3 and meta.get("node_type") == "array" and len(shape) == 3
                and meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, shape[1], shape[2]]
                and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                and codecs == ["bytes", "blosc"]
                and meta["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                and meta["data_type"] in _DTYPES and meta.get("fill_value") in (0, 0.0)
                and not meta.get("storage_transformers")
            )
            if not ok:
                return None
            reader = cls(folder, (shape[1], shape[2]), _DTYPES[meta["data_type"]])
            if shape[0] and not np.array_equal(reader(0), np.asarray(array[0])):  # belt and braces
                return None
            return reader
        except (OSError, ValueError, KeyError, TypeError, ImportError):
            return None

    def __call__(self, z: int) -> np.ndarray:
        try:
            data = (self.folder / "c" / str(z) / "0" / "0").read_bytes()
        except FileNotFoundError:
            return np.zeros(self.shape, dtype=self.dtype)
        return np.frombuffer(self._decompress(data), dtype=self.dtype).reshape(self.shape)


class SliceDataset(Dataset):
    """Every axial slice of the chosen volumes, as ``patch x patch`` tensors with their positions.

    ``volume_ids=None`` takes every volume in the store (every labeled one when ``with_labels``).
    The store is opened on first use in each process, so the dataset pickles cleanly and each
    DataLoader worker gets its own handles.
    """

    def __init__(
        self,
        store: str,
        volume_ids: list[str] | None = None,
        patch: int = 64,
        with_labels: bool = False,
    ):
        manifest = read_manifest(store)
        entries = {v["id"]: v for v in manifest["volumes"]}
        if volume_ids is None:
            volume_ids = [v for v, e in entries.items() if e["labeled"] or not with_labels]
        volume_ids = list(volume_ids)
        for vid in volume_ids:
            if vid not in entries:
                shown = ", ".join(list(entries)[:8]) + (" ..." if len(entries) > 8 else "")
                raise UserError(f"volume {vid!r} is not in store {store}; volumes there: {shown}")
            if with_labels and not entries[vid]["labeled"]:
                raise UserError(
                    f"volume {vid!r} in store {store} has no label; drop it from the labeled "
                    "(train/val/test) volume lists or add its label and preprocess again"
                )
        if not volume_ids:
            raise UserError(f"no volumes selected from store {store}; check the volume lists in the config")
        if patch < 1:
            raise UserError(f"patch must be a positive number of pixels, got {patch}")

        self.store = str(store)
        self.volume_ids = volume_ids
        self.patch = int(patch)
        self.with_labels = with_labels
        depths = np.array([entries[v]["shape"][0] for v in volume_ids], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(depths)])  # slice i is in volume searchsorted(i)
        self._handles: dict[int, tuple[Callable[[int], np.ndarray], Any, list[float], list[int]]] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None  # open handles never cross a process boundary
        return state

    def _volume(self, v: int) -> tuple[Callable[[int], np.ndarray], Any, list[float], list[int]]:
        if self._pid != os.getpid():  # a forked worker must not reuse the parent's handles
            self._handles, self._pid = {}, os.getpid()
        if v not in self._handles:
            group = zarr.open_group(self.store, mode="r")[f"volumes/{self.volume_ids[v]}"]
            attrs = group.attrs
            folder = Path(self.store) / "volumes" / self.volume_ids[v]
            image = group["image"]
            image = _ChunkReader.make(folder / "image", image) or image.__getitem__
            label = None
            if self.with_labels:
                label = group["label"]
                label = _ChunkReader.make(folder / "label", label) or label.__getitem__
            self._handles[v] = (image, label, list(attrs["positions"]), list(attrs["partitions"]))
        return self._handles[v]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"slice index {index} out of range for {len(self)} slices")
        v = int(np.searchsorted(self._starts, index, side="right") - 1)
        z = int(index - self._starts[v])
        image, label, positions, partitions = self._volume(v)
        item = {
            "image": torch.from_numpy(center_fit(np.asarray(image(z), dtype=np.float32), self.patch)[None]),
            "position": torch.tensor(positions[z], dtype=torch.float32),
            "partition": torch.tensor(partitions[z], dtype=torch.int64),
            "volume": torch.tensor(v, dtype=torch.int64),
            "slice": torch.tensor(z, dtype=torch.int64),
        }
        if self.with_labels:
            item["label"] = torch.from_numpy(center_fit(np.asarray(label(z)), self.patch).astype(np.int64))
        return item


class ResumableDistributedSampler(Sampler[int]):
    """Disjoint per-rank shares of a seeded per-epoch permutation that can resume mid-epoch.

    Every rank draws the same permutation from ``(seed, epoch)`` and takes every
    ``num_replicas``-th index from its ``rank``. ``set_epoch(epoch, start)`` skips the first
    ``start`` indices of this rank's share: after a restart at step ``s`` with batch size ``b``,
    ``set_epoch(epoch, s * b)`` yields exactly the indices the interrupted run had not reached.
    ``drop_last=False`` pads the permutation by wrapping around, so all ranks get equal counts.
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.dataset_len = int(dataset_len)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def _per_rank(self) -> int:
        if self.drop_last:
            return self.dataset_len // self.num_replicas
        return -(-self.dataset_len // self.num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self._per_rank():
            raise ValueError(f"start {start} is not in [0, {self._per_rank()}] for this rank's share")
        self.epoch, self.start = int(epoch), int(start)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self._per_rank() * self.num_replicas
        if total > len(order) and order:  # drop_last=False: wrap around to equalise ranks
            order = (order * (total // len(order) + 1))[:total]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self._per_rank() - self.start

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Where this rank is; ``consumed`` (indices of this epoch already used, e.g. steps x batch
        size) overrides the ``start`` given to ``set_epoch``."""
        return {
            "epoch": self.epoch,
            "start": self.start if consumed is None else int(consumed),
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "dataset_len": self.dataset_len,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_replicas", "dataset_len", "seed"):
            if key in state and int(state[key]) != getattr(self, key):
                raise UserError(
                    f"cannot resume the sampler: checkpoint has {key}={state[key]} but this run has "
                    f"{getattr(self, key)}; resume with the same number of ranks, data and seed"
                )
        self.set_epoch(int(state["epoch"]), int(state.get("start", 0)))

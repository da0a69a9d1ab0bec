"""Slices out of the Zarr store, read a whole batch per call, and a sampler that shards them
across ranks and resumes mid-epoch (``slice_loader`` puts the pieces together)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from pcl_hpc.data.store import read_manifest
from pcl_hpc.errors import UserError


def _window(n: int, patch: int) -> tuple[slice, slice]:
    """Source and destination windows along one axis: centre-crop when too big, pad when too small."""
    if n >= patch:
        start = (n - patch) // 2
        return slice(start, start + patch), slice(0, patch)
    start = (patch - n) // 2
    return slice(0, n), slice(start, start + n)


def fit_into(out: np.ndarray, array: np.ndarray) -> None:
    """Write ``array`` centre-cropped / zero-padded into ``out`` (last two axes), in place."""
    (sy, dy), (sx, dx) = _window(array.shape[-2], out.shape[-2]), _window(array.shape[-1], out.shape[-1])
    if array.shape[-2] < out.shape[-2] or array.shape[-1] < out.shape[-1]:
        out[...] = 0  # padding: only the window gets image data
    out[..., dy, dx] = array[..., sy, sx]


def center_fit(array: np.ndarray, patch: int) -> np.ndarray:
    """Centre-crop and/or zero-pad the last two axes to ``patch x patch``."""
    out = np.empty(array.shape[:-2] + (patch, patch), dtype=array.dtype)
    fit_into(out, array)
    return out


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker it lives in shared memory from the
    start (as torch's own collate does), so handing the batch to the trainer copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    try:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    except AttributeError:  # a torch without the (private) call: shared all the same, one copy more
        return torch.empty(shape, dtype=dtype).share_memory_()
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def collate_slices(batch: Any) -> Any:
    """``collate_fn`` for ``SliceDataset``: its ``__getitems__`` already returns the whole batch."""
    return batch if isinstance(batch, dict) else default_collate(batch)


@dataclass(frozen=True)
class BatchRequest:
    """One batch's slice indices and where it sits in the run: ``epoch`` and its ``number`` in
    that epoch on this rank (what seeds its augmentation, see ``augment.batch_generator``)."""

    indices: list[int]
    epoch: int
    number: int

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class KeyedBatchSampler(Sampler[BatchRequest]):
    """Groups a ``ResumableDistributedSampler`` into ``BatchRequest``s; after a mid-epoch resume
    (``set_epoch(epoch, start)``) the numbering goes on from ``start // batch_size``."""

    def __init__(self, sampler: "ResumableDistributedSampler", batch_size: int, drop_last: bool):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler, self.batch_size, self.drop_last = sampler, int(batch_size), drop_last

    def __iter__(self) -> Iterator[BatchRequest]:
        number, batch = self.sampler.start // self.batch_size, []
        for index in self.sampler:
            batch.append(int(index))
            if len(batch) == self.batch_size:
                yield BatchRequest(batch, self.sampler.epoch, number)
                number, batch = number + 1, []
        if batch and not self.drop_last:
            yield BatchRequest(batch, self.sampler.epoch, number)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def slice_loader(dataset: "SliceDataset", batch_size: int, sampler: "ResumableDistributedSampler",
                 num_workers: int, drop_last: bool, persistent: bool = False) -> DataLoader:
    """The DataLoader every stage uses: one ``__getitems__`` call per batch (reading, and the
    dataset's ``transform`` when it has one), pinned memory when a GPU takes the batches."""
    return DataLoader(dataset, batch_sampler=KeyedBatchSampler(sampler, batch_size, drop_last),
                      num_workers=num_workers, persistent_workers=persistent and num_workers > 0,
                      collate_fn=collate_slices, pin_memory=torch.cuda.is_available())


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
            if not (self.folder / "zarr.json").is_file():  # the array itself is gone, not an all-zero slice
                raise
            return np.zeros(self.shape, dtype=self.dtype)
        return np.frombuffer(self._decompress(data), dtype=self.dtype).reshape(self.shape)


class SliceDataset(Dataset):
    """Every axial slice of the chosen volumes, as ``patch x patch`` (or ``height x width``) tensors with their positions.

    ``volume_ids=None`` takes every volume in the store (every labeled one when ``with_labels``).
    The store is opened on first use in each process, so the dataset pickles cleanly and each
    DataLoader worker gets its own handles. Volumes with a node-local copy (``use_local``, see
    ``pcl_hpc.data.staging``) are read from it; one whose copy is gone or unreadable is read from the
    store again, with one line saying so.
    """

    def __init__(
        self,
        store: str,
        volume_ids: list[str] | None = None,
        patch: int | tuple[int, int] = 64,
        with_labels: bool = False,
        transform: Callable[..., dict] | None = None,
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
        patch = (patch, patch) if isinstance(patch, int) else tuple(int(p) for p in patch)
        if len(patch) != 2 or min(patch) < 1:
            raise UserError(f"patch must be a positive number of pixels (or two: height, width), got {patch}")

        self.store = str(store)
        self.volume_ids = volume_ids
        self.patch = patch  # (height, width)
        self.with_labels = with_labels
        self.transform = transform  # run on each keyed batch, in the loader worker (e.g. BatchAugment)
        depths = np.array([entries[v]["shape"][0] for v in volume_ids], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(depths)])  # slice i is in volume searchsorted(i)
        self._handles: dict[int, tuple[Callable[[int], np.ndarray], Any, list[float], list[int]]] = {}
        self._pid: int | None = None
        self.local: dict[str, str] = {}  # volume id -> its node-local copy (a volume folder), read before the store

    @property
    def depths(self) -> list[int]:
        """Slices of each volume, in ``volume_ids`` order."""
        return np.diff(self._starts).tolist()

    @property
    def starts(self) -> np.ndarray:
        """The dataset index of each volume's first slice, and the total at the end."""
        return self._starts

    def use_local(self, folders: dict[str, Path]) -> None:
        """Read these volumes from their node-local copies (volume folders laid out as in the store)."""
        self.local, self._handles = {vid: str(f) for vid, f in folders.items()}, {}

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
            local = self.local.get(self.volume_ids[v])
            if local is not None:
                try:
                    self._handles[v] = self._open(Path(local))
                except Exception as err:  # noqa: BLE001 - any unreadable copy: the store still has the volume
                    self._unstage(v, err)
            if v not in self._handles:
                self._handles[v] = self._open(Path(self.store) / "volumes" / self.volume_ids[v])
        return self._handles[v]

    def _open(self, folder: Path) -> tuple[Callable[[int], np.ndarray], Any, list[float], list[int]]:
        group = zarr.open_group(str(folder), mode="r")
        image = group["image"]
        image = _ChunkReader.make(folder / "image", image) or image.__getitem__
        label = None
        if self.with_labels:
            label = group["label"]
            label = _ChunkReader.make(folder / "label", label) or label.__getitem__
        return image, label, list(group.attrs["positions"]), list(group.attrs["partitions"])

    def _unstage(self, v: int, err: Exception) -> None:
        """Drop volume ``v``'s node-local copy (gone, or unreadable) in this process: the store is read again."""
        vid = self.volume_ids[v]
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        print(f"warning: the node-local copy of volume {vid} ({self.local.pop(vid)}) is missing or unreadable "
              f"({reason}); reading it from the shared store {self.store}", flush=True)
        self._handles.pop(v, None)

    def _read(self, v: int, z: int) -> tuple[np.ndarray, np.ndarray | None, float, int]:
        """Slice ``z`` of volume ``v`` (image, label or None, position, partition); a node-local copy that fails
        mid-run is dropped and the slice read from the store."""
        for _ in range(2):
            read_image, read_label, positions, partitions = self._volume(v)
            try:
                return read_image(z), (read_label(z) if read_label is not None else None), positions[z], partitions[z]
            except Exception as err:
                if self.volume_ids[v] not in self.local:
                    raise
                self._unstage(v, err)
        raise AssertionError("unreachable: the second try reads the store")

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"slice index {index} out of range for {len(self)} slices")
        v = int(np.searchsorted(self._starts, index, side="right") - 1)
        return v, int(index - self._starts[v])

    def __getitems__(self, request: "BatchRequest | list[int]") -> dict[str, torch.Tensor]:
        """A whole batch in one call (DataLoader passes the batch sampler's request): each key is
        one array filled in place, with no per-slice tensors and no collate copy; labels travel as
        uint8 (8x less than int64 through the worker's shared memory). A ``BatchRequest`` adds
        ``key`` = (epoch, number) and runs ``transform``."""
        indices = list(request)
        n, p = len(indices), self.patch
        image = _batch_tensor((n, 1, *p), torch.float32)
        label = _batch_tensor((n, *p), torch.uint8) if self.with_labels else None
        meta = np.empty((4, n), dtype=np.float64)  # position, partition, volume, slice
        image_np, label_np = image.numpy(), (label.numpy() if label is not None else None)
        for i, index in enumerate(indices):
            v, z = self._locate(int(index))
            image_z, label_z, position, partition = self._read(v, z)
            fit_into(image_np[i, 0], image_z)
            if label_np is not None:
                fit_into(label_np[i], label_z)
            meta[:, i] = position, partition, v, z
        batch = {
            "image": image,
            "position": torch.from_numpy(meta[0].astype(np.float32)),
            "partition": torch.from_numpy(meta[1].astype(np.int64)),
            "volume": torch.from_numpy(meta[2].astype(np.int64)),
            "slice": torch.from_numpy(meta[3].astype(np.int64)),
        }
        if label is not None:
            batch["label"] = label
        if isinstance(request, BatchRequest):
            batch["key"] = torch.tensor([request.epoch, request.number], dtype=torch.int64)
            if self.transform is not None:
                batch = self.transform(batch, empty=_batch_tensor)
        return batch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}


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
        mine = self.state_dict().get("shards")
        if state.get("shards") != mine:
            raise UserError(
                f"cannot resume the sampler: the checkpoint's volume shards are {state.get('shards') or 'none'} but this "
                f"run's are {mine or 'none'} (data.stage shards the store by node); resume with the same data.stage "
                f"setting and number of nodes")
        for key in ("num_replicas", "dataset_len", "seed"):
            if key in state and int(state[key]) != getattr(self, key):
                raise UserError(
                    f"cannot resume the sampler: checkpoint has {key}={state[key]} but this run has "
                    f"{getattr(self, key)}; resume with the same number of ranks, data and seed"
                )
        self.set_epoch(int(state["epoch"]), int(state.get("start", 0)))

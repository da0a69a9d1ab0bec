"""Data pipeline benchmark: prints one JSON line (timings are benchmarks, never test assertions).

In one run, on synthetic volumes written to a temporary folder:
- preprocess_mb_s_per_worker: source voxel MB converted per second with --workers 1
- zarr_slice_reads_s_per_worker: random single-slice reads (SliceDataset, one process)
- compressors: per Blosc codec (bitshuffle) the compression ratio, write MB/s and slice reads/s
- loader_views_s_<P>: augmented views/s (2 per slice) at patch P = 256 and 352 from the loader as
  CPU training runs it: slice_loader with 2 workers, each reading and augmenting whole batches
- loader_views_s_<P>_augment_in_main: the same loader reading only, this process augmenting
  (data.augment_on=device, with the CPU as the device)
- baseline_views_s_<P>: the original PCL code's way: one .npy per slice, per-sample CPU
  augmentation (mirror; with p=0.67 elastic alpha 100-350 / sigma 14-17, rotation 0-2pi,
  scale 0.7-1.3, order-3 spline interpolation as batchgenerators' SpatialTransform), 2 workers
- speedup_<P>: loader / baseline
- kornia_aug_views_s_256 / ours_aug_views_s_256: augmentation alone (no loading), for the choice

    python tools/bench_data.py [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _volumes(raw: Path, n: int, size: int, depth: int) -> None:
    import nibabel as nib

    (raw / "imagesTs").mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        rng = np.random.default_rng(i)
        base = 600 * np.exp(-(((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 4) ** 2)))
        vol = np.stack([base * (1 + 0.1 * z / depth) for z in range(depth)], axis=-1)
        vol = (vol + rng.normal(0, 20, vol.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 3.0, 1.0])), str(raw / "imagesTs" / f"v{i:02d}.nii"))


class NpySlices:
    """The original code's dataset: one .npy per slice, per-sample augmentation on the CPU."""

    def __init__(self, files: list[str], patch: int):
        self.files, self.patch = files, patch

    def __len__(self) -> int:
        return len(self.files)

    def _augment(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from scipy.ndimage import gaussian_filter, map_coordinates

        for axis in (0, 1):  # MirrorTransform((0, 1))
            if rng.random() < 0.5:
                img = img[::-1] if axis == 0 else img[:, ::-1]
        p = self.patch
        if rng.random() >= 0.67:  # RndTransform(..., prob=0.67, alternative=RandomCrop)
            return np.ascontiguousarray(img)
        coords = np.mgrid[:p, :p].astype(np.float32) - (p - 1) / 2
        alpha, sigma = rng.uniform(100, 350), rng.uniform(14, 17)
        coords = coords + np.stack([gaussian_filter(rng.random((p, p)) * 2 - 1, sigma, mode="constant") * alpha
                                    for _ in range(2)])
        a = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        coords = np.einsum("ij,jyx->iyx", rot, coords) * rng.uniform(0.7, 1.3)
        coords += (np.array(img.shape)[:, None, None] - 1) / 2
        return map_coordinates(img, coords, order=3, mode="constant", cval=0.0).astype(np.float32)

    def __getitem__(self, i: int):
        import torch

        img = np.load(self.files[i]).astype(np.float32)
        rng = np.random.default_rng(i + int(time.time_ns() % 1000003))
        return torch.from_numpy(np.stack([self._augment(img, rng), self._augment(img, rng)])[:, None])


def _loop(loader, seconds: float, step) -> float:
    """Views per second over at least ``seconds`` (after one warm-up batch)."""
    it = iter(loader)
    step(next(it))
    views, start = 0, time.perf_counter()
    while True:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        views += step(batch)
        if time.perf_counter() - start >= seconds:
            return views / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="time per throughput figure")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch
    import zarr
    from torch.utils.data import DataLoader

    from pcl_hpc.config import DataConfig
    from pcl_hpc.data import store as zstore
    from pcl_hpc.data.augment import BatchAugment, augment_views
    from pcl_hpc.data.dataset import ResumableDistributedSampler, SliceDataset, center_fit, slice_loader
    from pcl_hpc.data.preprocess import preprocess

    # One torch thread per process (OMP_NUM_THREADS=1 unless set), as in training: DataLoader
    # workers always run one thread, and on a 2-core machine 2 workers already fill the cores.
    result: dict = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _volumes(tmp / "raw", n=6, size=352, depth=16)
        t0 = time.perf_counter()
        summary = preprocess(DataConfig(raw_dir=str(tmp / "raw"), store=str(tmp / "s.zarr")), workers=1, progress=False)
        assert summary.ok, summary.format()
        result["preprocess_mb_s_per_worker"] = round(summary.source_bytes / 1e6 / (time.perf_counter() - t0), 1)
        store = str(tmp / "s.zarr")
        vids = zstore.volume_ids(store)

        ds = SliceDataset(store, vids, patch=352)
        rng = np.random.default_rng(0)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds / 2:
            ds[int(rng.integers(len(ds)))]
            n += 1
        result["zarr_slice_reads_s_per_worker"] = round(n / (time.perf_counter() - t0), 1)

        image = zstore.load_volume(store, vids[0])[0]
        comp = {}
        for name in zstore.COMPRESSORS:
            path = tmp / f"c-{name}.zarr"
            t0 = time.perf_counter()
            for k in range(3):
                zstore.write_volume(path, f"v{k}", image, None, {}, compressor=name)
            write_s = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in (path / "volumes" / "v0" / "image" / "c").rglob("*") if f.is_file())
            arr = zarr.open_group(str(path), mode="r")["volumes/v0/image"]
            t0, reads = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.5:
                arr[reads % image.shape[0]]
                reads += 1
            comp[name] = {"ratio": round(image.nbytes / size, 2), "write_mb_s": round(3 * image.nbytes / 1e6 / write_s, 1),
                          "slice_reads_s": round(reads / (time.perf_counter() - t0), 1)}
        result["compressors"] = comp

        # one .npy per slice for the baseline
        npy = tmp / "npy"
        npy.mkdir()
        files = []
        for vid in vids:
            for z, sl in enumerate(zstore.load_volume(store, vid)[0]):
                files.append(str(npy / f"{vid}_{z:03d}.npy"))
                np.save(files[-1], sl)

        gen = torch.Generator().manual_seed(0)
        for patch in (256, 352):
            # As training on a CPU runs it (data.augment_on=auto): each worker reads and augments whole batches.
            dataset = SliceDataset(store, vids, patch=patch, transform=BatchAugment(seed=0, views=2))
            loader = slice_loader(dataset, args.batch, ResumableDistributedSampler(len(dataset)), num_workers=2,
                                  drop_last=True, persistent=True)
            result[f"loader_views_s_{patch}"] = round(_loop(loader, args.seconds, lambda b: b["views"].shape[0] * 2), 1)
            del loader
            # data.augment_on=device with the device a CPU: workers read, this process augments.
            dataset = SliceDataset(store, vids, patch=patch)
            loader = slice_loader(dataset, args.batch, ResumableDistributedSampler(len(dataset)), num_workers=2,
                                  drop_last=True, persistent=True)

            def in_main(batch):
                return augment_views(batch["image"], views=2, generator=gen).shape[0] * 2

            result[f"loader_views_s_{patch}_augment_in_main"] = round(_loop(loader, args.seconds, in_main), 1)
            del loader
            cropped = []
            for f in files:  # the original stored slices already at training size
                out = f.replace(".npy", f"_{patch}.npy")
                np.save(out, center_fit(np.load(f), patch))
                cropped.append(out)
            base = DataLoader(NpySlices(cropped, patch), batch_size=args.batch, shuffle=True, num_workers=2,
                              persistent_workers=True, drop_last=True)
            result[f"baseline_views_s_{patch}"] = round(_loop(base, args.seconds, lambda b: b.shape[0] * 2), 1)
            del base
            result[f"speedup_{patch}"] = round(result[f"loader_views_s_{patch}"] / result[f"baseline_views_s_{patch}"], 1)

        x = torch.randn(args.batch, 1, 256, 256)
        try:
            import kornia.augmentation as K

            pipe = torch.nn.Sequential(
                K.RandomHorizontalFlip(), K.RandomVerticalFlip(),
                K.RandomAffine(degrees=180.0, scale=(0.7, 1.3), p=1.0),
                K.RandomElasticTransform(kernel_size=(63, 63), sigma=(15.5, 15.5), alpha=(1.0, 1.0), p=1.0),
            )
            pipe(x)
            t0, k = time.perf_counter(), 0
            while time.perf_counter() - t0 < args.seconds / 2:
                pipe(x.repeat_interleave(2, 0))
                k += 2 * args.batch
            result["kornia_aug_views_s_256"] = round(k / (time.perf_counter() - t0), 1)
        except Exception as err:  # kornia missing or its API changed: report, do not fail the bench
            result["kornia_aug_views_s_256"] = f"unavailable: {type(err).__name__}"
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < args.seconds / 2:
            augment_views(x, views=2, generator=gen)
            k += 2 * args.batch
        result["ours_aug_views_s_256"] = round(k / (time.perf_counter() - t0), 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Batched geometric augmentation on whatever device the batch is on.

Each sample (and each view) gets its own random flips (each axis with p=0.5), rotation in
[0, 2pi), isotropic scale in [0.7, 1.3] and an elastic deformation with the PCL paper's ranges
(batchgenerators' ``SpatialTransform(alpha=(100, 350), sigma=(14, 17))``: a displacement of
``alpha * gaussian_filter(uniform(-1, 1) noise, sigma)`` pixels per axis), all folded into one
sampling grid per sample and applied by ``grid_sample``: for the whole batch at once on a GPU,
CPU_CHUNK samples at a time on a CPU (all random numbers are drawn first, so chunking never
changes a transform).

Each sampling grid (affine + elastic) comes out of ONE batched matrix product,
with no full-resolution intermediate: the paper's field is a Gaussian filter (sigma >= 14 px) of
white noise; noise block-averaged over ELASTIC_BLOCK x ELASTIC_BLOCK pixels (variance scaled so
the smoothed field keeps the same statistics) and filtered with each sample's own sigma is
``K @ B @ K^T`` with ``K[y, j] = gaussian(y - centre_j)`` (separable filter; blocks exist only
inside the image: the zero padding of the paper's ``mode="constant"`` scipy filter). The affine
part ``x_in = t00 x + t01 y`` is two more rank-1 terms of the same product (columns ``1`` and
``x`` appended to ``K``), so ``grid = L @ M @ L^T`` per sample, coordinates interleaved by one
``bmm``. tests/test_data.py checks the field's spread and correlation against scipy's
``gaussian_filter`` of full-resolution noise.

Why plain torch and not kornia/MONAI: kornia 0.9's ``RandomAffine`` + flips do the same
``affine_grid`` + ``grid_sample`` underneath and measured no faster, and its
``RandomElasticTransform`` has one fixed sigma per call (the paper draws sigma per sample) and
resamples a second time (extra blur, twice the cost); MONAI's ``Rand2DElastic`` works per sample,
not per batch. tools/bench_data.py reports kornia's figure next to ours.

Random numbers are drawn from ``generator`` on its own device (CPU by default) and only the small
parameter tensors are moved to the batch's device: a seed gives the same transforms on any device.
Training seeds each batch from its place in the run (``batch_generator``), and ``BatchAugment``
applies it to a loader batch in a worker or on the device alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SCALE_RANGE = (0.7, 1.3)
ROTATION_RANGE = (0.0, 2 * math.pi)
ELASTIC_ALPHA = (100.0, 350.0)  # the paper's batchgenerators settings, in pixels
ELASTIC_SIGMA = (14.0, 17.0)
ELASTIC_BLOCK = 8  # elastic noise is drawn per block of this many pixels per axis (sigma >= 14 px)
ELASTIC = 1.0  # default multiplier of the elastic displacement (0 turns it off)
CPU_CHUNK = 4  # transforms per grid_sample call on a CPU (see _chunks)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


@dataclass
class _Draws:
    """Every random number of ``n`` transforms, drawn up front in one fixed order, so that how
    the grids are then built (in chunks on a CPU, all at once on a GPU) never changes them."""

    theta: torch.Tensor  # (n, 4): x_in = t0 x + t1 y, y_in = t2 x + t3 y (normalised coordinates)
    noise: torch.Tensor | None  # (n, 2, m, m) block noise, already in normalised units
    sigma: torch.Tensor | None  # (n,) elastic sigma in pixels


def _draw(n: int, size: int, generator: torch.Generator | None, elastic: float,
          alpha: tuple[float, float], sigma: tuple[float, float]) -> _Draws:
    gdev = generator.device if generator is not None else torch.device("cpu")
    angle = _uniform(n, *ROTATION_RANGE, generator)
    scale = _uniform(n, *SCALE_RANGE, generator)
    flip_x = torch.where(torch.rand(n, generator=generator, device=gdev) < 0.5, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator, device=gdev) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # zoom in by `scale`
    # theta = rotation @ diag(flip_x, flip_y) / scale maps output coords to input coords
    # (normalised, align_corners=False pixel centres).
    theta = torch.stack([cos * flip_x, -sin * flip_y, sin * flip_x, cos * flip_y], dim=1)
    if elastic <= 0:
        return _Draws(theta, None, None)
    h = ELASTIC_BLOCK
    m = -(-size // h)
    a = _uniform(n, *alpha, generator)
    s = _uniform(n, *sigma, generator)
    # uniform(-1, 1) noise per pixel, block-averaged over h x h: variance 1/(3 h^2) = uniform(-1, 1) / h;
    # pixels -> normalised coordinates (align_corners=False: the image spans 2 units over `size` px)
    noise = (torch.rand(n, 2, m, m, generator=generator, device=gdev) * 2 - 1) / h
    noise = noise * (a * (elastic * 2.0 / size))[:, None, None, None]
    return _Draws(theta, noise, s)


def _grid(draws: _Draws, lo: int, hi: int, size: int, device: torch.device) -> torch.Tensor:
    """``(hi - lo, size, size, 2)`` float32 sampling grids of transforms ``lo:hi``."""
    n = hi - lo
    pix = torch.arange(size, device=device, dtype=torch.float32)
    base = ((pix * 2 + 1) / size - 1).expand(n, size)[..., None]
    cols = [torch.ones(n, size, 1, device=device, dtype=torch.float32), base]
    m = 0
    if draws.noise is not None:
        h = ELASTIC_BLOCK
        m = draws.noise.shape[-1]
        s = draws.sigma[lo:hi].to(device)
        centre = (torch.arange(m, device=device, dtype=torch.float32) + 0.5) * h - 0.5
        d2 = (pix[:, None] - centre[None, :]) ** 2
        # 1-D Gaussian weights of a block of h pixels at each pixel (the 2-D filter is their product)
        k = torch.exp(-d2[None] / (2 * s[:, None, None] ** 2)) * (h / (math.sqrt(2 * math.pi) * s))[:, None, None]
        cols = [k] + cols
    lmat = torch.cat(cols, dim=2)  # (n, size, m + 2): rows index y (or x)
    mid = torch.zeros(n, 2, m + 2, m + 2, device=device, dtype=torch.float32)
    if m:
        mid[:, :, :m, :m] = draws.noise[lo:hi].to(device)
    t = draws.theta[lo:hi].to(device=device, dtype=torch.float32)
    mid[:, 0, m, m + 1], mid[:, 0, m + 1, m] = t[:, 0], t[:, 1]  # 1 * t00 * x + y * t01 * 1
    mid[:, 1, m, m + 1], mid[:, 1, m + 1, m] = t[:, 2], t[:, 3]
    # Full float32 products: TF32 (10-bit mantissa), if a caller enabled it, would put the
    # affine part off by ~0.1 px.
    tf32 = lmat.is_cuda and torch.backends.cuda.matmul.allow_tf32
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        right = torch.matmul(mid, lmat.transpose(1, 2)[:, None])  # (n, 2, m+2, size): M @ L^T per coordinate
        right = right.permute(0, 2, 3, 1).reshape(n, m + 2, 2 * size)  # interleave (x, y) per pixel
        grid = torch.bmm(lmat, right)
    finally:
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
    return grid.view(n, size, size, 2)


def _chunks(n: int, device: torch.device) -> list[tuple[int, int]]:
    """A GPU takes the whole batch in one call; a CPU goes CPU_CHUNK transforms at a time, so
    each grid is still in cache when grid_sample reads it (1.9x faster at 256 px, measured)."""
    step = n if device.type != "cpu" else CPU_CHUNK
    return [(lo, min(lo + step, n)) for lo in range(0, n, max(step, 1))]


def _random_grid(n: int, size: int, device: torch.device, dtype: torch.dtype,
                 generator: torch.Generator | None, elastic: float,
                 alpha: tuple[float, float] = ELASTIC_ALPHA,
                 sigma: tuple[float, float] = ELASTIC_SIGMA) -> torch.Tensor:
    """``(n, size, size, 2)`` sampling grids: output pixel -> input location in [-1, 1]."""
    return _grid(_draw(n, size, generator, elastic, alpha, sigma), 0, n, size, device).to(dtype)


def elastic_field(n: int, size: int, generator: torch.Generator | None, device: torch.device,
                  dtype: torch.dtype, alpha: tuple[float, float] = ELASTIC_ALPHA,
                  sigma: tuple[float, float] = ELASTIC_SIGMA) -> torch.Tensor:
    """``(n, size, size, 2)`` elastic displacements in pixels, (x, y) order, as used by the grids
    (for checks: the grids never build it separately)."""
    if generator is None:
        raise ValueError("elastic_field needs a generator (the rigid part is drawn twice from one state)")
    state = generator.get_state()
    grid = _random_grid(n, size, device, torch.float32, generator, 1.0, alpha, sigma)
    generator.set_state(state)
    rigid = _random_grid(n, size, device, torch.float32, generator, 0.0)
    return ((grid - rigid) * (size / 2.0)).to(dtype)


def _check(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected images of shape (N, 1, P, P), got {tuple(images.shape)}")


def _sample(images: torch.Tensor, draws: _Draws, source: torch.Tensor, mode: str,
            out: torch.Tensor) -> torch.Tensor:
    """``out[i] = images[source[i]]`` resampled through transform i, chunk by chunk."""
    size = images.shape[-1]
    for lo, hi in _chunks(out.shape[0], images.device):
        grid = _grid(draws, lo, hi, size, images.device).to(images.dtype)
        out[lo:hi] = F.grid_sample(images[source[lo:hi]], grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out


def augment_views(
    images: torch.Tensor,
    views: int = 2,
    generator: torch.Generator | None = None,
    elastic: float = ELASTIC,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(N, 1, P, P)`` -> ``(N, views, 1, P, P)``: independently augmented views of each slice.
    ``out`` (optional, ``(N * views, 1, P, P)``) receives the result, e.g. in shared memory."""
    _check(images)
    n, _, p, _ = images.shape
    dtype = images.dtype if images.is_floating_point() else torch.float32
    draws = _draw(n * views, p, generator, elastic, ELASTIC_ALPHA, ELASTIC_SIGMA)
    source = torch.arange(n * views, device=images.device) // views  # sample-major: view v of slice i
    if out is None:
        out = torch.empty(n * views, 1, p, p, device=images.device, dtype=dtype)
    return _sample(images.to(dtype), draws, source, "bilinear", out).view(n, views, 1, p, p)


def augment_pair(
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    elastic: float = ELASTIC,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random transform on images ``(N,1,P,P)`` (bilinear) and labels ``(N,P,P)`` (nearest)."""
    _check(images)
    if labels.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"labels {tuple(labels.shape)} must be (N, P, P) to match images {tuple(images.shape)}")
    n, _, p, _ = images.shape
    dtype = images.dtype if images.is_floating_point() else torch.float32
    draws = _draw(n, p, generator, elastic, ELASTIC_ALPHA, ELASTIC_SIGMA)
    source = torch.arange(n, device=images.device)
    out = _sample(images.to(dtype), draws, source, "bilinear", torch.empty_like(images, dtype=dtype))
    # Class ids are small integers, exact in float; nearest sampling never mixes two classes.
    lab = _sample(labels[:, None].to(dtype), draws, source, "nearest", torch.empty_like(out))
    return out, lab[:, 0].round().to(labels.dtype)


def _pad_square(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) centred on a zero (N, 1, S, S) canvas, S = max(H, W): the transforms are drawn for
    a square; the views are cropped back to H x W (what rotates out of the patch is lost, as at its edges)."""
    height, width = images.shape[-2:]
    size = max(height, width)
    top, left = (size - height) // 2, (size - width) // 2
    return F.pad(images, (left, size - width - left, top, size - height - top))


def _crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    size = images.shape[-1]
    top, left = (size - height) // 2, (size - width) // 2
    return images[..., top:top + height, left:left + width]


def batch_generator(seed: int, rank: int, epoch: int, number: int) -> torch.Generator:
    """The CPU generator of one batch's augmentation, a pure function of where the batch sits in
    the run: the same transforms wherever they run (loader worker or device, any number of
    workers) and after any resume, with no generator state to checkpoint."""
    words = np.random.SeedSequence([seed, rank, epoch, number]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 31 ^ int(words[1]))


@dataclass(frozen=True)
class BatchAugment:
    """Augments one loader batch (a dict with ``image``, ``key`` = (epoch, number), ``label``
    for fine-tuning) on whatever device the batch is on. ``views`` > 0: pretraining, adds
    ``views`` ``(N, V, 1, P, P)`` and drops ``image``; ``views`` = 0: fine-tuning, image and
    label get the same transform. Picklable, so a loader worker can run it (CPU training)."""

    seed: int
    rank: int = 0
    views: int = 2
    elastic: float = ELASTIC

    def __call__(self, batch: dict, empty=torch.empty) -> dict:
        epoch, number = (int(v) for v in batch["key"])
        generator = batch_generator(self.seed, self.rank, epoch, number)
        batch = dict(batch)
        image = batch.pop("image")
        if self.views and image.shape[-2] != image.shape[-1]:  # (H, W) patches (nnU-Net's plans)
            n, _, height, width = image.shape
            views = augment_views(_pad_square(image), self.views, generator, self.elastic)
            out = empty((n * self.views, 1, height, width), dtype=torch.float32) if image.device.type == "cpu" \
                else torch.empty(n * self.views, 1, height, width, device=image.device)
            out.copy_(_crop(views.flatten(0, 1), height, width))
            batch["views"] = out.view(n, self.views, 1, height, width)
        elif self.views:
            n, _, p, _ = image.shape
            out = empty((n * self.views, 1, p, p), dtype=torch.float32) if image.device.type == "cpu" else None
            batch["views"] = augment_views(image, self.views, generator, self.elastic, out=out)
        else:
            label = batch["label"]
            batch["image"], lab = augment_pair(image, label.long(), generator, self.elastic)
            batch["label"] = lab.to(label.dtype)
        return batch


def augment_in_workers(data, device: torch.device) -> bool:
    """Where batches are augmented (``data.augment_on``, a DataConfig field): ``auto`` picks the loader
    workers when training on a CPU with workers (its cores are the accelerator: each worker reads and
    augments a whole batch), else the training device (a GPU augments a batch in well under a millisecond)."""
    from pcl_hpc.errors import UserError

    if data.augment_on not in ("auto", "workers", "device"):
        raise UserError(f"data.augment_on={data.augment_on!r} is not one of auto, workers, device")
    if data.augment_on == "auto":
        return device.type == "cpu" and data.num_workers > 0
    return data.augment_on == "workers"

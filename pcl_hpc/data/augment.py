"""Batched geometric augmentation on whatever device the batch is on.

Each sample (and each view) gets its own random flips (each axis with p=0.5), rotation in
[0, 2pi), isotropic scale in [0.7, 1.3] and an elastic deformation with the PCL paper's ranges
(batchgenerators' ``SpatialTransform(alpha=(100, 350), sigma=(14, 17))``: a displacement of
``alpha * gaussian_filter(uniform(-1, 1) noise, sigma)`` pixels per axis), all folded into one
sampling grid and applied with a single ``grid_sample`` call for the whole batch.

The elastic field is smooth by construction (sigma >= 14 px), so it is drawn on a grid 4x coarser
per axis (noise variance scaled so the smoothed field has the same statistics), blurred in the
Fourier domain with each sample's own sigma (zero padding: the same ``mode="constant"`` as the
paper's scipy filter) and upsampled bilinearly: a few percent of the cost of the resampling.

Why plain torch and not kornia/MONAI: kornia 0.9's ``RandomAffine`` + flips do the same
``affine_grid`` + ``grid_sample`` underneath and measured no faster, and its
``RandomElasticTransform`` has one fixed sigma per call (the paper draws sigma per sample) and
resamples a second time (extra blur, twice the cost); MONAI's ``Rand2DElastic`` works per sample,
not per batch. tools/bench_data.py reports kornia's figure next to ours.

Random numbers are drawn from ``generator`` on its own device (CPU by default) and only the small
parameter tensors are moved to the batch's device: a seed gives the same transforms on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCALE_RANGE = (0.7, 1.3)
ROTATION_RANGE = (0.0, 2 * math.pi)
ELASTIC_ALPHA = (100.0, 350.0)  # the paper's batchgenerators settings, in pixels
ELASTIC_SIGMA = (14.0, 17.0)
ELASTIC_COARSE = 4  # the elastic field is drawn on a grid this much coarser per axis
ELASTIC = 1.0  # default multiplier of the elastic displacement (0 turns it off)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def elastic_field(n: int, size: int, generator: torch.Generator | None, device: torch.device,
                  dtype: torch.dtype, alpha: tuple[float, float] = ELASTIC_ALPHA,
                  sigma: tuple[float, float] = ELASTIC_SIGMA) -> torch.Tensor:
    """``(n, size, size, 2)`` displacements in pixels, (x, y) order, one random field per sample."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    f = ELASTIC_COARSE
    c = -(-size // f)
    a = _uniform(n, *alpha, generator)
    s = _uniform(n, *sigma, generator) / f  # sigma on the coarse grid
    pad = int(math.ceil(4.0 * sigma[1] / f))  # scipy's truncate=4: zero padding makes it linear, not circular
    # White noise uniform(-1, 1) per fine pixel, block-averaged over f x f, has variance 1/(3 f^2):
    # scaling the coarse noise by 1/f keeps the smoothed field's variance.
    noise = (torch.rand(n, 2, c, c, generator=generator, device=gdev) * 2 - 1) / f
    noise = noise.to(device=device, dtype=torch.float32)
    noise = F.pad(noise, (pad, pad, pad, pad))
    m = c + 2 * pad
    freq = torch.fft.fftfreq(m, device=device)
    rfreq = torch.fft.rfftfreq(m, device=device)
    k2 = freq[:, None] ** 2 + rfreq[None, :] ** 2
    transfer = torch.exp(-2 * math.pi ** 2 * s.to(device)[:, None, None, None] ** 2 * k2)
    smooth = torch.fft.irfft2(torch.fft.rfft2(noise) * transfer, s=(m, m))[:, :, pad:pad + c, pad:pad + c]
    smooth = smooth * a.to(device)[:, None, None, None]
    fine = F.interpolate(smooth, scale_factor=f, mode="bilinear", align_corners=False)[:, :, :size, :size]
    return fine.permute(0, 2, 3, 1).to(dtype)


def _random_grid(n: int, size: int, device: torch.device, dtype: torch.dtype,
                 generator: torch.Generator | None, elastic: float) -> torch.Tensor:
    """``(n, size, size, 2)`` sampling grids: output pixel -> input location in [-1, 1]."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    angle = _uniform(n, *ROTATION_RANGE, generator)
    scale = _uniform(n, *SCALE_RANGE, generator)
    flip_x = torch.where(torch.rand(n, generator=generator, device=gdev) < 0.5, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator, device=gdev) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # zoom in by `scale`
    # theta = rotation @ diag(flip_x, flip_y) / scale; maps output coords to input coords.
    # Output pixel centres in normalised coordinates (align_corners=False), then input = theta @ output:
    # x_in = t00 x + t01 y, y_in = t10 x + t11 y. Written out (not F.affine_grid): 4x faster on CPU.
    t = torch.stack([cos * flip_x, -sin * flip_y, sin * flip_x, cos * flip_y], dim=1).to(device=device, dtype=dtype)
    base = (torch.arange(size, device=device, dtype=dtype) * 2 + 1) / size - 1
    xs, ys = base[None, None, :], base[None, :, None]
    grid = torch.stack([t[:, 0, None, None] * xs + t[:, 1, None, None] * ys,
                        t[:, 2, None, None] * xs + t[:, 3, None, None] * ys], dim=-1)
    if elastic > 0:
        # pixels -> normalised coordinates (align_corners=False: the image spans 2 units over `size` px)
        grid = grid + elastic_field(n, size, generator, device, dtype) * (elastic * 2.0 / size)
    return grid


def _check(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected images of shape (N, 1, P, P), got {tuple(images.shape)}")


def augment_views(
    images: torch.Tensor,
    views: int = 2,
    generator: torch.Generator | None = None,
    elastic: float = ELASTIC,
) -> torch.Tensor:
    """``(N, 1, P, P)`` -> ``(N, views, 1, P, P)``: independently augmented views of each slice."""
    _check(images)
    n, _, p, _ = images.shape
    dtype = images.dtype if images.is_floating_point() else torch.float32
    stacked = images.to(dtype).repeat_interleave(views, dim=0)  # sample-major: (n*views, 1, P, P)
    grid = _random_grid(n * views, p, images.device, dtype, generator, elastic)
    out = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(n, views, 1, p, p)


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
    grid = _random_grid(n, p, images.device, dtype, generator, elastic)
    out = F.grid_sample(images.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Class ids are small integers, exact in float; nearest sampling never mixes two classes.
    lab = F.grid_sample(labels[:, None].to(dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out, lab[:, 0].round().to(labels.dtype)

"""The one forward pass over a volume's slices: validation, test scores, `pcl-hpc evaluate` and `predict` all use it.

Whole ``(Z, H, W)`` volumes go through the network ``batch`` slices at a time, each slice padded
(zeros, bottom and right) to a multiple of the U-Net's ``DOWNSAMPLE`` and the output cropped back;
bf16 autocast on CUDA (fp32 elsewhere, so CPU results do not depend on it); optional flip
test-time augmentation (the mean of the softmax over the identity, a horizontal and a vertical
flip). Labels are the argmax of exactly the probabilities :func:`predict_probabilities` returns,
so a Dice computed from :func:`predict_labels` is the Dice of the masks `predict` writes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pcl_hpc.models.unet import DOWNSAMPLE

# Slices per forward pass when not given: a GPU wants big batches; on a CPU batching gains little
# and 32 loses (tools/bench_predict.py, 192^2, f=16, 2 cores: 0.9-1.2x the per-slice loop with 8, 0.84x with 32).
AUTO_BATCH = {True: 32, False: 8}
FLIPS = ((), (-1,), (-2,))  # identity, horizontal, vertical


def default_device() -> torch.device:
    """CUDA when there is one, else the CPU: where predict and evaluate run unless told."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def auto_batch(device: torch.device, batch: int | None = None) -> int:
    """``batch``, or (None / 0) the default for ``device``: 32 slices on CUDA, 8 elsewhere."""
    return max(1, int(batch)) if batch else AUTO_BATCH[device.type == "cuda"]


def _probability_batches(model: torch.nn.Module, image: np.ndarray, device: torch.device, batch: int | None,
                         tta: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """(first slice, (N, C, H, W) float32 softmax on ``device``) for each batch of slices of ``image``."""
    model.eval()
    z, h, w = image.shape
    pad_h, pad_w = (-h) % DOWNSAMPLE, (-w) % DOWNSAMPLE
    flips = FLIPS if tta else FLIPS[:1]
    step = auto_batch(device, batch)
    for start in range(0, z, step):
        x = torch.from_numpy(np.ascontiguousarray(image[start:start + step])).float().unsqueeze(1).to(device)
        x = F.pad(x, (0, pad_w, 0, pad_h))
        prob = None
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(xi)
            p = logits.float().softmax(1)
            p = torch.flip(p, dims) if dims else p
            prob = p if prob is None else prob + p
        yield start, (prob / len(flips))[:, :, :h, :w]


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, image: np.ndarray, device: torch.device, batch: int | None = None,
                          tta: bool = False) -> np.ndarray:
    """(Z, H, W) image -> (Z, H, W, C) float32 softmax probabilities, C counting the background.

    ``batch``: slices per forward pass (None or 0: :data:`AUTO_BATCH` for the device)."""
    z, h, w = image.shape
    out: np.ndarray | None = None
    for start, prob in _probability_batches(model, image, device, batch, tta):
        if out is None:
            out = np.empty((z, h, w, prob.shape[1]), dtype=np.float32)
        out[start:start + prob.shape[0]] = prob.permute(0, 2, 3, 1).cpu().numpy()
    if out is None:
        raise ValueError(f"image of shape {image.shape} has no slices to predict")
    return out


@torch.no_grad()
def predict_labels(model: torch.nn.Module, image: np.ndarray, device: torch.device, batch: int | None = None,
                   tta: bool = False) -> np.ndarray:
    """(Z, H, W) image -> (Z, H, W) uint8 label map: the argmax of :func:`predict_probabilities`
    (first maximum on ties, as numpy's), without holding the whole probability volume."""
    out = np.zeros(image.shape, dtype=np.uint8)
    for start, prob in _probability_batches(model, image, device, batch, tta):
        out[start:start + prob.shape[0]] = prob.argmax(1).to(torch.uint8).cpu().numpy()
    return out

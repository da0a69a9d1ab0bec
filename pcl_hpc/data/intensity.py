"""Intensity normalisation of one volume (percentile, z-score, or a CT Hounsfield window)."""

from __future__ import annotations

import numpy as np

from pcl_hpc.config import DataConfig

INTENSITIES = ("auto", "percentile", "zscore", "window")


def resolved_intensity(cfg: DataConfig) -> str:
    if cfg.intensity != "auto":
        return cfg.intensity
    return "percentile" if cfg.modality == "ct" else "zscore"


def normalise(image: np.ndarray, method: str, clip: list[float], window: list[float]) -> np.ndarray:
    if method == "window":
        lo, hi = float(window[0]), float(window[1])
    else:
        lo, hi = np.percentile(image, [float(clip[0]), float(clip[1])])
    image = np.clip(image, lo, hi)
    if method in ("percentile", "window"):
        out = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    else:  # zscore
        std = image.std()
        out = (image - image.mean()) / std if std > 0 else np.zeros_like(image)
    return out.astype(np.float32)

"""Segmentation metrics of whole 3D volumes: Dice per class and HD95 in millimetres.

Inputs are integer label maps ``(Z, H, W)`` (0 = background, classes 1..num_classes) and the voxel
spacing in mm in the same axis order as the arrays, e.g. the stored volumes' ``spacing`` attr
``[z, y, x]``.

Definitions
-----------
Dice of class c: ``2 |P ∩ T| / (|P| + |T|)`` over the whole volume (P = ``pred == c``,
T = ``label == c``).

HD95 of class c (the definition of MONAI's ``compute_hausdorff_distance(..., percentile=95)``,
the field's reference, which this module is tested against):

* the surface of a mask is its voxels that have at least one 6-connected neighbour outside it
  (``mask ^ binary_erosion(mask)``, with everything outside the array counted as background);
* the directed distances P -> T are, for every surface voxel of P, the Euclidean distance in mm
  (voxel offsets times ``spacing``) from its centre to the nearest surface voxel centre of T;
* HD95 = ``max(percentile95(P -> T), percentile95(T -> P))``, percentiles by linear
  interpolation (``numpy.percentile``'s default, as ``torch.quantile``).

medpy's ``hd95`` differs only in the last step: it takes the 95th percentile of both directed sets
pooled together, which is usually smaller (3.4 against 8.2 mm for one class of the benchmark). DeepMind's ``surface-distance`` measures
between surface elements weighted by area instead of voxel centres.

Conventions for absent classes
-----------------------------
* absent from both pred and label: Dice 1.0 and HD95 0.0 (nothing to find, nothing found);
* absent from exactly one of them: Dice 0.0 and HD95 ``None``: the distance to an empty surface
  is undefined, so it is reported missing, never as 0 (nor as infinity, which would poison means).
  Averages over volumes skip missing values.

Classes beyond ``num_classes`` are ignored.

Implementation: scipy only (erosion for the surfaces; a KD-tree or a distance transform for the
distances, whichever is faster for the surfaces at hand). ``tools/bench_metrics.py`` times it
against MONAI, medpy and surface-distance on a 256x256x100 volume and checks that they agree: it
matches MONAI to float32 precision and is several times faster; tests/test_metrics.py checks the
agreement with MONAI (and medpy's pooled variant) whenever they are installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

_FACES = ndimage.generate_binary_structure(3, 1)  # 6-connectivity, as MONAI and medpy


def _check(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {pred.shape} != label shape {label.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected (Z, H, W) arrays, got shape {pred.shape}")
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise ValueError(f"spacing must be three positive numbers in mm (same axis order as the arrays), got {spacing!r}")
    return pred, label, sp


def _bbox(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """The bounding box of ``mask`` grown by ``margin`` (clipped to the array); None when empty."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean mask: those with a 6-neighbour outside it (or outside the array)."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_FACES, border_value=0)


# "auto" picks the KD-tree while the surfaces are sparse in their bounding box (smooth masks: ~5x
# faster than the distance transform) and the distance transform when they are dense (the speckled
# predictions of an untrained model: a KD-tree over millions of points is ~2x slower). The crossover,
# measured by tools/bench_metrics.py's cases, is near a box of ~12 voxels per surface voxel.
AUTO_BOX_PER_SURFACE_VOXEL = 12
METHODS = ("auto", "kdtree", "edt")


def surface_distances(pred_mask: np.ndarray, label_mask: np.ndarray, spacing: Sequence[float],
                      method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm ``(pred -> label, label -> pred)`` of two non-empty boolean masks.

    ``method``: "kdtree" (nearest surface voxel by a KD-tree over the surface voxels' mm
    coordinates), "edt" (scipy's Euclidean distance transform of the other surface's complement, on
    the masks' joint bounding box) or "auto" (whichever is faster for these surfaces, see above).
    All are exact and give the same numbers."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    p, t, sp = _check(pred_mask, label_mask, spacing)
    p, t = p.astype(bool, copy=False), t.astype(bool, copy=False)
    if not p.any() or not t.any():
        raise ValueError("surface_distances needs two non-empty masks")
    box = _bbox(p | t)
    sp_p, sp_t = surface(p[box]), surface(t[box])
    if method == "auto":
        points = int(np.count_nonzero(sp_p)) + int(np.count_nonzero(sp_t))
        method = "kdtree" if sp_p.size > AUTO_BOX_PER_SURFACE_VOXEL * points else "edt"
    if method == "kdtree":
        cp, ct = np.argwhere(sp_p) * sp, np.argwhere(sp_t) * sp
        return (cKDTree(ct, leafsize=32).query(cp, k=1)[0], cKDTree(cp, leafsize=32).query(ct, k=1)[0])
    return (ndimage.distance_transform_edt(~sp_t, sampling=sp)[sp_p],
            ndimage.distance_transform_edt(~sp_p, sampling=sp)[sp_t])


def hd95(pred_mask: np.ndarray, label_mask: np.ndarray, spacing: Sequence[float], method: str = "auto") -> float | None:
    """Symmetric 95th-percentile Hausdorff distance in mm of two boolean masks (see the module docstring).

    0.0 when both masks are empty, None when exactly one is."""
    has_p, has_t = bool(np.any(pred_mask)), bool(np.any(label_mask))
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return None
    d_pt, d_tp = surface_distances(pred_mask, label_mask, spacing, method)
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def dice(pred_mask: np.ndarray, label_mask: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    n_p, n_t = int(np.count_nonzero(pred_mask)), int(np.count_nonzero(label_mask))
    if n_p + n_t == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(np.logical_and(pred_mask, label_mask))) / (n_p + n_t)


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Volume Dice for classes 1..num_classes (a class absent from both gets 1.0)."""
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {pred.shape} != label shape {label.shape}")
    return [dice(pred == c, label == c) for c in range(1, int(num_classes) + 1)]


def volume_metrics(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float], num_classes: int,
                   method: str = "auto") -> dict[str, list]:
    """``{"dice": [class 1..num_classes], "hd95_mm": [float or None per class]}`` of one volume.

    ``pred`` and ``label`` are integer label maps (Z, H, W); ``spacing`` is in mm, same axis order;
    ``method`` is `surface_distances`'s."""
    pred, label, sp = _check(pred, label, spacing)
    # Every class lies inside the joint foreground box: crop once, then work on the small arrays.
    box = _bbox((pred > 0) | (label > 0), margin=0)
    if box is None:  # no foreground anywhere: every class is absent from both
        return {"dice": [1.0] * int(num_classes), "hd95_mm": [0.0] * int(num_classes)}
    pred, label = pred[box], label[box]
    dices, hds = [], []
    for c in range(1, int(num_classes) + 1):
        p, t = pred == c, label == c
        dices.append(dice(p, t))
        hds.append(hd95(p, t, sp, method))
    return {"dice": dices, "hd95_mm": hds}

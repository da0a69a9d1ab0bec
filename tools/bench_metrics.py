"""Benchmark per-class Dice + HD95 of one volume across implementations; prints ONE JSON line.

    python tools/bench_metrics.py               # 256x256x100, 3 classes, best of 3 runs each
    python tools/bench_metrics.py --repeats 1   # quicker

A label/prediction pair of shape (Z, H, W) = (100, 256, 256) with anisotropic spacing
(2.5, 0.8, 0.8) mm is built from a fixed seed: each class is a noisy ellipsoid (an ellipsoid's
implicit function plus Gaussian-smoothed noise, thresholded); the prediction is the label's fields
with extra smoothed noise, shifted by a voxel or two, plus a few small false-positive blobs far
from the class, so HD95 is neither 0 nor dominated by one outlier.

Every implementation goes from the two integer label maps to per-class Dice and HD95 in mm (the
work evaluation does per volume), timed end to end (one-hot conversion included for MONAI), best
of ``--repeats`` runs, one thread each (torch and BLAS pinned to 1):

* ``scipy``: ``pcl_hpc.metrics.volume_metrics`` as evaluation calls it (``method="auto"``), and
  ``scipy_kdtree`` / ``scipy_edt`` with either surface-distance method forced (all exact; scipy is
  already a dependency);
* ``monai``: ``monai.metrics.compute_hausdorff_distance(percentile=95, spacing=...)`` and
  ``compute_dice``: the reference, and the same HD95 definition as ours (max of the two directed
  95th percentiles of voxel-centre surface distances);
* ``medpy``: ``medpy.metric.binary.hd95`` / ``dc``: pools both directed distance sets before the
  percentile, so it is compared with our distances pooled the same way;
* ``surface_distance``: DeepMind's ``compute_robust_hausdorff(..., 95)``: distances between
  area-weighted surface elements, so it is compared within one voxel size (the largest spacing).

Then ``speckled_pred``: the same label against a prediction of uniformly random classes (an
untrained model's output, whose surfaces are dense: every voxel), once, ours only: there the
distance transform beats the KD-tree, which is what ``method="auto"`` switches on.

Implementations that are not installed report null. ``agree`` is true when every installed one
matches within its tolerance; ``chosen`` is ours (``scipy``, the default method) when it agrees with
the reference, ``speedup_over_reference`` its time against MONAI's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pcl_hpc import metrics  # noqa: E402

SHAPE = (100, 256, 256)
SPACING = (2.5, 0.8, 0.8)
NUM_CLASSES = 3
SEED = 0


def make_pair(shape=SHAPE, num_classes=NUM_CLASSES, seed=SEED) -> tuple[np.ndarray, np.ndarray]:
    """(label, pred) uint8 label maps of noisy ellipsoids; pred is a perturbed, shifted label."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    label = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)

    def smooth_noise(sigma: float, amp: float) -> np.ndarray:
        return amp * ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma) * sigma

    for c in range(1, num_classes + 1):
        centre = rng.uniform([0.3 * n for n in shape], [0.7 * n for n in shape])
        radii = rng.uniform([0.12 * n for n in shape], [0.25 * n for n in shape])
        field = 1 - ((zz - centre[0]) / radii[0]) ** 2 - ((yy - centre[1]) / radii[1]) ** 2 - ((xx - centre[2]) / radii[2]) ** 2
        field += smooth_noise(4.0, 0.25)
        label[field > 0] = c
        shifted = np.roll(field + smooth_noise(3.0, 0.2), tuple(int(s) for s in rng.integers(-2, 3, 3)), axis=(0, 1, 2))
        pred[shifted > 0] = c
        for _ in range(3):  # small false positives somewhere else
            z, y, x = (int(rng.integers(5, n - 5)) for n in shape)
            pred[z - 1:z + 2, y - 3:y + 4, x - 3:x + 4] = c
    return label, pred


def run_ours(method: str):
    def run(pred, label):
        out = metrics.volume_metrics(pred, label, SPACING, NUM_CLASSES, method=method)
        return out["dice"], out["hd95_mm"]
    return run


def run_monai(pred, label):
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    def onehot(a):
        return torch.from_numpy(np.stack([a == c for c in range(NUM_CLASSES + 1)])[None])

    p, t = onehot(pred), onehot(label)
    hd = compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=SPACING)
    dc = compute_dice(p, t, include_background=False)
    return dc[0].tolist(), hd[0].tolist()


def run_medpy(pred, label):
    from medpy.metric.binary import dc, hd95

    return ([float(dc(pred == c, label == c)) for c in range(1, NUM_CLASSES + 1)],
            [float(hd95(pred == c, label == c, voxelspacing=SPACING)) for c in range(1, NUM_CLASSES + 1)])


def run_surface_distance(pred, label):
    import surface_distance as sd

    dices, hds = [], []
    for c in range(1, NUM_CLASSES + 1):
        t, p = label == c, pred == c
        dists = sd.compute_surface_distances(t, p, SPACING)
        dices.append(float(sd.compute_dice_coefficient(t, p)))
        hds.append(float(sd.compute_robust_hausdorff(dists, 95)))
    return dices, hds


def pooled_hd95(pred, label) -> list[float]:
    """medpy's definition from our distances: the 95th percentile of both directed sets pooled."""
    out = []
    for c in range(1, NUM_CLASSES + 1):
        d_pt, d_tp = metrics.surface_distances(pred == c, label == c, SPACING)
        out.append(float(np.percentile(np.hstack([d_pt, d_tp]), 95)))
    return out


def timed(fn, pred, label, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(pred, label)
        best = min(best, time.perf_counter() - start)
    return best, result


def version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v(module)
    except PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    label, pred = make_pair()
    candidates = {
        "scipy": (run_ours("auto"), None),
        "scipy_kdtree": (run_ours("kdtree"), None),
        "scipy_edt": (run_ours("edt"), None),
        "monai": (run_monai, "monai"),
        "medpy": (run_medpy, "medpy"),
        "surface_distance": (run_surface_distance, "surface_distance"),
    }
    seconds, hd, dice = {}, {}, {}
    for name, (fn, module) in candidates.items():
        if module is not None:
            try:
                __import__(module)
            except ImportError:
                seconds[name] = hd[name] = dice[name] = None
                continue
        seconds[name], (dice[name], hd[name]) = timed(fn, pred, label, args.repeats)

    ours = np.array(hd["scipy"])
    tolerance = {"scipy_kdtree": 1e-6, "scipy_edt": 1e-6, "monai": 1e-3, "medpy": 1e-6, "surface_distance": float(max(SPACING))}
    expected = {"scipy_kdtree": ours, "scipy_edt": ours, "monai": ours, "medpy": np.array(pooled_hd95(pred, label)), "surface_distance": ours}
    max_diff, agree = {}, True
    for name, tol in tolerance.items():
        if hd[name] is None:
            max_diff[name] = None
            continue
        max_diff[name] = float(np.max(np.abs(np.array(hd[name]) - expected[name])))
        dice_diff = float(np.max(np.abs(np.array(dice[name]) - np.array(dice["scipy"]))))
        agree = agree and max_diff[name] <= tol and dice_diff <= 1e-5

    ref_ok = max_diff["monai"] is None or max_diff["monai"] <= tolerance["monai"]
    chosen = "scipy" if ref_ok and max(v for v in (max_diff["scipy_kdtree"], max_diff["scipy_edt"])) <= 1e-6 else None
    speedup = seconds["monai"] / seconds[chosen] if chosen and seconds["monai"] else None

    speckled = np.random.default_rng(SEED + 1).integers(0, NUM_CLASSES + 1, SHAPE).astype(np.uint8)
    speckled_s, speckled_hd = {}, {}
    for name in ("scipy", "scipy_kdtree", "scipy_edt"):
        speckled_s[name], (_, speckled_hd[name]) = timed(candidates[name][0], speckled, label, 1)
    agree = agree and all(np.allclose(speckled_hd[n], speckled_hd["scipy"], rtol=0, atol=1e-6) for n in speckled_hd)
    line = {
        "bench": "metrics",
        "shape_zhw": list(SHAPE),
        "spacing_mm": list(SPACING),
        "classes": NUM_CLASSES,
        "foreground_voxels": {"label": int((label > 0).sum()), "pred": int((pred > 0).sum())},
        "repeats": args.repeats,
        "seconds_per_volume": {k: (round(v, 4) if v is not None else None) for k, v in seconds.items()},
        "hd95_mm": {k: ([round(x, 4) for x in v] if v is not None else None) for k, v in hd.items()},
        "dice": {k: ([round(x, 5) for x in v] if v is not None else None) for k, v in dice.items()},
        "speckled_pred_seconds": {k: round(v, 4) for k, v in speckled_s.items()},
        "max_abs_hd95_diff_mm": max_diff,
        "tolerance_mm": tolerance,
        "agree": bool(agree),
        "reference": "monai",
        "chosen": chosen,
        "speedup_over_reference": round(speedup, 2) if speedup else None,
        "versions": {m: version(m) for m in ("numpy", "scipy", "torch", "monai", "medpy", "surface-distance")},
        "python": platform.python_version(),
        "cpu_threads": 1,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()

"""Geometry of one volume: the canonical orientation per slice axis, and in-plane resampling."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

INTERPOLATIONS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}
# DICOM-style codes (each letter: where the index of x, y, z increases towards). Axial: array axis
# 0 (Z) runs inferior->superior, rows anterior->posterior, columns right->left (radiological view).
# Coronal: slices anterior->posterior, rows superior->inferior. Sagittal: slices right->left,
# rows superior->inferior, columns anterior->posterior.
ORIENTATIONS = {"axial": "LPS", "coronal": "LIP", "sagittal": "PIL"}
CANONICAL_ORIENTATION = ORIENTATIONS["axial"]


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    spacing = np.array(a.GetSpacing())
    return (
        np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-3, atol=1e-4)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-3)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=float(spacing.max()) * 0.01 + 1e-4)
    )


def resample_inplane(img: sitk.Image, target_yx: list[float] | None, interp: int) -> sitk.Image:
    if not target_yx:
        return img
    sx, sy, sz = img.GetSpacing()
    ty, tx = float(target_yx[0]), float(target_yx[1])
    if np.isclose(sx, tx) and np.isclose(sy, ty):
        return img
    nx, ny, nz = img.GetSize()
    # Keep the physical centre of the first voxel's footprint: the new grid starts half a new voxel
    # in from the old grid's edge.
    size = [max(1, int(round(nx * sx / tx))), max(1, int(round(ny * sy / ty))), nz]
    direction = np.array(img.GetDirection()).reshape(3, 3)
    shift = direction @ np.array([(tx - sx) / 2, (ty - sy) / 2, 0.0])
    origin = tuple(np.array(img.GetOrigin()) + shift)
    return sitk.Resample(img, size, sitk.Transform(), interp, origin, (tx, ty, sz), img.GetDirection(), 0.0,
                         img.GetPixelID())

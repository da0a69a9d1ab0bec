"""One 3D image (+ label) -> checked, canonically oriented, normalised ``(Z, H, W)`` arrays.

Checks a volume (NaN/Inf voxels, label shape and geometry against the image, label values) and
raises ``VolumeError`` (file, reason incl. what to do) for a problem with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

from pcl_hpc.data.geometry import INTERPOLATIONS, ORIENTATIONS, resample_inplane, same_geometry
from pcl_hpc.data.intensity import normalise


class VolumeError(Exception):
    """A problem with one volume: (file, reason incl. what to do)."""

    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path = path
        self.reason = reason


def label_values(values: np.ndarray, settings: dict[str, Any], path: str) -> np.ndarray:
    """Raw label voxels -> uint8 class ids under the layout's convention, or a clear error."""
    if not np.isfinite(values).all() or np.any(values != np.round(values)):
        raise VolumeError(path, "label has non-integer values; labels must be integer class ids")
    values = values.astype(np.int64)
    mapping = settings.get("label_map") or {}
    if mapping:
        lut_keys = np.array([int(k) for k in mapping], dtype=np.int64)
        lut_vals = np.array(list(mapping.values()), dtype=np.int64)
        out = values.copy()
        for k, v in zip(lut_keys, lut_vals):
            out[values == k] = v
        bad = sorted(set(np.unique(values).tolist()) - set(lut_keys.tolist()) - {0})
        if bad:
            raise VolumeError(
                path, f"label values {bad[:8]} are not among the dataset's classes "
                f"({', '.join(f'{k}->{v}' for k, v in mapping.items())}); fix the label file (set them to 0) "
                "or remove the case",
            )
        values = out
    above = settings.get("label_above_to_zero")
    if above is not None:
        values = np.where(values > int(above), 0, values)
    n = settings.get("num_classes")
    lo, hi = int(values.min()), int(values.max())
    limit = (int(n) - 1) if n else 255
    if lo < 0 or hi > limit:
        bad = sorted(v for v in np.unique(values).tolist() if v < 0 or v > limit)
        where = f"the dataset's classes 0..{limit}" if n else "0..255"
        raise VolumeError(
            path, f"label values {bad[:8]} are outside {where}; fix the label file or the class list "
            "(dataset.json 'labels')",
        )
    return values.astype(np.uint8)


def volume_arrays(img: sitk.Image, lab: sitk.Image | None, settings: dict[str, Any], image_path: str,
            label_path: str | None) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """One 3D image (+ label) -> normalised (Z, H, W) arrays and their attrs."""
    source_orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())
    original_shape = list(img.GetSize()[::-1])
    if lab is not None:
        if lab.GetSize() != img.GetSize():
            raise VolumeError(
                label_path,
                f"label shape {lab.GetSize()[::-1]} differs from image shape {img.GetSize()[::-1]} "
                f"({image_path}); give the label on the image's voxel grid",
            )
        if not same_geometry(img, lab):
            raise VolumeError(
                label_path,
                "label origin/spacing/direction differ from the image's; resample the label onto the image grid",
            )
        lab.CopyInformation(img)  # tiny header rounding differences must not change the orientation

    orientation = ORIENTATIONS[settings["slice_axis"]]
    img = sitk.DICOMOrient(img, orientation)
    image = sitk.GetArrayViewFromImage(img)
    if not np.isfinite(image).all():
        raise VolumeError(image_path, "image contains NaN or Inf values; fix the export (e.g. replace them with 0)")
    img = resample_inplane(sitk.Cast(img, sitk.sitkFloat32), settings["target_spacing"],
                            INTERPOLATIONS[settings["interpolation"]])
    image = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)  # (Z, H, W)

    label = None
    if lab is not None:
        lab = sitk.DICOMOrient(lab, orientation)
        values = label_values(sitk.GetArrayFromImage(lab), settings, label_path)
        lab_u8 = sitk.GetImageFromArray(values)
        lab_u8.CopyInformation(lab)
        label = sitk.GetArrayFromImage(
            resample_inplane(lab_u8, settings["target_spacing"], sitk.sitkNearestNeighbor)
        ).astype(np.uint8)

    image = normalise(image, settings["intensity"], settings["clip_percentiles"], settings["hu_window"])
    z = image.shape[0]
    g = settings["gcl_partitions"]
    sx, sy, sz = img.GetSpacing()
    attrs = {
        "spacing": [sz, sy, sx],
        "original_shape": original_shape,
        "orientation": source_orientation,
        "stored_orientation": orientation,
        "slice_axis": settings["slice_axis"],
        "origin": list(img.GetOrigin()),
        "direction": list(img.GetDirection()),
        "positions": [(i + 1) / z for i in range(z)],
        "partitions": [i * g // z for i in range(z)],
    }
    return image, label, attrs

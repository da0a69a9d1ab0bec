"""Write a small DICOM series (one int16 slice file per z) carrying patient identifiers, for the
tests that check none of them reach a store, a mask or a sidecar."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk


def write_dicom_series(folder: Path, image: sitk.Image, phi: dict[str, str], modality: str = "CT",
                       series: str = "1.2.826.0.1.3680043.2.1125.1.1") -> None:
    """``image`` (3D, axial slices along z) -> ``folder/IM0000.dcm ...`` with ``phi`` tags set on every slice."""
    folder.mkdir(parents=True)
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        image = sitk.Round(image)
    image = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    study = series.rsplit(".", 1)[0]
    for z in range(image.GetSize()[2]):
        sl = image[:, :, z]
        tags = {**phi, "0008|0060": modality, "0020|000d": study, "0020|000e": series,
                "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(z + 1), "0018|0050": str(image.GetSpacing()[2]),
                "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z)))),
                "0008|0018": f"{series}.{z + 1}"}
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{z:04d}.dcm"))
        writer.Execute(sl)

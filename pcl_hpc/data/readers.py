"""Reading sources with SimpleITK: NIfTI / NRRD / MetaImage files and DICOM series folders.

A DICOM series is read through GDCM without its metadata dictionary. A NIfTI file is first checked
for what ITK would hide: a truncated file (zero-filled) and NaN/Inf voxels (read as 0). 4D sources
are read whole and split into 3D frames with ``select_frame``, or, where the 4th axis holds
channels (an MSD multi-modal image), give one channel with ``select_channel``. ``source_sha256``
fingerprints a source so that unchanged volumes are skipped on a re-run.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pcl_hpc.data.volume import VolumeError


def source_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a DICOM folder's files (sorted by name)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.iterdir() if q.is_file() and not q.name.startswith(".")):
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of the file bytes; for MetaImage headers the separate data file is included too."""
    h = hashlib.sha256()
    paths = [Path(path)]
    if str(path).lower().endswith(".mhd"):
        text = Path(path).read_text(errors="replace")
        m = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", text, re.MULTILINE)
        if m and m.group(1) != "LOCAL":
            paths.append(Path(path).parent / m.group(1))
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _nifti_problem(path: str, what: str) -> str | None:
    """What is wrong with a NIfTI file that ITK would read without a word, or None.

    ITK silently zero-fills the missing part of a truncated file (e.g. an interrupted copy) and
    reads NaN and Inf voxels as 0 (nifti1_io), so both are checked here on the stored bytes. For an
    integer file (no NaN possible) the gzip trailer's ISIZE settles the size cheaply; otherwise the
    stream is read once, in blocks, counting the bytes and checking the voxels."""
    try:
        stored = nib.load(path).dataobj  # the header's view of the stored voxels (nothing read yet)
        dtype, offset, shape = np.dtype(stored.dtype), int(stored.offset), stored.shape
    except Exception:  # not parseable by nibabel: ITK's reader reports it, unless it is a cut-off gzip stream,
        if path.lower().endswith(".gz"):  # which ITK reads without a word (a header, then zeros)
            try:
                with gzip.open(path, "rb") as f:
                    while f.read(1 << 22):
                        pass
            except EOFError:
                return f"{what} file is truncated (its gzip stream ends early); copy or export it again"
            except (OSError, zlib.error):
                pass  # not gzip at all, or corrupt: ITK's reader says so
        return None
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    truncated = f"{what} file is truncated (fewer bytes than its header says); copy or export it again"
    floating = dtype.kind == "f"
    gz = path.lower().endswith(".gz")
    if not floating:  # no NaN possible: only the size matters
        if not gz:
            return truncated if os.path.getsize(path) < expected else None
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if int.from_bytes(f.read(4), "little") == expected % (1 << 32):
                return None  # else: count the decompressed bytes below
    total, finite, pending = 0, True, b""
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                if floating and finite:  # the voxel bytes of this block, whole voxels only
                    data = pending + block[max(0, offset - total):max(0, expected - total)]
                    whole = len(data) - len(data) % dtype.itemsize
                    finite, pending = bool(np.isfinite(np.frombuffer(data[:whole], dtype)).all()), data[whole:]
                total += len(block)
    except (EOFError, OSError, zlib.error):
        return truncated
    if total < expected:
        return truncated
    return None if finite else f"{what} contains NaN or Inf values; fix the export (e.g. replace them with 0)"


def _itk_detail(err: Exception) -> str:
    # ITK's message is "Exception thrown in ...:<line>\n<what went wrong>": keep the latter.
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    errors = [ln.split("ERROR:", 1)[-1].strip() for ln in lines if "ERROR" in ln]
    detail = (errors[0] if errors else (lines[-1] if lines else ""))[:200]
    return "".join(ch if ch.isprintable() and ord(ch) < 128 else "?" for ch in detail)  # one clean line


def _read_dicom(folder: str) -> sitk.Image:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    except RuntimeError:
        series = ()
    if not series:
        raise VolumeError(
            folder, "no readable DICOM series in this folder (files are not DICOM or are damaged); "
            "re-export the series or remove the folder"
        )
    if len(series) > 1:
        raise VolumeError(folder, f"folder holds {len(series)} DICOM series; move each series into its own folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0])
    if len(files) < 2:
        raise VolumeError(folder, f"DICOM series has {len(files)} slice file(s); give a 3D series with at least 2 slices")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOff()  # no tags are even read into memory
    reader.LoadPrivateTagsOff()
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise VolumeError(
            folder, f"DICOM series cannot be read ({_itk_detail(err)}); re-export the series (a slice may be truncated)"
        ) from None


def read_image(path: str, what: str, allow_4d: bool = False) -> sitk.Image:
    if os.path.isdir(path):
        img = _read_dicom(path)
    else:
        if os.path.getsize(path) == 0:
            raise VolumeError(path, f"{what} file is empty (0 bytes); re-export or copy it again")
        problem = _nifti_problem(path, what) if path.lower().endswith((".nii", ".nii.gz")) else None
        if problem:
            raise VolumeError(path, problem)
        try:
            img = sitk.ReadImage(path)
        except RuntimeError as err:
            raise VolumeError(
                path, f"{what} cannot be read ({_itk_detail(err)}); check that it is a valid NIfTI/NRRD/MHA file"
            ) from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(
            path,
            f"{what} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
            "give a single-channel 3D volume",
        )
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    dims_ok = img.GetDimension() == 3 or (allow_4d and img.GetDimension() == 4)
    if not dims_ok or min(img.GetSize()[:3]) < 2:
        raise VolumeError(
            path, f"{what} is not a 3D volume (size {img.GetSize()}); give 3D volumes with at least 2 slices"
        )
    return img


def select_frame(img: sitk.Image, t: int | None, path: str, what: str) -> sitk.Image:
    if t is None:
        if img.GetDimension() != 3:
            raise VolumeError(path, f"{what} is 4D where a 3D volume was expected; give one 3D volume per file")
        return img
    if img.GetDimension() != 4 or t >= img.GetSize()[3]:
        raise VolumeError(path, f"{what} has no time frame {t + 1} (size {img.GetSize()}); check the file")
    return img[:, :, :, t]


def select_channel(img: sitk.Image, c: int, path: str) -> sitk.Image:
    """Channel ``c`` (0-based, ``data.channel``) of an image whose 4th axis holds channels."""
    n = img.GetSize()[3] if img.GetDimension() == 4 else 1
    if c >= n:
        raise VolumeError(path, f"image has {n} channel(s) in its 4th axis, no channel {c}; set data.channel to "
                                f"0..{n - 1}")
    return img if img.GetDimension() == 3 else img[:, :, :, c]

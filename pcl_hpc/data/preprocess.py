"""Raw volumes (NIfTI / NRRD / MetaImage) -> the Zarr store that training reads.

Per volume: read with SimpleITK, reorient to one canonical orientation (so the same physical
image stored with permuted or flipped axes gives the same array), optionally resample in-plane,
normalise intensities, and write ``(Z, H, W)`` arrays with axial slices along Z plus the slice
positions ``(i + 1) / Z`` (PCL) and partitions ``floor(i * G / Z)`` (GCL).

A bad volume never stops the run: it is recorded in ``PreprocessSummary.failed`` with the file
and what to do, and the other volumes are converted. Re-running skips volumes whose source files
and settings are unchanged. Only pixel data and geometry are stored: no header fields, file paths
or other metadata that might identify a patient.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from pcl_hpc.config import DataConfig
from pcl_hpc.data import store as zstore
from pcl_hpc.errors import UserError

LAYOUTS = ("generic", "images")
MODALITIES = ("mri", "ct")
# DICOM-style code: array axis 0 (Z) runs inferior->superior, rows anterior->posterior, columns
# right->left, i.e. axial slices in the usual radiological view.
CANONICAL_ORIENTATION = "LPS"
SETTINGS_VERSION = 1  # bump when the conversion itself changes, so stores are rebuilt
EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass
class PreprocessSummary:
    converted: list[str] = field(default_factory=list)  # volume ids written this run
    skipped: list[str] = field(default_factory=list)  # volume ids already up to date
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason and what to do)
    store: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        head = (
            f"preprocess: {len(self.converted)} converted, {len(self.skipped)} skipped (unchanged), "
            f"{len(self.failed)} failed"
        )
        if self.store:
            head += f" -> {self.store}"
        lines = [head]
        lines += [f"  FAILED {path}: {reason}" for path, reason in self.failed]
        if self.failed:
            lines.append("  fix or remove the failed files and run preprocess again (converted volumes are kept)")
        return "\n".join(lines)


class _VolumeError(Exception):
    """A problem with one volume: (file, reason incl. what to do)."""

    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path = path
        self.reason = reason


@dataclass
class _Job:
    vid: str
    image: str
    label: str | None = None
    expect_label: bool = False  # from imagesTr: a missing label is an error


# ---------------------------------------------------------------- discovery


def _split_ext(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for ext in EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)], ext
    return None


def _image_files(folder: Path) -> list[tuple[str, Path]]:
    """``(stem, path)`` of readable-looking image files in ``folder`` (hidden files ignored)."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        split = _split_ext(p.name)
        if split:
            out.append((split[0], p))
    return out


def _discover(raw: Path, layout: str) -> tuple[list[_Job], list[tuple[str, str]]]:
    jobs: list[_Job] = []
    problems: list[tuple[str, str]] = []
    if layout == "images":
        for stem, path in _image_files(raw):
            jobs.append(_Job(stem, str(path)))
    else:
        for sub in ("imagesTr", "imagesTs"):
            files = _image_files(raw / sub)
            stems = {stem for stem, _ in files}
            for stem, path in files:
                m = re.match(r"^(.*)_(\d{4})$", stem)  # nnU-Net channel suffix
                if m and m.group(2) != "0000" and f"{m.group(1)}_0000" in stems:
                    continue  # PCL uses one channel: only channel 0000 of multi-channel cases
                case = m.group(1) if m and m.group(2) == "0000" else stem
                jobs.append(_Job(case, str(path), expect_label=(sub == "imagesTr")))
        labels = dict(_image_files(raw / "labelsTr"))
        for job in jobs:
            if job.expect_label:
                job.label = str(labels.pop(job.vid)) if job.vid in labels else None
        for stem, path in labels.items():
            problems.append(
                (str(path), f"label without an image; add imagesTr/{stem}.nii.gz (or _0000) or remove the label")
            )
    seen: dict[str, str] = {}
    unique = []
    for job in jobs:
        try:
            zstore.check_volume_id(job.vid)
        except UserError as err:
            problems.append((job.image, str(err)))
            continue
        if job.vid in seen:
            problems.append(
                (job.image, f"volume id {job.vid!r} also used by {seen[job.vid]}; rename one of the files")
            )
            continue
        seen[job.vid] = job.image
        unique.append(job)
    return unique, problems


# ---------------------------------------------------------------- per-volume conversion


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


def _nifti_truncated(path: str) -> bool:
    """True if a NIfTI file holds fewer bytes than its header promises.

    ITK silently zero-fills the missing part of a truncated .nii.gz (e.g. an interrupted copy),
    so this is checked before reading. The gzip trailer's ISIZE settles the common case cheaply;
    only when it disagrees is the stream decompressed to count the bytes.
    """
    try:
        header = nib.load(path).header
    except Exception:
        return False  # not parseable by nibabel: let ITK's reader report it
    expected = int(header["vox_offset"]) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if not path.lower().endswith(".gz"):
        return os.path.getsize(path) < expected
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected % (1 << 32):
            return False
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                total += len(block)
    except (EOFError, OSError, zlib.error):
        return True
    return total < expected


def _read(path: str, what: str) -> sitk.Image:
    if os.path.getsize(path) == 0:
        raise _VolumeError(path, f"{what} file is empty (0 bytes); re-export or copy it again")
    if path.lower().endswith((".nii", ".nii.gz")) and _nifti_truncated(path):
        raise _VolumeError(
            path, f"{what} file is truncated (fewer bytes than its header says); copy or export it again"
        )
    try:
        img = sitk.ReadImage(path)
    except RuntimeError as err:
        # ITK's message is "Exception thrown in ...:<line>\n<what went wrong>": keep the latter.
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        errors = [ln.split("ERROR:", 1)[-1].strip() for ln in lines if "ERROR" in ln]
        detail = errors[0] if errors else (lines[-1] if lines else "")
        raise _VolumeError(
            path, f"{what} cannot be read ({detail[:200]}); check that it is a valid NIfTI/NRRD/MHA file"
        ) from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise _VolumeError(
            path,
            f"{what} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
            "give a single-channel 3D volume",
        )
    if img.GetDimension() != 3 or min(img.GetSize()) < 2:
        raise _VolumeError(
            path, f"{what} is not a 3D volume (size {img.GetSize()}); give 3D volumes with at least 2 slices"
        )
    return img


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    spacing = np.array(a.GetSpacing())
    return (
        np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-3, atol=1e-4)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-3)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=float(spacing.max()) * 0.01 + 1e-4)
    )


def _resample_inplane(img: sitk.Image, target_yx: list[float] | None, interp: int) -> sitk.Image:
    if not target_yx:
        return img
    sx, sy, sz = img.GetSpacing()
    ty, tx = float(target_yx[0]), float(target_yx[1])
    if np.isclose(sx, tx) and np.isclose(sy, ty):
        return img
    nx, ny, nz = img.GetSize()
    size = [max(1, int(round(nx * sx / tx))), max(1, int(round(ny * sy / ty))), nz]
    return sitk.Resample(
        img, size, sitk.Transform(), interp, img.GetOrigin(), (tx, ty, sz), img.GetDirection(), 0.0,
        img.GetPixelID(),
    )


def _normalise(image: np.ndarray, modality: str, clip: list[float]) -> np.ndarray:
    lo, hi = np.percentile(image, [float(clip[0]), float(clip[1])])
    image = np.clip(image, lo, hi)
    if modality == "ct":
        out = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    else:
        std = image.std()
        out = (image - image.mean()) / std if std > 0 else np.zeros_like(image)
    return out.astype(np.float32)


def _convert(job: _Job, settings: dict[str, Any], settings_sha: str, store_path: str,
             existing: dict[str, Any] | None) -> tuple[str, str, str, str]:
    """Convert one volume; returns (status, vid, file, reason) with status converted/skipped/failed."""
    try:
        if job.expect_label and job.label is None:
            raise _VolumeError(
                job.image,
                f"no label labelsTr/{job.vid}.nii.gz; add it, or move the image to imagesTs/ to use it unlabeled",
            )
        try:
            src_sha = file_sha256(job.image)
        except OSError as err:
            raise _VolumeError(
                job.image, f"cannot read file ({err.strerror}); check that it exists and is readable"
            ) from None
        lab_sha = file_sha256(job.label) if job.label else None
        if (
            existing is not None
            and existing.get("source_sha256") == src_sha
            and existing.get("label_sha256") == lab_sha
            and existing.get("settings_sha256") == settings_sha
        ):
            return "skipped", job.vid, job.image, ""

        img = _read(job.image, "image")
        source_orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())
        original_shape = list(img.GetSize()[::-1])
        lab = None
        if job.label:
            lab = _read(job.label, "label")
            if lab.GetSize() != img.GetSize():
                raise _VolumeError(
                    job.label,
                    f"label shape {lab.GetSize()[::-1]} differs from image shape {img.GetSize()[::-1]} "
                    f"({job.image}); give the label on the image's voxel grid",
                )
            if not _same_geometry(img, lab):
                raise _VolumeError(
                    job.label,
                    "label origin/spacing/direction differ from the image's; resample the label onto the image grid",
                )
            lab.CopyInformation(img)  # tiny header rounding differences must not change the orientation

        img = sitk.DICOMOrient(img, CANONICAL_ORIENTATION)
        img = _resample_inplane(sitk.Cast(img, sitk.sitkFloat32), settings["target_spacing"], sitk.sitkLinear)
        image = sitk.GetArrayFromImage(img).astype(np.float32)  # (Z, H, W)
        if not np.isfinite(image).all():
            raise _VolumeError(
                job.image, "image contains NaN or Inf values; fix the export (e.g. replace them with 0)"
            )

        label = None
        if lab is not None:
            lab = sitk.DICOMOrient(lab, CANONICAL_ORIENTATION)
            values = sitk.GetArrayViewFromImage(lab)
            if not np.isfinite(values).all() or np.any(values != np.round(values)):
                raise _VolumeError(job.label, "label has non-integer values; labels must be integer class ids")
            if values.min() < 0 or values.max() > 255:
                raise _VolumeError(
                    job.label, f"label values {values.min()}..{values.max()} are outside 0..255; use class ids 0..255"
                )
            lab = _resample_inplane(
                sitk.Cast(lab, sitk.sitkUInt8), settings["target_spacing"], sitk.sitkNearestNeighbor
            )
            label = sitk.GetArrayFromImage(lab).astype(np.uint8)

        image = _normalise(image, settings["modality"], settings["clip_percentiles"])
        z = image.shape[0]
        g = settings["gcl_partitions"]
        sx, sy, sz = img.GetSpacing()
        attrs = {
            "spacing": [sz, sy, sx],
            "original_shape": original_shape,
            "orientation": source_orientation,
            "origin": list(img.GetOrigin()),
            "direction": list(img.GetDirection()),
            "positions": [(i + 1) / z for i in range(z)],
            "partitions": [i * g // z for i in range(z)],
            "source_sha256": src_sha,
            "label_sha256": lab_sha,
            "settings_sha256": settings_sha,
        }
        zstore.write_volume(store_path, job.vid, image, label, attrs)
        return "converted", job.vid, job.image, ""
    except _VolumeError as err:
        return "failed", job.vid, err.path, err.reason
    except MemoryError:
        return "failed", job.vid, job.image, "out of memory while converting; run with fewer workers"
    except Exception as err:  # keep going: one odd file must not cost the other volumes
        reason = f"unexpected {type(err).__name__}: {err}; please report this file's format"
        return "failed", job.vid, job.image, reason


# ---------------------------------------------------------------- driver


def _check_config(cfg: DataConfig) -> None:
    if not cfg.raw_dir:
        raise UserError("data.raw_dir is not set; set it to the folder of raw volumes")
    if not Path(cfg.raw_dir).is_dir():
        raise UserError(f"data.raw_dir {cfg.raw_dir} does not exist or is not a folder; check the path")
    if not cfg.store:
        raise UserError("data.store is not set; set it to the folder where the Zarr store should go")
    if cfg.layout not in LAYOUTS:
        raise UserError(f"data.layout {cfg.layout!r} is not known; valid layouts: {', '.join(LAYOUTS)}")
    if cfg.modality not in MODALITIES:
        raise UserError(f"data.modality {cfg.modality!r} is not known; valid: {', '.join(MODALITIES)}")
    clip = cfg.clip_percentiles
    if not (isinstance(clip, (list, tuple)) and len(clip) == 2 and 0 <= float(clip[0]) < float(clip[1]) <= 100):
        raise UserError(f"data.clip_percentiles {clip!r} must be two numbers 0 <= low < high <= 100, e.g. [1, 99]")
    ts = cfg.target_spacing
    if ts is not None and not (isinstance(ts, (list, tuple)) and len(ts) == 2 and all(float(s) > 0 for s in ts)):
        raise UserError(f"data.target_spacing {ts!r} must be null or two positive numbers [y, x] in mm")
    if int(cfg.gcl_partitions) < 1:
        raise UserError(f"data.gcl_partitions must be >= 1, got {cfg.gcl_partitions}")
    if int(cfg.folds) < 1:
        raise UserError(f"data.folds must be >= 1, got {cfg.folds}")


def volume_settings(cfg: DataConfig) -> dict[str, Any]:
    """The settings that determine the stored arrays (a change re-converts every volume)."""
    return {
        "version": SETTINGS_VERSION,
        "layout": cfg.layout,
        "modality": cfg.modality,
        "clip_percentiles": [float(c) for c in cfg.clip_percentiles],
        "target_spacing": [float(s) for s in cfg.target_spacing] if cfg.target_spacing else None,
        "gcl_partitions": int(cfg.gcl_partitions),
        "orientation": CANONICAL_ORIENTATION,
    }


def _class_names(raw: Path) -> list[str] | None:
    """Class names from an MSD / nnU-Net ``dataset.json`` if there is one."""
    path = raw / "dataset.json"
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text()).get("labels")
    except (OSError, ValueError):
        raise UserError(f"{path} is not valid JSON; fix it or remove it") from None
    if not isinstance(labels, dict) or not labels:
        return None
    try:
        if all(str(k).isdigit() for k in labels):  # MSD: {"0": "background", ...}
            by_id = {int(k): str(v) for k, v in labels.items()}
        else:  # nnU-Net v2: {"background": 0, ...}
            by_id = {int(v): str(k) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise UserError(f"{path}: 'labels' must map class ids to names") from None
    return [by_id.get(i, f"class_{i}") for i in range(max(by_id) + 1)]


def preprocess(cfg: DataConfig, *, workers: int = 1, progress: bool = True) -> PreprocessSummary:
    """Convert ``cfg.raw_dir`` into the Zarr store ``cfg.store``; returns what happened per volume."""
    _check_config(cfg)
    raw = Path(cfg.raw_dir)
    jobs, problems = _discover(raw, cfg.layout)
    if not jobs and not problems:
        where = "imagesTr/ or imagesTs/" if cfg.layout == "generic" else "the folder itself"
        raise UserError(
            f"no images ({', '.join(EXTENSIONS)}) found in data.raw_dir {raw} (layout {cfg.layout!r} "
            f"looks in {where}); check raw_dir and data.layout"
        )
    class_names = _class_names(raw) if cfg.layout == "generic" else None

    store_path = str(cfg.store)
    zstore.init_store(store_path)
    zstore.remove_leftovers(store_path)
    settings = volume_settings(cfg)
    settings_sha = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    stored = zstore.stored_volume_dirs(store_path)
    existing = {vid: zstore.volume_attrs(store_path, vid) for vid in stored}

    summary = PreprocessSummary(store=store_path)
    summary.failed.extend(problems)
    bar = tqdm(total=len(jobs), desc="preprocess", unit="vol", disable=not progress)
    results = []
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: the parent may hold threads (zarr IO, torch) that fork would copy broken
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(_convert, job, settings, settings_sha, store_path, existing.get(job.vid)): job
                for job in jobs
            }
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    results.append(fut.result())
                except Exception as err:  # a worker killed (e.g. out of memory) or crashed inside ITK
                    reason = f"worker process failed ({type(err).__name__}); run again with fewer workers"
                    results.append(("failed", job.vid, job.image, reason))
                bar.update()
    else:
        for job in jobs:
            results.append(_convert(job, settings, settings_sha, store_path, existing.get(job.vid)))
            bar.update()
    bar.close()

    kept = set()
    for status, vid, path, reason in sorted(results, key=lambda r: r[1]):
        if status == "failed":
            summary.failed.append((path, reason))
        else:
            kept.add(vid)
            (summary.converted if status == "converted" else summary.skipped).append(vid)
    # The store mirrors raw_dir: volumes whose source vanished or now fails are not left behind
    # looking current.
    for vid in stored:
        if vid not in kept:
            zstore.remove_volume(store_path, vid)
    zstore.write_manifest(store_path, {**settings, "folds": int(cfg.folds)}, class_names)
    return summary

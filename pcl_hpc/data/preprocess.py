"""Raw volumes (NIfTI / NRRD / MetaImage / DICOM series) -> the Zarr store that training reads.

Per source (see ``layouts.py`` for how each layout names them): read with SimpleITK (a DICOM
series folder through GDCM, without its metadata dictionary), split 4D sources into 3D frames,
reorient to one canonical orientation whose first array axis is ``data.slice_axis`` (so the same
physical image stored with permuted or flipped axes gives the same array), optionally resample
in-plane, normalise intensities, and write ``(Z, H, W)`` arrays plus the slice positions
``(i + 1) / Z`` (PCL) and partitions ``floor(i * G / Z)`` (GCL).

A bad volume never stops the run: it is recorded in ``PreprocessSummary.failed`` with the file
and what to do, and the other volumes are converted. Re-running skips volumes whose source files
and settings are unchanged. Only pixel data and geometry are stored: no header fields, DICOM tags,
file paths or other metadata that might identify a patient.

Volume ids (``data.id_scheme``): ``source`` keeps the case names of the files/folders (right for
public datasets such as ACDC's ``patientNNN``). ``hashed`` makes them pseudonymous for clinical
exports whose folders are named after the patient: ``v`` + the first 12 hex digits of
HMAC-SHA256(key, case name) (a 4D frame suffix ``_frameNN`` is kept, so folds still group a
patient's frames). The key is random, made on the first hashed run and kept NEXT TO the store, in
``<store>.idkey``, never inside it: with the key in the store, anyone holding the store could
confirm a guessed name (``DOE_JOHN_19700101``) by hashing it. The same key gives the same ids on
every re-run, so only changed sources are converted again; the manifest holds only a check value
of the key, so a lost or different key stops the run instead of silently renaming everything.
The mapping back to the sources is written only to ``<store>.idmap.csv``, also next to the store
(``id,source,label``, layout-relative paths); keep both files with the raw data, and share the
store alone. In hashed mode the summary and failure lines name a volume by its hashed id and the
layout folder it came from (``imagesTr/v1a2b...``); any source path or case name in a failure
reason is replaced the same way.
"""

from __future__ import annotations

import gzip
import csv
import hashlib
import hmac
import json
import os
import re
import secrets
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
from pcl_hpc.data import layouts
from pcl_hpc.data import store as zstore
from pcl_hpc.data.layouts import EXTENSIONS, LAYOUTS
from pcl_hpc.errors import UserError

MODALITIES = ("mri", "ct")
ID_SCHEMES = ("source", "hashed")
INTENSITIES = ("auto", "percentile", "zscore", "window")
INTERPOLATIONS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}
# DICOM-style codes (each letter: where the index of x, y, z increases towards). Axial: array axis
# 0 (Z) runs inferior->superior, rows anterior->posterior, columns right->left (radiological view).
# Coronal: slices anterior->posterior, rows superior->inferior. Sagittal: slices right->left,
# rows superior->inferior, columns anterior->posterior.
ORIENTATIONS = {"axial": "LPS", "coronal": "LIP", "sagittal": "PIL"}
CANONICAL_ORIENTATION = ORIENTATIONS["axial"]
SETTINGS_VERSION = 2  # bump when the conversion itself changes, so stores are rebuilt


@dataclass
class PreprocessSummary:
    converted: list[str] = field(default_factory=list)  # volume ids written this run
    skipped: list[str] = field(default_factory=list)  # volume ids already up to date
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason and what to do)
    store: str = ""
    source_bytes: int = 0  # voxel bytes read for the converted volumes (for throughput figures)

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


# ---------------------------------------------------------------- reading


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
        raise _VolumeError(
            folder, "no readable DICOM series in this folder (files are not DICOM or are damaged); "
            "re-export the series or remove the folder"
        )
    if len(series) > 1:
        raise _VolumeError(folder, f"folder holds {len(series)} DICOM series; move each series into its own folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0])
    if len(files) < 2:
        raise _VolumeError(folder, f"DICOM series has {len(files)} slice file(s); give a 3D series with at least 2 slices")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOff()  # no tags are even read into memory
    reader.LoadPrivateTagsOff()
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise _VolumeError(
            folder, f"DICOM series cannot be read ({_itk_detail(err)}); re-export the series (a slice may be truncated)"
        ) from None


def _read(path: str, what: str, allow_4d: bool = False) -> sitk.Image:
    if os.path.isdir(path):
        img = _read_dicom(path)
    else:
        if os.path.getsize(path) == 0:
            raise _VolumeError(path, f"{what} file is empty (0 bytes); re-export or copy it again")
        if path.lower().endswith((".nii", ".nii.gz")) and _nifti_truncated(path):
            raise _VolumeError(
                path, f"{what} file is truncated (fewer bytes than its header says); copy or export it again"
            )
        try:
            img = sitk.ReadImage(path)
        except RuntimeError as err:
            raise _VolumeError(
                path, f"{what} cannot be read ({_itk_detail(err)}); check that it is a valid NIfTI/NRRD/MHA file"
            ) from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise _VolumeError(
            path,
            f"{what} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
            "give a single-channel 3D volume",
        )
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    dims_ok = img.GetDimension() == 3 or (allow_4d and img.GetDimension() == 4)
    if not dims_ok or min(img.GetSize()[:3]) < 2:
        raise _VolumeError(
            path, f"{what} is not a 3D volume (size {img.GetSize()}); give 3D volumes with at least 2 slices"
        )
    return img


def _frame(img: sitk.Image, t: int | None, path: str, what: str) -> sitk.Image:
    if t is None:
        if img.GetDimension() != 3:
            raise _VolumeError(path, f"{what} is 4D where a 3D volume was expected; give one 3D volume per file")
        return img
    if img.GetDimension() != 4 or t >= img.GetSize()[3]:
        raise _VolumeError(path, f"{what} has no time frame {t + 1} (size {img.GetSize()}); check the file")
    return img[:, :, :, t]


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
    # Keep the physical centre of the first voxel's footprint: the new grid starts half a new voxel
    # in from the old grid's edge.
    size = [max(1, int(round(nx * sx / tx))), max(1, int(round(ny * sy / ty))), nz]
    direction = np.array(img.GetDirection()).reshape(3, 3)
    shift = direction @ np.array([(tx - sx) / 2, (ty - sy) / 2, 0.0])
    origin = tuple(np.array(img.GetOrigin()) + shift)
    return sitk.Resample(img, size, sitk.Transform(), interp, origin, (tx, ty, sz), img.GetDirection(), 0.0,
                         img.GetPixelID())


def _normalise(image: np.ndarray, method: str, clip: list[float], window: list[float]) -> np.ndarray:
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


def _labels(values: np.ndarray, settings: dict[str, Any], path: str) -> np.ndarray:
    """Raw label voxels -> uint8 class ids under the layout's convention, or a clear error."""
    if not np.isfinite(values).all() or np.any(values != np.round(values)):
        raise _VolumeError(path, "label has non-integer values; labels must be integer class ids")
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
            raise _VolumeError(
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
        raise _VolumeError(
            path, f"label values {bad[:8]} are outside {where}; fix the label file or the class list "
            "(dataset.json 'labels')",
        )
    return values.astype(np.uint8)


def _volume(img: sitk.Image, lab: sitk.Image | None, settings: dict[str, Any], image_path: str,
            label_path: str | None) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """One 3D image (+ label) -> normalised (Z, H, W) arrays and their attrs."""
    source_orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())
    original_shape = list(img.GetSize()[::-1])
    if lab is not None:
        if lab.GetSize() != img.GetSize():
            raise _VolumeError(
                label_path,
                f"label shape {lab.GetSize()[::-1]} differs from image shape {img.GetSize()[::-1]} "
                f"({image_path}); give the label on the image's voxel grid",
            )
        if not _same_geometry(img, lab):
            raise _VolumeError(
                label_path,
                "label origin/spacing/direction differ from the image's; resample the label onto the image grid",
            )
        lab.CopyInformation(img)  # tiny header rounding differences must not change the orientation

    orientation = ORIENTATIONS[settings["slice_axis"]]
    img = sitk.DICOMOrient(img, orientation)
    image = sitk.GetArrayViewFromImage(img)
    if not np.isfinite(image).all():
        raise _VolumeError(image_path, "image contains NaN or Inf values; fix the export (e.g. replace them with 0)")
    img = _resample_inplane(sitk.Cast(img, sitk.sitkFloat32), settings["target_spacing"],
                            INTERPOLATIONS[settings["interpolation"]])
    image = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)  # (Z, H, W)

    label = None
    if lab is not None:
        lab = sitk.DICOMOrient(lab, orientation)
        values = _labels(sitk.GetArrayFromImage(lab), settings, label_path)
        lab_u8 = sitk.GetImageFromArray(values)
        lab_u8.CopyInformation(lab)
        label = sitk.GetArrayFromImage(
            _resample_inplane(lab_u8, settings["target_spacing"], sitk.sitkNearestNeighbor)
        ).astype(np.uint8)

    image = _normalise(image, settings["intensity"], settings["clip_percentiles"], settings["hu_window"])
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


def _convert(job: layouts.Job, settings: dict[str, Any], settings_sha: str, store_path: str,
             existing: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str, int]]:
    """Convert one source; per output volume (status, vid, file, reason, source bytes)."""
    results: list[tuple[str, str, str, str, int]] = []
    todo = list(job.outputs)
    try:
        if job.expect_label and job.label is None:
            raise _VolumeError(
                job.image,
                "no label found for this image; add it (see the layout's naming), or move the image where "
                "unlabeled images go (imagesTs/ for the generic layout)",
            )
        try:
            src_sha = source_sha256(job.image)
            lab_sha = source_sha256(job.label) if job.label else None
        except OSError as err:
            raise _VolumeError(
                job.image, f"cannot read file ({err.strerror}); check that it exists and is readable"
            ) from None
        pending = []
        for vid, t in todo:
            old = existing.get(vid)
            if (old is not None and old.get("source_sha256") == src_sha and old.get("label_sha256") == lab_sha
                    and old.get("settings_sha256") == settings_sha):
                results.append(("skipped", vid, job.image, "", 0))
            else:
                pending.append((vid, t))
        todo = pending
        if not todo:
            return results

        img4 = _read(job.image, "image", allow_4d=True)
        lab4 = _read(job.label, "label", allow_4d=True) if job.label else None
        while todo:
            vid, t = todo[0]
            try:
                img = _frame(img4, t, job.image, "image")
                lab = _frame(lab4, t if job.label_frames else None, job.label, "label") if lab4 is not None else None
                image, label, attrs = _volume(img, lab, settings, job.image, job.label)
                attrs.update({
                    "frame": None if t is None else t + 1,
                    "patient": zstore.patient_id(vid),
                    "source_sha256": src_sha,
                    "label_sha256": lab_sha,
                    "settings_sha256": settings_sha,
                })
                zstore.write_volume(store_path, vid, image, label, attrs, compressor=settings["compressor"])
                nbytes = img.GetNumberOfPixels() * img.GetSizeOfPixelComponent()
                results.append(("converted", vid, job.image, "", int(nbytes)))
            except _VolumeError as err:
                results.append(("failed", vid, err.path, err.reason, 0))
            todo.pop(0)
    except _VolumeError as err:
        results += [("failed", vid, err.path, err.reason, 0) for vid, _ in todo]
    except MemoryError:
        results += [("failed", vid, job.image, "out of memory while converting; run with fewer workers", 0)
                    for vid, _ in todo]
    except Exception as err:  # keep going: one odd file must not cost the other volumes
        reason = f"unexpected {type(err).__name__}: {str(err)[:200]}; please report this file's format"
        results += [("failed", vid, job.image, reason, 0) for vid, _ in todo]
    return results


# ---------------------------------------------------------------- pseudonymous ids


def id_key_path(store_path: str | Path) -> Path:
    """Where the id key of a hashed store is kept: beside the store, never inside it."""
    return Path(str(store_path).rstrip("/\\") + ".idkey")


def id_map_path(store_path: str | Path) -> Path:
    """The hashed id -> source mapping, beside the store (keep it with the raw data)."""
    return Path(str(store_path).rstrip("/\\") + ".idmap.csv")


def _key_check(key: bytes) -> str:
    return hmac.new(key, b"pcl-hpc volume id key check", hashlib.sha256).hexdigest()[:16]


def hashed_id(key: bytes, vid: str) -> str:
    """``v`` + 12 hex digits of HMAC-SHA256(key, case name); a ``_frameNN`` suffix is kept."""
    case = zstore.patient_id(vid)
    return "v" + hmac.new(key, case.encode("utf-8"), hashlib.sha256).hexdigest()[:12] + vid[len(case):]


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (replacing it atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _id_key(store_path: str) -> bytes:
    """The store's id key: read from ``<store>.idkey``, or made for a store that has no hashed ids yet."""
    path = id_key_path(store_path)
    try:
        previous = zstore.read_manifest(store_path)["settings"]
    except UserError:
        previous = {}
    if path.is_file():
        try:
            key = bytes.fromhex(path.read_text().strip())
        except ValueError:
            key = b""
        if len(key) < 16:
            raise UserError(f"id key file {path} is damaged; restore it from a backup, or preprocess into a new store")
    elif previous.get("id_key_check"):
        raise UserError(
            f"store {store_path} has hashed volume ids but their key file {path} is missing; restore it "
            "(it is kept beside the store), or preprocess into a new store"
        )
    else:
        key = secrets.token_bytes(32)
        _write_private(path, key.hex() + "\n")
    if previous.get("id_key_check") not in (None, _key_check(key)):
        raise UserError(
            f"id key file {path} is not the key store {store_path} was built with; restore the right one, "
            "or preprocess into a new store"
        )
    return key


class _Pseudonyms:
    """Hashed ids for the jobs, and the scrubbing of source paths / case names out of report lines."""

    def __init__(self, key: bytes, raw: Path, jobs: list[layouts.Job]):
        self.key, self.raw = key, raw
        self.tokens: dict[str, str] = {}  # source path -> "folder/hashed id"
        self.names: dict[str, str] = {}  # case name -> hashed id
        self.rows: list[tuple[str, str, str]] = []
        for job in jobs:
            source_ids = job.vids
            job.outputs = [(hashed_id(key, vid), t) for vid, t in job.outputs]
            hid = zstore.patient_id(job.outputs[0][0]) if job.outputs else ""
            self.tokens[job.image] = self._folder(job.image) + hid
            if job.label:
                self.tokens[job.label] = self._folder(job.label) + hid + "(label)"
            for vid, (new, _) in zip(source_ids, job.outputs):
                self.names[vid] = new
                self.names.setdefault(zstore.patient_id(vid), zstore.patient_id(new))
                self.rows.append((new, self._rel(job.image), self._rel(job.label) if job.label else ""))
            for p in (job.image, job.label):
                if p:
                    stem = layouts.split_ext(Path(p).name)
                    self.names.setdefault(stem[0] if stem else Path(p).name, hid)

    def _rel(self, path: str) -> str:
        try:
            return Path(path).relative_to(self.raw).as_posix()
        except ValueError:
            return Path(path).name

    def _folder(self, path: str) -> str:
        parent = Path(self._rel(path)).parent.as_posix()
        return "" if parent == "." else parent + "/"

    def token(self, path: str) -> str:
        if path in self.tokens:
            return self.tokens[path]
        rel = self._rel(path)
        tok = "p" + hmac.new(self.key, rel.encode("utf-8"), hashlib.sha256).hexdigest()[:12]
        self.rows.append((tok, rel, ""))
        stem = layouts.split_ext(Path(path).name)
        stem = stem[0] if stem else Path(path).name
        for name in (stem, re.sub(r"_\d{4}$", "", stem)):  # a reason may name the case, not the file
            self.names.setdefault(name, tok)
        self.tokens[path] = self._folder(path) + tok
        return self.tokens[path]

    def scrub(self, text: str) -> str:
        raw = re.escape(str(self.raw))
        text = re.sub(raw + r"[^\s;,'\"()\[\]]*", lambda m: self.token(m.group(0)), text)
        for name in sorted(self.names, key=len, reverse=True):
            if len(name) >= 3:
                text = text.replace(name, self.names[name])
        return text

    def write_map(self, store_path: str) -> None:
        lines = [("id", "source", "label"), *sorted(set(self.rows))]
        from io import StringIO

        buf = StringIO()
        csv.writer(buf).writerows(lines)
        _write_private(id_map_path(store_path), buf.getvalue())


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
    if cfg.slice_axis not in ORIENTATIONS:
        raise UserError(f"data.slice_axis {cfg.slice_axis!r} is not known; valid: {', '.join(ORIENTATIONS)}")
    if cfg.intensity not in INTENSITIES:
        raise UserError(f"data.intensity {cfg.intensity!r} is not known; valid: {', '.join(INTENSITIES)}")
    if cfg.intensity == "window":
        if cfg.modality != "ct":
            raise UserError("data.intensity=window clips Hounsfield units and needs data.modality=ct; "
                            "use percentile or zscore for MRI")
        w = cfg.hu_window
        if not (isinstance(w, (list, tuple)) and len(w) == 2 and float(w[0]) < float(w[1])):
            raise UserError(f"data.hu_window {w!r} must be two numbers [low, high] in HU with low < high")
    if cfg.interpolation not in INTERPOLATIONS:
        raise UserError(f"data.interpolation {cfg.interpolation!r} is not known; valid: {', '.join(INTERPOLATIONS)}")
    if cfg.compressor not in zstore.COMPRESSORS:
        raise UserError(f"data.compressor {cfg.compressor!r} is not known; valid: {', '.join(zstore.COMPRESSORS)}")
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
    if cfg.id_scheme not in ID_SCHEMES:
        raise UserError(f"data.id_scheme {cfg.id_scheme!r} is not known; valid: {', '.join(ID_SCHEMES)}")


def resolved_intensity(cfg: DataConfig) -> str:
    if cfg.intensity != "auto":
        return cfg.intensity
    return "percentile" if cfg.modality == "ct" else "zscore"


def volume_settings(cfg: DataConfig, class_names: list[str] | None = None) -> dict[str, Any]:
    """The settings that determine the stored arrays (a change re-converts every volume)."""
    intensity = resolved_intensity(cfg)
    mapping = layouts.LABEL_MAPS.get(cfg.layout)
    return {
        "version": SETTINGS_VERSION,
        "layout": cfg.layout,
        "modality": cfg.modality,
        "intensity": intensity,
        "clip_percentiles": [float(c) for c in cfg.clip_percentiles],
        "hu_window": [float(w) for w in cfg.hu_window] if intensity == "window" else None,
        "target_spacing": [float(s) for s in cfg.target_spacing] if cfg.target_spacing else None,
        "interpolation": cfg.interpolation,
        "slice_axis": cfg.slice_axis,
        "orientation": ORIENTATIONS[cfg.slice_axis],
        "gcl_partitions": int(cfg.gcl_partitions),
        "compressor": cfg.compressor,
        "num_classes": len(class_names) if class_names else None,
        "label_map": {str(k): v for k, v in mapping.items()} if mapping else None,
        "label_above_to_zero": layouts.LABEL_ABOVE_TO_ZERO.get(cfg.layout),
    }


def preprocess(cfg: DataConfig, *, workers: int = 1, progress: bool = True) -> PreprocessSummary:
    """Convert ``cfg.raw_dir`` into the Zarr store ``cfg.store``; returns what happened per volume."""
    _check_config(cfg)
    raw = Path(cfg.raw_dir)
    jobs, problems = layouts.discover(raw, cfg.layout)
    if not jobs and not problems:
        raise UserError(
            f"no images ({', '.join(EXTENSIONS)} or DICOM series folders) found in data.raw_dir {raw} "
            f"for layout {cfg.layout!r} (see pcl_hpc/data/layouts.py for what each layout looks for); "
            "check raw_dir and data.layout"
        )
    class_names = layouts.class_names(raw, cfg.layout)

    store_path = str(cfg.store)
    names = None
    if cfg.id_scheme == "hashed":
        if Path(store_path).is_dir() and any(Path(store_path).iterdir()) and not zstore.is_store(store_path):
            zstore.init_store(store_path)  # its clear error, before a key file is made beside other data
        names = _Pseudonyms(_id_key(store_path), raw, jobs)
        problems = [(names.token(path), names.scrub(reason)) for path, reason in problems]
        seen: dict[str, str] = {}
        for job in list(jobs):  # 48-bit ids: a collision is next to impossible, but never merge two cases
            clash = next((vid for vid in job.vids if vid in seen), None)
            if clash:
                problems.append((names.token(job.image), f"hashed id {clash} collides with {seen[clash]}; "
                                 "preprocess into a new store (a new key)"))
                jobs.remove(job)
            else:
                seen.update({vid: names.token(job.image) for vid in job.vids})
    zstore.init_store(store_path)
    zstore.remove_leftovers(store_path)
    settings = volume_settings(cfg, class_names)
    settings_sha = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    stored = zstore.stored_volume_dirs(store_path)
    existing = {vid: zstore.volume_attrs(store_path, vid) for vid in stored}

    def existing_for(job):
        return {vid: existing[vid] for vid in job.vids if vid in existing}

    summary = PreprocessSummary(store=store_path)
    summary.failed.extend(problems)
    total = sum(len(job.outputs) for job in jobs)
    bar = tqdm(total=total, desc="preprocess", unit="vol", disable=not progress)
    results = []
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: the parent may hold threads (zarr IO, torch) that fork would copy broken
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(_convert, job, settings, settings_sha, store_path, existing_for(job)): job
                for job in jobs
            }
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    out = fut.result()
                except Exception as err:  # a worker killed (e.g. out of memory) or crashed inside ITK
                    reason = f"worker process failed ({type(err).__name__}); run again with fewer workers"
                    out = [("failed", vid, job.image, reason, 0) for vid in job.vids]
                results += out
                bar.update(len(out))
    else:
        for job in jobs:
            out = _convert(job, settings, settings_sha, store_path, existing_for(job))
            results += out
            bar.update(len(out))
    bar.close()

    multi = {vid for job in jobs if len(job.outputs) > 1 for vid in job.vids}
    kept = set()
    for status, vid, path, reason, nbytes in sorted(results, key=lambda r: r[1]):
        if status == "failed":
            if names is not None:
                path, reason = names.token(path), names.scrub(reason)
            summary.failed.append((path, f"[{vid}] {reason}" if vid in multi else reason))
        else:
            kept.add(vid)
            (summary.converted if status == "converted" else summary.skipped).append(vid)
            summary.source_bytes += nbytes
    # The store mirrors raw_dir: volumes whose source vanished or now fails are not left behind
    # looking current.
    for vid in stored:
        if vid not in kept:
            zstore.remove_volume(store_path, vid)
    if names is not None:
        names.write_map(store_path)
    ids = {"id_scheme": cfg.id_scheme, "id_key_check": _key_check(names.key) if names is not None else None}
    zstore.write_manifest(
        store_path, {**settings, "folds": int(cfg.folds), "fold_seed": int(cfg.fold_seed), **ids}, class_names
    )
    return summary


"""`pcl-hpc predict`: segment new scans with a fine-tuned model, masks on each scan's own grid.

The model carries its preprocessing (``model_spec.json`` beside ``model.pt``, or the same two
files as a registry version), so one folder or one ``models:/<name>@<alias>`` is all it needs.
Per scan: read with the project's readers (NIfTI, NRRD, MHA, DICOM series folders), apply exactly
the training preprocessing (``volume_arrays``: canonical orientation, in-plane resampling,
intensity normalisation), predict whole slices with `pcl_hpc.inference` (the forward pass that
also scores validation and test volumes: batches, padding to a multiple of 16, bf16 autocast on
CUDA, optional flip test-time augmentation), then map the class probabilities back:
inverse in-plane resampling (linear on the probabilities, then argmax), inverse orientation, and
the input's size, spacing, origin and direction copied onto the label image. Beside each mask a
JSON sidecar names the classes and the model's version and lineage; no header field or DICOM
tag of the input is copied to either.

A bad scan (unreadable, truncated, 2D, NaN voxels, a channel count that does not fit) is one
line naming the file; the other scans are still predicted and the command exits 1 at the end.
An existing mask is kept (counted as skipped) unless ``overwrite``; every file is written
atomically, the sidecar first and the mask last, so a requeued job skips the finished scans. A job
array splits the scans with ``shard=(i, k)`` (``--shard I/K``): every k-th scan in path order from the i-th.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from pcl_hpc.atomic import atomic_path, write_text
from pcl_hpc.data.geometry import ORIENTATIONS
from pcl_hpc.data.layouts import is_dicom_dir, split_ext
from pcl_hpc.data.readers import read_image, select_channel
from pcl_hpc.data.volume import VolumeError, volume_arrays
from pcl_hpc.errors import UserError
from pcl_hpc.inference import AUTO_BATCH, auto_batch, default_device, predict_probabilities  # noqa: F401 (AUTO_BATCH: tools)
from pcl_hpc.models.unet import build_from_spec
from pcl_hpc.tracking.models import SegmentationModel, open_segmentation_model

FORMATS = ("nii.gz", "keep")
# --format keep: the input's own format; a MetaImage header+raw pair becomes one .mha, DICOM .nii.gz
KEEP_EXTENSIONS = {".nii.gz": ".nii.gz", ".nii": ".nii", ".nrrd": ".nrrd", ".mha": ".mha", ".mhd": ".mha"}
SIDECAR_FORMAT = 1
ID_MAP_FILE = "idmap.csv"  # with --id-key: hashed output name -> input name, readable by its owner only


@dataclass
class PredictSummary:
    written: list[str] = field(default_factory=list)  # masks written this run
    skipped: list[str] = field(default_factory=list)  # masks already there (kept without --overwrite)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, reason incl. what to do)
    output: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        rate = len(self.written) / self.seconds if self.seconds > 0 else 0.0
        return (f"predict: {len(self.written)} written, {len(self.skipped)} skipped (mask exists; --overwrite "
                f"replaces it), {len(self.failed)} failed in {self.seconds:.1f} s ({rate:.2f} volumes/s) -> {self.output}")

    def format(self) -> str:
        """One line per failed scan, then the one-line summary."""
        return "\n".join([f"predict: FAILED {path}: {reason}" for path, reason in self.failed] + [self.line()])


# ---------------------------------------------------------------- the network


def build_network(model: SegmentationModel, where: str) -> torch.nn.Module:
    """The U-Net of a spec with its weights loaded (a mismatch is a UserError naming ``where``), one input channel."""
    try:
        net = build_from_spec(model.spec, model.state)
    except ValueError as err:
        raise UserError(f"{where}: the weights do not fit the network in model_spec.json ({err}); the two files "
                        "must come from the same fine-tuning") from None
    if net.encoder.in_channels != 1:
        raise UserError(f"{where}: the network takes {net.encoder.in_channels} input channels; predict feeds one "
                        "channel per scan (data.channel)")
    return net


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "":
        return default_device()
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise UserError(f"predict: device {device!r} is not a torch device ({err}); use cpu, cuda or cuda:<n>") from None


# ---------------------------------------------------------------- one scan


def preprocess_scan(img: sitk.Image, settings: dict[str, Any], path: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The training preprocessing of one 3D scan: ``(Z, H, W)`` normalised array and its attrs."""
    image, _, attrs = volume_arrays(img, None, settings, path, None)
    return image, attrs


def to_source_grid(prob: np.ndarray, source: sitk.Image, attrs: dict[str, Any], settings: dict[str, Any]) -> sitk.Image:
    """(Z, H, W, C) probabilities on the preprocessed grid -> uint8 label image on ``source``'s grid.

    Inverse in-plane resampling (linear on the probabilities; outside the grid: background), argmax,
    inverse orientation (``DICOMOrient`` back to the source's orientation), then the source's
    size/spacing/origin/direction exactly (``CopyInformation``: geometry only, no metadata)."""
    ref = sitk.Image(source.GetSize(), sitk.sitkUInt8)  # the source's grid without its voxels
    ref.CopyInformation(source)
    oriented = sitk.DICOMOrient(ref, ORIENTATIONS[settings["slice_axis"]])  # the grid before resampling
    sz, sy, sx = attrs["spacing"]
    same = (tuple(oriented.GetSize()) == (prob.shape[2], prob.shape[1], prob.shape[0])
            and np.allclose(oriented.GetSpacing(), (sx, sy, sz)))
    if same:  # no in-plane resampling happened: the probabilities are on the oriented grid already
        labels = prob.argmax(-1).astype(np.uint8)
    else:
        grid = sitk.GetImageFromArray(prob, isVector=True)
        grid.SetSpacing((sx, sy, sz))
        grid.SetOrigin(tuple(attrs["origin"]))
        grid.SetDirection(tuple(attrs["direction"]))
        back = sitk.Resample(grid, oriented, sitk.Transform(), sitk.sitkLinear, 0.0)
        labels = sitk.GetArrayViewFromImage(back).argmax(-1).astype(np.uint8)
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(oriented)
    lab = sitk.DICOMOrient(lab, attrs["orientation"])
    if lab.GetSize() != source.GetSize():  # cannot happen for a permutation/flip; never write a misfit
        raise VolumeError(str(source), f"mask size {lab.GetSize()} differs from the scan's {source.GetSize()} after "
                                       "reorientation; please report this scan's orientation")
    lab.CopyInformation(source)
    return lab


def read_scan(path: Path, settings: dict[str, Any]) -> sitk.Image:
    """The 3D scan at ``path`` (a 4D one: channel ``settings['channel']``, the channel trained on)."""
    img = read_image(str(path), "image", allow_4d=True)
    if img.GetDimension() == 4:
        img = select_channel(img, int(settings.get("channel") or 0), str(path))
    return img


def segment(net: torch.nn.Module, img: sitk.Image, settings: dict[str, Any], path: str, device: torch.device,
            batch: int | None = None, tta: bool = False) -> sitk.Image:
    """One scan -> its label image on its own grid."""
    image, attrs = preprocess_scan(img, settings, path)
    prob = predict_probabilities(net, image, device, batch=batch, tta=tta)
    return to_source_grid(prob, img, attrs, settings)


# ---------------------------------------------------------------- inputs and outputs


@dataclass
class Scan:
    path: Path
    name: str  # output stem: file name without extension, or the DICOM series folder's name
    ext: str  # ".nii.gz", ".nrrd", ... or "dicom"


def _scan(path: Path) -> Scan:
    if path.is_dir():
        return Scan(path, path.name, "dicom")
    split = split_ext(path.name)
    if split:
        return Scan(path, split[0], split[1].lower())
    return Scan(path, path.name.split(".", 1)[0] or path.name, "")


def list_scans(inputs: str | Path | list) -> list[Scan]:
    """Scans named by ``inputs``: files, DICOM series folders, or folders holding either."""
    scans: list[Scan] = []
    for item in ([inputs] if isinstance(inputs, (str, Path)) else list(inputs)):
        path = Path(item).expanduser()
        if path.is_file() or is_dicom_dir(path):
            scans.append(_scan(path))
        elif path.is_dir():
            found = [p for p in sorted(path.iterdir()) if not p.name.startswith(".")
                     and ((p.is_file() and split_ext(p.name)) or is_dicom_dir(p))]
            if not found:
                raise UserError(f"predict: no scans (.nii.gz, .nii, .nrrd, .mha, .mhd or DICOM series folders) in "
                                f"{path}; pass a scan, a DICOM series folder or a folder of them")
            scans += [_scan(p) for p in found]
        else:
            raise UserError(f"predict: input {path} not found; pass a scan, a DICOM series folder or a folder of them")
    return scans


def _output_ext(scan: Scan, fmt: str) -> str:
    return KEEP_EXTENSIONS.get(scan.ext, ".nii.gz") if fmt == "keep" else ".nii.gz"


def _write_image(img: sitk.Image, path: Path, ext: str) -> None:
    """Atomically: ITK picks the writer by extension, so the temp file gets the extension too."""
    with atomic_path(path) as tmp:
        staged = tmp.with_name(tmp.name + ext)
        try:
            sitk.WriteImage(img, str(staged), True)
            os.replace(staged, tmp)
        finally:
            if staged.exists():
                staged.unlink()


def _sidecar(model: SegmentationModel, scan: Scan, ext: str, tta: bool, mask: sitk.Image) -> dict[str, Any]:
    """What the mask is: classes, the model's version and lineage, how it was made. Nothing of the
    input's header: no name, path, DICOM tag or date."""
    spec = model.spec
    names = list(spec["class_names"])
    pre = spec["preprocessing"]
    labels = np.bincount(sitk.GetArrayViewFromImage(mask).ravel(), minlength=len(names))
    return {
        "format": SIDECAR_FORMAT,
        "kind": "pcl-hpc-prediction",
        "mask_format": ext.lstrip("."),
        "input_kind": "dicom-series" if scan.ext == "dicom" else (scan.ext.lstrip(".") or "other"),
        "class_names": names,
        "labels": {str(i): n for i, n in enumerate(names)},
        "voxels_per_class": {n: int(c) for n, c in zip(names, labels)},
        "model": {**model.lineage, "spec_format": spec.get("format"), "kind": spec.get("kind"),
                  "num_classes": spec.get("num_classes"), "network": spec.get("model"),
                  "encoder": spec.get("encoder"), "store_hash": spec.get("store_hash", ""),
                  "train_volumes": spec.get("train_volumes")},
        "preprocessing": {k: pre.get(k) for k in ("slice_axis", "orientation", "target_spacing", "interpolation",
                                                    "modality", "intensity", "clip_percentiles", "hu_window",
                                                    "channel", "id_scheme")},
        "tta": "flips" if tta else "none",
        "geometry": {"size": list(mask.GetSize()), "spacing": list(mask.GetSpacing())},
    }


def _load_id_key(id_key: str | Path, spec: dict[str, Any]) -> bytes:
    from pcl_hpc.data.pseudonym import key_check

    path = Path(id_key).expanduser()
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as err:
        raise UserError(f"predict: id key file {path} cannot be read ({_first_line(err)}); pass the <store>.idkey "
                        "file kept beside the model's store") from None
    check = spec["preprocessing"].get("id_key_check")
    if len(key) < 16 or (check and key_check(key) != check):
        raise UserError(f"predict: {path} is not the id key of the store this model was trained on; pass that "
                        "store's <store>.idkey")
    return key


def _write_id_map(output: Path, rows: dict[str, str]) -> None:
    from pcl_hpc.data.pseudonym import _write_private

    path = output / ID_MAP_FILE
    merged: dict[str, str] = {}
    if path.is_file():
        with open(path, newline="") as f:
            merged = {r["id"]: r["source"] for r in csv.DictReader(f) if r.get("id")}
    merged.update(rows)
    buf = io.StringIO()
    csv.writer(buf).writerows([("id", "source"), *sorted(merged.items())])
    _write_private(path, buf.getvalue())


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


# ---------------------------------------------------------------- the command


def predict(model: str | Path | SegmentationModel, inputs: str | Path | list, output: str | Path, *,
            tta: bool = False, fmt: str = "nii.gz", overwrite: bool = False, device: str | torch.device | None = None,
            batch: int = 0, progress: bool = True, tracking_uri: str | None = None,
            id_key: str | Path | None = None, shard: tuple[int, int] | None = None) -> PredictSummary:
    """Segment every scan in ``inputs`` into ``output``; returns what happened per scan.

    ``model``: a fine-tuning folder, a ``model.pt`` with ``model_spec.json`` beside it,
    ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` (looked up at ``tracking_uri``, default
    the process's / ``$MLFLOW_TRACKING_URI``), or an already opened :class:`SegmentationModel`.
    ``inputs``: a scan file, a DICOM series folder, a folder of them, or a list of these.
    Writes ``<output>/<name><ext>`` (``fmt`` ``nii.gz``, or ``keep``: the input's format, DICOM ->
    .nii.gz) and ``<output>/<name>.json``; ``<name>`` is the input's file name without extension
    (a DICOM series: its folder name), or with ``id_key`` (the model's store's ``<store>.idkey``)
    the store's hashed id of that name, mapped back in ``<output>/idmap.csv`` (owner-only).
    ``shard=(i, k)``: only ``scans[i::k]`` of the scans sorted by path (array task i of k); names,
    clashes and the id map are settled over all scans, so the shards together write what one run does.
    A problem with the model, the inputs or the output folder raises UserError; a problem with one
    scan is recorded in ``failed`` and the other scans are still predicted."""
    if fmt not in FORMATS:
        raise UserError(f"predict: format {fmt!r} is not known; valid: {', '.join(FORMATS)}")
    if int(batch) < 0:
        raise UserError(f"predict: batch must be >= 1 (or 0: auto), got {batch}")
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise UserError(f"predict: shard {shard} must be (i, k) with 0 <= i < k")
    seg = model if isinstance(model, SegmentationModel) else open_segmentation_model(model, tracking_uri)
    where = str(model) if not isinstance(model, SegmentationModel) else "model"
    net = build_network(seg, where)
    dev = _device(device)
    batch = auto_batch(dev, batch)
    net.to(dev)
    scans = sorted(list_scans(inputs), key=lambda s: str(s.path))
    out_dir = Path(output).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"predict: output {out_dir} is a file; pass a folder for the masks")
    inputs_dirs = {s.path.parent.resolve() for s in scans if s.ext != "dicom"}
    if out_dir.resolve() in inputs_dirs:
        raise UserError(f"predict: output folder {out_dir} is the folder of the input scans; choose another "
                        "--output so masks never replace or mix with scans")
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = seg.spec["preprocessing"]
    key = _load_id_key(id_key, seg.spec) if id_key else None
    if key is None and settings.get("id_scheme") == "hashed":
        print("predict: note: the model's store used hashed volume ids; masks are named after the inputs (pass "
              "--id-key <store>.idkey to name them by the store's hashed ids)", file=sys.stderr, flush=True)

    from pcl_hpc.data.pseudonym import hashed_id

    named = [(scan, hashed_id(key, scan.name) if key is not None else scan.name) for scan in scans]
    owner: dict[str, Path] = {}  # output name -> the first scan (in path order) that has it
    for scan, name in named:
        owner.setdefault(name, scan.path)
    id_rows = {name: scan.name for scan, name in named} if key is not None else {}
    if shard is not None:
        named = named[shard[0]::shard[1]]

    summary = PredictSummary(output=str(out_dir))
    start = time.monotonic()
    bar = tqdm(total=len(named), desc="predict", unit="vol", disable=not progress)
    for scan, name in named:
        try:
            ext = _output_ext(scan, fmt)
            target = out_dir / f"{name}{ext}"
            if owner[name] != scan.path:  # a.nrrd and a.mha: one a.json sidecar, and with nii.gz one a.nii.gz
                raise VolumeError(str(scan.path), f"its mask {name}{ext} (and {name}.json) would replace the one of "
                                                  f"{owner[name]}; rename one of the two inputs")
            if target.exists() and not overwrite:
                summary.skipped.append(str(scan.path))
                continue
            img = read_scan(scan.path, settings)
            mask = segment(net, img, settings, str(scan.path), dev, batch=int(batch), tta=tta)
            write_text(out_dir / f"{name}.json", json.dumps(_sidecar(seg, scan, ext, tta, mask), indent=1))
            _write_image(mask, target, ext)  # last: an existing mask means a finished scan
            summary.written.append(str(scan.path))
        except VolumeError as err:
            summary.failed.append((err.path or str(scan.path), err.reason))
        except MemoryError:
            summary.failed.append((str(scan.path), "out of memory; use a smaller --batch or a machine with more memory"))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            summary.failed.append((str(scan.path), "out of GPU memory; use a smaller --batch"))
        except Exception as err:  # noqa: BLE001 - one odd scan must not cost the others
            summary.failed.append((str(scan.path), f"unexpected {type(err).__name__}: {_first_line(err)}; "
                                                   "please report this scan's format"))
        finally:
            bar.update(1)
    bar.close()
    if id_rows:
        _write_id_map(out_dir, id_rows)
    summary.seconds = time.monotonic() - start
    return summary


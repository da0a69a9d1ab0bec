"""The preprocessed dataset: one Zarr v3 store per dataset, written by `preprocess`, read by training.

Layout::

    <store>/                       root group, attrs {"format": ..., "manifest": {...}}
      volumes/<vid>/               one group per volume, attrs below
        image                      float32 (Z, H, W), chunks (1, H, W): one axial slice per chunk
        label                      uint8   (Z, H, W), same chunks (labeled volumes only)

Volume attrs: spacing [z, y, x] (mm), original_shape, orientation (the source's orientation code;
arrays are always stored in the canonical one, see ``settings.orientation``), origin, direction,
positions ((i + 1) / Z per slice), partitions (GCL partition per slice), source_sha256,
label_sha256 (or None), settings_sha256, labeled.

One slice per chunk because training reads random single slices; Blosc/zstd with bitshuffle
packs smooth float images well and decodes fast enough that the data loader is never the
bottleneck. Volumes are written under a temporary name and renamed into place, so a crash never
leaves a half-written volume under its real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pcl_hpc.errors import UserError

FORMAT = "pcl-hpc-store/1"
FOLD_SEED = 0  # fixed so that every run and every rank sees the same folds
TMP_PREFIX = ".tmp-"  # in-progress volume writes; never listed as volumes
TRASH_PREFIX = ".trash-"  # a replaced volume between the two renames

_PREPROCESS_HINT = "run `pcl-hpc preprocess --config ...` first"
_VID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def check_volume_id(vid: str) -> None:
    """Volume ids become folder names inside the store, so keep them to a safe character set."""
    if not _VID_RE.match(vid) or vid.startswith("__"):
        raise UserError(
            f"volume id {vid!r} cannot be used as a store key; rename the file to use only "
            "letters, digits, '.', '_', '+', '-' (starting with a letter or digit)"
        )


def _volumes_dir(store_path: str | Path) -> Path:
    return Path(store_path) / "volumes"


def is_store(store_path: str | Path) -> bool:
    """True when ``store_path`` is a Zarr group written by pcl-hpc (with or without a manifest)."""
    meta = Path(store_path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attrs.get("format") == FORMAT


def init_store(store_path: str | Path) -> None:
    """Create an empty store, or check that an existing folder is one (never write into other data)."""
    path = Path(store_path)
    if path.exists() and not path.is_dir():
        raise UserError(f"store path {path} is a file; set data.store to a folder path")
    if path.is_dir() and any(path.iterdir()) and not is_store(path):
        raise UserError(
            f"store path {path} exists and is not a pcl-hpc store; "
            "set data.store to a new or empty folder"
        )
    root = zarr.open_group(str(path), mode="a", zarr_format=3)
    if root.attrs.get("format") != FORMAT:
        root.attrs["format"] = FORMAT
    root.require_group("volumes")


def stored_volume_dirs(store_path: str | Path) -> dict[str, Path]:
    """``{vid: folder}`` of complete volumes (temporary and trash folders are left out)."""
    vols = _volumes_dir(store_path)
    if not vols.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(vols.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / "zarr.json").is_file()
    }


def volume_attrs(store_path: str | Path, vid: str) -> dict[str, Any]:
    """Attrs of one stored volume, read straight from its metadata (cheap; no arrays opened)."""
    meta = _volumes_dir(store_path) / vid / "zarr.json"
    return json.loads(meta.read_text()).get("attributes", {})


def remove_leftovers(store_path: str | Path) -> None:
    """Delete temporary folders left by an interrupted run."""
    vols = _volumes_dir(store_path)
    if vols.is_dir():
        for p in vols.iterdir():
            if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)


def remove_volume(store_path: str | Path, vid: str) -> None:
    target = _volumes_dir(store_path) / vid
    if target.is_dir():
        trash = target.with_name(f"{TRASH_PREFIX}{vid}-{uuid.uuid4().hex[:8]}")
        os.rename(target, trash)  # disappears from listings at once, then delete at leisure
        shutil.rmtree(trash, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain JSON types (Zarr attrs are JSON)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_volume(
    store_path: str | Path,
    vid: str,
    image: np.ndarray,
    label: np.ndarray | None,
    attrs: dict[str, Any],
) -> None:
    """Write one volume atomically: build it under a temporary name, then rename it into place."""
    check_volume_id(vid)
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"volume {vid}: image must be (Z, H, W), got shape {image.shape}")
    if label is not None:
        label = np.asarray(label)
        if label.shape != image.shape:
            raise ValueError(f"volume {vid}: label shape {label.shape} != image shape {image.shape}")
    init_store(store_path)

    tmp_name = f"{TMP_PREFIX}{vid}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    root = zarr.open_group(str(store_path), mode="a", zarr_format=3)
    group = root["volumes"].create_group(tmp_name)
    chunks = (1, *image.shape[1:])
    arr = group.create_array(
        "image", shape=image.shape, chunks=chunks, dtype="float32", compressors=_compressor()
    )
    arr[...] = image.astype(np.float32, copy=False)
    if label is not None:
        lab = group.create_array(
            "label", shape=label.shape, chunks=chunks, dtype="uint8", compressors=_compressor()
        )
        lab[...] = label.astype(np.uint8, copy=False)
    group.attrs.update(_jsonable({**attrs, "labeled": label is not None}))

    vols = _volumes_dir(store_path)
    remove_volume(store_path, vid)  # re-conversion of a changed source replaces the old volume
    os.rename(vols / tmp_name, vols / vid)


def patient_id(vid: str) -> str:
    """The patient a volume belongs to: folds must never split a patient's volumes.

    ACDC-style ids (``patient001_frame01``, ``patient001_frame12``) are two time points of one
    patient; everything else is taken to be one volume per patient.
    """
    return re.sub(r"_frame\d+$", "", vid)


def _assign_folds(vids: list[str], k: int) -> dict[str, int]:
    patients = sorted({patient_id(v) for v in vids})
    order = np.random.default_rng(FOLD_SEED).permutation(len(patients))
    fold_of = {patients[j]: rank % k for rank, j in enumerate(order)}
    return {v: fold_of[patient_id(v)] for v in vids}


def content_hash(entries: list[tuple[str, str, str | None]], settings: dict[str, Any]) -> str:
    """sha256 over (volume id, source checksums) sorted by id, and the preprocessing settings."""
    payload = json.dumps(
        {"volumes": sorted([list(e) for e in entries]), "settings": settings}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def write_manifest(
    store_path: str | Path, settings: dict[str, Any], class_names: list[str] | None = None
) -> dict[str, Any]:
    """Describe every complete volume in the store in the root attrs; returns the manifest."""
    if not is_store(store_path):
        raise UserError(f"{store_path} is not a pcl-hpc store; {_PREPROCESS_HINT}")
    folds = int(settings.get("folds", 5))
    if folds < 1:
        raise UserError(f"data.folds must be >= 1, got {folds}")
    vids = list(stored_volume_dirs(store_path))
    fold_of = _assign_folds(vids, folds)
    volumes, entries = [], []
    for vid in vids:
        attrs = volume_attrs(store_path, vid)
        meta = json.loads((_volumes_dir(store_path) / vid / "image" / "zarr.json").read_text())
        volumes.append(
            {
                "id": vid,
                "shape": meta["shape"],
                "labeled": bool(attrs.get("labeled")),
                "fold": fold_of[vid],
                "patient": patient_id(vid),
            }
        )
        entries.append((vid, attrs.get("source_sha256"), attrs.get("label_sha256")))
    settings = _jsonable(settings)
    manifest = {
        "format": FORMAT,
        "volumes": volumes,
        "settings": settings,
        "class_names": list(class_names) if class_names else None,
        "content_hash": content_hash(entries, settings),
    }
    root = zarr.open_group(str(store_path), mode="a", zarr_format=3)
    root.attrs["manifest"] = manifest
    return manifest


def read_manifest(store_path: str | Path) -> dict[str, Any]:
    """The manifest of a finished store; a clear UserError if there is none."""
    path = Path(store_path)
    if not str(store_path):
        raise UserError(f"data.store is not set; set it to the store folder ({_PREPROCESS_HINT})")
    if not path.is_dir():
        raise UserError(f"store {path} does not exist; {_PREPROCESS_HINT}")
    if not is_store(path):
        raise UserError(f"{path} is not a pcl-hpc store; {_PREPROCESS_HINT}")
    manifest = json.loads((path / "zarr.json").read_text())["attributes"].get("manifest")
    if not manifest:
        raise UserError(f"store {path} has no manifest (preprocessing did not finish); {_PREPROCESS_HINT}")
    if manifest.get("format") != FORMAT:
        raise UserError(
            f"store {path} has format {manifest.get('format')!r}, expected {FORMAT!r}; "
            f"re-run preprocessing into a new folder ({_PREPROCESS_HINT})"
        )
    return manifest


def volume_ids(store_path: str | Path, labeled: bool | None = None) -> list[str]:
    """Volume ids listed in the manifest; ``labeled`` True/False keeps only (un)labeled ones."""
    vols = read_manifest(store_path)["volumes"]
    return [v["id"] for v in vols if labeled is None or v["labeled"] == labeled]


def load_volume(store_path: str | Path, vid: str) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """``(image float32 (Z,H,W), label uint8 (Z,H,W) or None, attrs)`` of one volume."""
    read_manifest(store_path)
    if vid not in stored_volume_dirs(store_path):
        raise UserError(
            f"volume {vid!r} is not in store {store_path}; "
            f"valid ids are listed by `volume_ids` (e.g. {', '.join(volume_ids(store_path)[:5])})"
        )
    group = zarr.open_group(str(store_path), mode="r")[f"volumes/{vid}"]
    image = group["image"][...]
    label = group["label"][...] if "label" in group else None
    return image, label, dict(group.attrs)

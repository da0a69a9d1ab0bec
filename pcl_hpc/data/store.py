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
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pcl_hpc.atomic import disk_full, is_disk_full
from pcl_hpc.errors import UserError

FORMAT = "pcl-hpc-store/1"
FOLD_SEED = 0  # fixed so that every run and every rank sees the same folds
TMP_PREFIX = ".tmp-"  # in-progress volume writes; never listed as volumes
TRASH_PREFIX = ".trash-"  # a replaced volume between the two renames

_PREPROCESS_HINT = "run `pcl-hpc preprocess --config ...` first"
_VID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


# Both bitshuffle; tools/bench_data.py measures ratio, write and read speed of each. zstd is the
# default: on smooth float32 slices it packs noticeably tighter than lz4, and decoding one slice is
# still far faster than augmenting it (see the bench's JSON line).
COMPRESSORS = {"zstd": 3, "lz4": 5}  # name -> Blosc clevel


def _compressor(name: str = "zstd") -> BloscCodec:
    if name not in COMPRESSORS:
        raise UserError(f"compressor {name!r} is not known; valid: {', '.join(COMPRESSORS)}")
    return BloscCodec(cname=name, clevel=COMPRESSORS[name], shuffle="bitshuffle")


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
    compressor: str = "zstd",
) -> None:
    """Write one volume atomically: build it under a temporary name, then rename it into place.

    ``content_sha256`` (over the stored arrays' bytes) is added to the attrs: the manifest's
    content hash is built from it, so it changes exactly when stored data changes."""
    check_volume_id(vid)
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"volume {vid}: image must be (Z, H, W), got shape {image.shape}")
    if label is not None:
        label = np.asarray(label)
        if label.shape != image.shape:
            raise ValueError(f"volume {vid}: label shape {label.shape} != image shape {image.shape}")
    init_store(store_path)
    codec = _compressor(compressor)
    image = np.ascontiguousarray(image, dtype=np.float32)
    if label is not None:
        label = np.ascontiguousarray(label, dtype=np.uint8)
    digest = content_digest(image, label)

    tmp_name = f"{TMP_PREFIX}{vid}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    vols = _volumes_dir(store_path)
    try:
        root = zarr.open_group(str(store_path), mode="a", zarr_format=3)
        group = root["volumes"].create_group(tmp_name)
        chunks = (1, *image.shape[1:])
        arr = group.create_array(
            "image", shape=image.shape, chunks=chunks, dtype="float32", compressors=codec
        )
        arr[...] = image
        if label is not None:
            lab = group.create_array(
                "label", shape=label.shape, chunks=chunks, dtype="uint8", compressors=codec
            )
            lab[...] = label
        group.attrs.update(_jsonable({**attrs, "labeled": label is not None, "content_sha256": digest}))
    except Exception as err:
        full = is_disk_full(err, vols)
        _remove_tree(vols / tmp_name)  # nothing half-written stays in the store
        if full:
            raise disk_full(vols / vid) from None
        raise
    remove_volume(store_path, vid)  # re-conversion of a changed source replaces the old volume
    os.rename(vols / tmp_name, vols / vid)


def content_digest(image: np.ndarray, label: np.ndarray | None) -> str:
    """A volume's ``content_sha256``: over its shape, float32 image bytes and uint8 label bytes (C order)."""
    digest = hashlib.sha256(f"{tuple(image.shape)}".encode())
    digest.update(np.ascontiguousarray(image, dtype=np.float32).tobytes())
    if label is not None:
        digest.update(np.ascontiguousarray(label, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def _remove_tree(folder: Path, settle_s: float = 1.0) -> None:
    """Remove ``folder`` for good: after a failed write zarr's other chunk writes may still be running on its
    event loop (the first error is raised while they go on) and recreate folders; remove until it stays gone."""
    deadline = time.monotonic() + settle_s
    while True:
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.05)
        if not folder.exists() or time.monotonic() > deadline:
            return


def patient_id(vid: str) -> str:
    """The patient a volume belongs to: folds must never split a patient's volumes.

    ACDC-style ids (``patient001_frame01``, ``patient001_frame12``) are two time points of one
    patient; everything else is taken to be one volume per patient.
    """
    return re.sub(r"_frame\d+$", "", vid)


def _assign_folds(patient_of: dict[str, str], k: int, seed: int = FOLD_SEED) -> dict[str, int]:
    """Patient-level folds: shuffled patients dealt round-robin, so fold sizes differ by at most one."""
    patients = sorted(set(patient_of.values()))
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[j]: rank % k for rank, j in enumerate(order)}
    return {v: fold_of[p] for v, p in patient_of.items()}


def content_hash(entries: list[tuple[str, ...]], settings: dict[str, Any]) -> str:
    """sha256 over (volume id, stored-content and source checksums) sorted by id, and the settings."""
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
    all_attrs = {vid: volume_attrs(store_path, vid) for vid in vids}
    patient_of = {vid: str(all_attrs[vid].get("patient") or patient_id(vid)) for vid in vids}
    fold_of = _assign_folds(patient_of, folds, int(settings.get("fold_seed", FOLD_SEED)))
    volumes, entries = [], []
    for vid in vids:
        attrs = all_attrs[vid]
        meta = json.loads((_volumes_dir(store_path) / vid / "image" / "zarr.json").read_text())
        volumes.append(
            {
                "id": vid,
                "shape": meta["shape"],
                "labeled": bool(attrs.get("labeled")),
                "fold": fold_of[vid],
                "patient": patient_of[vid],
                "content_sha256": attrs.get("content_sha256"),  # what node-local staging verifies a copy against
            }
        )
        entries.append((vid, attrs.get("content_sha256"), attrs.get("source_sha256"), attrs.get("label_sha256")))
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
    if path.is_file():
        raise UserError(f"store {path} is a file, not a store folder; set data.store to the folder `pcl-hpc preprocess` wrote")
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


def labeled_split(
    store_or_manifest: str | Path | dict[str, Any], fold: int, m: int | None = None, seed: int = 0
) -> dict[str, list[str]]:
    """The semi-supervised protocol's volumes for one fold: ``{"train": ..., "test": ...}``.

    ``test``: every labeled volume of the patients in ``fold``. ``train``: the labeled volumes of
    ``m`` patients drawn (seeded by ``seed`` and ``fold``) from the other folds' labeled patients;
    ``m=None`` takes them all. For ACDC a patient brings both its ED and ES frames. The same
    (manifest, fold, m, seed) always gives the same lists, on every rank and machine, and a larger
    ``m`` keeps the patients of a smaller one (the draw is one seeded permutation, cut at ``m``).
    """
    manifest = store_or_manifest if isinstance(store_or_manifest, dict) else read_manifest(store_or_manifest)
    k = int(manifest["settings"].get("folds", 5))
    if not 0 <= int(fold) < k:
        raise UserError(f"fold {fold} is not in 0..{k - 1} (the store was written with data.folds={k})")
    labeled = [v for v in manifest["volumes"] if v["labeled"]]
    test = [v["id"] for v in labeled if v["fold"] == fold]
    pool = sorted({v["patient"] for v in labeled if v["fold"] != fold})
    if m is not None and not 0 < int(m) <= len(pool):
        raise UserError(
            f"cannot draw {m} labeled patients for fold {fold}: {len(pool)} are available outside it; "
            f"choose M between 1 and {len(pool)}"
        )
    order = np.random.default_rng([int(seed), int(fold)]).permutation(len(pool))
    chosen = {pool[j] for j in order[: len(pool) if m is None else int(m)]}
    train = [v["id"] for v in labeled if v["fold"] != fold and v["patient"] in chosen]
    return {"train": train, "test": test}


def split_hash(split: dict[str, list[str]]) -> str:
    """A short hash of a split's volume ids (``{"train": [...], "val": [...], "test": [...]}``)."""
    return hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()[:16]

"""Raw volumes (NIfTI / NRRD / MetaImage / DICOM series) -> the Zarr store that training reads.

Per source (see ``layouts.py`` for how each layout names them): read with SimpleITK (a DICOM
series folder through GDCM, without its metadata dictionary), split 4D sources into 3D frames
(or take channel ``data.channel`` of a multi-channel case), reorient to one canonical orientation
whose first array axis is ``data.slice_axis`` (so the same physical image stored with permuted
or flipped axes gives the same array), optionally resample in-plane, normalise intensities, and
write ``(Z, H, W)`` arrays plus the slice positions ``(i + 1) / Z`` (PCL) and partitions
``floor(i * G / Z)`` (GCL).

A bad volume never stops the run: it is recorded in ``PreprocessSummary.failed`` with the file
and what to do, and the other volumes are converted. Re-running skips volumes whose source files
and settings are unchanged. Only pixel data and geometry are stored: no header fields, DICOM tags,
file paths or other metadata that might identify a patient.

Volume ids (``data.id_scheme``): ``source`` keeps the case names of the files/folders;
``hashed`` makes them pseudonymous (see ``pseudonym.py``).

This module is the driver (walking the cases, skipping unchanged ones, the worker pool, the
summary); the work per volume lives in ``readers.py`` (reading, 4D frames and channels),
``geometry.py`` (orientation, resampling), ``intensity.py`` (normalisation), ``volume.py``
(checks, arrays) and ``pseudonym.py`` (hashed ids).
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pcl_hpc.atomic import DiskFull
from pcl_hpc.config import DataConfig
from pcl_hpc.data import layouts
from pcl_hpc.data import store as zstore
from pcl_hpc.data.geometry import CANONICAL_ORIENTATION, INTERPOLATIONS, ORIENTATIONS  # noqa: F401
from pcl_hpc.data.intensity import INTENSITIES, resolved_intensity
from pcl_hpc.data.layouts import EXTENSIONS, LAYOUTS
from pcl_hpc.data.pseudonym import (  # noqa: F401  (id_key_path, id_map_path, hashed_id: re-exported)
    ID_SCHEMES,
    Pseudonyms,
    hashed_id,
    id_key_path,
    id_map_path,
    key_check,
    load_id_key,
)
from pcl_hpc.data.readers import (  # noqa: F401  (file_sha256, select_frame: re-exported)
    file_sha256,
    read_image,
    select_channel,
    select_frame,
    source_sha256,
)
from pcl_hpc.data.volume import VolumeError, volume_arrays
from pcl_hpc.errors import UserError

MODALITIES = ("mri", "ct")
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


# ---------------------------------------------------------------- one source (runs in the workers)


def _convert(job: layouts.Job, settings: dict[str, Any], settings_sha: str, store_path: str,
             existing: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str, int]]:
    """Convert one source; per output volume (status, vid, file, reason, source bytes)."""
    results: list[tuple[str, str, str, str, int]] = []
    todo = list(job.outputs)
    try:
        if job.expect_label and job.label is None:
            raise VolumeError(
                job.image,
                "no label found for this image; add it (see the layout's naming), or move the image where "
                "unlabeled images go (imagesTs/ for the generic layout)",
            )
        try:
            src_sha = source_sha256(job.image)
            lab_sha = source_sha256(job.label) if job.label else None
        except OSError as err:
            raise VolumeError(
                job.image, f"cannot read file ({err.strerror}); check that it exists and is readable"
            ) from None
        pending = []
        for vid, t in todo:
            old = existing.get(vid)
            if (old is not None and old.get("source_sha256") == src_sha and old.get("label_sha256") == lab_sha
                    and old.get("settings_sha256") == settings_sha and old.get("channel") == job.channel):
                results.append(("skipped", vid, job.image, "", 0))
            else:
                pending.append((vid, t))
        todo = pending
        if not todo:
            return results

        img4 = read_image(job.image, "image", allow_4d=True)
        lab4 = read_image(job.label, "label", allow_4d=True) if job.label else None
        while todo:
            vid, t = todo[0]
            try:
                img = (select_channel(img4, t, job.image) if job.channels_axis
                       else select_frame(img4, t, job.image, "image"))
                lab = (select_frame(lab4, t if job.label_frames else None, job.label, "label")
                       if lab4 is not None else None)
                image, label, attrs = volume_arrays(img, lab, settings, job.image, job.label)
                attrs.update({
                    "frame": None if t is None or job.channels_axis else t + 1,
                    "channel": job.channel,  # of a multi-channel case (data.channel), else None
                    "patient": zstore.patient_id(vid),
                    "source_sha256": src_sha,
                    "label_sha256": lab_sha,
                    "settings_sha256": settings_sha,
                })
                zstore.write_volume(store_path, vid, image, label, attrs, compressor=settings["compressor"])
                nbytes = img.GetNumberOfPixels() * img.GetSizeOfPixelComponent()
                results.append(("converted", vid, job.image, "", int(nbytes)))
            except VolumeError as err:
                results.append(("failed", vid, err.path, err.reason, 0))
            todo.pop(0)
    except VolumeError as err:
        results += [("failed", vid, err.path, err.reason, 0) for vid, _ in todo]
    except MemoryError:
        results += [("failed", vid, job.image, "out of memory while converting; run with fewer workers", 0)
                    for vid, _ in todo]
    except DiskFull as err:  # the store's disk: this volume is not in the store, nothing half-written is
        results += [("failed", vid, job.image, str(err), 0) for vid, _ in todo]
    except Exception as err:  # keep going: one odd file must not cost the other volumes
        reason = f"unexpected {type(err).__name__}: {str(err)[:200]}; please report this file's format"
        results += [("failed", vid, job.image, reason, 0) for vid, _ in todo]
    return results


# ---------------------------------------------------------------- driver


def _check_config(cfg: DataConfig) -> None:
    if not cfg.raw_dir:
        raise UserError("data.raw_dir is not set; set it to the folder of raw volumes")
    if not Path(cfg.raw_dir).is_dir():
        raise UserError(f"data.raw_dir {cfg.raw_dir} does not exist or is not a folder; check the path")
    if not cfg.store:
        raise UserError("data.store is not set; set it to the folder where the Zarr store should go")
    if cfg.layout == "nnunet":
        raise UserError("data.layout=nnunet reads nnU-Net's preprocessed data: run `pcl-hpc preprocess --config ...` "
                        "(one process; no --shard, --prepare-shards or pipeline array for it yet)")
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
    if isinstance(cfg.channel, bool) or not isinstance(cfg.channel, int) or cfg.channel < 0:
        raise UserError(f"data.channel must be a channel index >= 0 (0 = the first), got {cfg.channel!r}")
    if cfg.id_scheme not in ID_SCHEMES:
        raise UserError(f"data.id_scheme {cfg.id_scheme!r} is not known; valid: {', '.join(ID_SCHEMES)}")


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


def prepare_shards(cfg: DataConfig) -> None:
    """Before an array of ``preprocess(shard=...)`` tasks: the store (and, for hashed ids, its key) exist,
    so that no two tasks create them at once."""
    _check_config(cfg)
    if cfg.id_scheme == "hashed":
        if Path(cfg.store).is_dir() and any(Path(cfg.store).iterdir()) and not zstore.is_store(cfg.store):
            zstore.init_store(cfg.store)  # its clear error
        load_id_key(str(cfg.store))
    zstore.init_store(cfg.store)
    zstore.remove_leftovers(cfg.store)


def preprocess(cfg: DataConfig, *, workers: int = 1, progress: bool = True,
               shard: tuple[int, int] | None = None) -> PreprocessSummary:
    """Convert ``cfg.raw_dir`` into the Zarr store ``cfg.store``; returns what happened per volume.

    ``shard=(i, k)``: only every k-th source from the i-th (an array task; :func:`prepare_shards` ran
    before). Shards write disjoint volumes and no manifest; a plain run afterwards (every volume is
    then current, so it only checks them) removes what is stale and writes the manifest: the same
    store as one process makes."""
    _check_config(cfg)
    if shard is not None and not (zstore.is_store(cfg.store) and (cfg.id_scheme != "hashed"
                                                                  or id_key_path(str(cfg.store)).is_file())):
        raise UserError(f"preprocess shard {shard[0]}/{shard[1]}: store {cfg.store} is not prepared; "
                        f"run prepare_shards (the pipeline does) before the array")
    raw = Path(cfg.raw_dir)
    jobs, problems = layouts.discover(raw, cfg.layout, int(cfg.channel))
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
        names = Pseudonyms(load_id_key(store_path), raw, jobs)
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
    if shard is None:
        zstore.init_store(store_path)
        zstore.remove_leftovers(store_path)  # never under running shards: their volumes are being built
    else:
        jobs = jobs[shard[0]::shard[1]]
        problems = problems if shard[0] == 0 else []  # each problem reported once
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
    if shard is not None:
        return summary  # the merge (a plain run) prunes and writes the manifest
    # The store mirrors raw_dir: volumes whose source vanished or now fails are not left behind
    # looking current.
    for vid in stored:
        if vid not in kept:
            zstore.remove_volume(store_path, vid)
    if names is not None:
        names.write_map(store_path)
    ids = {"id_scheme": cfg.id_scheme, "id_key_check": key_check(names.key) if names is not None else None}
    # data.channel is recorded here, not in the hashed settings: it only changes multi-channel volumes,
    # which are re-converted through their per-volume "channel" attr. Only the generic layout has it.
    channel = {"channel": int(cfg.channel)} if cfg.layout == "generic" else {}
    zstore.write_manifest(
        store_path, {**settings, "folds": int(cfg.folds), "fold_seed": int(cfg.fold_seed), **ids, **channel},
        class_names,
    )
    return summary


"""nnU-Net's preprocessed cases -> the store pcl-hpc pretrains on (``data.layout: nnunet``).

The slices are nnU-Net's own: the arrays ``nnUNetv2_plan_and_preprocess`` wrote for the plan's
configuration (its transpose, crop, resampling and normalisation: per-image z-score for MRI, the
dataset's foreground statistics for CT), read through nnunetv2's dataset class. Images nnU-Net never
saw (``data.raw_dir``: a folder of ``<case>_0000<ending>`` files, e.g. imagesTs) go through the
plan's own preprocessor. Slices are taken along the first axis of the preprocessed array, the
axis nnU-Net's 2D loader draws its slices from, so positions ``(i + 1) / Z`` count along it; the
data set's patch size travels in the manifest. A case is re-read only when its files change.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from pcl_hpc.atomic import sha256_file
from pcl_hpc.config import Config
from pcl_hpc.data import store as zstore
from pcl_hpc.data.preprocess import PreprocessSummary
from pcl_hpc.errors import UserError
from pcl_hpc.nnunet.network import model_plan
from pcl_hpc.nnunet.plans import Plan

VERSION = 1  # bump when the ingestion itself changes


def settings(cfg: Config, plan: Plan) -> dict:
    """What determines the stored arrays (a change re-reads every case)."""
    return {"version": VERSION, "layout": "nnunet", "plans_sha256": plan.sha256, "dataset_name": plan.dataset_name,
            "configuration": plan.configuration, "patch_size": list(plan.patch_size),
            "gcl_partitions": int(cfg.data.gcl_partitions), "compressor": cfg.data.compressor,
            "num_classes": len(_class_names(plan)) - 1 or None}


def _class_names(plan: Plan) -> list[str]:
    """dataset.json's label names by value, background first (as every store's manifest lists them)."""
    labels = {name: value for name, value in plan.dataset_json.get("labels", {}).items() if isinstance(value, int)}
    return sorted(labels, key=labels.get)


def _attrs(image: np.ndarray, spacing_z: float, plan: Plan, source_sha: str, settings_sha: str, labeled: bool,
           partitions: int) -> dict:
    z = image.shape[0]
    return {"spacing": [float(spacing_z), *[float(s) for s in plan.config["spacing"]]],
            "original_shape": list(image.shape), "orientation": "nnunet", "slice_axis": "nnunet",
            "positions": [(i + 1) / z for i in range(z)], "partitions": [i * partitions // z for i in range(z)],
            "patient": None, "source_sha256": source_sha, "label_sha256": source_sha if labeled else None,
            "settings_sha256": settings_sha}


def _preprocessed_cases(plan: Plan):
    """(case id, files, loader) of every case nnU-Net preprocessed for the plan's configuration."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = plan.preprocessed_folder
    if not folder.is_dir() or not any(folder.iterdir()):
        raise UserError(f"data.layout=nnunet: {folder} has no preprocessed cases; run nnUNetv2_plan_and_preprocess "
                        f"-d <id> -c {plan.configuration} (or nnUNetv2_preprocess) first")
    dataset = infer_dataset_class(str(folder))(str(folder))
    for case in dataset.identifiers:
        files = sorted(folder.glob(f"{case}.*")) + sorted(folder.glob(f"{case}_seg.*"))

        def load(case=case):
            data, seg, _, props = dataset.load_case(case)
            return np.asarray(data), np.asarray(seg), props
        yield case, files, load


def _extra_cases(plan: Plan, raw_dir: str):
    """(case id, files, loader) of the unlabeled images in ``raw_dir``, through the plan's preprocessor."""
    raw = Path(raw_dir).expanduser()
    if not raw.is_dir():
        raise UserError(f"data.raw_dir: {raw} is not a folder; give a folder of extra images named "
                        f"<case>_0000{plan.dataset_json.get('file_ending', '.nii.gz')}, or leave it empty")
    ending = plan.dataset_json.get("file_ending", ".nii.gz")
    channels = plan.input_channels
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    cases: dict[str, list[Path]] = {}
    for path in sorted(raw.iterdir()):
        match = pattern.match(path.name)
        if match:
            cases.setdefault(match.group(1), []).append(path)
    if not cases:
        raise UserError(f"data.raw_dir: {raw} has no images named <case>_0000{ending}; rename them as nnU-Net's "
                        "raw layout does, or leave data.raw_dir empty")
    for case, files in cases.items():
        if len(files) != channels:
            raise UserError(f"data.raw_dir: case {case} in {raw} has {len(files)} channel file(s), the plan has "
                            f"{channels}; give <case>_0000 ... one per channel")

        def load(files=files):
            preprocessor = plan.configuration_manager.preprocessor_class(verbose=False)
            data, _, props = preprocessor.run_case([str(f) for f in files], None, plan.manager,
                                                   plan.configuration_manager, plan.dataset_json)
            return np.asarray(data), None, props
        yield case, files, load


def ingest(cfg: Config) -> PreprocessSummary:
    """Write the store ``cfg.data.store`` from the plan's preprocessed cases (+ ``data.raw_dir``'s extra images)."""
    plan = model_plan(cfg.model)
    store = str(cfg.data.store)
    zstore.init_store(store)
    zstore.remove_leftovers(store)
    conf = settings(cfg, plan)
    settings_sha = hashlib.sha256(json.dumps(conf, sort_keys=True).encode()).hexdigest()
    summary = PreprocessSummary(store=store)
    sources = list(_preprocessed_cases(plan))
    labeled_ids = {case for case, _, _ in sources}
    if cfg.data.raw_dir:
        extra = list(_extra_cases(plan, cfg.data.raw_dir))
        clash = sorted(labeled_ids & {case for case, _, _ in extra})
        if clash:
            raise UserError(f"data.raw_dir: case(s) {', '.join(clash[:5])} are also nnU-Net's training cases; "
                            "keep only images nnU-Net did not preprocess there")
        sources += extra
    stored = zstore.stored_volume_dirs(store)
    for case, files, load in sources:
        zstore.check_volume_id(case)
        source_sha = hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()
        old = zstore.volume_attrs(store, case) if case in stored else {}
        if old.get("source_sha256") == source_sha and old.get("settings_sha256") == settings_sha:
            summary.skipped.append(case)
            continue
        data, seg, props = load()
        image = data[0].astype(np.float32)
        label = np.clip(seg[0], 0, None).astype(np.uint8) if seg is not None else None  # -1: outside nnU-Net's mask
        spacing_z = float(props["spacing"][0])
        zstore.write_volume(store, case, image, label,
                            _attrs(image, spacing_z, plan, source_sha, settings_sha, label is not None,
                                   int(cfg.data.gcl_partitions)), compressor=cfg.data.compressor)
        summary.converted.append(case)
        summary.source_bytes += sum(f.stat().st_size for f in files)
    kept = {case for case, _, _ in sources}
    for vid in stored:
        if vid not in kept:
            zstore.remove_volume(store, vid)
    zstore.write_manifest(store, {**conf, "folds": int(cfg.data.folds), "fold_seed": int(cfg.data.fold_seed)},
                          _class_names(plan))
    return summary


def store_plan_check(cfg: Config, manifest: dict) -> tuple[int, int]:
    """The store was made from the plans file the model uses; returns the plan's 2D patch size."""
    plan = model_plan(cfg.model)
    made = manifest.get("settings", {})
    if made.get("layout") != "nnunet":
        raise UserError(f"data.store {cfg.data.store} was not made from nnU-Net's preprocessed data; preprocess it "
                        "with data.layout=nnunet and the same model.plans")
    if made.get("plans_sha256") != plan.sha256 or made.get("configuration") != plan.configuration:
        raise UserError(f"data.store {cfg.data.store} was made from another plans file or configuration "
                        f"({made.get('dataset_name')} {made.get('configuration')}) than model.plans {plan.path} "
                        f"({plan.dataset_name} {plan.configuration}); preprocess the store again with this plan")
    return plan.patch_size

"""The demo's volumes in nnU-Net's raw layout, for ``nnUNetv2_plan_and_preprocess``.

``nnUNet_raw/Dataset<ID>_<Name>/``: ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz``,
``imagesTs/<case>_0000.nii.gz`` (the demo's unlabeled images) and ``dataset.json`` with
``channel_names``, ``labels`` (name -> value, background 0), ``numTraining`` and ``file_ending``.
Files are linked where the file system allows, else copied.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pcl_hpc.errors import UserError

ENDING = ".nii.gz"


def _place(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def dataset_folder(raw_root: str | Path, dataset_id: int, name: str) -> Path:
    if not 1 <= int(dataset_id) <= 999:
        raise UserError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    return Path(raw_root) / f"Dataset{int(dataset_id):03d}_{name}"


def write_raw_dataset(demo_dir: str | Path, raw_root: str | Path, dataset_id: int, name: str,
                      modality: str = "MRI") -> Path:
    """``demo_dir`` (imagesTr/labelsTr/imagesTs and dataset.json as `make_demo_data` writes them) in nnU-Net's layout."""
    demo = Path(demo_dir)
    meta = json.loads((demo / "dataset.json").read_text())
    out = dataset_folder(raw_root, dataset_id, name)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    cases = sorted(p.name[: -len(ENDING)] for p in (demo / "imagesTr").glob(f"*{ENDING}"))
    for case in cases:
        _place(demo / "imagesTr" / f"{case}{ENDING}", out / "imagesTr" / f"{case}_0000{ENDING}")
        _place(demo / "labelsTr" / f"{case}{ENDING}", out / "labelsTr" / f"{case}{ENDING}")
    for image in sorted((demo / "imagesTs").glob(f"*{ENDING}")):
        _place(image, out / "imagesTs" / f"{image.name[: -len(ENDING)]}_0000{ENDING}")
    labels = {label: int(value) for value, label in meta["labels"].items()}
    dataset = {"channel_names": {"0": modality}, "labels": labels, "numTraining": len(cases),
               "file_ending": ENDING, "name": meta.get("name", name)}
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    return out


def plan_and_preprocess(raw_root: str | Path, preprocessed_root: str | Path, dataset_id: int,
                        processes: int = 2) -> Path:
    """``nnUNetv2_plan_and_preprocess -d <id> -c 2d`` (nnU-Net's own command) on ``raw_root``; returns the plans file.
    Its output is printed only when it fails (one line naming the log)."""
    import subprocess
    import sys

    preprocessed = Path(preprocessed_root)
    preprocessed.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "nnUNet_raw": str(Path(raw_root).absolute()),
           "nnUNet_preprocessed": str(preprocessed.absolute()),
           "nnUNet_results": str(preprocessed.parent.absolute() / "nnUNet_results")}
    env.pop("nnUNet_n_proc_DA", None)  # its planner fails on 0
    command = [str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(int(dataset_id)),
               "-c", "2d", "-np", str(int(processes))]
    log = preprocessed / f"plan_and_preprocess_{int(dataset_id):03d}.log"
    with open(log, "w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    plans = list(preprocessed.glob(f"Dataset{int(dataset_id):03d}_*/nnUNetPlans.json"))
    if done.returncode != 0 or not plans:
        raise UserError(f"nnUNetv2_plan_and_preprocess -d {dataset_id} failed (exit {done.returncode}); see {log}")
    return plans[0]

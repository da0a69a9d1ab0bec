"""One cell of the protocol with nnU-Net as the fine-tuning trainer: its stock ``nnUNetTrainer`` on the
cell's M labeled cases, from scratch or from a pcl-hpc export, then nnU-Net's predictor on the test
cases, scored by pcl-hpc's own per-volume Dice and HD95.

The cell lives in its own folder: ``nnunet_preprocessed/<Dataset>/`` (the plan, dataset.json, a link to
the plan's preprocessed cases and ``splits_final.json`` with the cell's split as fold 0) and
``nnunet_results/`` (nnU-Net's output folder). nnU-Net reads both from its environment variables, so
a cell runs in a process of its own (the sweep's cells do). Training length is set on the trainer
(``num_epochs``, ``num_iterations_per_epoch``): the stock trainer's 1000 x 250 is days on a CPU. A cell
saves nnU-Net's checkpoint every epoch; started again it continues from it (``nnUNetv2_train --c``), and
once ``result.json`` is written it is never rerun.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from pcl_hpc import dist
from pcl_hpc.atomic import sha256_file, write_text
from pcl_hpc.config import Config
from pcl_hpc.metrics import volume_metrics
from pcl_hpc.nnunet.handoff import export_nnunet
from pcl_hpc.nnunet.network import model_plan
from pcl_hpc.nnunet.plans import Plan
from pcl_hpc.tracking import resolve_tracking_uri

RESULT_FILE = "result.json"
TRAINER = "nnUNetTrainer"


def _cell_dataset(plan: Plan, folder: Path, split: dict[str, list[str]]) -> Path:
    """The cell's nnUNet_preprocessed: the plan's cases linked, the split as fold 0."""
    base = folder / "nnunet_preprocessed"
    dataset = base / plan.dataset_name
    dataset.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plan.path, dataset / plan.path.name)
    fingerprint = plan.path.parent / "dataset_fingerprint.json"  # nnU-Net copies it into its results
    if fingerprint.is_file():
        shutil.copyfile(fingerprint, dataset / fingerprint.name)
    write_text(dataset / "dataset.json", json.dumps(plan.dataset_json, indent=1))
    link = dataset / plan.preprocessed_folder.name
    if not link.exists():
        link.symlink_to(plan.preprocessed_folder.absolute(), target_is_directory=True)
    write_text(dataset / "splits_final.json", json.dumps([{"train": split["train"], "val": split["val"]}]))
    return base


def _trainer(plan: Plan, folder: Path, split: dict, device: torch.device, resume: bool):
    os.environ["nnUNet_preprocessed"] = str(_cell_dataset(plan, folder, split))
    os.environ["nnUNet_results"] = str(folder / "nnunet_results")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans = {**copy.deepcopy(plan.plans), "continue_training": resume}  # as run_training's loader sets it
    return nnUNetTrainer(plans=plans, configuration=plan.configuration, fold=0, dataset_json=plan.dataset_json,
                         device=device)


def _checkpointed(folder: Path) -> bool:
    """nnU-Net saved a checkpoint of this cell (its output folder: <results>/<Dataset>/<trainer>__<plans>__<conf>/fold_0)."""
    return any(folder.glob("nnunet_results/*/*/fold_0/checkpoint_latest.pth")) or \
        any(folder.glob("nnunet_results/*/*/fold_0/checkpoint_final.pth"))


def score(trainer, plan: Plan, cases: list[str]) -> dict:
    """nnU-Net's sliding-window prediction of each preprocessed test case, scored against its label in the
    same (preprocessed) space: per volume Dice and HD95 (mm) per foreground class, as fine-tuning reports."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    trainer.set_deep_supervision_enabled(False)  # as nnU-Net's own validation: the full-resolution output only
    trainer.network.eval()
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=trainer.device,
                                allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [trainer.network.state_dict()], trainer.dataset_json, TRAINER, None)
    folder = str(plan.preprocessed_folder)
    dataset = infer_dataset_class(folder)(folder, list(cases))
    classes = trainer.label_manager.num_segmentation_heads - 1
    per_volume, hd = {}, {}
    for case in cases:
        data, seg, _, props = dataset.load_case(case)
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.asarray(data)))
        pred = logits.argmax(0).numpy().astype(np.uint8)
        label = np.clip(np.asarray(seg)[0], 0, None).astype(np.uint8)
        spacing = [float(props["spacing"][0]), *[float(s) for s in plan.config["spacing"]]]
        scores = volume_metrics(pred, label, spacing, classes)
        per_volume[case], hd[case] = scores["dice"], scores["hd95_mm"]
    means = np.array(list(per_volume.values()))
    return {"per_volume": per_volume, "mean_per_class": means.mean(0).tolist(), "mean": float(means.mean()),
            "hd95_mm_per_volume": hd}


def finished(folder: Path, identity: dict) -> dict | None:
    """The cell's result when it finished with this ``identity`` (split, encoder, length), else None."""
    path = Path(folder) / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("identity") == json.loads(json.dumps(identity)) else None


def run_cell(plan: Plan, folder: Path, split: dict[str, list[str]], *, pretrained: Path | None, epochs: int,
             iterations: int, val_iterations: int = 2, seed: int = 0, device: str = "cpu",
             identity: dict | None = None) -> dict:
    """Train (or continue) the cell's nnU-Net and score it on ``split["test"]``; returns and writes result.json.
    ``identity`` (default: split, epochs, iterations, seed): a finished cell of another identity is run again
    from scratch (its nnU-Net folder removed), one of the same is returned as it is."""
    folder = Path(folder)
    identity = identity or {"split": split, "epochs": int(epochs), "iterations": int(iterations), "seed": int(seed)}
    earlier = finished(folder, identity)
    if earlier is not None:
        return earlier
    if (folder / RESULT_FILE).is_file():  # finished, but as another cell: nothing of it may be continued
        shutil.rmtree(folder / "nnunet_results", ignore_errors=True)
        (folder / RESULT_FILE).unlink()
    from nnunetv2.run.run_training import maybe_load_checkpoint

    torch.manual_seed(seed)
    np.random.seed(seed)
    resume = _checkpointed(folder)
    trainer = _trainer(plan, folder, split, torch.device(device), resume)
    trainer.num_epochs, trainer.num_iterations_per_epoch = int(epochs), int(iterations)
    trainer.num_val_iterations_per_epoch, trainer.save_every = int(val_iterations), 1
    maybe_load_checkpoint(trainer, resume, False, None if resume or pretrained is None else str(pretrained))
    trainer.run_training()
    result = {**score(trainer, plan, split["test"]), "trainer": TRAINER, "epochs": int(epochs),
              "iterations_per_epoch": int(iterations), "pretrained": str(pretrained or ""), "split": split,
              "identity": identity}
    write_text(folder / RESULT_FILE, json.dumps(result, indent=1))
    return result


def cell_identity(cfg: Config, split: dict, source: str, seed: int) -> dict:
    """What a protocol cell's result depends on: its split, its encoder's content, nnU-Net's training length."""
    encoder = source if not source or source.startswith("models:/") else sha256_file(source)
    return {"split": {k: split[k] for k in ("train", "val", "test")}, "encoder": encoder, "seed": int(seed),
            "epochs": cfg.sweep.nnunet_epochs, "iterations": cfg.sweep.nnunet_iterations, "plans": model_plan(cfg.model).sha256}


def protocol_cell(cfg: Config, folder: Path, split: dict, source: str, seed: int) -> dict:
    """A sweep cell with nnU-Net as the trainer: the encoder ``source`` ("" = nnU-Net from scratch) exported
    for the plan, then :func:`run_cell` (CPU: nnU-Net's augmentation in this process, this worker's cores)."""
    identity = cell_identity(cfg, split, source, seed)
    done = finished(folder, identity)
    if done is not None:
        return done
    plan = model_plan(cfg.model)
    pretrained = None
    if source:
        pretrained = export_nnunet(source, cfg.model.plans, cfg.model.configuration, Path(folder) / "pretrained.pt",
                                   tracking_uri=resolve_tracking_uri(cfg))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("nnUNet_n_proc_DA", "0")
        dist.set_threads(dist.detect())
    return run_cell(plan, folder, split, pretrained=pretrained, epochs=cfg.sweep.nnunet_epochs,
                    iterations=cfg.sweep.nnunet_iterations, seed=seed, device=device, identity=identity)

"""Semi-supervised fine-tuning: a U-Net whose encoder comes from pretraining (or random), M labeled volumes.

The model is selected on the validation volumes at the end of every epoch, never on the test volumes
it is scored on. ``finetune.mode=frozen`` trains only the decoder: the encoder (its BatchNorm statistics
too) stays bit-identical: a segmentation probe of what the encoder already holds.
The harness (`pcl_hpc.engine.harness`) runs the steps, checkpoints and resume. Writes under
``<output_dir>/finetune/<finetune.name>/`` (default name ``<init>_M<labeled volumes>[_frozen]``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from pcl_hpc.atomic import save_torch, write_text
from pcl_hpc.config import Config
from pcl_hpc.data.augment import BatchAugment, augment_in_workers
from pcl_hpc.data.dataset import SliceDataset
from pcl_hpc.data.readers import file_sha256
from pcl_hpc.data.store import split_hash
from pcl_hpc.engine.harness import Harness, Stage, run, stage_folder
from pcl_hpc.errors import UserError
from pcl_hpc.evaluate import check_num_classes, load_labeled, score_volumes
from pcl_hpc.losses import segmentation_loss
from pcl_hpc.models.unet import build_from_spec, build_unet
from pcl_hpc.optim import build_finetune_optimizer
from pcl_hpc.tracking import (encoder_lineage, load_encoder_state, local_encoder_file, register_segmentation_model,
                              resolve_tracking_uri, segmentation_model_name)


RESULTS_FILE = "results.json"
SPEC_FILE = "model_spec.json"  # beside model.pt: everything needed to apply the model, no config file
SPEC_FORMAT = 1


def model_spec(cfg: Config, manifest: dict, lineage: dict, class_names: list[str]) -> dict:
    """What a fine-tuned model needs to be applied to a new scan: the store's preprocessing
    (orientation, slice axis, in-plane spacing, interpolation, modality, intensity), the network
    (width, channels, classes) and where it came from (encoder, manifest hash). Plain JSON."""
    return {"format": SPEC_FORMAT, "kind": "pcl-hpc-segmentation", "weights": "model.pt",
            "preprocessing": {**manifest["settings"], "channel": cfg.data.channel},
            "model": dataclasses.asdict(cfg.model), "num_classes": cfg.finetune.num_classes,
            "class_names": ["background", *class_names], "encoder": lineage,
            "store_hash": manifest.get("content_hash", ""), "train_volumes": len(cfg.finetune.train_volumes)}


def check_splits(f) -> None:
    if not f.train_volumes:
        raise UserError("finetune.train_volumes is empty: name the labeled volumes to train on")
    if not f.test_volumes:
        raise UserError("finetune.test_volumes is empty: name the held-out volumes to score")
    overlap = set(f.test_volumes) & (set(f.train_volumes) | set(f.val_volumes))
    if overlap:
        raise UserError(f"finetune: test volumes {sorted(overlap)} also appear in train/val volumes")


def check_labeled(manifest: dict, store: str, lists: dict[str, list[str]]) -> None:
    """Every listed volume is in the store and has a label (the manifest says so: no array is read)."""
    labeled = {v["id"]: v["labeled"] for v in manifest["volumes"]}
    for key, volumes in lists.items():
        for vid in volumes:
            if vid not in labeled:
                raise UserError(f"{key}: volume {vid!r} is not in store {store} (its labeled volumes: "
                                f"{', '.join(v for v, yes in labeled.items() if yes)[:200]})")
            if not labeled[vid]:
                raise UserError(f"{key}: volume {vid!r} in store {store} has no label; name labeled volumes only")


def init_name(encoder: str) -> str:
    """A folder-safe name for where the encoder came from: random, <registered name>-<alias|version>, or encoder."""
    if not encoder:
        return "random"
    if encoder.startswith("models:/"):
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", encoder[len("models:/"):]).strip("-")
    return "encoder"


def folder(cfg: Config) -> Path:
    """``<output_dir>/finetune/<finetune.name>``; the default name is ``<init>_M<labeled volumes>[_frozen]``."""
    f = cfg.finetune
    name = f.name or f"{init_name(f.encoder)}_M{len(f.train_volumes)}{'_frozen' if f.mode == 'frozen' else ''}"
    return stage_folder(cfg, "finetune", name)


class Finetune(Stage):
    name, distributed, checkpoint_each_epoch = "finetune", False, True

    def __init__(self, cfg: Config, section, folder: Path, tags: dict | None = None, register: bool = True):
        super().__init__(cfg, section, folder)
        self.tags = dict(tags or {})  # extra tracking tags (the sweep: the cell, its parent run)
        self.register = register  # register the model at the end (a sweep registers only its best cell: False)

    def dataset(self, h: Harness) -> SliceDataset:
        f, data = self.cfg.finetune, self.cfg.data
        check_labeled(h.manifest, data.store, {"finetune.train_volumes": f.train_volumes,
                                               "finetune.test_volumes": f.test_volumes})  # before any training
        key = "finetune.val_volumes" if f.val_volumes else "finetune.train_volumes"  # no val split: select on train
        self.val = load_labeled(data.store, f.val_volumes or f.train_volumes, key=key)  # read once, scored every epoch
        check_num_classes(data.store, f.num_classes, self.val)
        if f.val_volumes:
            check_num_classes(data.store, f.num_classes, f.train_volumes)
        self.augment = BatchAugment(seed=self.cfg.seed, views=0) if f.augment else None
        self.in_workers = self.augment is not None and augment_in_workers(data, h.env.device)
        return SliceDataset(data.store, f.train_volumes, patch=data.patch, with_labels=True,
                            transform=self.augment if self.in_workers else None)

    def build(self, h: Harness):
        f = self.cfg.finetune
        model = build_unet(self.cfg.model, f.num_classes + 1)
        model.encoder.requires_grad_(f.mode != "frozen")  # frozen: the optimizer holds only the decoder
        if f.encoder:
            state = load_encoder_state(f.encoder, resolve_tracking_uri(self.cfg))
            try:
                model.encoder.load_state_dict(state)
            except RuntimeError as err:
                m = self.cfg.model
                raise UserError(f"finetune.encoder={f.encoder} does not fit model.width={m.width}, "
                                f"model.in_channels={m.in_channels} ({str(err).splitlines()[0][:120]}); use the model "
                                f"settings it was pretrained with (its config.yaml, or the version's model.* tags)") from None
        return model, build_finetune_optimizer(model, f), 0

    def begin_epoch(self, h: Harness, epoch: int) -> None:
        f = self.cfg.finetune  # the decoder learns on the pretrained encoder first, or only on it (mode=frozen)
        frozen = f.mode == "frozen" or epoch < f.freeze_encoder_epochs
        for param in h.strategy.module.encoder.parameters():
            param.requires_grad_(not frozen)

    def loss(self, h: Harness, net, batch: dict) -> torch.Tensor:
        device = h.env.device
        if self.cfg.finetune.mode == "frozen":
            h.strategy.module.encoder.eval()  # its BatchNorm statistics stay those it was given
        if self.augment is not None and not self.in_workers:
            batch = self.augment({**batch, "image": batch["image"].to(device), "label": batch["label"].to(device)})
        with h.strategy.autocast():
            logits = net(h.strategy.prepare(batch["image"]))
        return segmentation_loss(logits.float(), batch["label"].to(device).long())

    def evaluate(self, h: Harness, epoch: int) -> dict:
        val = score_volumes(h.strategy.module, self.val, self.cfg.finetune.num_classes, h.env.device, hd95=False)["mean"]
        h.strategy.module.train()
        if val > h.state.best_score:
            h.state.best_score = val
            save_torch(h.strategy.module.state_dict(), self.folder / "model_best.pt")
        return {"val_dice": val}

    def log_now(self, step: int, last: bool, ended_epoch: int | None) -> tuple[bool, bool]:
        """Every epoch's end is logged; printed every finetune.log_every epochs and at the last step."""
        due = ended_epoch is not None and (ended_epoch + 1) % self.cfg.finetune.log_every == 0
        return ended_epoch is not None or last, due or last

    def tracking(self, h: Harness):
        f = self.cfg.finetune
        uri = resolve_tracking_uri(self.cfg)
        return self.cfg.tracking.run_name or "finetune", {
            "init": f.encoder or "random", "labeled_volumes": len(f.train_volumes), "mode": f.mode,
            **(encoder_lineage(f.encoder, uri) if f.encoder else {}), **self.tags}

    def identity(self) -> dict:
        """The encoder's content (a file's hash) or registry version: a new encoder makes a new run."""
        source = self.cfg.finetune.encoder
        if not source:
            return {"encoder": "random"}
        if source.startswith("models:/"):
            return {"encoder": encoder_lineage(source, resolve_tracking_uri(self.cfg))}
        return {"encoder": file_sha256(local_encoder_file(source))}

    def completed(self) -> dict | None:
        path = self.folder / RESULTS_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def export(self, h: Harness) -> dict:
        f, out, model = self.cfg.finetune, self.folder, h.strategy.module
        save_torch(model.state_dict(), out / "model_last.pt")
        if not (out / "model_best.pt").is_file():  # no epoch ended (a max_steps shorter than an epoch)
            save_torch(model.state_dict(), out / "model_best.pt")
        model.load_state_dict(torch.load(out / "model_best.pt", map_location=h.env.device, weights_only=True))
        save_torch(model.state_dict(), out / "model.pt")
        test = load_labeled(self.cfg.data.store, f.test_volumes, key="finetune.test_volumes")
        names = (h.manifest.get("class_names") or [])[1:] or [f"class{c}" for c in range(1, f.num_classes + 1)]
        spec = model_spec(self.cfg, h.manifest, self.identity(), names)
        net = build_from_spec(spec, model.state_dict()).to(h.env.device)  # the network predict builds from the files
        result = score_volumes(net, test, f.num_classes, h.env.device)
        result.update(init=self.cfg.tracking.run_name or init_name(f.encoder), labeled=len(f.train_volumes),
                      best_val_dice=h.state.best_score, class_names=names)
        write_text(out / RESULTS_FILE, json.dumps(result, indent=2))
        write_text(out / SPEC_FILE, json.dumps(spec, indent=1))
        h.tracker.log_metrics({"test_dice": result["mean"]}, h.state.step)
        h.tracker.log_artifact(out / RESULTS_FILE)
        registered = ""
        if self.register:
            name = segmentation_model_name(self.cfg)
            split = {"train": f.train_volumes, "val": f.val_volumes, "test": f.test_volumes}
            encoder = self.identity()["encoder"]
            version = register_segmentation_model(out, name, self.cfg.tracking.alias, tags={
                "test_dice": result["mean"], "best_val_dice": h.state.best_score, "labeled_volumes": len(f.train_volumes),
                "mode": f.mode,
                "split_hash": split_hash(split),
                **(encoder if isinstance(encoder, dict) else {"encoder": encoder})}, run_id=h.tracker.run_id)
            registered = (f"; registered models:/{name}@{self.cfg.tracking.alias} (version {version})" if version
                          else "; NOT registered (tracking unreachable; register_segmentation_model registers it later)")
        print(f"finetune done: {init_name(f.encoder)} with M={len(f.train_volumes)} ({f.mode}): "
              f"test Dice {result['mean']:.3f} (best val {h.state.best_score:.3f}); best model {out / 'model.pt'}, "
              f"last {out / 'model_last.pt'}{registered}", flush=True)
        return result


def finetune(cfg: Config) -> dict:
    """Fine-tune (or resume) under ``<output_dir>/finetune/<name>``; returns the test results."""
    check_splits(cfg.finetune)
    return run(Finetune(cfg, cfg.finetune, folder(cfg)))

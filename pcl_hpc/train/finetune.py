"""Semi-supervised fine-tuning: a U-Net whose encoder comes from pretraining (or random), M labeled volumes.

The model is selected on the validation volumes, never on the test volumes it is scored on.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pcl_hpc import dist
from pcl_hpc.config import Config, flatten, save_config
from pcl_hpc.data.augment import augment_pair
from pcl_hpc.data.dataset import SliceDataset
from pcl_hpc.data.store import read_manifest
from pcl_hpc.errors import UserError
from pcl_hpc.evaluate import evaluate_volumes
from pcl_hpc.models.unet import build_unet
from pcl_hpc.tracking import Tracker, encoder_lineage, load_encoder_state, resolve_tracking_uri
from pcl_hpc.train.common import append_jsonl, git_commit, save_atomic, seed_everything


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the foreground classes (as in the PCL fine-tuning)."""
    ce = F.cross_entropy(logits, labels)
    probs = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum((0, 2, 3))
    dice = (2 * inter + 1e-5) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1e-5)
    return ce + (1 - dice.mean())


def check_splits(f) -> None:
    if not f.train_volumes:
        raise UserError("finetune.train_volumes is empty: name the labeled volumes to train on")
    if not f.test_volumes:
        raise UserError("finetune.test_volumes is empty: name the held-out volumes to score")
    overlap = set(f.test_volumes) & (set(f.train_volumes) | set(f.val_volumes))
    if overlap:
        raise UserError(f"finetune: test volumes {sorted(overlap)} also appear in train/val volumes")


def finetune(cfg: Config) -> dict:
    f = cfg.finetune
    check_splits(f)
    env = dist.detect()
    if env.distributed:
        raise UserError("finetune runs in one process per job for now: start it without torchrun / with one task")
    dist.set_threads(env, cfg.engine.threads)
    out = Path(cfg.output_dir)
    manifest = read_manifest(cfg.data.store)
    seed_everything(cfg.seed)
    model = build_unet(cfg.model, f.num_classes + 1).to(env.device)
    if f.encoder:
        mlflow.set_tracking_uri(resolve_tracking_uri(cfg))  # where models:/ URIs are looked up
        model.encoder.load_state_dict(load_encoder_state(f.encoder))
    dataset = SliceDataset(cfg.data.store, f.train_volumes, patch=cfg.data.patch, with_labels=True)
    loader = DataLoader(dataset, batch_size=f.batch_size, shuffle=True, drop_last=len(dataset) > f.batch_size,
                        num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=f.lr, weight_decay=f.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(f.epochs * len(loader), 1))
    augment_rng = torch.Generator(device=env.device).manual_seed(cfg.seed)
    val_volumes = f.val_volumes or f.train_volumes  # without a validation split, select on training volumes

    tracker = Tracker(cfg, enabled=env.is_main)
    init = "random" if not f.encoder else f.encoder
    tracker.start(cfg.tracking.run_name or "finetune", flatten(cfg), tags={
        "stage": "finetune", "init": init, "labeled_volumes": len(f.train_volumes),
        "store_hash": manifest.get("content_hash", ""), "git_commit": git_commit(),
        **(encoder_lineage(f.encoder) if f.encoder else {})})
    if env.is_main:
        save_config(cfg, out / "config.yaml")

    best, best_state, step = -1.0, None, 0
    for epoch in range(f.epochs):
        model.train()
        for batch in loader:
            images, labels = batch["image"].to(env.device), batch["label"].to(env.device)
            if f.augment:
                images, labels = augment_pair(images, labels, generator=augment_rng)
            loss = segmentation_loss(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
        val = evaluate_volumes(model, cfg.data.store, val_volumes, f.num_classes, env.device)["mean"]
        if val > best:
            best, best_state = val, copy.deepcopy(model.state_dict())
        metrics = {"loss": loss.item(), "val_dice": val, "lr": schedule.get_last_lr()[0]}
        tracker.log_metrics(metrics, step)
        append_jsonl(out / "metrics.jsonl", {"epoch": epoch, "step": step, **metrics})

    save_atomic(model.state_dict(), out / "model_last.pt")
    model.load_state_dict(best_state)
    save_atomic(model.state_dict(), out / "model.pt")
    result = evaluate_volumes(model, cfg.data.store, f.test_volumes, f.num_classes, env.device)
    result.update(init=cfg.tracking.run_name or init, labeled=len(f.train_volumes), best_val_dice=best,
                  class_names=(manifest.get("class_names") or [])[1:] or [f"class{c}" for c in range(1, f.num_classes + 1)])
    (out / "results.json").write_text(json.dumps(result, indent=2))
    tracker.log_metrics({"test_dice": result["mean"]}, step)
    tracker.log_artifact(out / "results.json")
    tracker.end()
    print(f"finetune done: {init} with M={len(f.train_volumes)}: test Dice {result['mean']:.3f} "
          f"(best val {best:.3f}); model {out / 'model.pt'}", flush=True)
    return result

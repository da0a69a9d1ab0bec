"""Semi-supervised fine-tuning: a U-Net whose encoder comes from pretraining (or random), M labeled volumes.

The model is selected on the validation volumes, never on the test volumes it is scored on.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F

from pcl_hpc import dist
from pcl_hpc.config import Config, flatten, save_config, to_dict
from pcl_hpc.data.augment import BatchAugment
from pcl_hpc.data.dataset import ResumableDistributedSampler, SliceDataset, slice_loader
from pcl_hpc.data.store import read_manifest
from pcl_hpc.errors import UserError
from pcl_hpc.engine.checkpoint import Checkpointer, rng_state
from pcl_hpc.engine.loop import Preempted, StepGuard, resumable_batches
from pcl_hpc.engine.strategy import build_strategy
from pcl_hpc.evaluate import evaluate_volumes, load_labeled, score_volumes
from pcl_hpc.models.unet import build_unet
from pcl_hpc.tracking import Tracker, encoder_lineage, load_encoder_state, resolve_tracking_uri
from pcl_hpc.train.common import augment_in_workers, log_step, resume_or_start, run_outcome, save_atomic, seed_everything


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


def freeze_encoder(model, frozen: bool) -> None:
    """Frozen: the pretrained encoder gets no gradients (the decoder learns on top of it first)."""
    for param in model.encoder.parameters():
        param.requires_grad_(not frozen)


def finetune(cfg: Config) -> dict:
    f = cfg.finetune
    check_splits(f)
    env = dist.detect()  # one process: no group to join
    if env.distributed:
        raise UserError("finetune runs in one process per job for now: start it without torchrun / with one task")
    dist.set_threads(env, cfg.engine.threads)
    out, manifest = Path(cfg.output_dir), read_manifest(cfg.data.store)
    augment = BatchAugment(seed=cfg.seed, views=0) if f.augment else None
    in_workers = augment is not None and augment_in_workers(cfg.data, env.device)
    dataset = SliceDataset(cfg.data.store, f.train_volumes, patch=cfg.data.patch, with_labels=True,
                           transform=augment if in_workers else None)
    sampler = ResumableDistributedSampler(len(dataset), seed=cfg.seed)
    loader = slice_loader(dataset, f.batch_size, sampler, cfg.data.num_workers, drop_last=len(dataset) > f.batch_size)
    per_epoch, total_steps = len(loader), f.epochs * len(loader)

    # Build, then load-or-resume.
    seed_everything(cfg.seed)
    model = build_unet(cfg.model, f.num_classes + 1)
    if f.encoder:
        mlflow.set_tracking_uri(resolve_tracking_uri(cfg))  # where models:/ URIs are looked up
        model.encoder.load_state_dict(load_encoder_state(f.encoder))
    optimizer = torch.optim.Adam(model.parameters(), lr=f.lr, weight_decay=f.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    strategy = build_strategy(cfg, env)
    net = strategy.setup(model, optimizer, schedule, f.batch_size)
    ckpt = Checkpointer(out, strategy, cfg.checkpoint.keep)
    meta, _ = resume_or_start(ckpt, cfg)
    step, best = meta.get("step", 0), meta.get("best_val_dice", -1.0)
    val_volumes = f.val_volumes or f.train_volumes  # without a validation split, select on training volumes
    val_data = load_labeled(cfg.data.store, val_volumes)  # read once, scored every epoch

    tracker = Tracker(cfg, enabled=env.is_main)
    init = "random" if not f.encoder else f.encoder
    tracker.start(cfg.tracking.run_name or "finetune", flatten(cfg), run_id=meta.get("run_id"), tags={
        "stage": "finetune", "init": init, "labeled_volumes": len(f.train_volumes), "strategy": strategy.name,
        "store_hash": manifest.get("content_hash", ""), **(encoder_lineage(f.encoder) if f.encoder else {})})
    save_config(cfg, out / "config.yaml")
    guard = StepGuard(cfg.engine.max_bad_steps, env.device)

    with run_outcome(tracker, guard):
        for epoch, batch in resumable_batches(loader, sampler, f.batch_size, step):
            if step >= total_steps:
                break
            freeze_encoder(strategy.module, frozen=epoch < f.freeze_encoder_epochs)
            if augment is not None and not in_workers:
                batch = augment({**batch, "image": batch["image"].to(env.device), "label": batch["label"].to(env.device)})
            images, labels = batch["image"].to(env.device), batch["label"].to(env.device).long()
            with strategy.autocast():
                logits = net(strategy.prepare(images))
            loss = segmentation_loss(logits.float(), labels)
            if guard.finite(loss):
                strategy.backward(loss)
            strategy.step() if guard.end_step(step + 1) else strategy.skip()
            step += 1
            if step % per_epoch == 0:  # end of an epoch: select on the validation volumes, save
                val = score_volumes(strategy.module, val_data, f.num_classes, env.device)["mean"]
                strategy.module.train()
                if val > best:
                    best = val
                    save_atomic(strategy.module.state_dict(), out / "model_best.pt")
                log_step(tracker, out, step, {"loss": loss.item(), "val_dice": val, "lr": strategy.lr,
                                              "skipped_steps": guard.skipped_total, "epoch": epoch}, total_steps, True,
                         echo=(epoch + 1) % f.log_every == 0 or step == total_steps)
            if guard.stop or step % per_epoch == 0:
                ckpt.save(step, {"micro": step, "epoch": epoch, "best_val_dice": best, "run_id": tracker.run_id,
                                 "config": to_dict(cfg)}, {"rng": rng_state(None), "sampler": sampler.state_dict()})
            if guard.stop:
                raise Preempted(f"finetune: saved step {step} after {guard.signalled}; start the same command again to resume")

    model = strategy.module
    save_atomic(model.state_dict(), out / "model_last.pt")
    if not (out / "model_best.pt").is_file():  # no epoch was run
        save_atomic(model.state_dict(), out / "model_best.pt")
    model.load_state_dict(torch.load(out / "model_best.pt", map_location=env.device, weights_only=True))
    save_atomic(model.state_dict(), out / "model.pt")
    result = evaluate_volumes(model, cfg.data.store, f.test_volumes, f.num_classes, env.device)
    result.update(init=cfg.tracking.run_name or init, labeled=len(f.train_volumes), best_val_dice=best,
                  class_names=(manifest.get("class_names") or [])[1:] or [f"class{c}" for c in range(1, f.num_classes + 1)])
    (out / "results.json").write_text(json.dumps(result, indent=2))
    tracker.log_metrics({"test_dice": result["mean"]}, step)
    tracker.log_artifact(out / "results.json")
    tracker.end()
    print(f"finetune done: {init} with M={len(f.train_volumes)}: test Dice {result['mean']:.3f} "
          f"(best val {best:.3f}); best model {out / 'model.pt'}, last {out / 'model_last.pt'}", flush=True)
    return result

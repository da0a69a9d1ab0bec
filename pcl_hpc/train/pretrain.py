"""Contrastive pretraining of the U-Net encoder (PCL, GCL or SimCLR), one process per device.

Each rank encodes its own slices (both views in one batched call); `contrastive_loss` gathers
features and positions from every rank, so the loss sees the whole global batch and the strategy's
gradient averaging gives the exact big-batch gradient. The harness (`pcl_hpc.engine.harness`) runs
the steps, checkpoints and resume; this stage adds its data, network, loss and export.
Writes under ``<output_dir>/pretrain/``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pcl_hpc.atomic import save_torch
from pcl_hpc.config import Config
from pcl_hpc.data.augment import BatchAugment, augment_in_workers
from pcl_hpc.data.dataset import SliceDataset
from pcl_hpc.data.store import volume_ids
from pcl_hpc.engine.harness import Harness, Stage, run, stage_folder
from pcl_hpc.errors import UserError
from pcl_hpc.losses import contrastive_loss
from pcl_hpc.models.unet import build_pretrain_net
from pcl_hpc.optim import build_optimizer
from pcl_hpc.tracking import register_encoder

ENCODER_FILE = "encoder.pt"


def pretrain_volumes(cfg: Config) -> list[str]:
    """The volumes to pretrain on: the configured list, else every volume in the store, minus exclusions."""
    chosen = cfg.pretrain.volumes or volume_ids(cfg.data.store)
    chosen = [v for v in chosen if v not in set(cfg.pretrain.exclude_volumes)]
    if not chosen:
        raise UserError(f"pretrain: no volumes left in {cfg.data.store} (check pretrain.volumes / pretrain.exclude_volumes)")
    return chosen


def with_sync_batchnorm(model: torch.nn.Module, enabled: bool, env) -> torch.nn.Module:
    """One set of BN statistics across ranks, so BN cannot tell which slices share a device."""
    if not enabled or not env.distributed:
        return model
    if env.device.type != "cuda":
        raise UserError("model.sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm has no CPU "
                        "kernel); set model.sync_batchnorm=false on CPU")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def batch_loss(net, strategy, batch: dict, cfg: Config, augment: BatchAugment | None) -> torch.Tensor:
    """Both views of every slice through the network in one call, then the gathered contrastive loss.
    Views come from a loader worker (``batch["views"]``), are made here, or (no augmentation) are the slice."""
    if "views" in batch:
        views = batch["views"].to(strategy.device, non_blocking=True)
    else:
        images = batch["image"].to(strategy.device, non_blocking=True)
        views = images.unsqueeze(1).expand(-1, 2, -1, -1, -1) if augment is None else \
            augment({**batch, "image": images})["views"]
    n = views.shape[0]
    with strategy.autocast():
        features = net(strategy.prepare(views.reshape(n * 2, *views.shape[2:]))).view(n, 2, -1)
    loss = cfg.loss
    return contrastive_loss(features.float(), batch["position"].to(strategy.device),
                            batch["partition"].to(strategy.device), method=loss.method, threshold=loss.threshold,
                            temperature=loss.temperature, base_temperature=loss.base_temperature,
                            chunk_size=loss.chunk_size or None)


class Pretrain(Stage):
    name, items_per_sample, rate_name = "pretrain", 2, "views_per_s"

    def dataset(self, h: Harness) -> SliceDataset:
        p = self.cfg.pretrain
        self.augment = BatchAugment(seed=self.cfg.seed, rank=h.env.rank, views=2) if p.augment else None
        in_workers = self.augment is not None and augment_in_workers(self.cfg.data, h.env.device)
        return SliceDataset(self.cfg.data.store, pretrain_volumes(self.cfg), patch=self.cfg.data.patch,
                            transform=self.augment if in_workers else None)

    def build(self, h: Harness):
        model = with_sync_batchnorm(build_pretrain_net(self.cfg.model), self.cfg.model.sync_batchnorm, h.env)
        return model, build_optimizer(model, self.cfg.pretrain, h.global_batch), self.cfg.pretrain.warmup_steps

    def loss(self, h: Harness, net, batch: dict) -> torch.Tensor:
        return batch_loss(net, h.strategy, batch, self.cfg, self.augment)  # augment: a no-op where a worker did

    def tracking(self, h: Harness):
        return self.cfg.tracking.run_name or f"pretrain-{self.cfg.loss.method}", {"method": self.cfg.loss.method}

    def completed(self) -> Path | None:
        path = self.folder / ENCODER_FILE
        return path if path.is_file() else None

    def export(self, h: Harness) -> Path:
        path = self.folder / ENCODER_FILE
        if not h.env.is_main:
            return path
        cfg, state = self.cfg, h.strategy.module.encoder.state_dict()
        save_torch(state, path)
        version = register_encoder(state, cfg.model, cfg.tracking.register_name, cfg.tracking.alias, tags={
            "method": cfg.loss.method, "dataset": Path(cfg.data.store).stem, "steps": h.state.step,
            "store_hash": h.manifest.get("content_hash", ""), "epochs": round(h.state.micro / h.per_epoch, 2),
            "global_batch": h.global_batch}, run_id=h.tracker.run_id)
        registered = (f"registered models:/{cfg.tracking.register_name}@{cfg.tracking.alias} (version {version})"
                      if version else f"NOT registered (tracking unreachable; see {self.folder / 'metrics_fallback.jsonl'})")
        print(f"pretrain done: {h.state.step} steps on {h.env.world_size} process(es); encoder {path}; {registered}",
              flush=True)
        return path


def folder(cfg: Config) -> Path:
    """``<output_dir>/pretrain``, or ``<output_dir>/pretrain/<pretrain.name>`` when it is set."""
    return stage_folder(cfg, "pretrain", *([cfg.pretrain.name] if cfg.pretrain.name else []))


def pretrain(cfg: Config) -> Path:
    """Pretrain (or resume) under ``<output_dir>/pretrain``; returns the path of ``encoder.pt``."""
    return run(Pretrain(cfg, cfg.pretrain, folder(cfg)))

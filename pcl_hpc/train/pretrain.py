"""Contrastive pretraining of the U-Net encoder (PCL, GCL or SimCLR), one process per device.

Each rank encodes its own slices (both views in one batched call); `contrastive_loss` gathers
features and positions from every rank, so the loss sees the whole global batch and the strategy's
gradient averaging gives the exact big-batch gradient. DDP or DeepSpeed, precision, accumulation,
clipping and checkpoints live in `pcl_hpc.engine`; this file is the loop.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pcl_hpc import dist
from pcl_hpc.config import Config, flatten, save_config, to_dict
from pcl_hpc.data.augment import BatchAugment
from pcl_hpc.data.dataset import ResumableDistributedSampler, SliceDataset, slice_loader
from pcl_hpc.data.store import read_manifest, volume_ids
from pcl_hpc.engine.checkpoint import Checkpointer, rng_state
from pcl_hpc.engine.loop import Preempted, StepGuard, resumable_batches
from pcl_hpc.engine.strategy import build_strategy
from pcl_hpc.errors import UserError
from pcl_hpc.losses import contrastive_loss
from pcl_hpc.models.unet import build_pretrain_net
from pcl_hpc.optim import build_optimizer, build_schedule
from pcl_hpc.tracking import Tracker, register_encoder
from pcl_hpc.train.common import (Throughput, augment_in_workers, log_step, maybe_inject_fault, resume_or_start, run_outcome,
                                  save_atomic, seed_everything)


def pretrain_volumes(cfg: Config) -> list[str]:
    """The volumes to pretrain on: the configured list, else every volume in the store, minus exclusions."""
    chosen = cfg.pretrain.volumes or volume_ids(cfg.data.store)
    chosen = [v for v in chosen if v not in set(cfg.pretrain.exclude_volumes)]
    if not chosen:
        raise UserError(f"pretrain: no volumes left in {cfg.data.store} (check pretrain.volumes / pretrain.exclude_volumes)")
    return chosen


def batch_views(batch: dict, augment: BatchAugment | None, device: torch.device) -> torch.Tensor:
    """(N,2,1,P,P) views on the device: augmented by a loader worker, here, or (no augmentation)
    both views the slice itself."""
    if "views" in batch:
        return batch["views"].to(device, non_blocking=True)
    images = batch["image"].to(device, non_blocking=True)
    if augment is None:
        return images.unsqueeze(1).expand(-1, 2, -1, -1, -1)
    return augment({**batch, "image": images})["views"]


def batch_loss(net, strategy, batch: dict, cfg: Config, augment: BatchAugment | None) -> torch.Tensor:
    """Both views of every slice through the network in one call, then the gathered contrastive loss."""
    views = batch_views(batch, augment, strategy.device)
    n = views.shape[0]
    with strategy.autocast():
        features = net(strategy.prepare(views.reshape(n * 2, *views.shape[2:]))).view(n, 2, -1)
    return contrastive_loss(features.float(), batch["position"].to(strategy.device),
                            batch["partition"].to(strategy.device), method=cfg.loss.method,
                            threshold=cfg.loss.threshold, temperature=cfg.loss.temperature,
                            base_temperature=cfg.loss.base_temperature, chunk_size=cfg.loss.chunk_size or None)


def with_sync_batchnorm(model: torch.nn.Module, enabled: bool, env) -> torch.nn.Module:
    """One set of BN statistics across ranks, so BN cannot tell which slices share a device."""
    if not enabled or not env.distributed:
        return model
    if env.device.type != "cuda":
        raise UserError("model.sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm has no CPU "
                        "kernel); set model.sync_batchnorm=false on CPU")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def pretrain(cfg: Config) -> Path:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # plain-text job logs
    env = dist.init(cfg.engine.backend, cfg.engine.timeout_s)
    dist.set_threads(env, cfg.engine.threads)
    out, p, accum = Path(cfg.output_dir), cfg.pretrain, cfg.engine.grad_accum
    manifest = read_manifest(cfg.data.store)
    augment = BatchAugment(seed=cfg.seed, rank=env.rank, views=2) if p.augment else None
    in_workers = augment is not None and augment_in_workers(cfg.data, env.device)
    dataset = SliceDataset(cfg.data.store, pretrain_volumes(cfg), patch=cfg.data.patch,
                           transform=augment if in_workers else None)
    sampler = ResumableDistributedSampler(len(dataset), env.world_size, env.rank, seed=cfg.seed)
    loader = slice_loader(dataset, p.batch_size, sampler, cfg.data.num_workers, drop_last=True, persistent=True)
    if len(loader) == 0:
        raise UserError(f"pretrain: {len(sampler)} slices per rank is less than pretrain.batch_size={p.batch_size}")
    per_epoch = len(loader)

    # Build, then load-or-resume. Same initial weights on every rank (DDP also broadcasts rank 0's).
    seed_everything(cfg.seed)
    strategy = build_strategy(cfg, env)
    total_steps = p.max_steps or max(1, p.epochs * per_epoch // accum)
    model = with_sync_batchnorm(build_pretrain_net(cfg.model), cfg.model.sync_batchnorm, env)
    optimizer = build_optimizer(model, p, p.batch_size * env.world_size * accum)
    net = strategy.setup(model, optimizer, build_schedule(optimizer, p.warmup_steps, total_steps), p.batch_size)
    ckpt = Checkpointer(out, strategy, cfg.checkpoint.keep)
    meta, ranks = resume_or_start(ckpt, cfg)
    if ranks:
        sampler.load_state_dict(ranks["sampler"])  # refuses another world size, data or seed
    step, micro = meta.get("step", 0), meta.get("micro", 0)

    tracker = Tracker(cfg, enabled=env.is_main)
    tracker.start(cfg.tracking.run_name or f"pretrain-{cfg.loss.method}", flatten(cfg), run_id=meta.get("run_id"), tags={
        "stage": "pretrain", "method": cfg.loss.method, "strategy": strategy.name,
        "precision": str(strategy.dtype).replace("torch.", ""), "store_hash": manifest.get("content_hash", "")})
    if env.is_main:
        save_config(cfg, out / "config.yaml")
        tracker.log_artifact(out / "config.yaml")
    guard, speed = StepGuard(cfg.engine.max_bad_steps, env.device), Throughput()
    guard.skipped_total = meta.get("skipped_steps", 0)

    def save(epoch: int) -> None:
        ckpt.save(step, {"micro": micro, "epoch": epoch, "skipped_steps": guard.skipped_total,
                         "run_id": tracker.run_id, "config": to_dict(cfg)},
                  {"rng": rng_state(None), "sampler": sampler.state_dict(micro % per_epoch * p.batch_size)})

    with run_outcome(tracker, guard):
        for epoch, batch in resumable_batches(loader, sampler, p.batch_size, micro):
            if step >= total_steps:
                break
            sync = (micro + 1) % accum == 0
            with strategy.micro_step(sync):
                loss = batch_loss(net, strategy, batch, cfg, augment)  # a no-op where a worker augmented
                if guard.finite(loss):
                    strategy.backward(loss)
            micro += 1
            speed.add(p.batch_size * 2 * env.world_size)
            if not sync:
                continue
            grad_norm = strategy.step() if guard.end_step(step + 1) else (strategy.skip() or float("nan"))
            step += 1
            if step % p.log_every == 0 or step == 1 or step == total_steps:
                log_step(tracker, out, step, {"loss": dist.all_reduce_mean(loss.item()), "lr": strategy.lr,
                                              "views_per_s": speed.rate(), "grad_norm": grad_norm,
                                              "skipped_steps": guard.skipped_total, "epoch": epoch}, total_steps, env.is_main)
            if guard.stop or step == total_steps or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0):
                save(epoch)
            maybe_inject_fault(step, env.rank)  # tests only (PCL_HPC_FAULT)
            if guard.stop:
                raise Preempted(f"pretrain: saved step {step} after {guard.signalled or 'a signal on another rank'}; "
                                f"start the same command again to resume")
            if step >= total_steps:
                break

    if env.is_main:
        encoder_path = save_atomic(strategy.module.encoder.state_dict(), out / "encoder.pt")
        version = register_encoder(
            strategy.module.encoder.state_dict(), cfg.model, cfg.tracking.register_name, cfg.tracking.alias,
            tags={"method": cfg.loss.method, "dataset": Path(cfg.data.store).stem,
                  "store_hash": manifest.get("content_hash", ""), "steps": step, "epochs": round(micro / per_epoch, 2),
                  "global_batch": p.batch_size * env.world_size * accum}, run_id=tracker.run_id)
        tracker.end()
        registered = (f"registered models:/{cfg.tracking.register_name}@{cfg.tracking.alias} (version {version})"
                      if version else f"NOT registered (tracking unreachable; see {out / 'metrics_fallback.jsonl'})")
        print(f"pretrain done: {step} steps on {env.world_size} process(es); encoder {encoder_path}; {registered}",
              flush=True)
    dist.teardown()
    return out / "encoder.pt"

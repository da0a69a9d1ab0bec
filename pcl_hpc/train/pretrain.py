"""Contrastive pretraining of the U-Net encoder (PCL, GCL or SimCLR), one process per device.

Each rank encodes its own slices; `contrastive_loss` gathers features and positions from every rank,
so the loss sees the whole global batch and DDP's gradient averaging gives the exact big-batch gradient.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pcl_hpc import dist
from pcl_hpc.config import Config, flatten, save_config
from pcl_hpc.data.augment import augment_views
from pcl_hpc.data.dataset import ResumableDistributedSampler, SliceDataset
from pcl_hpc.data.store import read_manifest, volume_ids
from pcl_hpc.errors import UserError
from pcl_hpc.losses import contrastive_loss
from pcl_hpc.models.unet import build_pretrain_net
from pcl_hpc.tracking import Tracker, register_encoder
from pcl_hpc.train.common import Throughput, append_jsonl, git_commit, save_atomic, seed_everything


def pretrain_volumes(cfg: Config) -> list[str]:
    """The volumes to pretrain on: the configured list, else every volume in the store, minus exclusions."""
    chosen = cfg.pretrain.volumes or volume_ids(cfg.data.store)
    chosen = [v for v in chosen if v not in set(cfg.pretrain.exclude_volumes)]
    if not chosen:
        raise UserError(f"pretrain: no volumes left in {cfg.data.store} (check pretrain.volumes / pretrain.exclude_volumes)")
    return chosen


def two_views(images: torch.Tensor, augment: bool, generator: torch.Generator) -> torch.Tensor:
    """(N,1,P,P) slices -> (N,2,1,P,P) views; without augmentation both views are the slice itself."""
    if augment:
        return augment_views(images, views=2, generator=generator)
    return images.unsqueeze(1).expand(-1, 2, -1, -1, -1)


def pretrain(cfg: Config) -> Path:
    env = dist.init(cfg.engine.backend)
    dist.set_threads(env, cfg.engine.threads)
    out = Path(cfg.output_dir)
    p = cfg.pretrain
    manifest = read_manifest(cfg.data.store)
    dataset = SliceDataset(cfg.data.store, pretrain_volumes(cfg), patch=cfg.data.patch)
    sampler = ResumableDistributedSampler(len(dataset), env.world_size, env.rank, seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=p.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)
    if len(loader) == 0:
        raise UserError(f"pretrain: {len(sampler)} slices per rank is less than pretrain.batch_size={p.batch_size}")

    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_pretrain_net(cfg.model).to(env.device, memory_format=torch.channels_last)
    net = DistributedDataParallel(model) if env.distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    total_steps = p.max_steps or p.epochs * len(loader)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    augment_rng = torch.Generator(device=env.device).manual_seed(cfg.seed * 1000 + env.rank)

    tracker = Tracker(cfg, enabled=env.is_main)
    tracker.start(cfg.tracking.run_name or f"pretrain-{cfg.loss.method}", flatten(cfg), tags={
        "stage": "pretrain", "method": cfg.loss.method, "strategy": "ddp", "world_size": env.world_size,
        "store_hash": manifest.get("content_hash", ""), "git_commit": git_commit()})
    if env.is_main:
        save_config(cfg, out / "config.yaml")
        tracker.log_artifact(out / "config.yaml")

    step, speed = 0, Throughput()
    for epoch in range(p.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            views = two_views(batch["image"].to(env.device), p.augment, augment_rng)
            n = views.shape[0]
            flat = views.reshape(n * 2, *views.shape[2:]).contiguous(memory_format=torch.channels_last)
            features = net(flat).view(n, 2, -1)
            loss = contrastive_loss(
                features, batch["position"].to(env.device), batch["partition"].to(env.device),
                method=cfg.loss.method, threshold=cfg.loss.threshold,
                temperature=cfg.loss.temperature, base_temperature=cfg.loss.base_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            speed.add(n * 2 * env.world_size)
            if step % p.log_every == 0 or step == 1 or step == total_steps:
                metrics = {"loss": dist.all_reduce_mean(loss.item()), "lr": schedule.get_last_lr()[0],
                           "views_per_s": speed.rate(), "epoch": epoch}
                if env.is_main:
                    append_jsonl(out / "metrics.jsonl", {"step": step, **metrics})
                    tracker.log_metrics(metrics, step)
                    print(f"pretrain step {step}/{total_steps} loss {metrics['loss']:.4f} "
                          f"({metrics['views_per_s']:.0f} views/s)", flush=True)
            if step >= total_steps:
                break
        if step >= total_steps:
            break

    if env.is_main:
        encoder_path = save_atomic(model.encoder.state_dict(), out / "encoder.pt")
        version = register_encoder(
            model.encoder.state_dict(), cfg.model, cfg.tracking.register_name, cfg.tracking.alias,
            tags={"method": cfg.loss.method, "store_hash": manifest.get("content_hash", ""), "steps": step,
                  "global_batch": p.batch_size * env.world_size}, run_id=tracker.run_id)
        tracker.end()
        print(f"pretrain done: {step} steps on {env.world_size} process(es); encoder {encoder_path}; "
              f"registered models:/{cfg.tracking.register_name}@{cfg.tracking.alias} (version {version})", flush=True)
    dist.teardown()
    return out / "encoder.pt"

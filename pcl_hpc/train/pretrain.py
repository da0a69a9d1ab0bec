"""Contrastive pretraining of the U-Net encoder (PCL, GCL or SimCLR), one process per device.

Each rank encodes its own slices (both views in one batched call); `contrastive_loss` gathers
features and positions from every rank, so the loss sees the whole global batch and the strategy's
gradient averaging gives the exact big-batch gradient. The harness (`pcl_hpc.engine.harness`) runs
the steps, checkpoints and resume; this stage adds its data, network, loss and export.
Writes under ``<output_dir>/pretrain/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pcl_hpc import dist
from pcl_hpc.atomic import save_torch, write_text
from pcl_hpc.config import Config
from pcl_hpc.data.augment import BatchAugment, augment_in_workers
from pcl_hpc.data.dataset import SliceDataset
from pcl_hpc.data.store import volume_ids
from pcl_hpc.engine.harness import METRICS_FILE, Harness, Stage, run, stage_folder
from pcl_hpc.errors import UserError
from pcl_hpc.losses import contrastive_loss
from pcl_hpc.models.unet import build_pretrain_net
from pcl_hpc.nnunet import ingest as nnunet_ingest
from pcl_hpc.nnunet import network as nnunet_network
from pcl_hpc.optim import build_optimizer
from pcl_hpc.probes import check_volumes, position_probe
from pcl_hpc.tracking import register_encoder

ENCODER_FILE = "encoder.pt"
TREND_WINDOW = 0.1  # the loss is smoothed over windows of this fraction of the run's steps
FLAT_BELOW = 0.01  # a smoothed loss that fell by less than 1% from one window to the next is flat
PROBE_R2 = "probe/position_r2"  # the metric pretrain.plateau_probes watches


def pretrain_volumes(cfg: Config) -> list[str]:
    """The volumes to pretrain on: the configured list, else every volume in the store, minus exclusions."""
    chosen = cfg.pretrain.volumes or volume_ids(cfg.data.store)
    chosen = [v for v in chosen if v not in set(cfg.pretrain.exclude_volumes)]
    if not chosen:
        raise UserError(f"pretrain: no volumes left in {cfg.data.store} (check pretrain.volumes / pretrain.exclude_volumes)")
    return chosen


def probe_volumes(cfg: Config) -> list[str]:
    """The position probe's volumes: pretrain.probe_volumes, else the held-out pretrain.exclude_volumes; [] when off."""
    p = cfg.pretrain
    if not p.probe_every and not p.plateau_probes:
        return []
    chosen = p.probe_volumes or p.exclude_volumes
    if p.plateau_probes and not p.probe_every:
        raise UserError(f"pretrain.plateau_probes={p.plateau_probes} stops on the position probe's plateau: set "
                        f"pretrain.probe_every (e.g. 250) or pretrain.plateau_probes=0")
    if len(set(chosen)) < 2:
        raise UserError(f"pretrain.probe_every={p.probe_every} needs pretrain.probe_volumes: name at least 2 "
                        f"volumes (best held out of pretraining: also in pretrain.exclude_volumes), or set "
                        f"pretrain.probe_every=0")
    return chosen


def loss_trend(steps: list[int], losses: list[float]) -> dict | None:
    """The logged loss smoothed over windows of steps (each TREND_WINDOW of the run's steps): the mean of
    the losses logged in the last window against those in the window before (where either window holds
    no logged loss, the last TREND_WINDOW of the logged values, at least one, against the ones before).
    ``{"change": relative change, "steps": the window's length in steps, "trend": falling | flat |
    rising}`` (flat: a change within FLAT_BELOW); None with fewer than 2 finite losses."""
    points = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    if len(points) < 2:
        return None
    end = points[-1][0]
    span = end * TREND_WINDOW
    last = [v for s, v in points if s > end - span]
    before = [v for s, v in points if end - 2 * span < s <= end - span]
    if not last or not before:  # too few logged losses for windows of steps: windows of logged values
        w = max(1, int(len(points) * TREND_WINDOW))
        last, before = [v for _, v in points[-w:]], [v for _, v in points[-2 * w:-w]]
        span = end - points[-w - 1][0]
    mean_last, mean_before = sum(last) / len(last), sum(before) / len(before)
    change = (mean_last - mean_before) / abs(mean_before) if mean_before else 0.0
    return {"change": change, "steps": round(span),
            "trend": "falling" if change < -FLAT_BELOW else "rising" if change > FLAT_BELOW else "flat"}


def convergence(metrics_file: Path) -> str:
    """One phrase on the loss's trend, from the stage's metrics.jsonl."""
    losses = logged(metrics_file, "loss")
    trend = loss_trend([s for s, _ in losses], [v for _, v in losses])
    if trend is None:
        return "too few logged losses to judge convergence (lower pretrain.log_every)"
    change = f"{trend['change']:+.1%} over the last {trend['steps']} steps"
    return {"falling": f"loss still falling: {change}; train longer", "flat": f"loss flat ({change})",
            "rising": f"loss rising: {change}"}[trend["trend"]]


def plateaued(scores: list[float], probes: int, delta: float) -> bool:
    """True when none of the last ``probes`` scores beat the best score before them by ``delta`` or more."""
    if probes < 1 or len(scores) <= probes:
        return False
    return max(scores[-probes:]) < max(scores[:-probes]) + delta


def logged(metrics_file: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every line of a stage's metrics.jsonl that holds ``key`` (after a resume the file holds
    the lines up to the checkpoint's step: the history of the run that goes on)."""
    lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
    return [(r["step"], r[key]) for r in map(json.loads, filter(str.strip, lines)) if key in r]


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
        self.probe_volumes, self.probed = probe_volumes(self.cfg), {}
        if self.probe_volumes:  # checked before any training
            check_volumes(self.cfg.data.store, self.probe_volumes, "pretrain.probe_volumes")
        nnunet = self.cfg.model.arch == "nnunet"  # nnU-Net's slices at the plan's patch size
        patch = nnunet_ingest.store_plan_check(self.cfg, h.manifest) if nnunet else self.cfg.data.patch
        return SliceDataset(self.cfg.data.store, pretrain_volumes(self.cfg), patch=patch,
                            transform=self.augment if in_workers else None)

    def build(self, h: Harness):
        net = nnunet_network.pretrain_net(self.cfg.model) if self.cfg.model.arch == "nnunet" else \
            build_pretrain_net(self.cfg.model)
        model = with_sync_batchnorm(net, self.cfg.model.sync_batchnorm, h.env)
        return model, build_optimizer(model, self.cfg.pretrain, h.global_batch), self.cfg.pretrain.warmup_steps

    def loss(self, h: Harness, net, batch: dict) -> torch.Tensor:
        return batch_loss(net, h.strategy, batch, self.cfg, self.augment)  # augment: a no-op where a worker did

    def periodic(self, h: Harness, last: bool) -> dict | None:
        """The position probe every pretrain.probe_every steps and at the last: rank 0 computes it on the unwrapped
        encoder, at the patch the stage trains on; the other ranks wait at the next collective (the logged loss)."""
        every = self.cfg.pretrain.probe_every
        if not every or not (h.state.step % every == 0 or last):
            return None
        if not h.env.is_main:
            return {}
        scores = position_probe(h.strategy.module.encoder, self.cfg.data.store, self.probe_volumes,
                                h.loader.dataset.patch, key="pretrain.probe_volumes")
        self.probed = {f"probe/{k}": v for k, v in scores.items()}
        return self.probed

    def stop_early(self, h: Harness, periodic: dict) -> bool:
        """With pretrain.plateau_probes: rank 0 judges the probe's R^2 history (metrics.jsonl, this step's
        probe last) and every rank gets its answer."""
        p = self.cfg.pretrain
        if not p.plateau_probes:
            return False
        history = [v for _, v in logged(self.folder / METRICS_FILE, PROBE_R2)] + [periodic.get(PROBE_R2, math.nan)]
        return dist.any_rank(h.env.is_main and plateaued(history, p.plateau_probes, p.plateau_delta)) >= 0

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
        nnunet = nnunet_network.arch_record(cfg, h.manifest.get("content_hash", "")) if cfg.model.arch == "nnunet" \
            else None  # what `export --format nnunet` checks the plan against
        if nnunet is not None:
            write_text(self.folder / nnunet_network.ARCH_FILE, json.dumps(nnunet, indent=1))
        save_torch(state, path)
        trend = convergence(self.folder / METRICS_FILE)
        probe_tags = {k.replace("/", "_"): round(v, 4) for k, v in self.probed.items()}  # the last step's probe
        version = register_encoder(state, cfg.model, cfg.tracking.register_name, cfg.tracking.alias, tags={
            "method": cfg.loss.method, "dataset": Path(cfg.data.store).stem, "steps": h.state.step,
            "store_hash": h.manifest.get("content_hash", ""), "epochs": round(h.state.micro / h.per_epoch, 2),
            "global_batch": h.global_batch, **nnunet_network.arch_tags(nnunet), "convergence": trend, **probe_tags,
            **({"stopped_early": f"step {h.state.step} of {h.total_steps}"} if h.state.stopped_early else {})},
            run_id=h.tracker.run_id)
        registered = (f"registered models:/{cfg.tracking.register_name}@{cfg.tracking.alias} (version {version})"
                      if version else f"NOT registered (tracking unreachable; see {self.folder / 'metrics_fallback.jsonl'})")
        probe_text = "".join(f"; {k} {v:.3f}" for k, v in self.probed.items())
        if h.state.stopped_early:
            probe_text += (f"; stopped early at step {h.state.step} of {h.total_steps}: the position probe's R^2 gained "
                           f"less than {cfg.pretrain.plateau_delta} over its last {cfg.pretrain.plateau_probes} probes")
        print(f"pretrain done: {h.state.step} steps on {h.env.world_size} process(es); {trend}{probe_text}; "
              f"encoder {path}; {registered}", flush=True)
        return path


def folder(cfg: Config) -> Path:
    """``<output_dir>/pretrain``, or ``<output_dir>/pretrain/<pretrain.name>`` when it is set."""
    return stage_folder(cfg, "pretrain", *([cfg.pretrain.name] if cfg.pretrain.name else []))


def pretrain(cfg: Config) -> Path:
    """Pretrain (or resume) under ``<output_dir>/pretrain``; returns the path of ``encoder.pt``."""
    return run(Pretrain(cfg, cfg.pretrain, folder(cfg)))

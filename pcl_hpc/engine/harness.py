"""The one training harness: every stage (pretrain, finetune, and the sweep and predict stages that
reuse them) runs in it, so set-up, the step protocol and resume are written once.

A stage supplies what only it knows (:class:`Stage`): its data, its model and optimizer, its loss on
a batch, its end-of-epoch evaluation, its periodic metrics (probes) and its export. :func:`run` does the rest:

* set-up: process group (``dist.init``), threads, loader with its resumable sampler, seeding,
  strategy (DDP | DeepSpeed), LR schedule, checkpointer, tracker, the preemption/NaN guard;
* the step protocol: micro-batches and gradient accumulation, the non-finite skip (agreed by every
  rank), periodic, end-of-epoch, final and preemption saves, ``Preempted`` (exit 75: requeue me);
* resume: :class:`TrainState` (step, micro-batch, epoch, skipped steps, best validation score, run
  id, schedule length) is one explicit object in the checkpoint; each rank's sampler position and
  RNG states beside it. A resume that would change the LR schedule's length fails with one line.

Each stage writes under its own folder of ``output_dir`` (:func:`stage_folder`): ``pretrain/``,
``finetune/<name>/``, so one config serves the whole sequence.

The one fault-injection point, for the tests that kill or signal a run between checkpoints, is
:func:`maybe_inject_fault` (``PCL_HPC_FAULT=<kill|signal>:<step>:<rank>`` or ``slow:<seconds>``; unset in
production).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcl_hpc import dist
from pcl_hpc.atomic import is_disk_full, write_text
from pcl_hpc.config import Config, flatten, save_config, to_dict
from pcl_hpc.data.dataset import ResumableDistributedSampler, slice_loader
from pcl_hpc.data.store import read_manifest
from pcl_hpc.engine.checkpoint import Checkpointer, rng_state
from pcl_hpc.engine.loop import Preempted, StepGuard, resumable_batches
from pcl_hpc.engine.strategy import build_strategy
from pcl_hpc.errors import UserError
from pcl_hpc.optim import build_schedule
from pcl_hpc.tracking import Tracker

METRICS_FILE = "metrics.jsonl"
TRACKING_FLUSH_S = 5.0  # the longest a checkpoint waits for the tracking queue (a hung server: no longer)
COMPLETE_FILE = "complete.json"  # written after the export: this folder holds the result of this configuration


def stage_folder(cfg: Config, *parts: str) -> Path:
    """``<output_dir>/<stage>[/<name>]``: where one stage of the experiment writes."""
    return Path(cfg.output_dir).joinpath(*parts)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclasses.dataclass
class TrainState:
    """A run's counters, checkpointed as one object (as torchtitan's Stateful train state)."""

    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches done (steps x engine.grad_accum), counted from the run's start
    epoch: int = 0  # epoch of the last micro-batch
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    best_score: float = -1.0  # best end-of-epoch validation score (fine-tuning's model selection)
    run_id: str | None = None  # the tracking run, continued on resume
    schedule_steps: int = 0  # length of the LR schedule this run was started with
    stopped_early: bool = False  # the stage ended the run before its last step (Stage.stop_early)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


class Stage:
    """What a stage adds to the harness. Override the methods; the attributes describe its loop."""

    name = "stage"  # also the `stage` tag of its tracking run
    distributed = True  # False: refuses to run with several processes
    checkpoint_each_epoch = False  # also save at every epoch end (where the stage selects a model)
    items_per_sample = 1  # e.g. 2 views per slice: for the throughput metric
    rate_name = "samples_per_s"

    def __init__(self, cfg: Config, section, folder: Path):
        self.cfg, self.section, self.folder = cfg, section, Path(folder)

    def dataset(self, h: "Harness"):
        raise NotImplementedError

    def build(self, h: "Harness") -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
        """(model, optimizer, warm-up steps) for the global batch ``h.global_batch``."""
        raise NotImplementedError

    def loss(self, h: "Harness", net: torch.nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def begin_epoch(self, h: "Harness", epoch: int) -> None:
        """Before the first micro-batch of an epoch (also of the epoch a resume starts in)."""

    def evaluate(self, h: "Harness", epoch: int) -> dict[str, float]:
        """After the last step of epoch ``epoch``: metrics to log with that step."""
        return {}

    def periodic(self, h: "Harness", last: bool) -> dict[str, float] | None:
        """After every optimizer step, on every rank: None when nothing is due at this step (the same answer on
        every rank), else metrics to log with it (e.g. a probe; may be {} on ranks that do not compute it)."""
        return None

    def stop_early(self, h: "Harness", periodic: dict[str, float]) -> bool:
        """After a step whose periodic() was due, on every rank: True ends the run at this step as if it were
        the last (saved, exported; a resume from it does not train on). The same answer on every rank."""
        return False

    def log_now(self, step: int, last: bool, ended_epoch: int | None) -> tuple[bool, bool]:
        """(log, print) this step: by default every ``log_every`` steps, the first and the last."""
        due = step % self.section.log_every == 0 or step == 1 or last
        return due or ended_epoch is not None, due

    def tracking(self, h: "Harness") -> tuple[str, dict]:
        """(run name, tags) of its tracking run."""
        return self.cfg.tracking.run_name or self.name, {}

    def export(self, h: "Harness") -> Any:
        """After the last step, on every rank: write the stage's outputs; its return value is run()'s."""

    def identity(self) -> dict:
        """What the result depends on besides the config (e.g. the encoder's version): see :func:`run_key`."""
        return {}

    def completed(self) -> Any:
        """The result of an earlier complete run in this folder (read from its outputs), or None."""
        return None


def maybe_inject_fault(step: int, rank: int) -> None:
    """The fault-injection point for the resume tests: ``PCL_HPC_FAULT=<kill|signal>:<step>:<rank>``.

    After step <step>'s checkpoint decision, rank <rank> exits hard (kill: like a dead node) or sends
    itself SIGUSR1 (signal: like SLURM before preemption). ``slow:<seconds>``: every rank sleeps that
    long after each step (a run that outlasts a SLURM time limit at little CPU; the numbers do not
    change). Only in the first attempt of a torchrun group or of a SLURM job, so a restarted group or a
    requeued job runs through.
    """
    spec = os.environ.get("PCL_HPC_FAULT", "")
    first = all(os.environ.get(v, "0") == "0" for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    if not spec or not first:
        return
    kind, *args = spec.split(":")
    if kind == "slow":
        time.sleep(float(args[0]))
        return
    at, who = args
    if int(at) != step or int(who) != rank:
        return
    if kind == "kill":
        print(f"PCL_HPC_FAULT: rank {rank} exits hard after step {step}", flush=True)
        os._exit(13)
    import signal

    os.kill(os.getpid(), signal.SIGUSR1)


class Throughput:
    """Items per second since the last call."""

    def __init__(self) -> None:
        self._t, self._n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self._n += n

    def exclude(self, seconds: float) -> None:
        """Leave out time that was not training (a probe) from the next rate."""
        self._t += seconds

    def rate(self) -> float:
        now = time.perf_counter()
        rate, self._t, self._n = self._n / max(now - self._t, 1e-9), now, 0
        return rate


class Harness:
    """The set-up a stage runs in; built by :func:`run`. Stages read ``env``, ``strategy``,
    ``state``, ``tracker``, ``manifest``, ``global_batch`` and ``folder`` from it."""

    def __init__(self, stage: Stage):
        cfg, s = stage.cfg, stage.section
        self.cfg, self.stage, self.folder = cfg, stage, stage.folder
        self.env = dist.detect() if not stage.distributed else dist.init(cfg.engine.backend, cfg.engine.timeout_s)
        if not stage.distributed and self.env.distributed:
            raise UserError(f"{stage.name} runs in one process per job: start it without torchrun / with one task")
        dist.set_threads(self.env, cfg.engine.threads)
        self.manifest = read_manifest(cfg.data.store)
        self.accum = cfg.engine.grad_accum
        self.global_batch = s.batch_size * self.env.world_size * self.accum
        self.state = TrainState()
        self._warned_full = False  # metrics.jsonl on a full disk: warned once

        dataset = stage.dataset(self)
        self.sampler = self._sampler(dataset)
        drop_last = len(self.sampler) > s.batch_size  # a smaller set still gives one (short) batch
        self.loader = slice_loader(dataset, s.batch_size, self.sampler, cfg.data.num_workers, drop_last, persistent=True)
        if len(self.loader) == 0:
            raise UserError(f"{stage.name}: {len(self.sampler)} slices per rank is less than "
                            f"{stage.name}.batch_size={s.batch_size}")
        self.per_epoch = len(self.loader)  # micro-batches per epoch
        self.total_steps = s.max_steps or max(1, s.epochs * self.per_epoch // self.accum)
        self.state.schedule_steps = s.schedule_steps or self.total_steps
        if self.env.is_main:
            per_epoch = max(1, self.per_epoch // self.accum)
            print(f"{stage.name}: {self.total_steps} steps = {self.total_steps / per_epoch:.1f} epochs of {len(dataset)} "
                  f"slices ({per_epoch} steps of {self.global_batch} per epoch)", flush=True)
        if self.total_steps > self.state.schedule_steps and self.env.is_main:
            print(f"warning: {stage.name} runs {self.total_steps} steps but its LR schedule ends at step "
                  f"{self.state.schedule_steps} ({stage.name}.schedule_steps): the steps after it run at lr 0", flush=True)

        seed_everything(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        self.strategy = build_strategy(cfg, self.env)
        model, optimizer, warmup = stage.build(self)
        schedule = build_schedule(optimizer, warmup, self.state.schedule_steps)
        self.net = self.strategy.setup(model, optimizer, schedule, s.batch_size)
        self.checkpointer = Checkpointer(self.folder, self.strategy, cfg.checkpoint.keep)
        self._resume()
        self.guard = StepGuard(cfg.engine.max_bad_steps, self.env.device)
        self.guard.skipped_total = self.state.skipped_steps
        self.tracker = Tracker(cfg, enabled=self.env.is_main, folder=self.folder)
        run_name, tags = stage.tracking(self)
        self.state.run_id = self.tracker.start(run_name, flatten(cfg), run_id=self.state.run_id, tags={
            "stage": stage.name, "strategy": self.strategy.name, "store_hash": self.manifest.get("content_hash", ""),
            "precision": str(self.strategy.dtype).replace("torch.", ""), **tags}) or self.state.run_id
        if self.env.is_main:
            save_config(cfg, self.folder / "config.yaml")
            self.tracker.log_artifact(self.folder / "config.yaml")

    def _sampler(self, dataset) -> ResumableDistributedSampler:
        """Every rank's share of the slices; with data.stage, its node's volumes, first copied to the node."""
        cfg = self.cfg
        if not cfg.data.stage:
            return ResumableDistributedSampler(len(dataset), self.env.world_size, self.env.rank, seed=cfg.seed)
        from pcl_hpc.data.staging import stage

        return stage(dataset, cfg.data, self.manifest, self.env, cfg.seed)

    def _resume(self) -> None:
        """Load the newest usable checkpoint (or checkpoint.path): strategy, RNGs, sampler position, train state.

        Corrupt checkpoints (digest mismatch, unreadable) are moved aside and named in one line; see
        :meth:`Checkpointer.resume`."""
        ckpt, s, name = self.checkpointer, self.stage.section, self.stage.name
        restored = ckpt.resume(self.cfg.checkpoint.path, self.cfg.checkpoint.resume)
        if restored is None:
            return
        folder, meta, ranks = restored
        saved = TrainState(**meta["train"])
        if saved.schedule_steps != self.state.schedule_steps:
            given = f"{name}.schedule_steps={s.schedule_steps}" if s.schedule_steps else \
                f"{name}.schedule_steps unset: the run's total steps"
            raise UserError(
                f"{folder}: the checkpoint's LR schedule is {saved.schedule_steps} steps long but this run's would be "
                f"{self.state.schedule_steps} ({given}); set {name}.schedule_steps={saved.schedule_steps} to keep it "
                f"(steps after {saved.schedule_steps} run at lr 0), pass --no-resume to start fresh, or next time "
                f"set {name}.schedule_steps to the final length from the start")
        self.sampler.load_state_dict(ranks["sampler"])  # refuses another world size, data or seed
        self.state = saved
        if self.env.is_main:
            print(f"resuming from {folder} (step {saved.step})", flush=True)
            _keep_metrics_up_to(self.folder / METRICS_FILE, saved.step)  # steps after it are run again

    def save(self) -> None:
        """A checkpoint of this step, on every rank; first the tracker's queue is sent (a bounded wait), so a
        run killed after this checkpoint has every step up to it in MLflow (or in its fallback file)."""
        self.tracker.flush(TRACKING_FLUSH_S)
        consumed = self.state.micro % self.per_epoch * self.stage.section.batch_size
        self.checkpointer.save(self.state.step, {"train": self.state.state_dict(), "config": to_dict(self.cfg)},
                               {"rng": rng_state(None), "sampler": self.sampler.state_dict(consumed)})

    def _append_metrics(self, line: str) -> None:
        """One line of metrics.jsonl; on a full disk the line is dropped whole (the file cut back to its last
        complete line, the tracker still gets it) with one warning, and training goes on to its next checkpoint."""
        path = self.folder / METRICS_FILE
        size = path.stat().st_size if path.exists() else 0
        try:
            with path.open("a") as f:
                f.write(line)
        except OSError as err:
            if not is_disk_full(err, path):
                raise
            os.truncate(path, size)
            if not self._warned_full:
                self._warned_full = True
                print(f"warning: no space left for {path}; its lines are skipped while the disk is full",
                      flush=True)

    def log(self, metrics: dict, echo: bool) -> None:
        """Rank 0: one JSON line, the tracker, and (when echo) a progress line."""
        if not self.env.is_main:
            return
        step = self.state.step
        self._append_metrics(json.dumps({"step": step, **metrics}) + "\n")
        self.tracker.log_metrics(metrics, step)
        if echo:
            extra = "".join(f" {k} {v:.3f}" for k, v in metrics.items() if k.startswith(("val_", "probe/")))
            rate = self.stage.rate_name
            speed = f" ({metrics[rate]:.0f} {rate.replace('_per_s', '')}/s)" if rate in metrics else ""
            print(f"step {step}/{self.total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.3g}{speed}{extra}",
                  flush=True)


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop the local metrics lines of steps after ``step`` (a resume runs them again): each step once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text(path, "".join(line + "\n" for line in kept))


@contextlib.contextmanager
def _outcome(tracker, guard):
    """The tracking run ends KILLED on a preemption, FAILED on an error; signal handlers are restored."""
    try:
        yield
    except Preempted:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        guard.close()


def fit(h: Harness) -> None:
    """The step protocol, from wherever the state says the run is, to the last step."""
    stage, st, s, guard, strategy = h.stage, h.state, h.stage.section, h.guard, h.strategy
    every, speed, epoch_seen = h.cfg.checkpoint.every_steps, Throughput(), None
    for epoch, batch in resumable_batches(h.loader, h.sampler, s.batch_size, st.micro):
        if st.step >= h.total_steps or st.stopped_early:
            break
        if epoch != epoch_seen:
            stage.begin_epoch(h, epoch)
            epoch_seen = st.epoch = epoch
        sync = (st.micro + 1) % h.accum == 0
        with strategy.micro_step(sync):
            loss = stage.loss(h, h.net, batch)
            if guard.finite(loss):
                strategy.backward(loss)
        st.micro += 1
        speed.add(s.batch_size * stage.items_per_sample * h.env.world_size)
        if not sync:
            continue
        grad_norm = strategy.step() if guard.end_step(st.step + 1) else (strategy.skip() or math.nan)
        st.step, st.skipped_steps = st.step + 1, guard.skipped_total
        ended = st.micro // h.per_epoch > (st.micro - h.accum) // h.per_epoch  # an epoch finished in this step
        evaluated = stage.evaluate(h, st.micro // h.per_epoch - 1) if ended else {}
        last = st.step == h.total_steps
        probe_start = time.perf_counter()
        periodic = stage.periodic(h, last)
        if periodic is not None and not last and stage.stop_early(h, periodic):
            st.stopped_early = last = True
        speed.exclude(time.perf_counter() - probe_start)
        log, echo = stage.log_now(st.step, last, st.micro // h.per_epoch - 1 if ended else None)
        if log or periodic is not None:
            h.log({"loss": dist.all_reduce_mean(loss.item()), "lr": strategy.lr, stage.rate_name: speed.rate(),
                   "grad_norm": grad_norm, "skipped_steps": st.skipped_steps, "epoch": epoch, **evaluated,
                   **(periodic or {})}, echo or periodic is not None)
        if guard.stop or last or (every and st.step % every == 0) or (ended and stage.checkpoint_each_epoch):
            h.save()
        maybe_inject_fault(st.step, h.env.rank)
        if guard.stop:
            raise Preempted(f"{stage.name}: saved step {st.step} after {guard.signalled or 'a signal on another rank'}; "
                            f"start the same command again to resume")
        if last:
            break


def run_key(stage: Stage) -> str:
    """A hash of what a stage's result is a function of: its config (less how and where it runs: ``slurm``,
    and ``sweep``: a cell's own seed, split and encoder are in its config and identity, so adding a seed or
    running cells side by side never invalidates a finished cell), the store's content, its identity().
    The number of processes a run had is recorded beside the key (``world_size`` in complete.json), as the
    SLURM settings are not part of it: a runner may pretrain with other resources than another one."""
    config = {k: v for k, v in to_dict(stage.cfg).items() if k not in ("slurm", "sweep")}
    drop = ("stage_dir",) if stage.cfg.data.stage else ("stage", "stage_dir")  # where a node stages is not what it
    config["data"] = {k: v for k, v in config["data"].items() if k not in drop}  # computes; unstaged keys as before
    what = {"config": config, "store": read_manifest(stage.cfg.data.store).get("content_hash", ""),
            **stage.identity()}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _done(stage: Stage) -> dict | None:
    """The complete-marker of an earlier run of exactly this stage (config, store, identity), else None."""
    marker = stage.folder / COMPLETE_FILE
    if not stage.cfg.checkpoint.resume or stage.cfg.checkpoint.path or not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    return done if done.get("key") == run_key(stage) else None


def is_complete(stage: Stage) -> bool:
    """True when ``run(stage)`` would return an earlier result without training."""
    return _done(stage) is not None and stage.completed() is not None


def run(stage: Stage) -> Any:
    """Set up, train to the last step (resuming if a checkpoint exists), export; the stage's result.

    A folder that already holds the complete result of the same run (:data:`COMPLETE_FILE` with the
    same :func:`run_key`) is not run again: its result is returned (``--no-resume`` runs it again)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # plain-text job logs
    done = _done(stage)
    result = stage.completed() if done else None
    if result is not None:
        if dist.detect().is_main:
            print(f"{stage.name}: {stage.folder} already holds this run's result (step {done.get('step')}); "
                  f"not run again (--no-resume runs it again)", flush=True)
        return result
    key = run_key(stage)
    try:
        h = Harness(stage)
        with _outcome(h.tracker, h.guard):
            fit(h)
            result = stage.export(h)
        if h.env.is_main:
            write_text(stage.folder / COMPLETE_FILE,
                       json.dumps({"key": key, "step": h.state.step, "run_id": h.state.run_id,
                                   "world_size": h.env.world_size}) + "\n")
        h.tracker.end()
    finally:
        dist.teardown()  # also after an error: no process group is left behind in this process
    return result

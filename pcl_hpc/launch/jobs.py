"""The picklable jobs submitit runs: every rank of a training stage (`StageJob`) and one pcl-hpc command (`CommandJob`).

Both run a ``pcl-hpc`` command line (a plan's task, :class:`pcl_hpc.plan.Task`) in the job's process.

Both are checkpointable: submitit's handler calls :meth:`Job.checkpoint` (on rank 0, inside the
signal handler) only when SIGUSR1 arrives outside a training loop; during training the StepGuard has
the signal, every rank saves at the same step and raises ``Preempted``, and rank 0 decides here
(:meth:`Job.after_preemption`) whether the job needs a requeue.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import submitit

from pcl_hpc import dist
from pcl_hpc.engine.checkpoint import latest_checkpoint
from pcl_hpc.engine.loop import REQUEUE_EXIT_CODE, Preempted
from pcl_hpc.errors import UserError
from pcl_hpc.launch.cluster import _run, base_state, job_state
from pcl_hpc.plan import mark_done


class JobStopped(UserError):
    """Rank 0 of a job that was interrupted and not requeued (slurm.max_requeues reached): one line."""


class CommandFailed(RuntimeError):
    """A pcl-hpc command of a job ended with a non-zero status (its own error line is in the task's log)."""


def checkpoint_text(folder: Path) -> str:
    """'<latest checkpoint> (step N)', or '' when the stage has none."""
    latest = latest_checkpoint(folder)
    if latest is None or not latest.is_dir():
        return ""
    try:
        step = json.loads((latest / "meta.json").read_text())["train"]["step"]
        return f"{latest} (step {step})"
    except (OSError, ValueError, KeyError):
        return str(latest)


def lost_peer(err: BaseException) -> bool:
    """Whether a collective failed because another rank is gone (its connection closed, or it never answered)."""
    import torch.distributed as torch_dist

    kinds = tuple(getattr(torch_dist, name) for name in ("DistBackendError", "DistNetworkError") if hasattr(torch_dist, name))
    text = str(err)
    return isinstance(err, kinds) or any(s in text for s in ("gloo", "NCCL", "Connection closed by peer",
                                                             "Connection reset by peer", "timed out", "Timed out"))


def restarts() -> int:
    value = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


class Job(submitit.helpers.Checkpointable):
    """What every job shares: the requeue decision after a preemption and submitit's checkpoint()."""

    name = "job"
    max_requeues = 3
    continue_command = ""

    def where(self) -> str:
        """'checkpoint ...; continue with: ...' for the one line of a stopped job."""
        return f"continue with: {self.continue_command}"

    def resumes_from(self) -> str:
        return "its checkpoint"

    def after_preemption(self, job) -> None:
        """Rank 0, after every rank saved: requeue once if SLURM will not; past max_requeues, stop with one line."""
        for sig in (signal.SIGUSR1, signal.SIGTERM):  # we are stopping: a second signal must not requeue again
            signal.signal(sig, signal.SIG_IGN)
        job_id = self._slurm_id()  # an array task is requeued by its own id (<array>_<index>)
        if job.cluster != "slurm" or not job_id:
            print(f"{self.name} stopped after a signal; {self.where()}", flush=True)
            return
        count, info = restarts(), job_state(job_id)
        state = info.get("JobState", "UNKNOWN")
        if state == "RUNNING":  # time limit, `scancel --signal`: nobody else requeues this job
            if count >= self.max_requeues:
                raise JobStopped(f"job {job_id} stopped after {count} requeue(s) (slurm.max_requeues="
                                 f"{self.max_requeues}); {self.where()}")
            proc = _run(["scontrol", "requeue", job_id], timeout=60)
            if proc.returncode == 0:
                print(f"requeued job {job_id} (restart {count + 1} of at most {self.max_requeues}); it resumes "
                      f"from {self.resumes_from()}", flush=True)
            else:
                print(f"scontrol requeue {job_id} failed: {(proc.stderr or proc.stdout).strip()}; {self.where()}",
                      flush=True)
            return
        if state == "COMPLETING":  # ending: accounting knows why (CANCELLED, REQUEUED, TIMEOUT, ...)
            state = base_state(job_id) or state
        if state in ("REQUEUED", "PREEMPTED") or (info.get("Restarts", "").isdigit() and int(info["Restarts"]) > count):
            print(f"job {job_id} is being requeued by SLURM (scontrol requeue or preemption); it resumes from "
                  f"{self.resumes_from()}", flush=True)
            return
        # cancelled, or ending for another reason (node failure, the hard time limit): never undone by a requeue
        print(f"job {job_id} is ending ({state}): not requeued; {self.where()}", flush=True)

    def after_lost_rank(self, job, err: BaseException) -> bool:
        """A surviving rank, after a collective failed because a peer died (a crash, an OOM kill, a lost node):
        requeue the job from its last checkpoint, within max_requeues. True when it was requeued."""
        job_id = self._slurm_id()
        if job.cluster != "slurm" or not job_id:
            return False
        count, state = restarts(), job_state(job_id).get("JobState", "")
        if state != "RUNNING" or count >= self.max_requeues:  # another rank requeued it, or the budget is spent
            return False
        proc = _run(["scontrol", "requeue", job_id], timeout=60)
        if proc.returncode != 0:
            return False
        why = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:200]
        print(f"job {job_id} lost a rank ({why}); requeued it (restart {count + 1} of at most {self.max_requeues}); "
              f"it resumes from {self.resumes_from()}", flush=True)
        return True

    @staticmethod
    def _slurm_id() -> str | None:
        """The id to requeue: an array task's <array>_<index>, else SLURM_JOB_ID."""
        array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{array}_{index}" if array and index else os.environ.get("SLURM_JOB_ID")

    def checkpoint(self, *args, **kwargs):
        """Inside submitit's SIGUSR1 handler on rank 0 (outside the training loop): nothing is saved or
        sent here; the resubmission is returned and submitit requeues the job, which resumes from latest."""
        if restarts() >= self.max_requeues:
            print(f"not requeued: {restarts()} requeue(s) already (slurm.max_requeues={self.max_requeues}); "
                  f"continue with: {self.continue_command}", flush=True)
            return None
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _parse(argv: list[str]):
    from pcl_hpc.cli import build_parser

    return build_parser().parse_args(argv)


class StageJob(Job):
    """Every rank of a training stage (one task per process): ``pcl-hpc pretrain|finetune|sweep --step
    pretrain-<method> ...``, each task told its rank; a requeued run continues its own checkpoint."""

    def __init__(self, name: str, argv: list[str], folder: str, max_requeues: int = 3, continue_command: str = ""):
        self.name, self.argv, self.folder = name, list(argv), Path(folder)
        self.max_requeues, self.continue_command = int(max_requeues), continue_command

    def __call__(self):
        from pcl_hpc.cli import run

        job = submitit.JobEnvironment()
        tasks = max(job.num_tasks, 1)
        dist.publish(job.global_rank, job.local_rank, tasks, tasks // max(job.num_nodes, 1),
                     *((job.hostnames[0] if job.num_nodes > 1 else "127.0.0.1", dist.master_port(job.job_id))
                       if tasks > 1 else ()))
        argv = list(self.argv)
        if restarts() > 0 and latest_checkpoint(self.folder) is not None:
            argv += ["checkpoint.resume=true", "checkpoint.path="]  # not a checkpoint.path it started from
        try:
            run(_parse(argv))  # a UserError reaches submitit: its line is the job's error
        except Preempted:
            if job.global_rank == 0:
                self.after_preemption(job)
            raise
        except RuntimeError as err:  # a collective failed: a peer rank died (gloo/NCCL say so), or timed out
            if tasks > 1 and lost_peer(err) and self.after_lost_rank(job, err):
                raise SystemExit(REQUEUE_EXIT_CODE) from None
            raise
        return f"pcl-hpc {self.argv[0]} done"

    def resumes_from(self) -> str:
        return checkpoint_text(self.folder) or "latest"

    def where(self) -> str:
        return f"checkpoint {checkpoint_text(self.folder) or 'none yet'}; continue with: {self.continue_command}"


class CommandJob(Job):
    """One task that runs a pcl-hpc command (`pcl-hpc <argv>`) in its process: an array task of a sweep
    (`sweep --step cells --shard I/K`), of preprocessing or of predict, a merge, the register or report step.

    Each of these commands is idempotent (a finished cell, volume or mask is skipped), so a requeued
    task simply runs its command again; a cell interrupted mid-training resumes from its checkpoint.
    ``then``: the plan's success marker, written once the command succeeded."""

    def __init__(self, name: str, argv: list[str], max_requeues: int = 3, continue_command: str = "",
                 then: dict | None = None):
        self.name, self.argv, self.max_requeues = name, list(argv), int(max_requeues)
        self.continue_command, self.then = continue_command, then

    def __call__(self):
        from pcl_hpc.cli import main

        job = submitit.JobEnvironment()
        dist.publish()  # one process: rank 0 of 1
        try:
            code = main(self.argv)
        except Preempted:
            self.after_preemption(job)
            raise
        except SystemExit as err:  # e.g. preprocess or predict with a failed volume: its lines are above
            code = err.code if isinstance(err.code, int) else 1
        if code:
            raise CommandFailed(f"pcl-hpc {self.argv[0]} ended with exit status {code} (its error is in this task's "
                                f"log): pcl-hpc {' '.join(self.argv)}")
        mark_done(self.then)
        return f"pcl-hpc {self.argv[0]} done"

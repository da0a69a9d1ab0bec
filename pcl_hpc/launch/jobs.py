"""The picklable jobs submitit runs: every rank of a training stage (`StageJob`) and one pcl-hpc command (`CommandJob`).

Both run a ``pcl-hpc`` command line (a plan's task, :class:`pcl_hpc.plan.Task`) in the job's process.

Both are checkpointable: submitit's handler calls :meth:`Job.checkpoint` (on rank 0, inside the
signal handler) only when SIGUSR1 arrives outside a training loop; during training the StepGuard has
the signal, every rank saves at the same step and raises ``Preempted``, and rank 0 decides here
(:meth:`Job.after_preemption`) whether the job needs a requeue.

How often a job is requeued (:meth:`Job.note_interruption`): a training stage (``StageJob``) as long as
it makes progress. Each interruption is noted in ``<stage folder>/requeues.json`` (:class:`Interruptions`,
replaced atomically) with the step of the stage's latest checkpoint; one whose latest checkpoint is still
the one of the previous interruption (or of the job's start) saved no new step and counts as "no
progress", and past ``slurm.max_requeues`` of those in a row (a crash loop) the job stops with one line.
Interruptions that saved a new step always requeue, up to ``MAX_INTERRUPTIONS`` in all (a safety total).
A command job (``CommandJob``: no checkpoint step of its own) is requeued at most ``COMMAND_REQUEUES`` x
``slurm.max_requeues`` times in all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
from pathlib import Path

import submitit

from pcl_hpc import dist
from pcl_hpc.atomic import DiskFull, write_text
from pcl_hpc.engine.checkpoint import latest_checkpoint
from pcl_hpc.engine.loop import REQUEUE_EXIT_CODE, Preempted
from pcl_hpc.errors import UserError
from pcl_hpc.launch.cluster import _run, base_state, job_state
from pcl_hpc.plan import mark_done


MAX_INTERRUPTIONS = 1000  # a training stage's safety total of interruptions (each of them saved a new step)
COMMAND_REQUEUES = 10  # a command job is requeued at most this many times slurm.max_requeues, in all
REQUEUES_FILE = "requeues.json"  # in the stage folder: the current job's interruptions (Interruptions)


class JobStopped(UserError):
    """A job that was interrupted and not requeued (its requeue bound reached): one line."""


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


def checkpoint_step(folder: Path) -> int:
    """The step of the stage's latest checkpoint (its folder's name, ``step_000000100``); 0 when it has none."""
    latest = latest_checkpoint(folder)
    match = re.fullmatch(r"step_(\d+)", latest.name) if latest is not None else None
    return int(match.group(1)) if match else 0


@dataclasses.dataclass
class Interruptions:
    """The interruptions of one job of a training stage, in ``<stage folder>/requeues.json``.

    ``start_step``: the latest checkpoint's step when the job first started; ``last_step``: that step at
    its latest interruption (at its start before any); ``total``: its interruptions; ``no_progress``: the
    interruptions in a row that found the same latest checkpoint step as the one before (reset by one that
    found another: a new checkpoint; a lower step counts too, as after --no-resume set the old checkpoints
    aside at the job's start). A new job (another id) starts a new record.
    """

    job: str
    start_step: int = 0
    last_step: int = 0
    total: int = 0
    no_progress: int = 0

    @staticmethod
    def path(folder: Path) -> Path:
        return Path(folder) / REQUEUES_FILE

    @classmethod
    def load(cls, folder: Path, job: str) -> "Interruptions | None":
        """This job's record, or None (none yet, another job's, or unreadable)."""
        try:
            data = json.loads(cls.path(folder).read_text())
            record = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record if record.job == job else None

    def save(self, folder: Path) -> None:
        write_text(self.path(folder), json.dumps(dataclasses.asdict(self)) + "\n")

    @classmethod
    def started(cls, folder: Path, job: str, step: int) -> "Interruptions":
        """At a run's start: the job's record; a job without one gets one that starts at ``step``."""
        record = cls.load(folder, job)
        if record is None:
            record = cls(job, start_step=step, last_step=step)
            record.save(folder)
        return record

    @classmethod
    def note(cls, folder: Path, job: str, step: int) -> "Interruptions":
        """Note an interruption whose latest checkpoint is at ``step``; the updated (saved) record.
        A job whose start was not noted (its first rank 0 never got that far) starts from step 0."""
        record = cls.load(folder, job) or cls(job)
        record.total += 1
        record.no_progress = 0 if step != record.last_step else record.no_progress + 1
        record.last_step = step
        record.save(folder)
        return record


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
    stopped = ""  # set by checkpoint() when it stops the job (its JobStopped may be caught on its way up)

    def where(self) -> str:
        """'checkpoint ...; continue with: ...' for the one line of a stopped job."""
        return f"continue with: {self.continue_command}"

    def resumes_from(self) -> str:
        return "its checkpoint"

    def note_interruption(self, job_id: str) -> tuple[str, str]:
        """Count an interruption of the job (about to be requeued): ``(what the requeue line says, "")``,
        or ``("", why it stops)`` past its bound. Here (a command job, no checkpoint step to watch): a plain
        total of ``COMMAND_REQUEUES`` x max_requeues requeues, from SLURM's restart count."""
        count, limit = restarts(), COMMAND_REQUEUES * self.max_requeues
        if count >= limit:
            return "", (f"job {job_id} stopped after {count} requeue(s) (a command job is requeued at most "
                        f"{COMMAND_REQUEUES} x slurm.max_requeues={self.max_requeues} times)")
        return f"restart {count + 1} of at most {limit}", ""

    def after_preemption(self, job) -> None:
        """Rank 0, after every rank saved: requeue once if SLURM will not; past the bound, stop with one line."""
        for sig in (signal.SIGUSR1, signal.SIGTERM):  # we are stopping: a second signal must not requeue again
            signal.signal(sig, signal.SIG_IGN)
        job_id = self._slurm_id()  # an array task is requeued by its own id (<array>_<index>)
        if job.cluster != "slurm" or not job_id:
            print(f"{self.name} stopped after a signal; {self.where()}", flush=True)
            return
        count, info = restarts(), job_state(job_id)
        state = info.get("JobState", "UNKNOWN")
        if state == "RUNNING":  # time limit, `scancel --signal`: nobody else requeues this job
            note, stop = self.note_interruption(job_id)
            if stop:
                raise JobStopped(f"{stop}; {self.where()}")
            proc = _run(["scontrol", "requeue", job_id], timeout=60)
            if proc.returncode == 0:
                print(f"requeued job {job_id} ({note}); it resumes from {self.resumes_from()}", flush=True)
            else:
                print(f"scontrol requeue {job_id} failed: {(proc.stderr or proc.stdout).strip()}; {self.where()}",
                      flush=True)
            return
        if state == "COMPLETING":  # ending: accounting knows why (CANCELLED, REQUEUED, TIMEOUT, ...)
            state = base_state(job_id) or state
        if state in ("REQUEUED", "PREEMPTED") or (info.get("Restarts", "").isdigit() and int(info["Restarts"]) > count):
            # SLURM requeues it whatever we say; noted all the same, so the next interruption compares with it
            note, stop = self.note_interruption(job_id)
            note = note or "past its requeue bound, requeued all the same"
            print(f"job {job_id} is being requeued by SLURM (scontrol requeue or preemption; {note}); it resumes "
                  f"from {self.resumes_from()}", flush=True)
            return
        # cancelled, or ending for another reason (node failure, the hard time limit): never undone by a requeue
        print(f"job {job_id} is ending ({state}): not requeued; {self.where()}", flush=True)

    def after_lost_rank(self, job, err: BaseException) -> bool:
        """A surviving rank, after a collective failed because a peer died (a crash, an OOM kill, a lost node):
        requeue the job from its last checkpoint; True when it was requeued. Past the bound (a rank that dies
        on every run before a new step is saved), raise JobStopped: one line."""
        job_id = self._slurm_id()
        if job.cluster != "slurm" or not job_id:
            return False
        if job_state(job_id).get("JobState", "") != "RUNNING":  # another rank requeued it, or it is ending
            return False
        note, stop = self.note_interruption(job_id)
        if stop:
            raise JobStopped(f"{stop}; {self.where()}") from err
        why = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:200]
        proc = _run(["scontrol", "requeue", job_id], timeout=60)
        if proc.returncode != 0:
            return False
        print(f"job {job_id} lost a rank ({why}); requeued it ({note}); it resumes from {self.resumes_from()}",
              flush=True)
        return True

    @staticmethod
    def _slurm_id() -> str | None:
        """The id to requeue: an array task's <array>_<index>, else SLURM_JOB_ID."""
        array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{array}_{index}" if array and index else os.environ.get("SLURM_JOB_ID")

    def checkpoint(self, *args, **kwargs):
        """Inside submitit's SIGUSR1 handler on rank 0 (outside the training loop): nothing is saved or
        sent here; the resubmission is returned and submitit requeues the job, which resumes from latest.
        Past the bound it raises JobStopped (from the handler, as submitit's own "not requeued" does)."""
        job_id = self._slurm_id()
        if job_id:  # on SLURM (submitit's local executor counts its own timeouts)
            note, stop = self.note_interruption(job_id)
            if stop:
                self.stopped = f"{stop}; {self.where()}"
                print(f"not requeued: {self.stopped}", flush=True)
                raise JobStopped(self.stopped)
            print(f"requeued job {job_id} ({note}) by submitit (a signal outside the training loop); it resumes "
                  f"from {self.resumes_from()}", flush=True)
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
        job_id = self._slurm_id()
        if job.global_rank == 0 and job.cluster == "slurm" and job_id:
            try:  # the step this job started from (once per job): its first interruption compares with it
                Interruptions.started(self.folder, job_id, checkpoint_step(self.folder))
            except OSError as err:
                print(f"warning: cannot write {Interruptions.path(self.folder)}: {err}", flush=True)
        argv = list(self.argv)
        if restarts() > 0 and latest_checkpoint(self.folder) is not None:
            argv += ["checkpoint.resume=true", "checkpoint.path="]  # not a checkpoint.path it started from
        try:
            run(_parse(argv))  # a UserError reaches submitit: its line is the job's error
        except Preempted:
            if job.global_rank == 0:
                self.after_preemption(job)
            raise
        except DiskFull as err:  # every rank (the checkpoint agrees): retryable, within the no-progress bound
            if job.global_rank == 0:
                print(f"pcl-hpc {self.argv[0]}: error: {err}", flush=True)
                self.after_preemption(job)
            raise SystemExit(REQUEUE_EXIT_CODE) from None
        except RuntimeError as err:  # a collective failed: a peer rank died (gloo/NCCL say so), or timed out
            if tasks > 1 and lost_peer(err) and self.after_lost_rank(job, err):
                raise SystemExit(REQUEUE_EXIT_CODE) from None
            raise
        return f"pcl-hpc {self.argv[0]} done"

    def resumes_from(self) -> str:
        return checkpoint_text(self.folder) or "latest"

    def note_interruption(self, job_id: str) -> tuple[str, str]:
        """A training stage: requeued while its interruptions save new steps (up to MAX_INTERRUPTIONS in
        all); stopped past max_requeues interruptions in a row that saved none."""
        try:
            record = Interruptions.note(self.folder, job_id, checkpoint_step(self.folder))
        except OSError as err:  # (the checkpoints could not be written there either)
            print(f"warning: cannot write {Interruptions.path(self.folder)}: {err}; the plain bound applies",
                  flush=True)
            return super().note_interruption(job_id)
        if record.no_progress > self.max_requeues:
            return "", (f"job {job_id} stopped after {record.no_progress} interruption(s) without a new checkpoint "
                        f"(slurm.max_requeues={self.max_requeues})")
        if record.total > MAX_INTERRUPTIONS:
            return "", f"job {job_id} stopped after {record.total} interruptions (at most {MAX_INTERRUPTIONS} in all)"
        if record.no_progress:
            return (f"restart {record.total}; {record.no_progress} interruption(s) in a row without a new checkpoint, "
                    f"at most {self.max_requeues}"), ""
        return f"restart {record.total}; new checkpoint at step {record.last_step}", ""

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
        if self.stopped:  # checkpoint() stopped it: main() turned its JobStopped into exit status 2
            raise JobStopped(self.stopped)
        if code:
            raise CommandFailed(f"pcl-hpc {self.argv[0]} ended with exit status {code} (its error is in this task's "
                                f"log): pcl-hpc {' '.join(self.argv)}")
        mark_done(self.then)
        return f"pcl-hpc {self.argv[0]} done"

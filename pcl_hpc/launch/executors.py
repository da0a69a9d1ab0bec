"""submitit executors for the slurm settings, the cluster to use, and waiting for jobs and their results.

`--cluster auto|slurm|local|debug`: SLURM when `sbatch` is on PATH (auto), submitit's local processes
(local), or one task in this process (debug), so the same command runs on a laptop. Before anything is
queued the settings are checked against the cluster's own answers (`check_cluster`).
"""

from __future__ import annotations

import copy
import re
import shutil
import sys
import time
from pathlib import Path

from pcl_hpc.launch import PREEMPT_SIGNAL

import submitit  # noqa: E402 - after SUBMITIT_PREEMPT_SIGNAL is set (pcl_hpc.launch)
from submitit.core.utils import FailedJobError, JobPaths, UncompletedJobError, pickle_load  # noqa: E402

from pcl_hpc.engine.loop import REQUEUE_EXIT_CODE  # noqa: E402
from pcl_hpc.errors import UserError  # noqa: E402
from pcl_hpc.launch.cluster import ACTIVE_STATES, check_cluster, job_state, mem_mb  # noqa: E402
from pcl_hpc.launch.jobs import MAX_INTERRUPTIONS, checkpoint_text  # noqa: E402

CLUSTERS = ("auto", "slurm", "local", "debug")


def slurm_parameters(s, name: str) -> dict:
    """submitit's SlurmExecutor parameters (the #SBATCH lines) for the slurm settings ``s``."""
    params = dict(job_name=name, time=s.time, nodes=s.nodes, ntasks_per_node=s.tasks_per_node,
                  cpus_per_task=s.cpus_per_task, signal_delay_s=s.signal_delay_s,
                  setup=[f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}", *s.setup],
                  # the advance signal is the StepGuard's SIGUSR1 (submitit would ask for its USR2);
                  # --requeue: the job may be requeued on clusters where that is not the default
                  additional_parameters={"signal": f"{PREEMPT_SIGNAL}@{s.signal_delay_s}", "requeue": True})
    for key in ("partition", "account", "qos", "mem", "constraint"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.exclusive:
        params["exclusive"] = True
    return params


def make_executor(cluster: str, folder: Path, s, name: str):
    if cluster == "debug":
        return submitit.DebugExecutor(folder=folder)
    if cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=s.time, tasks_per_node=s.tasks_per_node, gpus_per_node=s.gpus_per_node,
                                   signal_delay_s=s.signal_delay_s, setup=list(s.setup))
        return executor
    # submitit counts every timeout its handler requeues: only a safety total here; the job's own bound
    # (Job.note_interruption: interruptions in a row without a new checkpoint) decides when to stop
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_INTERRUPTIONS)
    executor.update_parameters(**slurm_parameters(s, name))
    return executor


def step_settings(s, kind: str):
    """The slurm settings of one step of a plan: a training stage gets the section's; the others one task
    with the node's share of CPUs (cells: its GPUs, predict: one GPU, the rest: none)."""
    s = copy.deepcopy(s)
    if kind == "stage":
        return s
    gpus = s.gpus_per_node
    s.cpus_per_task = s.cpus_per_task * s.tasks_per_node  # the share of the node a training stage has
    s.nodes, s.tasks_per_node = 1, 1
    s.gpus_per_node = gpus if kind == "cells" else min(gpus, 1) if kind == "predict" else 0
    return s


def resolve_cluster(cluster: str) -> str:
    if cluster == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return cluster


def checked_cluster(s, tasks_allowed: bool = True) -> str:
    """The cluster to use for the slurm settings ``s``, once they were checked against it (one line if not)."""
    cluster = resolve_cluster(s.cluster)
    tasks = s.nodes * s.tasks_per_node
    if cluster in ("local", "debug") and s.nodes > 1:
        raise UserError(f"--cluster {cluster} runs on one node: use --nodes 1, or submit from a SLURM login node")
    if cluster == "debug" and tasks > 1 and tasks_allowed:
        raise UserError("--cluster debug runs one task in this process: use --tasks-per-node 1, or --cluster local")
    if s.mem:
        mem_mb(s.mem)
    if cluster == "slurm":
        if not shutil.which("sbatch"):
            raise UserError("--cluster slurm: sbatch is not on PATH (use --cluster local on a machine without SLURM)")
        check_cluster(s)
    return cluster


def _outcome(path: Path):
    """("success", result) / ("error", trace) from a task's result file, or None when it has none."""
    if not path.exists():
        return None
    try:
        return pickle_load(path)
    except Exception:  # noqa: BLE001 - a half-written file: treat as missing
        return None


def wait_slurm(job) -> dict[str, str]:
    """Until every task wrote its result or the job reached a final state; its last state info."""
    paths = [JobPaths(job.paths.folder, job_id=job.job_id, task_id=t).result_pickle for t in range(job.num_tasks)]
    seen_restarts, info, unknown_since, final_since = 0, {}, None, None
    while True:
        if all(p.exists() for p in paths):
            return info or job_state(job.job_id)
        info = job_state(job.job_id) or info
        state = info.get("JobState", "")
        restarts = int(info.get("Restarts", "0")) if info.get("Restarts", "").isdigit() else seen_restarts
        if restarts > seen_restarts:
            print(f"job {job.job_id}: requeued (restart {restarts})", flush=True)
            seen_restarts = restarts
        now = time.monotonic()
        if not state:
            unknown_since = unknown_since or now
            if now - unknown_since > 120:
                return {"JobState": "UNKNOWN"}
        elif state not in ACTIVE_STATES:
            final_since = final_since or now
            if now - final_since > 10:  # a slow shared file system may show the result files late
                return info
        else:
            unknown_since = final_since = None
        time.sleep(2)


def _last_line(trace: str) -> str:
    lines = [line.strip() for line in str(trace).splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def wait(job, cluster: str, stage_dir: Path, folder: Path, command: str) -> int:
    """Until a single job ended: 0, or one line (state, why, checkpoint, the command that continues, logs)."""
    info: dict[str, str] = {}
    try:
        if cluster == "slurm":
            info = wait_slurm(job)
            outcomes = [_outcome(JobPaths(folder, job_id=job.job_id, task_id=t).result_pickle)
                        for t in range(job.num_tasks)]
            if all(o is not None for o in outcomes):
                results = job.results()  # raises FailedJobError when a task's result is its error
            else:
                errors = [o[1] for o in outcomes if o is not None and o[0] == "error"]
                raise (FailedJobError(errors[0]) if errors else UncompletedJobError("no result written"))
        else:
            results = job.results()
    except KeyboardInterrupt:
        print(f"launchers/slurm.py: stopped waiting; job {job.job_id} goes on (scancel {job.job_id} stops it); "
              f"logs in {folder}", file=sys.stderr)
        return 130
    except (FailedJobError, UncompletedJobError, SystemExit) as err:
        return _report_failure(job, cluster, info, err, stage_dir, folder, command)
    print(f"job {job.job_id} finished: {results[0]}", flush=True)
    return 0


def _report_failure(job, cluster, info, err, stage_dir, folder, command) -> int:
    """One line: state, why, checkpoint and the command that continues, logs; the exit status."""
    if cluster == "slurm":
        state = info.get("JobState") or "UNKNOWN"
        restarts = info.get("Restarts", "")
        state += f" after {restarts} restart(s)" if restarts not in ("", "0") else ""
    else:  # submitit's local states (FINISHED, ...) say nothing about the outcome
        state = "stopped" if isinstance(err, SystemExit) else "" if isinstance(err, UncompletedJobError) else "FAILED"
    text = str(err) if not isinstance(err, SystemExit) else f"exit status {err.code}"
    stopped = re.search(r"JobStopped: (.*)", text)
    if stopped:
        why = stopped.group(1).strip()
    elif isinstance(err, UncompletedJobError):
        why = "it wrote no result"
    else:
        trace_lines = [line for line in text.splitlines() if line.strip() and not line.startswith("-" * 5)]
        marker = [i for i, line in enumerate(trace_lines) if line.startswith(("You can check full logs", "or at paths"))]
        why = _last_line("\n".join(trace_lines[:marker[0]] if marker else trace_lines))
    ckpt = checkpoint_text(stage_dir)
    # 75 (as the training's own exit status): interrupted with a checkpoint kept, the command continues it;
    # 1: the job failed with an error of its own (running it again would fail again)
    resumable = bool(ckpt) and (stopped is not None or not isinstance(err, FailedJobError))
    where = "" if stopped else (f"; checkpoint {ckpt}; continue with: {command}" if ckpt else "")
    logs = f"{folder}/{job.job_id}_0_log.out and .err" if cluster != "debug" else f"{folder}"
    print(f"launchers/slurm.py: job {job.job_id} ended{' ' + state if state else ''}: {why}{where}; logs: {logs}",
          file=sys.stderr, flush=True)
    return REQUEUE_EXIT_CODE if resumable else 1


def wait_results(jobs) -> bool:
    """local / debug: every job's result; False (and the job's last error line) when one failed."""
    ok = True
    for job in jobs:
        try:
            job.results()
        except (FailedJobError, UncompletedJobError) as err:
            print(f"  job {job.job_id} failed: {_last_line(str(err).split('You can check full logs')[0])}", flush=True)
            ok = False
    return ok

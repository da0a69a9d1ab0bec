"""A plan's steps as chained SLURM jobs (or one after another on this machine), and the ledger `status` reads.

Each pending step of a plan (:func:`pcl_hpc.plan.pending_steps`) is one job, or one job array when it
has several tasks, and waits (``afterok``) for the steps it names; ``--kill-on-invalid-dep=yes``
cancels the dependants of a step that failed, so nothing waits forever. On ``--cluster local|debug``
the steps run one after another on this machine instead, and a failed step stops the rest. A task
of a ``stage`` step is a :class:`~pcl_hpc.launch.jobs.StageJob` (every rank of a training stage), any
other a :class:`~pcl_hpc.launch.jobs.CommandJob`.

What was submitted is appended to ``<folder>/slurm/jobs.json`` (the ledger): per step its job id,
log folder, and per task its command (:meth:`pcl_hpc.plan.Task.record`), shard and cells, so
``launchers/slurm.py status <folder> [--resubmit]`` can report and resubmit without a config.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from pcl_hpc.atomic import write_text
from pcl_hpc.errors import UserError
from pcl_hpc.launch.executors import make_executor, step_settings, wait_results
from pcl_hpc.launch.jobs import CommandJob, Job, StageJob
from pcl_hpc.plan import Step, Task

LEDGER = Path("slurm") / "jobs.json"


def build_job(kind: str, name: str, task: Task, max_requeues: int, continue_command: str) -> Job:
    """A task's job (``status --resubmit`` builds the same job again from the ledger)."""
    if kind == "stage":
        return StageJob(name, task.argv, task.folder, max_requeues, continue_command)
    return CommandJob(name, task.argv, max_requeues, continue_command, then=task.then)


def _executor(cluster: str, folder: Path, s, name: str, deps: list[str], parallelism: int):
    executor = make_executor(cluster, folder, s, name)
    if cluster == "slurm":
        extra = dict(executor.parameters.get("additional_parameters") or {})
        if deps:
            extra.update({"dependency": "afterok:" + ":".join(deps), "kill_on_invalid_dep": "yes"})
        executor.update_parameters(additional_parameters=extra, array_parallelism=parallelism or 256)
    return executor


def submit_step(cluster: str, step: Step, out: Path, section, command: str, ids: dict[str, str],
                logs: Path | None = None) -> tuple[dict, list]:
    """Submit one step (its tasks as an array on SLURM), waiting for the steps of ``ids`` it names; its
    ledger record and submitit jobs. Logs go to ``logs`` (default ``<out>/slurm/<step>``)."""
    s = step_settings(section, step.kind)
    folder = logs or out / "slurm" / step.name
    deps = [ids[a] for a in step.after if a in ids]
    executor = _executor(cluster, folder, s, f"pcl-hpc-{step.name}", deps, section.array_parallelism)
    jobs = [build_job(step.kind, step.name, t, s.max_requeues, command) for t in step.tasks]
    submitted = executor.submit_array(jobs) if len(jobs) > 1 and cluster == "slurm" else [executor.submit(j) for j in jobs]
    return record_submission(out, step, submitted, cluster, folder, deps, s, section), submitted


def submit_steps(cluster: str, steps: list[Step], out: Path, section, command: str) -> list[dict]:
    """Submit (SLURM: all at once, chained by afterok) or run (local/debug: in order, a failed step stops
    the rest) the steps; the ledger records, also appended to ``<out>/slurm/jobs.json``."""
    records, ids = [], {}
    for step in steps:
        record, submitted = submit_step(cluster, step, out, section, command, ids)
        array = f" (array of {len(submitted)})" if len(submitted) > 1 else ""
        waits = f", after {', '.join(a for a in step.after if a in ids)}" if record["after"] else ""
        print(f"  {step.name:<16} job {record['job_id']}{array}{waits}; logs {record['logs']}/{record['job_id']}_*_log.out",
              flush=True)
        ids[step.name] = record["job_id"]
        records.append(record)
        if cluster != "slurm" and not wait_results(submitted):
            print(f"  {step.name} failed: the steps after it are not run", flush=True)
            break
    return records


def record_submission(out: Path, step: Step, submitted: list, cluster: str, folder: Path, deps: list[str], s,
                      section) -> dict:
    """Append what was submitted for a step to ``<out>/slurm/jobs.json``; the record."""
    record = {"step": step.name, "job_id": submitted[0].job_id.split("_")[0], "cluster": cluster, "logs": str(folder),
              "after": deps, "kind": step.kind, "settings": dataclasses.asdict(s), "slurm": dataclasses.asdict(section),
              "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
              "tasks": [{**t.record(), "job_id": j.job_id} for t, j in zip(step.tasks, submitted)]}
    path = out / LEDGER
    ledger = json.loads(path.read_text()) if path.is_file() else {"steps": []}
    ledger["steps"].append(record)
    write_text(path, json.dumps(ledger, indent=1) + "\n")
    return record


def read_ledger(folder: Path) -> list[dict]:
    path = folder / LEDGER
    if not path.is_file():
        raise UserError(f"{folder}: no {LEDGER} here; give the folder of a sweep, pipeline or predict submission "
                        f"(its output_dir, or predict's --output)")
    try:
        return json.loads(path.read_text())["steps"]
    except (ValueError, KeyError):
        raise UserError(f"{path} is not a ledger written by launchers/slurm.py") from None

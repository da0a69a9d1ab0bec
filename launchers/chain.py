"""Chains of jobs: the sweep as a job array, the whole pipeline, predict over shards; the ledger `status` reads.

A chain is a list of :class:`Step` s. Each step is one job, or one job array when it has several
tasks, and waits (``afterok``) for the steps it names; ``--kill-on-invalid-dep=yes`` cancels the
dependants of a step that failed, so nothing waits forever. On ``--cluster local|debug`` the steps
run one after another on this machine instead, and a failed step stops the rest.

What was submitted is appended to ``<folder>/slurm/jobs.json`` (the ledger): per step its job id,
log folder, what each array task does (its shard, its cells) and how to submit that task again,
so ``launchers/slurm.py status <folder> [--resubmit]`` can report and resubmit without a config.

* ``sweep`` (:func:`sweep_steps`): pretrain-<method> for each method of ``sweep.pretrain`` whose
  encoder is not complete, ``register`` (``pcl-hpc sweep --plan``: the sweep's tracking run, each
  encoder in the registry), ``cells`` (an array of ``pcl-hpc sweep --shard I/K``, ``slurm.cells_per_task``
  cells per task, ``gpus_per_node`` of them side by side, ``%slurm.array_parallelism``), ``report``
  (``--report-only``). Finished cells are not resubmitted.
* ``pipeline`` (:func:`pipeline_steps`): ``preprocess`` (an array of ``pcl-hpc preprocess --shard I/K``
  over ``slurm.array_tasks`` tasks), ``merge`` (a plain ``preprocess``: the manifest, the same store
  as one process makes), then the sweep's steps. A store whose sources and settings did not change
  since the last merge is not preprocessed again.
* ``predict`` (:func:`predict_steps`): ``slurm.array_tasks`` tasks of ``pcl-hpc predict --shard I/K``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

from launchers.jobs import CommandJob, Job, StageJob
from pcl_hpc.atomic import write_text
from pcl_hpc.config import Config, to_dict
from pcl_hpc.errors import UserError

LEDGER = Path("slurm") / "jobs.json"
PREPROCESS_DONE = Path("slurm") / "preprocess.json"


@dataclasses.dataclass
class Step:
    name: str
    tasks: list[dict]  # per task: {"job": <how to build it>, ...what status shows (shard, cells)}
    after: list[str] = dataclasses.field(default_factory=list)  # steps this waits for (afterok)
    kind: str = "single"  # resources: single (1 task) | stage (the slurm: section's) | cells (its GPUs) | predict


def build_job(spec: dict, max_requeues: int, continue_command: str) -> Job:
    """A task's job from its ledger entry (so `status --resubmit` builds the same job again)."""
    if spec["kind"] == "stage":
        return StageJob(spec["stage"], spec["config"], spec["overrides"], max_requeues, continue_command)
    after = _write_preprocess_done(spec["after"]) if spec.get("after") else None
    return CommandJob(spec["name"], spec["argv"], max_requeues, continue_command, after=after)


class _write_preprocess_done:  # noqa: N801 - a picklable callable run by the merge job after it succeeded
    def __init__(self, payload: dict):
        self.payload = payload

    def __call__(self):
        write_text(Path(self.payload["path"]), json.dumps({"key": self.payload["key"]}) + "\n")


def step_settings(s, kind: str):
    """The slurm settings of one step: a training stage gets the section's; the others one task."""
    s = copy.deepcopy(s)
    if kind == "stage":
        return s
    gpus = s.gpus_per_node
    s.cpus_per_task = s.cpus_per_task * s.tasks_per_node  # the share of the node a training stage has
    s.nodes, s.tasks_per_node = 1, 1
    s.gpus_per_node = gpus if kind == "cells" else min(gpus, 1) if kind == "predict" else 0
    return s


# ---------------------------------------------------------------- what to run


def _command(argv_head: list[str], config: str, overrides: list[str]) -> list[str]:
    return [*argv_head, "--config", config, *overrides]


def preprocess_key(cfg: Config) -> str:
    """Sources (path, size, mtime) and data settings: equal keys mean the merged store is current."""
    raw = Path(cfg.data.raw_dir)
    files = sorted((str(p.relative_to(raw)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in raw.rglob("*") if p.is_file()) if raw.is_dir() else []
    what = {"data": to_dict(cfg)["data"], "files": files}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def preprocess_current(cfg: Config) -> bool:
    from pcl_hpc.data.store import read_manifest

    path = Path(cfg.output_dir) / PREPROCESS_DONE
    try:
        read_manifest(cfg.data.store)
        return json.loads(path.read_text()).get("key") == preprocess_key(cfg)
    except (OSError, ValueError, UserError):
        return False


def preprocess_steps(cfg: Config, config: str, overrides: list[str]) -> list[Step]:
    if preprocess_current(cfg):
        return []
    from pcl_hpc.data.preprocess import prepare_shards

    prepare_shards(cfg.data)  # here, before the array: no two tasks create the store at once
    k = cfg.slurm.array_tasks
    shards = [{"shard": f"{i}/{k}", "job": {"kind": "command", "name": "preprocess", "argv": _command(
        ["preprocess", "--shard", f"{i}/{k}"], config, overrides)}} for i in range(k)]
    done = {"path": str(Path(cfg.output_dir).absolute() / PREPROCESS_DONE), "key": preprocess_key(cfg)}
    merge = {"job": {"kind": "command", "name": "merge", "argv": _command(["preprocess"], config, overrides),
                     "after": done}}
    return [Step("preprocess", shards), Step("merge", [merge], ["preprocess"])]


def sweep_steps(cfg: Config, config: str, overrides: list[str], upstream: list[str]) -> list[Step]:
    """The sweep's steps; ``upstream``: steps submitted before (their outputs are not there yet)."""
    from pcl_hpc import sweep as sw
    from pcl_hpc.engine.harness import is_complete
    from pcl_hpc.train.pretrain import Pretrain, folder as pretrain_folder

    steps, fresh = [], not upstream  # fresh: the store exists now, so completeness can be asked
    for method in cfg.sweep.pretrain:
        run = sw.method_config(cfg, method)
        where = pretrain_folder(run).absolute()
        if fresh and is_complete(Pretrain(run, run.pretrain, pretrain_folder(run))):
            continue
        method_overrides = [f"loss.method={method}", f"pretrain.name={method}",
                            f"tracking.register_name={cfg.tracking.register_name}-{method}",
                            f"tracking.run_name=pretrain-{method}"]
        steps.append(Step(f"pretrain-{method}", [{"folder": str(where), "job": {
            "kind": "stage", "stage": "pretrain", "config": config, "overrides": overrides + method_overrides}}],
                          upstream, kind="stage"))
    before = upstream + [s.name for s in steps]
    steps.append(Step("register", [{"job": {"kind": "command", "name": "register",
                                            "argv": _command(["sweep", "--plan"], config, overrides)}}], before))
    manifest = None
    if fresh:
        from pcl_hpc.data.store import read_manifest

        manifest = read_manifest(cfg.data.store)
    cells = sw.plan(cfg, manifest)
    workers = max(1, cfg.slurm.gpus_per_node)  # cells side by side in one task: one per GPU
    k = max(1, math.ceil(len(cells) / max(cfg.slurm.cells_per_task, workers)))  # a task fills its node's GPUs
    tasks, cells_dir = [], str((sw.folder(cfg) / "cells").absolute())
    for i in range(k):
        mine = sw.shard_cells(cells, (i, k))
        if fresh and len(steps) == 1 and all(sw.is_cell_complete(cfg, c, manifest) for c in mine):
            continue  # nothing upstream was resubmitted and every cell of this task is finished
        tasks.append({"shard": f"{i}/{k}", "cells": [c.name for c in mine], "folder": cells_dir, "job": {
            "kind": "command", "name": "cells",
            "argv": _command(["sweep", "--shard", f"{i}/{k}"], config, overrides + [f"sweep.workers={workers}"])}})
    if tasks:
        steps.append(Step("cells", tasks, ["register"], kind="cells"))
    report_ready = (sw.folder(cfg) / "summary.md").is_file()
    if tasks or len(steps) > 1 or not report_ready:
        steps.append(Step("report", [{"job": {"kind": "command", "name": "report", "argv": _command(
            ["sweep", "--report-only"], config, overrides)}}], ["cells"] if tasks else ["register"]))
    elif fresh:
        return []  # every cell finished and reported: nothing to submit
    return steps


def predict_steps(argv: list[str], shards: int) -> list[Step]:
    tasks = [{"shard": f"{i}/{shards}", "job": {"kind": "command", "name": "predict",
                                                 "argv": [*argv, "--shard", f"{i}/{shards}"]}} for i in range(shards)]
    return [Step("predict", tasks, kind="predict")]


# ---------------------------------------------------------------- submitting


def _executor(cluster: str, folder: Path, s, name: str, deps: list[str], parallelism: int):
    from launchers.slurm import make_executor

    executor = make_executor(cluster, folder, s, name)
    if cluster == "slurm":
        extra = dict(executor.parameters.get("additional_parameters") or {})
        if deps:
            extra.update({"dependency": "afterok:" + ":".join(deps), "kill_on_invalid_dep": "yes"})
        executor.update_parameters(additional_parameters=extra, array_parallelism=parallelism or 256)
    return executor


def submit_steps(cluster: str, steps: list[Step], out: Path, section, command: str, wait_local) -> list[dict]:
    """Submit (SLURM: all at once, chained by afterok) or run (local/debug: in order) the steps; the
    ledger records, also appended to ``<out>/slurm/jobs.json``."""
    records, ids = [], {}
    for step in steps:
        s = step_settings(section, step.kind)
        folder = out / "slurm" / step.name
        deps = [ids[a] for a in step.after if a in ids]
        executor = _executor(cluster, folder, s, f"pcl-hpc-{step.name}", deps, section.array_parallelism)
        jobs_ = [build_job(t["job"], s.max_requeues, command) for t in step.tasks]
        if len(jobs_) > 1 and cluster == "slurm":
            submitted = executor.submit_array(jobs_)
        else:
            submitted = [executor.submit(j) for j in jobs_]
        record = record_submission(out, step, submitted, cluster, folder, deps, s, section)
        ids[step.name] = job_id = record["job_id"]
        records.append(record)
        array = f" (array of {len(jobs_)})" if len(jobs_) > 1 else ""
        waits = f", after {', '.join(a for a in step.after if a in ids)}" if deps else ""
        print(f"  {step.name:<16} job {job_id}{array}{waits}; logs {folder}/{job_id}_*_log.out", flush=True)
        if cluster != "slurm" and not wait_local(step, submitted):
            print(f"  {step.name} failed: the steps after it are not run", flush=True)
            break
    return records


def record_submission(out: Path, step: Step, submitted: list, cluster: str, folder: Path, deps: list[str], s,
                      section) -> dict:
    """Append what was submitted for a step to ``<out>/slurm/jobs.json``; the record."""
    record = {"step": step.name, "job_id": submitted[0].job_id.split("_")[0], "cluster": cluster, "logs": str(folder),
              "after": deps, "kind": step.kind, "settings": dataclasses.asdict(s), "slurm": dataclasses.asdict(section),
              "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
              "tasks": [{**t, "job_id": j.job_id} for t, j in zip(step.tasks, submitted)]}
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


def config_path(path: str) -> str:
    """The config as the jobs see it: absolute, so a job started elsewhere finds it."""
    return str(Path(path).expanduser().absolute())


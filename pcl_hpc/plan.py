"""A plan: the steps of a piece of work (the sweep, the pipeline, predict over shards), and its local runner.

A :class:`Step` is one job, or a job array when it has several :class:`Task` s. A task is one
``pcl-hpc`` command line (``argv``) and a ``done()`` check; a step waits for the steps it names in
``after``. The plan is built once, by the part that owns the protocol (``pcl_hpc.sweep``,
``pcl_hpc.pipeline``); two runners execute the same plan:

* :func:`run_local` here: each pending task as a ``python -m pcl_hpc <argv>`` process, in order
  (a training stage with ``processes`` > 1 through torchrun on this node; the tasks of a ``together``
  array in one process, which runs their cells in one pool);
* the SLURM chain (``pcl_hpc.launch.chain``): each pending step as a job or array, chained by ``afterok``.

Both ask :func:`pending_steps` what is left: a task runs when it is not done, or when a step it
waits for runs too (its outputs will change, so its own check cannot be trusted yet). Every command
is idempotent, so a task that runs again skips what it finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pcl_hpc.atomic import write_text
from pcl_hpc.errors import UserError

KINDS = ("single", "stage", "cells", "predict")  # the resources a step's tasks get (see launch.executors.step_settings)


def _never() -> bool:
    return False


@dataclasses.dataclass
class Task:
    argv: list[str]  # the pcl-hpc command of this task
    shard: str = ""  # "I/K" of an array task
    cells: list[str] = dataclasses.field(default_factory=list)  # what it holds, for status (sweep cells)
    folder: str = ""  # where its progress shows (a stage folder, or the folder of its cells)
    then: dict | None = None  # a marker to write once it succeeded ({"path", "key"}; see :func:`mark_done`)
    done: Callable[[], bool] = dataclasses.field(default=_never, compare=False, repr=False)

    def record(self) -> dict:
        """What the ledger keeps of it: enough to run it again without the config."""
        out = {"argv": self.argv, "shard": self.shard, "cells": self.cells, "folder": self.folder, "then": self.then}
        return {k: v for k, v in out.items() if v}

    @classmethod
    def from_record(cls, record: dict) -> Task:
        return cls(**{k: record[k] for k in ("argv", "shard", "cells", "folder", "then") if k in record})


@dataclasses.dataclass
class Step:
    name: str
    tasks: list[Task]
    after: list[str] = dataclasses.field(default_factory=list)  # the steps this one waits for
    kind: str = "single"  # one of KINDS
    together: bool = False  # an array whose tasks one process may run at once (``--shard 0/8,3/8``): see run_local

    def __post_init__(self):
        assert self.kind in KINDS, self.kind

    def commands(self) -> list[list[str]]:
        """What the local runner runs for these tasks: each task's argv, or (``together``) one argv holding
        every task's shard, so one pool of workers is shared by all of them (no worker idles at a task's end)."""
        if not self.together or len(self.tasks) < 2:
            return [t.argv for t in self.tasks]
        argv = list(self.tasks[0].argv)
        argv[argv.index("--shard") + 1] = ",".join(t.shard for t in self.tasks)
        return [argv]


def command(name: str, *flags: str, config: str) -> list[str]:
    """A task's argv: ``<name> <flags> --config <file>`` (the plan's resolved config: no overrides)."""
    return [name, *flags, "--config", config]


def pending_steps(steps: list[Step]) -> list[Step]:
    """The steps with what is left to run: each with its pending tasks, waiting only for pending steps."""
    out: list[Step] = []
    for step in steps:
        names = {s.name for s in out}
        upstream = [a for a in step.after if a in names]
        tasks = list(step.tasks) if upstream else [t for t in step.tasks if not t.done()]
        if tasks:
            out.append(Step(step.name, tasks, upstream, step.kind, step.together))
    return out


def describe(steps: list[Step]) -> str:
    """The plan as lines: each step, what it waits for, and its tasks (pending or done)."""
    left = {(s.name, t.shard) for s in pending_steps(steps) for t in s.tasks}
    lines = []
    for step in steps:
        after = f" (after {', '.join(step.after)})" if step.after else ""
        lines.append(f"{step.name}{after}: {len(step.tasks)} task(s), {step.kind}")
        for task in step.tasks:
            state = "pending" if (step.name, task.shard) in left else "done"
            lines.append(f"  {state:<8}{' ' + task.shard if task.shard else ''} pcl-hpc {' '.join(task.argv)}"
                         + (f"  [{', '.join(task.cells)}]" if task.cells else ""))
    return "\n".join(lines)


def mark_done(then: dict | None) -> None:
    """Write a task's success marker (e.g. the merged store's source key), after it succeeded."""
    if then:
        write_text(Path(then["path"]), json.dumps({"key": then["key"]}) + "\n")


def run_local(steps: list[Step], stage_processes: int = 1, echo: Callable[[str], None] = print) -> list[Step]:
    """Run what is left of the plan on this machine, in order; a failed task stops it with one line.
    ``stage_processes``: processes of a training stage (torchrun, one node). Returns what was run."""
    todo = pending_steps(steps)
    for step in todo:
        for argv in step.commands():
            label = f"{step.name} {argv[argv.index('--shard') + 1] if '--shard' in argv else ''}".strip()
            echo(f"[{label}] pcl-hpc {' '.join(argv)}")
            code = _run_process(argv, stage_processes if step.kind == "stage" else 1)
            if code != 0:
                raise UserError(f"{label} failed (exit status {code}; its error is above); run the same command "
                                f"again: what finished is kept")
        for task in step.tasks:
            mark_done(task.then)
    return todo


def _run_process(argv: list[str], processes: int) -> int:
    cmd = [sys.executable, "-m", "pcl_hpc", *argv]
    env = dict(os.environ)
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *cmd[1:]]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))  # the node's cores, shared
    sys.stdout.flush()
    return subprocess.run(cmd, env=env, check=False).returncode

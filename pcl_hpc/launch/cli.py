"""Run pcl-hpc jobs through submitit: on SLURM, as local processes, or in this process.

    python launchers/slurm.py pretrain --config configs/acdc_pcl.yaml --nodes 2 --tasks-per-node 8 \
        --gpus-per-node 8 --partition gpu --time 720 pretrain.epochs=50
    python launchers/slurm.py pipeline|sweep --config ... [--array-parallelism K] [--cells-per-task P] [--wait]
    python launchers/slurm.py predict --model ... --input ... --output ... [--array-tasks K]
    python launchers/slurm.py status <folder> [--resubmit]

pretrain / finetune are one job each (a plan of one step: it joins the ledger `status` reads), and the
launcher waits for it (below). sweep, pipeline and
predict are chains of jobs and job arrays (pcl_hpc/launch/chain.py) built from one plan (pcl_hpc/plan.py,
the same one `pcl-hpc sweep` runs locally), printed and left to run; status (pcl_hpc/launch/status.py)
reads what they submitted.

The job reuses the training config unchanged; the cluster settings are its `slurm:` section
(`slurm.key=value` like any key; this script's flags win). `--cluster auto|slurm|local|debug`:
SLURM when `sbatch` is on PATH (auto), submitit's local processes (local), or one task in this
process (debug), so the same command runs on a laptop.

Before anything is queued the settings are checked against the cluster's own answers (`sinfo`,
`scontrol -o show partition/node`, `sacctmgr` when accounting answers): an unknown partition,
more GPUs, CPUs or memory than a node has, a time above the partition's MaxTime, ... give one
line and exit 2.

How a job survives the ways SLURM stops it (each ends with every rank saving at the same step
boundary, see pcl_hpc/engine/loop.py StepGuard, and one requeue; the job resumes from
`<stage folder>/checkpoints/latest` by itself):

* the time limit: the job asks SLURM for SIGUSR1 `slurm.signal_delay_s` before it
  (`#SBATCH --signal=USR1@<s>`; SLURM may send it up to ~30 s earlier), the StepGuard's signal,
  and submitit's own handler is moved to SIGUSR1 too (SUBMITIT_PREEMPT_SIGNAL), so it only acts
  outside the training loop (set-up, export): there the job's `checkpoint()` returns its
  resubmission and submitit requeues;
* SIGTERM (`scancel --signal=TERM`, `scontrol requeue`, preemption) and SIGUSR1
  (`scancel --signal=USR1`): the StepGuard.

After the save every rank exits 75 (`Preempted`); rank 0 decides, from `scontrol show job`, who
requeues: a job still RUNNING (time limit, a signal sent with `scancel --signal`) is requeued by
rank 0, once; a job that SLURM already requeues (`scontrol requeue`, preemption: its restart count
went up) or ends (`scancel`: cancelled stays cancelled; a node failure) is not. A job is requeued as
long as its interruptions save new checkpoint steps (up to 1000 in all; a command job at most
10 x `slurm.max_requeues` times); past `slurm.max_requeues` interruptions in a row without a new
checkpoint (a crash loop, or a disk that stays full) it stops with one line: where its checkpoint is
and the command that continues it. The launcher waits on the job's state (scontrol, then sacct) and its result
files; a job that ends without a result gives one line with its state and logs, and exit non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from submitit.core.utils import FailedJobError, FailedSubmissionError

from pcl_hpc.config import load_config
from pcl_hpc.errors import UserError
from pcl_hpc.launch import chain
from pcl_hpc.launch.cluster import ACTIVE_STATES, check_cluster, task_states
from pcl_hpc.launch.executors import CLUSTERS, checked_cluster, step_settings, wait
from pcl_hpc.launch.status import status
from pcl_hpc.plan import Step, Task, pending_steps


# ---------------------------------------------------------------- submission


FLAGS = {  # flag dest -> slurm.<key>: each given flag becomes an override that wins over the config
    "partition": "partition", "account": "account", "qos": "qos", "time": "time", "nodes": "nodes",
    "tasks_per_node": "tasks_per_node", "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task",
    "mem": "mem", "constraint": "constraint", "exclusive": "exclusive", "signal_delay_s": "signal_delay_s",
    "max_requeues": "max_requeues", "setup": "setup", "cluster": "cluster", "array_parallelism": "array_parallelism",
    "cells_per_task": "cells_per_task", "array_tasks": "array_tasks",
}


def add_cluster_flags(parser: argparse.ArgumentParser, overrides: bool = True) -> None:
    if overrides:
        parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--cluster", choices=CLUSTERS, default=None,
                        help="auto: SLURM when sbatch is available, else local processes; debug: in this process")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--time", "--timeout-min", dest="time", type=int, help="time limit of one run, minutes")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--tasks-per-node", type=int, help="processes per node (one per GPU)")
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--mem", help='memory per node, e.g. 16G ("" = the partition default)')
    parser.add_argument("--constraint")
    parser.add_argument("--exclusive", action="store_true", default=None)
    parser.add_argument("--signal-delay-s", type=int, help="SIGUSR1 this long before the time limit")
    parser.add_argument("--max-requeues", type=int)
    parser.add_argument("--setup", action="append", help="a shell line run before the tasks (repeatable)")
    parser.add_argument("--array-parallelism", type=int, help="array tasks running at once (%%K; 0 = no limit)")
    parser.add_argument("--cells-per-task", type=int, help="sweep cells packed into one array task")
    parser.add_argument("--array-tasks", type=int, help="array tasks of preprocess / predict")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launchers/slurm.py", description="Submit pcl-hpc with submitit: pretrain | finetune (one job), sweep "
        "(a job array and its report), pipeline (preprocess -> pretrain per method -> register -> sweep -> report), "
        "predict (an array over the inputs), status <folder>. Cluster settings come from the config's slurm: section "
        "(slurm.key=value); the flags win.")
    parser.add_argument("stage", choices=["pretrain", "finetune", "sweep", "pipeline"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--folder", default="", help="submitit logs of pretrain/finetune (default: <stage folder>/submitit)")
    parser.add_argument("--no-wait", action="store_true", help="pretrain/finetune: submit and return without waiting")
    parser.add_argument("--wait", action="store_true", help="sweep/pipeline: wait until every job ended, then status")
    add_cluster_flags(parser)
    return parser


def build_predict_parser() -> argparse.ArgumentParser:
    from pcl_hpc.cli import model_command_arguments

    parser = argparse.ArgumentParser(prog="launchers/slurm.py predict", description="pcl-hpc predict as a job array: "
                                     "slurm.array_tasks shards of the inputs, one GPU each (cluster settings: "
                                     "the flags, or --config's slurm: section)")
    model_command_arguments(parser, "predict")
    parser.add_argument("--config", default=None, help="only for its slurm: section")
    parser.add_argument("--wait", action="store_true", help="wait until every task ended, then status")
    add_cluster_flags(parser, overrides=False)
    return parser


def build_status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launchers/slurm.py status", description="jobs and cells of a sweep, "
                                     "pipeline or predict submission: states, restarts, progress, logs, errors")
    parser.add_argument("folder", help="its output_dir (predict: its --output)")
    parser.add_argument("--resubmit", action="store_true", help="submit again the tasks that did not complete "
                        "(and the steps that waited for them)")
    return parser


def flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for dest, key in FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            out.append(f"slurm.{key}={json.dumps(value)}")  # JSON is YAML: strings stay strings
    return out


def continue_command(args: argparse.Namespace, argv: list[str]) -> str:
    """The command that continues this run: this one, without checkpoint.resume / checkpoint.path overrides."""
    keep = [a for a in argv if a not in args.overrides or a in _resume_overrides(args.overrides)]
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("slurm.py") else "launchers/slurm.py"
    return shlex.join([sys.executable, script, *keep])


def _resume_overrides(overrides: list[str]) -> list[str]:
    """The overrides of a command that continues the run: without checkpoint.resume / checkpoint.path."""
    return [o for o in overrides if o.split("=", 1)[0].strip() not in ("checkpoint.resume", "checkpoint.path")]


def stage_folder(cfg, stage: str) -> Path:
    """Where a training stage writes (its submitit logs go beside its outputs)."""
    if stage == "pretrain":
        from pcl_hpc.train.pretrain import folder
    else:
        from pcl_hpc.train.finetune import folder
    return folder(cfg)


@contextlib.contextmanager
def _refused(what: str):
    """sbatch's refusal as one line (submitit prints sbatch's error too: that output is dropped)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError) as err:
        raise UserError(f"sbatch refused {what}: {' '.join(str(err).split())[:400]}") from None


def submit(args: argparse.Namespace, argv: list[str]) -> int:
    """pretrain | finetune: a one-step plan (it joins the ledger, so `status` shows it), then wait for it."""
    overrides = list(args.overrides) + flag_overrides(args)
    cfg = load_config(args.config, overrides)  # a bad config fails here, not in the queue
    s = cfg.slurm
    if args.stage == "finetune" and s.nodes * s.tasks_per_node > 1:
        raise UserError("finetune runs as a single task: use --nodes 1 --tasks-per-node 1")
    cluster = checked_cluster(s)
    where = stage_folder(cfg, args.stage).absolute()
    folder = Path(args.folder or where / "submitit")
    command = continue_command(args, argv)
    step = Step(args.stage, [Task([args.stage, "--config", str(Path(args.config).absolute()), *overrides],
                                  folder=str(where))], kind="stage")
    with _refused("the job"):
        _, (job,) = chain.submit_step(cluster, step, Path(cfg.output_dir), s, command, {}, logs=folder)
    print(f"submitted {args.stage} as job {job.job_id} ({cluster}); logs in {folder}", flush=True)
    if args.no_wait:
        return 0
    return wait(job, cluster, where, folder, command)


def chain_steps(stage: str, cfg, cluster: str) -> list[Step]:
    """What a sweep or pipeline submission runs: the plan's pending steps (what the local runner,
    pcl_hpc.sweep.sweep, runs too), once the settings of each kind of step fit the cluster."""
    from pcl_hpc.pipeline import plan_for

    if cluster == "slurm":
        for kind in ("cells", "stage") if cfg.sweep.pretrain else ("cells",):  # "stage": the pretrainings
            check_cluster(step_settings(cfg.slurm, kind))
    return pending_steps(plan_for(stage, cfg))


def submit_chain(args: argparse.Namespace, argv: list[str]) -> int:
    """sweep | pipeline | predict: the steps, submitted chained (SLURM) or run in order (local, debug)."""
    overrides = list(getattr(args, "overrides", [])) + flag_overrides(args)
    config = str(Path(args.config).expanduser().absolute()) if args.config else None  # jobs may start elsewhere
    cfg = load_config(config, overrides)
    cluster = checked_cluster(step_settings(cfg.slurm, "predict" if args.stage == "predict" else "single"),
                              tasks_allowed=False)
    if args.stage == "predict":  # the predict command's own arguments, the inputs made absolute
        from pcl_hpc.pipeline import predict_steps

        steps, out = predict_steps(predict_argv(args), cfg.slurm.array_tasks), Path(args.output).absolute()
    else:
        steps, out = chain_steps(args.stage, cfg, cluster), Path(cfg.output_dir)
    if not steps:
        print(f"{args.stage}: every stage is complete and current; nothing to submit (outputs in {out})")
        return 0
    print(f"{args.stage}: {len(steps)} step(s) on {cluster}:", flush=True)
    with _refused("a job"):
        records = chain.submit_steps(cluster, steps, out, cfg.slurm, shlex.join([sys.executable, *sys.argv]))
    print(f"watch: python launchers/slurm.py status {out}"
          + (f"   (squeue -u $USER; tail -f {records[0]['logs']}/*_log.out)" if cluster == "slurm" else ""), flush=True)
    if cluster != "slurm":
        return status(out)
    if not getattr(args, "wait", False):
        return 0
    return wait_chain(records, out)


def predict_argv(args: argparse.Namespace) -> list[str]:
    argv = ["predict", "--model", args.model if args.model.startswith("models:/") else str(Path(args.model).absolute()),
            "--input", *[str(Path(p).absolute()) for p in args.input], "--output", str(Path(args.output).absolute()),
            "--format", args.format]
    argv += ["--tta"] * bool(args.tta) + ["--overwrite"] * bool(args.overwrite)
    argv += ["--tracking-uri", args.tracking_uri] if args.tracking_uri else []
    argv += ["--device", args.device] if args.device else []
    argv += ["--batch", str(args.batch)] if args.batch else []
    argv += ["--id-key", str(Path(args.id_key).absolute())] if args.id_key else []
    return argv


# ---------------------------------------------------------------- waiting


def wait_chain(records: list[dict], out: Path, poll_s: float = 5) -> int:
    """Until no task of the chain can still run; then the status table and its exit status."""
    while True:
        states = {}
        for record in records:
            tasks = task_states(record["job_id"])
            for task in record["tasks"]:
                info = tasks.get(task["job_id"].partition("_")[2], {})
                states[task["job_id"]] = info.get("state", "UNKNOWN"), info.get("reason", "")
        going = [j for j, (state, reason) in states.items()
                 if state in ACTIVE_STATES and reason != "DependencyNeverSatisfied"]
        if not going:
            return status(out)
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["status"]:
            args = build_status_parser().parse_args(argv[1:])
            return status(Path(args.folder), resubmit=args.resubmit)
        if argv[:1] == ["predict"]:
            args = build_predict_parser().parse_args(argv[1:])
            args.stage = "predict"
            return submit_chain(args, argv)
        args = build_parser().parse_intermixed_args(argv)
        if args.stage in ("sweep", "pipeline"):
            return submit_chain(args, argv)
        return submit(args, argv)
    except UserError as err:
        print(f"launchers/slurm.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

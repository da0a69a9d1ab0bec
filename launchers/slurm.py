"""Run pcl-hpc jobs through submitit: on SLURM, as local processes, or in this process.

    python launchers/slurm.py pretrain --config configs/acdc_pcl.yaml --nodes 2 --tasks-per-node 8 \
        --gpus-per-node 8 --partition gpu --time 720 pretrain.epochs=50
    python launchers/slurm.py pipeline|sweep --config ... [--array-parallelism K] [--cells-per-task P] [--wait]
    python launchers/slurm.py predict --model ... --input ... --output ... [--array-tasks K]
    python launchers/slurm.py status <folder> [--resubmit]

pretrain / finetune are one job each, and the launcher waits for it (below). sweep, pipeline and
predict are chains of jobs and job arrays (launchers/chain.py), printed and left to run; status
(launchers/status.py) reads what they submitted.

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
went up) or ends (`scancel`: cancelled stays cancelled; a node failure) is not. Past
`slurm.max_requeues` restarts the job stops with one line: where its checkpoint is and the command
that continues it. The launcher waits on the job's state (scontrol, then sacct) and its result
files; a job that ends without a result gives one line with its state and logs, and exit non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

# submitit's own preemption handler listens to this signal (read when submitit is imported, here and
# in the job): the same one SLURM is asked for before the time limit, and the one the StepGuard takes.
PREEMPT_SIGNAL = "USR1"
os.environ["SUBMITIT_PREEMPT_SIGNAL"] = PREEMPT_SIGNAL

import submitit  # noqa: E402
from submitit.core.utils import (FailedJobError, FailedSubmissionError, JobPaths,  # noqa: E402
                                 UncompletedJobError, pickle_load)

_REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, _REPO)  # run from a checkout without installing

# the jobs unpickle launchers.jobs: they find it as the launcher does (SLURM and submitit pass the environment on)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH", "")) if p)

from launchers.cluster import (ACTIVE_STATES, _run, check_cluster, gpus_in_gres, job_state, mem_mb,  # noqa: E402,F401
                               parse_oneliner, slurm_minutes, task_states)
from launchers.jobs import JobStopped, StageJob, checkpoint_text, stage_folder  # noqa: E402,F401
from pcl_hpc.config import load_config  # noqa: E402
from pcl_hpc.engine.loop import REQUEUE_EXIT_CODE  # noqa: E402
from pcl_hpc.errors import UserError  # noqa: E402

CLUSTERS = ("auto", "slurm", "local", "debug")


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
    from pcl_hpc.cli import _model_command_arguments

    parser = argparse.ArgumentParser(prog="launchers/slurm.py predict", description="pcl-hpc predict as a job array: "
                                     "slurm.array_tasks shards of the inputs, one GPU each (cluster settings: "
                                     "the flags, or --config's slurm: section)")
    _model_command_arguments(parser, "predict")
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
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=s.max_requeues)
    executor.update_parameters(**slurm_parameters(s, name))
    return executor


def resolve_cluster(cluster: str) -> str:
    if cluster == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return cluster


def continue_command(args: argparse.Namespace, argv: list[str]) -> str:
    """The command that continues this run: this one, without checkpoint.resume / checkpoint.path overrides."""
    keep = [a for a in argv if a not in args.overrides or a in _resume_overrides(args.overrides)]
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("slurm.py") else "launchers/slurm.py"
    return shlex.join([sys.executable, script, *keep])


def _resume_overrides(overrides: list[str]) -> list[str]:
    """The overrides of a command that continues the run: without checkpoint.resume / checkpoint.path."""
    return [o for o in overrides if o.split("=", 1)[0].strip() not in ("checkpoint.resume", "checkpoint.path")]


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


def submit(args: argparse.Namespace, argv: list[str]) -> int:
    overrides = list(args.overrides) + flag_overrides(args)
    cfg = load_config(args.config, overrides)  # a bad config fails here, not in the queue
    s = cfg.slurm
    if args.stage == "finetune" and s.nodes * s.tasks_per_node > 1:
        raise UserError("finetune runs as a single task: use --nodes 1 --tasks-per-node 1")
    cluster = checked_cluster(s)
    folder = Path(args.folder or stage_folder(cfg, args.stage) / "submitit")
    executor = make_executor(cluster, folder, s, f"pcl-hpc-{args.stage}")
    command = continue_command(args, argv)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's error too: one line is ours
            job = executor.submit(StageJob(args.stage, args.config, overrides, s.max_requeues, command))
    except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError) as err:
        raise UserError(f"sbatch refused the job: {' '.join(str(err).split())[:400]}") from None
    print(f"submitted {args.stage} as job {job.job_id} ({cluster}); logs in {folder}", flush=True)
    from launchers.chain import Step, record_submission  # status <output_dir> shows it beside the chains

    spec = {"kind": "stage", "stage": args.stage, "config": str(Path(args.config).absolute()), "overrides": overrides}
    record_submission(Path(cfg.output_dir), Step(args.stage, [{"folder": str(stage_folder(cfg, args.stage).absolute()),
                                                               "job": spec}], kind="stage"),
                      [job], cluster, folder, [], s, s)
    if args.no_wait:
        return 0
    return wait(job, cluster, cfg, args.stage, folder, command)


def submit_chain(args: argparse.Namespace, argv: list[str]) -> int:
    """sweep | pipeline | predict: the steps, submitted chained (SLURM) or run in order (local, debug)."""
    from launchers import chain

    overrides = list(getattr(args, "overrides", [])) + flag_overrides(args)
    config = chain.config_path(args.config) if args.config else None
    cfg = load_config(config, overrides)
    # each kind of step's settings against the cluster, before anything is written or queued
    kinds = ("predict",) if args.stage == "predict" else ("single", "cells", "stage")
    cluster = checked_cluster(chain.step_settings(cfg.slurm, kinds[0]), tasks_allowed=False)
    if cluster == "slurm":
        for kind in kinds[1:] if cfg.sweep.pretrain else kinds[1:2]:  # "stage": the pretrainings
            check_cluster(chain.step_settings(cfg.slurm, kind))
    if args.stage == "pipeline":
        steps = chain.preprocess_steps(cfg, config, overrides)
        steps += chain.sweep_steps(cfg, config, overrides, [s.name for s in steps])
        out = Path(cfg.output_dir)
    elif args.stage == "sweep":
        steps, out = chain.sweep_steps(cfg, config, overrides, []), Path(cfg.output_dir)
    else:  # predict: the predict command's own arguments, the inputs made absolute
        steps = chain.predict_steps(predict_argv(args), cfg.slurm.array_tasks)
        out = Path(args.output).absolute()
    if not steps:
        print(f"{args.stage}: every stage is complete and current; nothing to submit (outputs in {out})")
        return 0
    print(f"{args.stage}: {len(steps)} step(s) on {cluster}:", flush=True)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            records = chain.submit_steps(cluster, steps, out, cfg.slurm, shlex.join([sys.executable, *sys.argv]),
                                         wait_local=lambda step, jobs: wait_results(jobs))
    except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError) as err:
        raise UserError(f"sbatch refused a job: {' '.join(str(err).split())[:400]}") from None
    print(f"watch: python launchers/slurm.py status {out}"
          + (f"   (squeue -u $USER; tail -f {records[0]['logs']}/*_log.out)" if cluster == "slurm" else ""), flush=True)
    if cluster != "slurm":
        from launchers.status import status

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


def wait(job, cluster: str, cfg, stage: str, folder: Path, command: str) -> int:
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
        return _report_failure(job, cluster, info, err, cfg, stage, folder, command)
    print(f"job {job.job_id} finished: {results[0]}", flush=True)
    return 0


def _report_failure(job, cluster, info, err, cfg, stage, folder, command) -> int:
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
    ckpt = checkpoint_text(stage_folder(cfg, stage))
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


def wait_chain(records: list[dict], out: Path, poll_s: float = 5) -> int:
    """Until no task of the chain can still run; then the status table and its exit status."""
    from launchers.status import status

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
            from launchers.status import status

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

"""Run pcl-hpc jobs through submitit: on SLURM, as local processes, or in this process.

    python launchers/slurm.py pretrain --config configs/acdc_pcl.yaml --nodes 2 --tasks-per-node 8 \
        --gpus-per-node 8 --partition gpu --time 720 pretrain.epochs=50

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
import signal
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pcl_hpc import dist  # noqa: E402
from pcl_hpc.config import load_config  # noqa: E402
from pcl_hpc.engine.checkpoint import latest_checkpoint  # noqa: E402
from pcl_hpc.engine.loop import REQUEUE_EXIT_CODE, Preempted  # noqa: E402
from pcl_hpc.errors import UserError  # noqa: E402

CLUSTERS = ("auto", "slurm", "local", "debug")
# SLURM job states in which a job is still going (it may run again); anything else is final
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "POWER_UP_NODE"}


class JobStopped(UserError):
    """Rank 0 of a job that was interrupted and not requeued (slurm.max_requeues reached): one line."""


# ---------------------------------------------------------------- small helpers


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def parse_oneliner(line: str) -> dict[str, str]:
    """`scontrol -o show ...` output (one record per line, Key=Value fields) as a dict."""
    return dict(m.groups() for m in re.finditer(r"(\S+?)=(\S*)", line))


def slurm_minutes(text: str) -> float | None:
    """A SLURM time ([days-]hours:minutes:seconds, minutes, ...) in minutes; None for no limit."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        h, m, s = (parts + [0, 0])[:3]
        return int(days) * 1440 + h * 60 + m + s / 60
    if len(parts) == 1:  # minutes
        return parts[0]
    if len(parts) == 2:  # minutes:seconds
        return parts[0] + parts[1] / 60
    return parts[0] * 60 + parts[1] + parts[2] / 60  # hours:minutes:seconds


def mem_mb(text: str) -> int:
    """SLURM's --mem value ("16G", "512M", "1T", "4096": megabytes by default) in MB."""
    match = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper())
    if not match:
        raise UserError(f"slurm.mem={text!r} is not a SLURM memory size: give e.g. 16G, 512M or \"\" for the default")
    value, unit = int(match.group(1)), match.group(2) or "M"
    return {"K": value // 1024, "M": value, "G": value * 1024, "T": value * 1024 * 1024}[unit]


def gpus_in_gres(gres: str) -> int:
    """GPUs in a node's Gres field: gpu:4, gpu:a100:4(S:0-1), gpu:a100:2,gpu:v100:2, (null)."""
    total = 0
    for item in re.split(r",(?![^()]*\))", gres or ""):
        fields = re.sub(r"\(.*?\)", "", item).split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def job_state(job_id: str) -> dict[str, str]:
    """{"JobState", "Restarts", ...} of a SLURM job: scontrol while slurmctld remembers it, else sacct; {} if unknown."""
    try:
        proc = _run(["scontrol", "-o", "show", "job", job_id])
        if proc.returncode == 0 and "JobState=" in proc.stdout:
            return parse_oneliner(proc.stdout.splitlines()[0])
        # slurmctld forgot it (MinJobAge): accounting has one line per run (-D), the last is the current one
        proc = _run(["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State,ExitCode"])
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode == 0 and lines:
            fields = lines[-1].split("|")
            return {"JobState": fields[0].split()[0], "ExitCode": fields[1] if len(fields) > 1 else "",
                    "Restarts": str(sum(line.split("|")[0].startswith("REQUEUED") for line in lines))}
    except (OSError, subprocess.SubprocessError):
        pass
    return {}


def base_state(job_id: str) -> str:
    """The state accounting records for the job's current run (CANCELLED while scontrol says COMPLETING)."""
    try:
        proc = _run(["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State"])
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return lines[-1] if proc.returncode == 0 and lines else ""


def stage_folder(cfg, stage: str) -> Path:
    """Where the stage writes (its submitit logs go beside its outputs)."""
    if stage == "pretrain":
        from pcl_hpc.train.pretrain import folder
    else:
        from pcl_hpc.train.finetune import folder
    return folder(cfg)


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


def _resume_overrides(overrides: list[str]) -> list[str]:
    """The overrides of a command that continues the run: without checkpoint.resume / checkpoint.path."""
    return [o for o in overrides if o.split("=", 1)[0].strip() not in ("checkpoint.resume", "checkpoint.path")]


# ---------------------------------------------------------------- the job


class StageJob(submitit.helpers.Checkpointable):
    """A picklable job: one task per process; sets the torch.distributed variables, then runs the stage.

    Checkpointable: submitit's handler calls :meth:`checkpoint` (on rank 0, inside the signal handler)
    only when SIGUSR1 arrives outside the training loop; during training the StepGuard has the signal.
    """

    def __init__(self, stage: str, config_path: str, overrides: list[str], max_requeues: int = 3,
                 continue_command: str = ""):
        self.stage, self.config_path, self.overrides = stage, config_path, list(overrides)
        self.max_requeues, self.continue_command = int(max_requeues), continue_command

    def __call__(self):
        job = submitit.JobEnvironment()
        tasks = max(job.num_tasks, 1)
        os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(tasks), LOCAL_RANK=str(job.local_rank),
                          LOCAL_WORLD_SIZE=str(tasks // max(job.num_nodes, 1)))
        if tasks > 1:
            os.environ.update(MASTER_ADDR=job.hostnames[0] if job.num_nodes > 1 else "127.0.0.1",
                              MASTER_PORT=str(dist.master_port(job.job_id)))
        overrides = list(self.overrides)
        cfg = load_config(self.config_path, overrides)
        if _restarts() > 0 and latest_checkpoint(stage_folder(cfg, self.stage)) is not None:
            # a requeued run always continues its own checkpoint (not a checkpoint.path it started from)
            cfg = load_config(self.config_path, overrides + ["checkpoint.resume=true", "checkpoint.path="])
        try:
            return self.run_stage(cfg)
        except Preempted:
            # Every rank saved at the same step; rank 0 decides whether this job needs a requeue.
            if job.global_rank == 0:
                self.after_preemption(job, cfg)
            raise

    def run_stage(self, cfg):
        if self.stage == "pretrain":
            from pcl_hpc.train.pretrain import pretrain

            return str(pretrain(cfg))
        from pcl_hpc.train.finetune import finetune

        return finetune(cfg)

    def _where(self, cfg) -> str:
        ckpt = checkpoint_text(stage_folder(cfg, self.stage)) or "none yet"
        return f"checkpoint {ckpt}; continue with: {self.continue_command}"

    def after_preemption(self, job, cfg) -> None:
        """Rank 0, after every rank saved: requeue once if SLURM will not; past max_requeues, stop with one line."""
        for sig in (signal.SIGUSR1, signal.SIGTERM):  # we are stopping: a second signal must not requeue again
            signal.signal(sig, signal.SIG_IGN)
        job_id = os.environ.get("SLURM_JOB_ID")
        if job.cluster != "slurm" or not job_id:
            print(f"{self.stage} stopped after a signal; {self._where(cfg)}", flush=True)
            return
        restarts, info = _restarts(), job_state(job_id)
        state = info.get("JobState", "UNKNOWN")
        if state == "RUNNING":  # time limit, `scancel --signal`: nobody else requeues this job
            if restarts >= self.max_requeues:
                raise JobStopped(f"job {job_id} stopped after {restarts} requeue(s) (slurm.max_requeues="
                                 f"{self.max_requeues}); {self._where(cfg)}")
            proc = _run(["scontrol", "requeue", job_id], timeout=60)
            if proc.returncode == 0:
                print(f"requeued job {job_id} (restart {restarts + 1} of at most {self.max_requeues}); it resumes "
                      f"from {checkpoint_text(stage_folder(cfg, self.stage))}", flush=True)
            else:
                print(f"scontrol requeue {job_id} failed: {(proc.stderr or proc.stdout).strip()}; "
                      f"{self._where(cfg)}", flush=True)
            return
        if state == "COMPLETING":  # ending: accounting knows why (CANCELLED, REQUEUED, TIMEOUT, ...)
            state = base_state(job_id) or state
        if state in ("REQUEUED", "PREEMPTED") or (info.get("Restarts", "").isdigit() and int(info["Restarts"]) > restarts):
            print(f"job {job_id} is being requeued by SLURM (scontrol requeue or preemption); it resumes from "
                  f"{checkpoint_text(stage_folder(cfg, self.stage))}", flush=True)
            return
        # cancelled, or ending for another reason (node failure, the hard time limit): never undone by a requeue
        print(f"job {job_id} is ending ({state}): not requeued; {self._where(cfg)}", flush=True)

    def checkpoint(self, *args, **kwargs):
        """Inside submitit's SIGUSR1 handler on rank 0 (outside the training loop): nothing is saved or
        sent here; the resubmission is returned and submitit requeues the job, which resumes from latest."""
        if _restarts() >= self.max_requeues:
            print(f"not requeued: {_restarts()} requeue(s) already (slurm.max_requeues={self.max_requeues}); "
                  f"continue with: {self.continue_command}", flush=True)
            return None
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _restarts() -> int:
    value = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


# ---------------------------------------------------------------- cluster checks


def check_cluster(s) -> None:
    """The slurm settings against this cluster's own answers; a UserError (one line) for the first that cannot run."""
    try:
        proc = _run(["sinfo", "-h", "-o", "%R"])
    except (OSError, subprocess.SubprocessError) as err:
        raise UserError(f"--cluster slurm: sinfo does not answer ({err}); is slurmctld running?") from None
    if proc.returncode != 0:
        raise UserError(f"--cluster slurm: sinfo failed: {(proc.stderr or proc.stdout).strip()[:300]}")
    names = sorted(set(proc.stdout.split()))
    partitions = {}
    for line in _run(["scontrol", "-o", "show", "partition"]).stdout.splitlines():
        fields = parse_oneliner(line)
        if "PartitionName" in fields:
            partitions[fields["PartitionName"]] = fields
    if not names:
        names = sorted(partitions)
    if s.partition:
        if s.partition not in names:
            raise UserError(f"slurm.partition={s.partition!r} is not a partition of this cluster "
                            f"(sinfo lists: {', '.join(names) or 'none'})")
        name = s.partition
    else:
        default = [n for n, f in partitions.items() if f.get("Default") == "YES"]
        if not default and not names:
            raise UserError("this cluster has no partition (sinfo lists none)")
        name = (default or names)[0]
    part = partitions.get(name, {})
    limit = slurm_minutes(part.get("MaxTime", "UNLIMITED"))
    if limit is not None and s.time > limit:
        raise UserError(f"slurm.time={s.time} minutes is above partition {name}'s MaxTime of {limit:g} minutes "
                        f"({part.get('MaxTime')}); lower slurm.time (the job is requeued from its checkpoint anyway)")
    nodes = []
    for line in _run(["scontrol", "-o", "show", "node"]).stdout.splitlines():
        fields = parse_oneliner(line)
        if "NodeName" in fields and name in fields.get("Partitions", "").split(","):
            nodes.append(fields)
    if not nodes:
        raise UserError(f"partition {name} has no nodes (scontrol show node)")
    if s.nodes > len(nodes):
        raise UserError(f"slurm.nodes={s.nodes} but partition {name} has {len(nodes)} node(s)")
    cpus = [int(n.get("CPUTot", "0") or 0) for n in nodes]
    gpus = [gpus_in_gres(n.get("Gres", "")) for n in nodes]
    mems = [int(n.get("RealMemory", "0") or 0) for n in nodes]
    need_cpus = s.tasks_per_node * s.cpus_per_task
    if need_cpus > max(cpus):
        raise UserError(f"slurm.tasks_per_node={s.tasks_per_node} x slurm.cpus_per_task={s.cpus_per_task} = "
                        f"{need_cpus} CPUs per node, but the nodes of partition {name} have at most {max(cpus)}")
    if s.gpus_per_node > max(gpus):
        raise UserError(f"slurm.gpus_per_node={s.gpus_per_node}, but the nodes of partition {name} have at most "
                        f"{max(gpus)} GPU(s)")
    need_mem = mem_mb(s.mem) if s.mem else 0
    if need_mem > max(mems):
        raise UserError(f"slurm.mem={s.mem} ({need_mem} MB), but the nodes of partition {name} have at most "
                        f"{max(mems)} MB")
    features = {f for n in nodes for f in re.split(r"[,\s]", n.get("AvailableFeatures", "")) if f and f != "(null)"}
    for feature in re.findall(r"[A-Za-z_][\w.-]*", s.constraint):
        if feature not in features:
            raise UserError(f"slurm.constraint={s.constraint!r}: no node of partition {name} has the feature "
                            f"{feature!r} (features: {', '.join(sorted(features)) or 'none'})")
    fit = [i for i in range(len(nodes)) if cpus[i] >= need_cpus and gpus[i] >= s.gpus_per_node and mems[i] >= need_mem]
    if len(fit) < s.nodes:
        raise UserError(f"slurm.nodes={s.nodes}, but only {len(fit)} node(s) of partition {name} have {need_cpus} CPUs, "
                        f"{s.gpus_per_node} GPU(s) and {need_mem} MB each")
    for key, kind, value in (("account", "account", s.account), ("qos", "qos", s.qos)):
        if not value:
            continue
        proc = _run(["sacctmgr", "-n", "-P", "show", kind, f"format={'account' if kind == 'account' else 'name'}"])
        known = {line.strip() for line in proc.stdout.splitlines() if line.strip()}
        if proc.returncode == 0 and known and value not in known:
            raise UserError(f"slurm.{key}={value!r} is not known to this cluster's accounting "
                            f"(sacctmgr lists: {', '.join(sorted(known))})")


# ---------------------------------------------------------------- submission


FLAGS = {  # flag dest -> slurm.<key>: each given flag becomes an override that wins over the config
    "partition": "partition", "account": "account", "qos": "qos", "time": "time", "nodes": "nodes",
    "tasks_per_node": "tasks_per_node", "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task",
    "mem": "mem", "constraint": "constraint", "exclusive": "exclusive", "signal_delay_s": "signal_delay_s",
    "max_requeues": "max_requeues", "setup": "setup", "cluster": "cluster",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Submit pcl-hpc pretrain / finetune with submitit. Cluster settings "
                                     "come from the config's slurm: section (slurm.key=value); these flags win.")
    parser.add_argument("stage", choices=["pretrain", "finetune"])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--cluster", choices=CLUSTERS, default=None,
                        help="auto: SLURM when sbatch is available, else local processes; debug: in this process")
    parser.add_argument("--folder", default="", help="submitit logs (default: <stage folder>/submitit)")
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
    parser.add_argument("--no-wait", action="store_true", help="submit and return without waiting for the result")
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


def submit(args: argparse.Namespace, argv: list[str]) -> int:
    overrides = list(args.overrides) + flag_overrides(args)
    cfg = load_config(args.config, overrides)  # a bad config fails here, not in the queue
    s = cfg.slurm
    cluster = resolve_cluster(s.cluster)
    tasks = s.nodes * s.tasks_per_node
    if args.stage == "finetune" and tasks > 1:
        raise UserError("finetune runs as a single task: use --nodes 1 --tasks-per-node 1")
    if cluster in ("local", "debug") and s.nodes > 1:
        raise UserError(f"--cluster {cluster} runs on one node: use --nodes 1, or submit from a SLURM login node")
    if cluster == "debug" and tasks > 1:
        raise UserError("--cluster debug runs one task in this process: use --tasks-per-node 1, or --cluster local")
    if s.mem:
        mem_mb(s.mem)
    if cluster == "slurm":
        if not shutil.which("sbatch"):
            raise UserError("--cluster slurm: sbatch is not on PATH (use --cluster local on a machine without SLURM)")
        check_cluster(s)
    folder = Path(args.folder or stage_folder(cfg, args.stage) / "submitit")
    executor = make_executor(cluster, folder, s, f"pcl-hpc-{args.stage}")
    command = continue_command(args, argv)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's error too: one line is ours
            job = executor.submit(StageJob(args.stage, args.config, overrides, s.max_requeues, command))
    except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError) as err:
        raise UserError(f"sbatch refused the job: {' '.join(str(err).split())[:400]}") from None
    print(f"submitted {args.stage} as job {job.job_id} ({cluster}); logs in {folder}", flush=True)
    if args.no_wait:
        return 0
    return wait(job, cluster, cfg, args.stage, folder, command)


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)
    try:
        return submit(args, argv)
    except UserError as err:
        print(f"launchers/slurm.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

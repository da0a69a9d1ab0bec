"""What a SLURM cluster says: job states (scontrol, then sacct), array tasks, partitions and nodes.

`check_cluster` holds the slurm: settings against the cluster's own answers before anything is
queued (`sinfo`, `scontrol -o show partition/node`, `sacctmgr` when accounting answers).
"""

from __future__ import annotations

import re
import subprocess

from pcl_hpc.errors import UserError

# SLURM job states in which a job is still going (it may run again); anything else is final
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "POWER_UP_NODE"}


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


def _expand_indices(text: str) -> list[str]:
    """'[2-4,7%2]' / '3' -> ['2', '3', '4', '7'] / ['3'] (sacct's and scontrol's array task ids)."""
    out = []
    for part in text.strip("[]").split("%")[0].split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out += [str(i) for i in range(int(lo), int(hi) + 1)]
        elif part.isdigit():
            out.append(part)
    return out


def task_states(job_id: str) -> dict[str, dict[str, str]]:
    """Each task of a job (an array's tasks by index, a plain job as "") -> {state, restarts, exit, reason,
    start, end}: accounting (`sacct -D`: one line per run, a requeued run is REQUEUED), then what
    slurmctld knows now (`scontrol show job`: its current state, restart count and pending reason)."""
    tasks: dict[str, dict[str, str]] = {}
    try:
        proc = _run(["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,Start,End"])
        lines = proc.stdout.splitlines() if proc.returncode == 0 else []
        for line in lines:
            fields = line.split("|")
            if len(fields) < 5 or not fields[0].startswith(job_id):
                continue
            jid, state = fields[0], fields[1].split()[0] if fields[1] else ""
            _, _, index = jid.partition("_")
            for i in _expand_indices(index) if index else [""]:
                task = tasks.setdefault(i, {"restarts": "0"})
                if state == "REQUEUED":
                    task["restarts"] = str(int(task["restarts"]) + 1)
                task.update(state=state, exit=fields[2], start=fields[3], end=fields[4])
        proc = _run(["scontrol", "-o", "show", "job", job_id])
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            fields = parse_oneliner(line)
            if "JobState" not in fields:
                continue
            index = fields.get("ArrayTaskId", "")
            for i in _expand_indices(index) if index else [""]:
                task = tasks.setdefault(i, {"restarts": "0"})
                task.update(state=fields["JobState"], reason=fields.get("Reason", ""),
                            restarts=max(fields.get("Restarts", "0"), task.get("restarts", "0"), key=int))
    except (OSError, subprocess.SubprocessError):
        pass
    return tasks

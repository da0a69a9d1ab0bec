"""The one place that knows where a process sits in a job: torchrun, SLURM/submitit, or a plain run.

Everything else asks `DistEnv` for rank, world size and device, and uses `is_main` to decide who
logs and saves (nanoGPT's `master_process`). The few collectives the harness needs outside the
model (`barrier`, `any_rank`, `all_reduce_mean`), the backend choice and the rendezvous port of a
SLURM job live here too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    source: str = "single"  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")


def detect() -> DistEnv:
    """Read rank and world size from torchrun's variables, else SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "slurm")
    return DistEnv()


def publish(rank: int = 0, local_rank: int = 0, world_size: int = 1, local_world_size: int | None = None,
            master_addr: str | None = None, master_port: int | None = None) -> DistEnv:
    """Say where this process sits, as torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR/PORT), so :func:`detect` and torch.distributed's ``env://`` agree. The launcher's jobs (from
    submitit's job environment), SLURM tasks started by srun, and the sweep's cell workers all come here."""
    local = local_world_size if local_world_size is not None else world_size
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local))
    if master_addr is not None:
        os.environ["MASTER_ADDR"] = master_addr
    if master_port is not None:
        os.environ["MASTER_PORT"] = str(master_port)
    return detect()


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    # scontrol expands compressed lists like node[01-04]; the first host is the rendezvous point.
    try:
        import subprocess

        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else "127.0.0.1"
    except (OSError, subprocess.SubprocessError):
        return "127.0.0.1"


def default_backend(backend: str = "") -> str:
    """``backend`` when given, else NCCL on CUDA and gloo otherwise."""
    return backend or ("nccl" if torch.cuda.is_available() else "gloo")


def master_port(job_id: str | int) -> int:
    """The rendezvous port of a SLURM job: a function of the job id, so every task computes the same one."""
    return 20000 + int(str(job_id).split("_")[0]) % 20000


def init(backend: str = "", timeout_s: int = 600) -> DistEnv:
    """Initialise the process group when the job has more than one process; return where we are."""
    env = detect()
    if not env.distributed or torch_dist.is_initialized():
        return env
    if env.source == "slurm":
        publish(env.rank, env.local_rank, env.world_size, None, os.environ.get("MASTER_ADDR") or _slurm_master_addr(),
                int(os.environ.get("MASTER_PORT") or master_port(os.environ.get("SLURM_JOB_ID", "0"))))
    backend = default_backend(backend)
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    # A bounded timeout: a rank that dies makes the others fail instead of hanging until the wall clock.
    timeout = timedelta(seconds=timeout_s)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0":
        torch_dist.init_process_group(backend=backend, timeout=timeout)
        report_layout(env)
        return env
    # torchrun keeps its store across restarts (--max-restarts), so the failed attempt's keys are still
    # there and a restarted rank could read a dead peer's address ("connectFullMesh ... Connection
    # refused"). A key prefix per attempt keeps the attempts apart.
    store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                world_size=env.world_size, is_master=False, timeout=timeout)
    torch_dist.init_process_group(backend, store=torch_dist.PrefixStore(f"pcl_hpc_attempt{attempt}", store),
                                  rank=env.rank, world_size=env.world_size, timeout=timeout)
    report_layout(env)
    return env


def layout_text(places: list[tuple[str, int]]) -> str:
    """``places[rank] = (host, local rank)`` as one line: each host with its ranks and their local ranks."""
    hosts = {}
    for rank, (host, local) in enumerate(places):
        hosts.setdefault(host, []).append((rank, local))
    return (f"process group: {len(places)} ranks on {len(hosts)} node(s): " + "; ".join(
        f"{host} ranks {','.join(str(r) for r, _ in ranks)} (local {','.join(str(lr) for _, lr in ranks)})"
        for host, ranks in hosts.items()))


def report_layout(env: DistEnv) -> None:
    """Rank 0 prints where every rank of the new group runs (host name, local rank): on a cluster, the first
    thing to read when a multi-node launch misbehaves."""
    places = gather(env, (socket.gethostname(), env.local_rank))
    if env.is_main:
        print(layout_text(places), flush=True)


@dataclass(frozen=True)
class NodeLayout:
    """Where this rank sits among the job's nodes: nodes are numbered by their first rank, so a requeued job
    on other machines has the same numbering (what node-local staging shards the store by)."""

    node: int  # this rank's node
    ranks: tuple[int, ...]  # the global ranks on this rank's node, ascending
    rank: int  # this rank
    host: str  # this node's host name
    per_node: tuple[int, ...]  # ranks on each node, by node

    @property
    def nodes(self) -> int:
        return len(self.per_node)

    @property
    def local_index(self) -> int:
        """This rank's place among its node's ranks (0: the rank that does the node's work)."""
        return self.ranks.index(self.rank)

    @property
    def local_count(self) -> int:
        return len(self.ranks)


def node_layout(env: DistEnv) -> NodeLayout:
    """Every rank's host name, gathered (a collective: every rank calls it), as this rank's NodeLayout."""
    host = socket.gethostname()
    hosts = gather(env, host)
    order = list(dict.fromkeys(hosts))
    mine = tuple(r for r, h in enumerate(hosts) if h == host)
    return NodeLayout(order.index(host), mine, env.rank, host,
                      tuple(hosts.count(h) for h in order))


def gather(env: DistEnv, value):
    """Every rank's ``value`` (any picklable object), on every rank; ``[value]`` in a single process."""
    if not env.distributed or not torch_dist.is_initialized():
        return [value]
    out = [None] * env.world_size
    torch_dist.all_gather_object(out, value)
    return out


def long_barrier(seconds: float) -> None:
    """A barrier that waits up to ``seconds`` (the process group's timeout may be shorter): for work of one rank
    per node that can take long, like staging the store. A gloo group of its own, so it runs beside NCCL too."""
    if not torch_dist.is_initialized():
        return
    group = torch_dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
    try:
        torch_dist.barrier(group=group)
    finally:
        torch_dist.destroy_process_group(group)


def teardown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def set_threads(env: DistEnv, threads: int = 0) -> None:
    """Split the CPU cores among the ranks of this node so they do not oversubscribe."""
    if threads <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size if env.distributed else 1))
        threads = max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(threads)


def _collective_device() -> str:
    return "cuda" if torch_dist.get_backend() == "nccl" else "cpu"


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_mean(value: float) -> float:
    """Average a Python number over ranks (for logging)."""
    if not torch_dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    torch_dist.all_reduce(t)
    return float(t.item()) / torch_dist.get_world_size()


def any_rank(flag: bool) -> int:
    """-1 when no rank raised the flag, else the lowest rank that did (every rank gets the same answer)."""
    if not torch_dist.is_initialized():
        return 0 if flag else -1
    world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
    t = torch.tensor([rank if flag else world], dtype=torch.int64, device=_collective_device())
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
    value = int(t.item())
    return -1 if value == world else value


def global_rank_and_world() -> tuple[int, int]:
    """(rank, world size): from the process group when there is one, else from the environment."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    env = detect()
    return env.rank, env.world_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_REPORTS = "PCL_HPC_REPORTS_ERRORS"  # set by run_workers: it prints the workers' error lines itself


def report_error(line: str, status: int = 2) -> None:
    """A worker's one-line error, said once when N ranks fail alike: under :func:`run_workers` every rank leaves
    it in its error file (torchrun's ``TORCHELASTIC_ERROR_FILE``) and the launcher prints one; under plain
    torchrun rank 0 prints it and the other ranks leave theirs in the file (torchrun's summary shows it)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or (detect().is_main and not os.environ.get(_REPORTS)):
        print(line, file=sys.stderr, flush=True)
        return
    with open(path, "w") as handle:
        json.dump({"message": line, "timestamp": int(time.time()), "status": status}, handle)


def run_workers(nproc: int, argv: list[str]) -> int:
    """``python -m pcl_hpc <argv>`` in ``nproc`` local processes, through torch.distributed's launcher API (what
    ``torchrun --standalone`` does), without torchrun's traceback: returns 0, 75 when the ranks stopped after
    saving on a signal (run it again to resume), else the failing rank's status, having printed its line once."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its lines repeat the ranks' own
    os.environ[_REPORTS] = "1"
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"pcl-hpc-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "pcl_hpc", *argv)
    except ChildFailedError as err:
        failures = sorted(err.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
        said = [f for _, f in failures if f.error_file != "<N/A>" and isinstance(f.message, str)]  # a rank's own line
        # the status a rank chose (in its error file: it may be stopped by the launcher before it exits), else its own
        statuses = [f.error_file_data.get("status", f.exitcode) if f in said else f.exitcode for _, f in failures]
        statuses = [code for code in statuses if isinstance(code, int) and code > 0]
        if said or 75 not in statuses:  # 75 alone: every rank saved on a signal and said so itself
            rank, first = failures[0]
            print(said[0].message if said else f"pcl-hpc: rank {rank} failed ({first.message})", file=sys.stderr,
                  flush=True)
        return 75 if 75 in statuses else statuses[0] if statuses else 1
    except SignalException as err:
        print(f"stopped by {signal.Signals(err.sigval).name}; run the same command again to resume from the last "
              "checkpoint", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0

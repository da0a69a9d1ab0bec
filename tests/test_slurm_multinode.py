"""launchers/slurm.py on two real SLURM nodes: `bash tools/slurm_local.sh start --nodes 2` (.ci/run does) runs
node1 and node2 as two slurmd on this machine, each in its own UTS namespace (its own hostname) at its own
loopback address, and partition `two` holds both. Without that partition every test here is skipped, except
under CI (CI=true), where each one fails instead.

What they check: one job over both nodes forms one process group whose ranks and local ranks are right on each
node (the rendezvous address comes from the job's node list), and it ends bit-identical to the same global
batch on one node (torchrun, as many processes); a time limit (SLURM's SIGUSR1 to every task), SIGUSR1 sent
from outside to the tasks of one node only, and the loss of one node's tasks (SIGKILL from outside) each end
in one job, requeued, that finishes bit-identical with each step logged once. With node-local staging
(data.stage), `scontrol requeuehold` (SIGTERM to every task on both nodes) and a node that comes back without
its staged copy end bit-identical to an uninterrupted staged run, each node reading its shard of the store
once per job start (counted from outside).
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcl_hpc.data.store import volume_ids
from tests.conftest import REPO
from tests.test_slurm import (
    TINY,
    assert_each_step_once,
    assert_same_weights,
    beside,
    finish,
    launch_in_background,
    sacct_runs,
    slurm_job,
    task_logs,
    wait_for_steps,
)
from tests.test_spine import overrides
from tests.test_staging import OpenCounter, staged_volumes, two_node_torchrun, volume_chunks

PARTITION = "two"
# torch threads per rank: by default cores / local ranks, so 1 rank per node would use 2 threads where the
# one-node reference's 2 ranks use 1 each, and a different thread count sums in another order (not bit-identical)
THREADS = {"engine.threads": 1}


def _two_nodes_unavailable() -> str:
    try:
        proc = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-N", "-o", "%N %t"], capture_output=True, text=True,
                              timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo does not answer: {err}"
    usable = [line.split()[0] for line in proc.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].startswith(("idle", "mix", "alloc"))]
    if proc.returncode != 0 or len(usable) < 2:
        return (f"no 2-node partition '{PARTITION}' (start it with `bash tools/slurm_local.sh start --nodes 2`); "
                f"sinfo: {(proc.stdout + proc.stderr).strip()[:200]}")
    return ""


_UNAVAILABLE = _two_nodes_unavailable()
_IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(bool(_UNAVAILABLE) and not _IN_CI, reason=_UNAVAILABLE or "2 nodes are up")]


@pytest.fixture(autouse=True)
def _two_nodes_required_in_ci():
    if _UNAVAILABLE:
        pytest.fail(f"CI=true but {_UNAVAILABLE}", pytrace=False)
    yield


def two_nodes(demo_store, out, tasks_per_node=1, env=None, **extra):
    """The launcher's job over both nodes, in the background: (launcher process, job id). Its time limit is
    10 minutes unless ``slurm.time`` is given."""
    return launch_in_background(demo_store, out, "--nodes", "2", "--tasks-per-node", str(tasks_per_node), env=env,
                                **{"slurm.partition": PARTITION, "slurm.time": 10, **THREADS, **extra})


def one_node(demo_store, out, processes, **extra) -> Path:
    """The same global batch on one node, straight under torchrun: the reference encoder."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m",
           "pcl_hpc", "pretrain", "--config", str(REPO / "configs" / "demo.yaml"),
           *overrides(demo_store, out, **{**TINY, **THREADS, **extra})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "pretrain" / "encoder.pt"


def task_pids(job_id: str, node: str) -> list[int]:
    """The pids of the job's task processes on ``node`` (read from /proc, as an outside observer would: the
    processes whose environment says this job and this node, less their own children such as loader workers)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
            cmdline = (proc / "cmdline").read_text()
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURMD_NODENAME") == node and "submitit" in cmdline:
            found[int(proc.name)] = parent
    return [pid for pid, parent in found.items() if parent not in found]


def signal_node(job_id: str, node: str, signum: int) -> list[int]:
    pids = task_pids(job_id, node)
    assert pids, f"no task of job {job_id} found on {node}"
    for pid in pids:
        os.kill(pid, signum)
    return pids


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True, timeout=30,
                          check=False).stdout.strip()


def test_a_staged_job_requeued_onto_a_node_without_its_copy_restages_it_and_ends_bit_identical(demo_store, tmp_path):
    # data.stage on both nodes, one task each: `scontrol requeuehold` (SIGTERM to both nodes' tasks, which save the
    # same step), node2's staged copy is deleted while the job is held (as if it came back on another machine),
    # then released: node2 restages its shard, node1 keeps its own, and the job finishes bit-identical to an
    # uninterrupted two-node staged run. The opens of the store's chunk files are counted from outside (inotify).
    steps, stage_dir = 200, tmp_path / "local"
    out = tmp_path / "slurm"
    out.mkdir()
    reference_store = tmp_path / "store-copy.zarr"  # the reference reads a copy: its opens are not the job's
    shutil.copytree(demo_store, reference_store)
    counter = OpenCounter(demo_store)
    try:
        proc, job_id = two_nodes(demo_store, out, **{"pretrain.max_steps": steps, "data.stage": "true",
                                                     "data.stage_dir": str(stage_dir)})
        wait_for_steps(out, 60, proc)
        subprocess.run(["scontrol", "requeuehold", job_id], check=True, timeout=30)
        deadline = time.monotonic() + 120
        while not job_state(job_id).startswith("PENDING"):
            assert time.monotonic() < deadline, f"job {job_id} not held: {job_state(job_id)}"
            time.sleep(0.5)
        shards = {node: staged_volumes(stage_dir, node) for node in ("node1", "node2")}
        shutil.rmtree(stage_dir / "pcl-hpc-stage" / "node2")
        subprocess.run(["scontrol", "release", job_id], check=True, timeout=30)
        beside(proc, out, lambda: two_node_torchrun(str(reference_store), tmp_path / "two", **{
            "pretrain.max_steps": steps, "data.stage_dir": str(tmp_path / "ref-local")}))
        rc, out_text, err_text = finish(proc, out, timeout=300)
        opened = counter.take()
    finally:
        counter.close()
    assert rc == 0, (out_text + err_text)[-4000:]
    job = slurm_job(job_id)
    assert job["JobState"] == "COMPLETED" and job["NumNodes"] == "2" and job["Restarts"] == "1", job
    log0 = task_logs(out, job_id, 0)
    assert "process group: 2 ranks on 2 node(s): node1 ranks 0 (local 0); node2 ranks 1 (local 0)" in log0, log0[-3000:]
    assert "after SIGTERM" in log0 and "resuming from" in log0 and "after SIGTERM" in task_logs(out, job_id, 1)
    assert sacct_runs(job_id) == ["REQUEUED", "COMPLETED"]
    assert shards["node1"] and shards["node2"] and not shards["node1"] & shards["node2"], shards
    assert shards["node1"] | shards["node2"] == set(volume_ids(demo_store))
    n1, n2 = len(shards["node1"]), len(shards["node2"])
    restaged = [line for line in log0.splitlines() if line.startswith("staging under")][-1]
    assert f"node 0: {n1}/{n1} volumes staged (0 copied" in restaged and \
        f"node 1: {n2}/{n2} volumes staged ({n2} copied" in restaged, restaged
    expected = {**{p: 1 for p in volume_chunks(demo_store, shards["node1"])},
                **{p: 2 for p in volume_chunks(demo_store, shards["node2"])}}
    assert opened == expected, "each node read its shard from the store once per job start, node2 again after losing it"
    assert_same_weights(out / "pretrain" / "encoder.pt", tmp_path / "two" / "pretrain" / "encoder.pt")
    assert_each_step_once(out, steps)


def test_sigusr1_to_one_node_stops_both_at_the_same_step_and_ends_bit_identical(demo_store, tmp_path):
    # two tasks per node (4 ranks); SIGUSR1 from outside to node2's two tasks only: the stop flag crosses to
    # node1 at the next step, every rank saves that step, rank 0 requeues, the job finishes bit-identical to 4
    # processes on one node
    steps = 150
    out = tmp_path / "slurm"
    out.mkdir()
    proc, job_id = two_nodes(demo_store, out, tasks_per_node=2, **{"pretrain.max_steps": steps})
    wait_for_steps(out, 40, proc)
    signalled = signal_node(job_id, "node2", 10)  # SIGUSR1
    assert len(signalled) == 2, signalled
    reference = beside(proc, out, lambda: one_node(demo_store, tmp_path / "one", 4, **{"pretrain.max_steps": steps}))
    rc, out_text, err_text = finish(proc, out, timeout=300)
    assert rc == 0, (out_text + err_text)[-4000:]
    job = slurm_job(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1" and job["NumTasks"] == "4", job
    log0 = task_logs(out, job_id, 0)
    assert "process group: 4 ranks on 2 node(s): node1 ranks 0,1 (local 0,1); node2 ranks 2,3 (local 0,1)" in log0
    assert "after a signal on another rank" in log0 and f"requeued job {job_id} (restart 1" in log0, log0[-3000:]
    assert "after SIGUSR1" in task_logs(out, job_id, 2) + task_logs(out, job_id, 3)
    assert_same_weights(out / "pretrain" / "encoder.pt", reference)
    assert_each_step_once(out, steps)


def test_a_lost_node_is_survived_bit_identical(demo_store, tmp_path):
    # node2's task is killed from outside (SIGKILL: the node is gone) between checkpoints; node1's rank fails at
    # its next collective, requeues the job, which resumes from the last checkpoint on both nodes
    extra = {"pretrain.max_steps": 150, "checkpoint.every_steps": 50}
    out = tmp_path / "slurm"
    out.mkdir()
    proc, job_id = two_nodes(demo_store, out, **extra)
    wait_for_steps(out, 75, proc)
    signal_node(job_id, "node2", 9)
    reference = beside(proc, out, lambda: one_node(demo_store, tmp_path / "one", 2, **extra))
    rc, out_text, err_text = finish(proc, out, timeout=300)
    assert rc == 0, (out_text + err_text)[-4000:]
    job = slurm_job(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job
    log0 = task_logs(out, job_id, 0)
    assert f"job {job_id} lost a rank" in log0 and "resuming from" in log0, log0[-3000:]
    assert_same_weights(out / "pretrain" / "encoder.pt", reference)
    assert_each_step_once(out, 150)


def test_a_time_limit_on_two_nodes_requeues_until_done_bit_identical(demo_store, tmp_path):
    # SLURM's SIGUSR1 before the 2-minute limit reaches the tasks of both nodes; the first run is slowed by
    # sleeping (PCL_HPC_FAULT=slow, its numbers unchanged) so that it outlasts the signal; the requeued run is
    # not slowed and finishes. Every rank saves the same step; the end equals one node's straight run.
    steps = 400
    out = tmp_path / "slurm"
    out.mkdir()
    proc, job_id = two_nodes(demo_store, out, env={"PCL_HPC_FAULT": "slow:0.25"}, **{
        "pretrain.max_steps": steps, "slurm.time": 2, "slurm.signal_delay_s": 60})

    def reference_once_the_job_trains():
        wait_for_steps(out, 1, proc)
        return one_node(demo_store, tmp_path / "one", 2, **{"pretrain.max_steps": steps})

    reference = beside(proc, out, reference_once_the_job_trains)
    rc, out_text, err_text = finish(proc, out, timeout=900)
    assert rc == 0, (out_text + err_text)[-4000:]
    job = slurm_job(job_id)
    assert job["JobState"] == "COMPLETED" and job["NumNodes"] == "2" and int(job["Restarts"]) >= 1, job
    log0, log1 = task_logs(out, job_id, 0), task_logs(out, job_id, 1)
    assert "after SIGUSR1" in log0 and "after SIGUSR1" in log1, "the signal reached both nodes' tasks"
    assert_same_weights(out / "pretrain" / "encoder.pt", reference)
    assert_each_step_once(out, steps)


def test_the_sweep_array_packs_cells_on_both_nodes(demo_store, tmp_path):
    # 4 cells, 2 per array task, 2 tasks at once; each cells task takes a node's 2 CPUs (the share of a
    # training stage of 2 tasks per node), so SLURM places the two tasks on the two nodes, and each runs its
    # 2 cells side by side (sweep.workers=2), as a task on a node with 2 GPUs would run one cell per GPU
    from datetime import datetime

    from tests.test_slurm_chain import launcher, submitted, sweep_args, wait_done

    out = tmp_path / "sweep"
    proc = launcher("sweep", "--cluster", "slurm", "--time", "10", "--tasks-per-node", "2", "--cells-per-task", "2",
                    "--array-parallelism", "2", "--config", str(REPO / "configs" / "demo.yaml"),
                    *sweep_args(demo_store, out, **{"slurm.partition": PARTITION, "sweep.workers": 2,
                                                    "finetune.epochs": 10}))
    ids = submitted(proc.stdout)
    assert "(array of 2)" in proc.stdout, proc.stdout
    wait_done(list(ids.values()))
    text = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ids["cells"], "-o", "JobID,NodeList,Start,End,State"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    tasks = [line.split("|") for line in text.splitlines() if line.strip()]
    assert len(tasks) == 2 and all(t[4] == "COMPLETED" for t in tasks), text
    assert sorted(t[1] for t in tasks) == ["node1", "node2"], f"one task per node: {text}"
    (s0, e0), (s1, e1) = [(datetime.fromisoformat(t[2]), datetime.fromisoformat(t[3])) for t in tasks]
    assert s0 < e1 and s1 < e0, f"the two tasks ran at the same time: {text}"
    logs = sorted((out / "slurm" / "cells").glob(f"{ids['cells']}_*_0_log.out"))
    assert len(logs) == 2, logs
    for log in logs:
        assert "2 cell(s) to run, 2 at a time" in log.read_text(), log.read_text()[-2000:]
    assert (out / "sweep" / "summary.md").is_file()
    assert len({line.split(",")[0] for line in (out / "sweep" / "results.csv").read_text().splitlines()[1:]}) == 4

"""launchers/slurm.py on a real SLURM: one node, 2 tasks (CPU, gloo), submitted with sbatch through submitit.

Start the cluster first with `bash tools/slurm_local.sh start` (.ci/run does); without `sbatch` on PATH or
an answering `sinfo`, every test here is skipped. Accounting is off on that cluster (no sacct), so the
launcher learns that a job ended from submitit's result files, and the tests read the job's state from
`scontrol show job` (slurmctld keeps finished jobs for MinJobAge = 300 s).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from pcl_hpc.engine.loop import REQUEUE_EXIT_CODE
from tests.conftest import REPO
from tests.test_spine import overrides


def _slurm_unavailable() -> str:
    if shutil.which("sbatch") is None:
        return "no SLURM here: sbatch is not on PATH (start one with `bash tools/slurm_local.sh start`)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo does not answer: {err}"
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        return f"sinfo reports no usable node (rc {proc.returncode}: {(proc.stdout + proc.stderr).strip()[:200]})"
    return ""


_UNAVAILABLE = _slurm_unavailable()  # once: sinfo retries for a while when no controller answers
pytestmark = pytest.mark.skipif(bool(_UNAVAILABLE), reason=_UNAVAILABLE or "SLURM is up")


def launch(demo_store, out, env=None, **extra):
    cmd = [sys.executable, str(REPO / "launchers" / "slurm.py"), "pretrain", "--cluster", "slurm",
           "--tasks-per-node", "2", "--timeout-min", "10", "--config", str(REPO / "configs" / "demo.yaml"),
           *overrides(demo_store, out, **extra)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=out, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    except subprocess.TimeoutExpired:
        # the launcher only waits: cancel its job, or it would hold the node for the tests that follow
        for script in (out / "pretrain" / "submitit").glob("*_submission.sh"):
            subprocess.run(["scancel", script.name.split("_")[0]], timeout=30, check=False)
        raise
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    match = re.search(r"submitted pretrain as job (\d+) \(slurm\)", proc.stdout)
    assert match, f"not submitted to SLURM:\n{log[-3000:]}"
    return match.group(1), log


def slurm_job(job_id: str, wait_s: float = 60) -> dict:
    """`scontrol show job` as a dict once the job has ended: slurmctld knows it, so it really ran there.

    submitit's result files appear before the batch script returns, so the job may still be RUNNING
    or COMPLETING for a moment after the launcher has its results.
    """
    deadline = time.monotonic() + wait_s
    while True:
        text = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                              timeout=30, check=True).stdout
        job = dict(field.split("=", 1) for field in text.split() if "=" in field)
        if job["JobState"] not in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED") or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def logged_steps(out):
    return [json.loads(line)["step"] for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def task_logs(out, job_id, task):
    return (out / "pretrain" / "submitit" / f"{job_id}_{task}_log.out").read_text()


def test_slurm_pretrain_two_tasks(demo_store, tmp_path):
    job_id, _ = launch(demo_store, tmp_path, **{"pretrain.max_steps": 1})
    torch.load(tmp_path / "pretrain" / "encoder.pt", weights_only=True)
    assert logged_steps(tmp_path) == [1]
    assert "on 2 process(es)" in task_logs(tmp_path, job_id, 0), "both tasks must have joined one process group"
    assert (tmp_path / "pretrain" / "submitit" / f"{job_id}_1_log.out").exists()
    job = slurm_job(job_id)
    assert job["JobState"] == "COMPLETED" and job["NumTasks"] == "2" and job["NumNodes"] == "1", job
    assert job["Restarts"] == "0" and job["ExitCode"] == "0:0", job


def test_slurm_preempted_job_is_requeued_and_resumes(demo_store, tmp_path):
    # SIGUSR1 reaches rank 1 after step 1: both ranks save step 2 and exit 75; rank 0 runs
    # `scontrol requeue`. The second run resumes after step 2, so the step-1 fault never fires again.
    job_id, _ = launch(demo_store, tmp_path, env={"PCL_HPC_FAULT": "signal:1:1"},
                       **{"pretrain.max_steps": 4, "checkpoint.every_steps": 0})
    torch.load(tmp_path / "pretrain" / "encoder.pt", weights_only=True)
    assert logged_steps(tmp_path) == [1, 2, 3, 4], "each step logged exactly once across the requeue"
    log0 = task_logs(tmp_path, job_id, 0)
    assert f"exit status {REQUEUE_EXIT_CODE}: requeue" in log0 and "resuming from" in log0, log0[-3000:]
    assert "on 2 process(es)" in log0, "the requeued run finished as one 2-process group"
    job = slurm_job(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1" and job["ExitCode"] == "0:0", job

"""launchers/slurm.py on a real SLURM: one node, 2 tasks (CPU, gloo), submitted with sbatch through submitit.

Start the cluster first with `bash tools/slurm_local.sh start` (.ci/run does): slurmctld, slurmd and
slurmdbd on MariaDB, so `sacct` answers as on a real cluster. Without `sbatch` on PATH or an answering
`sinfo` every test here is skipped, except under CI (CI=true), where each one fails instead. The tests
read a job's state and restart count from `scontrol show job` (slurmctld keeps finished jobs for
MinJobAge = 300 s) and its runs from `sacct -D`.

What they check: a job interrupted by its time limit (the SIGUSR1 that SLURM sends signal_delay_s
before it) or by a SIGUSR1 on one rank comes back by itself, as one job, and ends bit-identical to the
same run straight under torchrun, in one MLflow run with each step once (`scontrol requeue` and a lost
rank, killed from outside, are tested over two nodes in tests/test_slurm_multinode.py); a cancelled job
stays cancelled; a job under its time limit is requeued as long as it saves new steps
(more than 3 times at the default settings), while a crash loop (a rank that dies in every run before a
new checkpoint) stops after slurm.max_requeues interruptions in a row without one, with one line whose
command continues it; bad cluster settings fail before anything is queued.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime

import pytest
import torch
from mlflow.tracking import MlflowClient

from pcl_hpc.engine.loop import REQUEUE_EXIT_CODE
from tests.conftest import REPO
from tests.test_spine import overrides

LAUNCHER = str(REPO / "launchers" / "slurm.py")
TINY = {"model.projection_dim": 32}  # with test_spine's sizes (patch 32, width 4, batch 4): ~30 steps/s here


def _slurm_unavailable() -> str:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no SLURM here: sbatch/sinfo are not on PATH (start one with `bash tools/slurm_local.sh start`)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo does not answer: {err}"
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        return f"sinfo reports no usable node (rc {proc.returncode}: {(proc.stdout + proc.stderr).strip()[:200]})"
    return ""


_UNAVAILABLE = _slurm_unavailable()  # once: sinfo retries for a while when no controller answers
_IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(bool(_UNAVAILABLE) and not _IN_CI, reason=_UNAVAILABLE or "SLURM is up")]


@pytest.fixture(autouse=True)
def _slurm_required_in_ci():
    """Under CI a missing SLURM is a failure, not a skip: .ci/run starts one and must not pass without it."""
    if _UNAVAILABLE:
        pytest.fail(f"CI=true but {_UNAVAILABLE}", pytrace=False)
    yield


def queued() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30,
                          check=True).stdout.split()


def launcher_cmd(demo_store, out, *flags, **extra):
    return [sys.executable, LAUNCHER, "pretrain", "--cluster", "slurm", "--tasks-per-node", "2", *flags,
            "--config", str(REPO / "configs" / "demo.yaml"), *overrides(demo_store, out, **{**TINY, **extra})]


def _cancel_jobs_of(out):
    """The launcher only waits: cancel its job, or it would hold the node for the tests that follow."""
    for script in (out / "pretrain" / "submitit").glob("*_submission.sh"):
        subprocess.run(["scancel", script.name.split("_")[0]], timeout=30, check=False)


def launch(demo_store, out, *flags, env=None, timeout=240, expect_rc=0, **extra):
    """Run the launcher to its end; (job id, stdout + stderr, the process)."""
    cmd = launcher_cmd(demo_store, out, *flags, **extra)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=out, check=False,
                              stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    except subprocess.TimeoutExpired:
        _cancel_jobs_of(out)
        raise
    log = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, log[-4000:]
    match = re.search(r"submitted pretrain as job (\d+) \(slurm\)", proc.stdout)
    assert match, f"not submitted to SLURM:\n{log[-3000:]}"
    return match.group(1), log, proc


def launch_in_background(demo_store, out, *flags, env=None, **extra):
    """Start the launcher; (its Popen, the job id) once sbatch answered."""
    proc = subprocess.Popen(launcher_cmd(demo_store, out, *flags, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=out, stdin=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    first = proc.stdout.readline()
    match = re.search(r"submitted pretrain as job (\d+) \(slurm\)", first)
    if not match:
        proc.kill()
        out_text, err_text = proc.communicate()
        raise AssertionError(f"not submitted: {first}{out_text}{err_text}"[-3000:])
    return proc, match.group(1)


def finish(proc, out, timeout):
    try:
        out_text, err_text = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _cancel_jobs_of(out)
        raise
    return proc.returncode, out_text, err_text


def wait_for_steps(out, n, proc, timeout=120):
    """Until metrics.jsonl holds at least n steps (the job is training)."""
    deadline = time.monotonic() + timeout
    path = out / "pretrain" / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "the launcher ended before the job trained"
        time.sleep(0.5)
    raise AssertionError(f"fewer than {n} steps logged after {timeout}s")


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


def sacct_runs(job_id: str) -> list[str]:
    """The states of each run of the job in accounting (`sacct -D`: a requeued run is REQUEUED)."""
    deadline = time.monotonic() + 30
    while True:
        text = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                              text=True, timeout=30, check=True).stdout
        runs = [line.split()[0] for line in text.splitlines() if line.strip()]
        if (runs and runs[-1] not in ("RUNNING", "PENDING", "COMPLETING")) or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def logged_steps(out):
    return [json.loads(line)["step"] for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def task_logs(out, job_id, task):
    return (out / "pretrain" / "submitit" / f"{job_id}_{task}_log.out").read_text()


def mlflow_steps(out) -> list[int]:
    """The steps of the one MLflow run's loss history (asserts there is exactly one run)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return [m.step for m in sorted(client.get_metric_history(runs[0].info.run_id, "loss"), key=lambda m: m.step)]


def straight_run(demo_store, out, **extra):
    """The same config straight under torchrun (2 processes): the reference encoder."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pcl_hpc",
           "pretrain", "--config", str(REPO / "configs" / "demo.yaml"), *overrides(demo_store, out, **{**TINY, **extra})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "pretrain" / "encoder.pt"


def beside(proc, out, make):
    """make() (a reference run) while the launcher's job runs: for speed, the reference uses the cores the job
    leaves idle (its start, its time waiting to be requeued); should make() fail, the job is cancelled."""
    try:
        return make()
    except BaseException:
        proc.kill()
        _cancel_jobs_of(out)
        raise


def assert_same_weights(path_a, path_b):
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bit-identical to the straight run: {different[:5]}"


def assert_each_step_once(out, steps):
    assert logged_steps(out) == list(range(1, steps + 1)), "metrics.jsonl: each step exactly once"
    assert mlflow_steps(out) == list(range(1, steps + 1)), "MLflow: one run, each step logged exactly once"


# ---------------------------------------------------------------- tests


def test_slurm_pretrain_two_tasks(demo_store, tmp_path):
    job_id, _, _ = launch(demo_store, tmp_path, "--timeout-min", "10", **{"pretrain.max_steps": 1})
    torch.load(tmp_path / "pretrain" / "encoder.pt", weights_only=True)
    assert logged_steps(tmp_path) == [1]
    assert "on 2 process(es)" in task_logs(tmp_path, job_id, 0), "both tasks must have joined one process group"
    assert (tmp_path / "pretrain" / "submitit" / f"{job_id}_1_log.out").exists()
    job = slurm_job(job_id)
    assert job["JobState"] == "COMPLETED" and job["NumTasks"] == "2" and job["NumNodes"] == "1", job
    assert job["Restarts"] == "0" and job["ExitCode"] == "0:0", job
    assert sacct_runs(job_id) == ["COMPLETED"], "accounting (slurmdbd) knows the job"
    script = next((tmp_path / "pretrain" / "submitit").glob(f"{job_id}_submission.sh")).read_text()
    assert "#SBATCH --signal=USR1@" in script and "#SBATCH --requeue" in script, script
    status = subprocess.run([sys.executable, LAUNCHER, "status", str(tmp_path)], capture_output=True, text=True,
                            timeout=60, check=False)
    line = next(line for line in status.stdout.splitlines() if line.startswith("pretrain "))
    assert status.returncode == 0 and line.split()[1:4] == [job_id, "COMPLETED", "0"] and " done " in line, status.stdout


def test_slurm_preempted_job_is_requeued_and_resumes(demo_store, tmp_path):
    # SIGUSR1 reaches rank 1 after step 1: both ranks save step 2 and exit 75; the job is still RUNNING,
    # so rank 0 runs `scontrol requeue` (once). The second run resumes after step 2, so the step-1 fault
    # never fires again.
    job_id, _, _ = launch(demo_store, tmp_path, "--time", "10", env={"PCL_HPC_FAULT": "signal:1:1"},
                          **{"pretrain.max_steps": 4, "checkpoint.every_steps": 0})
    torch.load(tmp_path / "pretrain" / "encoder.pt", weights_only=True)
    assert logged_steps(tmp_path) == [1, 2, 3, 4], "each step logged exactly once across the requeue"
    log0 = task_logs(tmp_path, job_id, 0)
    assert f"exit status {REQUEUE_EXIT_CODE}: requeue" in log0 and "resuming from" in log0, log0[-3000:]
    assert f"requeued job {job_id} (restart 1; new checkpoint at step 2)" in log0, log0[-3000:]
    assert "on 2 process(es)" in log0, "the requeued run finished as one 2-process group"
    job = slurm_job(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1" and job["ExitCode"] == "0:0", job
    assert sacct_runs(job_id) == ["REQUEUED", "COMPLETED"]


@pytest.fixture(scope="module")
def straight_400(demo_store, tmp_path_factory):
    return straight_run(demo_store, tmp_path_factory.mktemp("straight400"), **{"pretrain.max_steps": 400})


def test_time_limit_requeues_until_done_bit_identical(demo_store, tmp_path, request):
    # The job's first run sleeps 0.25 s after each step (PCL_HPC_FAULT=slow: the numbers do not change), so
    # its 400 steps take over 100 s, little of it CPU: longer than it takes the 2-minute time limit's SIGUSR1,
    # sent 60-90 s before the end, to come. That run saves at the step after the signal and requeues; the
    # requeued runs are not slowed (the fault fires in a job's first run only) and finish. The job ends by
    # itself, at the default slurm.max_requeues (3): every interruption saved a new step, so none counts
    # towards it. (For speed: a run slowed by sleeping, not 4000 steps of CPU; few steps are left after the
    # signal, so the requeued run mostly ends before a signal of its own; the reference, a straight run, is
    # made while the first run sleeps.)
    steps = 400
    out = tmp_path / "slurm"
    out.mkdir()
    start = time.monotonic()
    proc, job_id = launch_in_background(demo_store, out, env={"PCL_HPC_FAULT": "slow:0.25"}, **{
        "pretrain.max_steps": steps, "slurm.time": 2, "slurm.signal_delay_s": 60})

    def reference_once_the_job_trains():  # its start (to the signal handlers) not slowed by the reference's
        wait_for_steps(out, 1, proc)
        return request.getfixturevalue("straight_400")

    reference = beside(proc, out, reference_once_the_job_trains)
    rc, out_text, err_text = finish(proc, out, timeout=900)
    assert rc == 0, (out_text + err_text)[-4000:]
    wall = time.monotonic() - start
    job = slurm_job(job_id)
    runs = sacct_runs(job_id)
    print(f"time-limit job {job_id}: {wall:.0f} s, {job['Restarts']} restart(s); sacct: {runs}")
    assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) >= 1, job
    assert runs[-1] == "COMPLETED" and runs.count("REQUEUED") == int(job["Restarts"]), runs
    log0 = task_logs(out, job_id, 0)
    err0 = (out / "pretrain" / "submitit" / f"{job_id}_0_log.err").read_text()
    assert "after SIGUSR1" in log0 and "Job not requeued" not in log0 + err0, log0[-3000:]
    requeues = log0.count(f"requeued job {job_id} (restart") + log0.count(f"job {job_id} lost a rank")
    assert requeues == int(job["Restarts"]), "one requeue per interruption"
    noted = json.loads((out / "pretrain" / "requeues.json").read_text())
    assert noted["job"] == job_id and noted["total"] == int(job["Restarts"]) and noted["no_progress"] <= 3, noted
    assert_same_weights(out / "pretrain" / "encoder.pt", reference)
    assert_each_step_once(out, steps)


def test_cancelled_job_stays_cancelled(demo_store, tmp_path):
    # scancel sends SIGTERM too: the ranks save, but the job is CANCELLED, so nobody requeues it.
    proc, job_id = launch_in_background(demo_store, tmp_path, "--time", "10", **{"pretrain.max_steps": 900})
    wait_for_steps(tmp_path, 50, proc)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    rc, out_text, err_text = finish(proc, tmp_path, timeout=120)
    lines = [line for line in err_text.splitlines() if line.strip()]
    assert rc == REQUEUE_EXIT_CODE and len(lines) == 1, out_text + err_text
    assert f"job {job_id} ended CANCELLED" in lines[0] and "continue with:" in lines[0], lines[0]
    assert "checkpoints/step_" in lines[0] and "logs:" in lines[0], lines[0]
    # until 10 s after the job ended (for speed: counted from its end, as the launcher already waited for most
    # of them): longer than a requeued job's hold (cred_expire + 1 s) and a scheduling pass
    ended = datetime.fromisoformat(slurm_job(job_id, wait_s=0)["EndTime"]).timestamp()
    time.sleep(max(0.0, ended + 11 - time.time()))  # EndTime is whole seconds
    job = slurm_job(job_id, wait_s=0)
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", job
    assert job_id not in queued()
    assert "is ending (CANCELLED): not requeued" in task_logs(tmp_path, job_id, 0)


def test_crash_loop_stops_after_max_requeues_with_one_line_that_continues(demo_store, tmp_path):
    # rank 1 exits hard after step 3 in every run (the fault fires in a job's first run only: the job's setup
    # line hides SLURM's restart count from it). Run 1 saved step 2 first: progress, requeued. Runs 2 and 3
    # resume from step 2 and die again before step 4's checkpoint: no new step. With --max-requeues 1 the
    # second of those stops the job (not requeued forever) with one line: its state, the checkpoint, the
    # command that continues it. That command (without the fault) finishes the run.
    job_id, log, proc = launch(demo_store, tmp_path, "--time", "10", "--max-requeues", "1",
                               env={"PCL_HPC_FAULT": "kill:3:1"}, expect_rc=REQUEUE_EXIT_CODE, timeout=360,
                               **{"pretrain.max_steps": 6, "checkpoint.every_steps": 2,
                                  "slurm.setup": "[export SLURM_RESTART_COUNT=0]"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(f"launchers/slurm.py: job {job_id} ended FAILED after 2 restart(s): job {job_id} "
                           f"stopped after 2 interruption(s) without a new checkpoint (slurm.max_requeues=1); "
                           f"checkpoint "), line
    assert "checkpoints/step_000000002 (step 2); continue with: " in line and "; logs: " in line, line
    job = slurm_job(job_id)
    assert job["Restarts"] == "2" and job["JobState"] == "FAILED", job
    log0 = task_logs(tmp_path, job_id, 0)
    assert task_logs(tmp_path, job_id, 1).count("exits hard after step 3") == 3, "the fault fired in every run"
    assert f"job {job_id} lost a rank" in log0 and "requeued it (restart 1; new checkpoint at step 2)" in log0, log0
    assert "requeued it (restart 2; 1 interruption(s) in a row without a new checkpoint, at most 1)" in log0, log0
    assert json.loads((tmp_path / "pretrain" / "requeues.json").read_text()) == {
        "job": job_id, "start_step": 0, "last_step": 2, "total": 3, "no_progress": 2}
    assert job_id not in queued()
    command = line.split("continue with: ", 1)[1].split("; logs:", 1)[0]
    again = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=240, cwd=tmp_path,
                           stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert logged_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert "resuming from" in "".join(p.read_text() for p in (tmp_path / "pretrain" / "submitit").glob("*_0_log.out"))


@pytest.mark.parametrize("flags, says", [
    (["--partition", "nosuchpartition"], "is not a partition of this cluster"),
    (["--gpus-per-node", "1"], "GPU"),
    (["--cpus-per-task", str((os.cpu_count() or 1) + 1)], "CPUs per node"),
    (["--time", "61"], "above partition"),  # tools/slurm_local.sh sets MaxTime=60 minutes
])
def test_bad_cluster_settings_fail_before_submission(demo_store, tmp_path, flags, says):
    before = queued()
    cmd = launcher_cmd(demo_store, tmp_path, *flags)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert says in lines[0] and lines[0].startswith("launchers/slurm.py: error: "), lines[0]
    assert "submitted" not in proc.stdout
    # (a job of an earlier test may still be leaving the queue: only new ids count)
    assert not set(queued()) - set(before), "nothing may be queued"
    newest = subprocess.run(["sacct", "-n", "-X", "-P", "-S", "now-2minutes", "-o", "JobID,JobName,WorkDir"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert str(tmp_path) not in newest, f"a job from this test reached accounting: {newest}"
    assert not list((tmp_path / "pretrain" / "submitit").glob("*_submission.sh"))

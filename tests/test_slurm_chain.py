"""launchers/slurm.py sweep | pipeline | predict | status on the real local SLURM (see tests/test_slurm.py).

What they check: a sweep of 4 cells runs as one job array (%2) with its report after it; one array
task cancelled while it trains (`scancel <array>_<i>`) leaves the report cancelled (afterok) and
`status` shows both; `status --resubmit` submits that task and the report again, the cell resumes
from its checkpoint, and the summary equals a local `pcl-hpc sweep` of the same cells. The pipeline
runs preprocess (an array), merge, pretrain, register, cells and report in dependency order (sacct's
start and end times); run again it submits nothing; predict shards the scans over an array. A
pipeline whose preprocessing meets a broken file stops there: its dependants are cancelled and
`status` shows the file's error line.
"""

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime

import SimpleITK as sitk

from tests.conftest import REPO, cli
from tests.test_slurm import _slurm_required_in_ci, pytestmark  # noqa: F401 - skip / fail as test_slurm does

LAUNCHER = str(REPO / "launchers" / "slurm.py")
CONFIG = str(REPO / "configs" / "demo.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def sweep_args(store, out, **extra):
    values = {"data.store": store, "output_dir": out, "tracking.uri": f"sqlite:///{out / 'mlflow.db'}",
              "data.patch": 32, "model.width": 4, "model.projection_dim": 32, "finetune.batch_size": 8,
              "finetune.epochs": 40, "sweep.pretrain": "[]", "sweep.encoders": "[random]", "sweep.labeled": "[1]",
              "sweep.folds": "[0, 1]", "sweep.seeds": "[0, 1]", "sweep.val_patients": 1, "engine.threads": 1,
              "sweep.workers": 1, "tracking.register_name": "chain", **extra}  # workers=1: one cell per array task
    return [f"{k}={v}" for k, v in values.items()]


def launcher(*args, timeout=300, ok=True, env=None):
    proc = subprocess.run([sys.executable, LAUNCHER, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, stdin=subprocess.DEVNULL, env={**ENV, **(env or {})})
    assert (proc.returncode == 0) == ok, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def submitted(stdout: str) -> dict[str, str]:
    """{step: job id} from the launcher's lines '  <step>  job <id> ...'."""
    return dict(re.findall(r"^  (\S+)\s+job (\d+)", stdout, re.M))


def wait_done(job_ids, timeout=400):
    """Until none of the jobs is queued or running (a dependant that can never run is cancelled by SLURM)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-o", "%i %r", "-j", ",".join(job_ids)], capture_output=True,
                               text=True, timeout=30).stdout
        if not queue.strip():
            return
        time.sleep(2)
    subprocess.run(["scancel", *job_ids], timeout=30)
    raise AssertionError(f"jobs {job_ids} still queued after {timeout}s")


def status(out, *flags, ok=None):
    proc = subprocess.run([sys.executable, LAUNCHER, "status", str(out), *flags], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=ENV)
    assert "Traceback" not in proc.stderr, proc.stderr
    if ok is not None:
        assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def row(text: str, job: str) -> str:
    """The status row of a job (an array: of its first task)."""
    return next(line for line in text.splitlines() if re.match(rf"\S+\s+{re.escape(job)}(_\d+)?\s", line))


def test_sweep_array_cancel_one_task_resubmit_through_status(demo_store, tmp_path, request):
    start = time.monotonic()
    out = tmp_path / "array"
    proc = launcher("sweep", "--cluster", "slurm", "--time", "10", "--array-parallelism", "2", "--config", CONFIG,
                    *sweep_args(demo_store, out))
    ids = submitted(proc.stdout)
    assert list(ids) == ["register", "cells", "report"], proc.stdout
    array = ids["cells"]
    assert "(array of 4)" in proc.stdout and f"status {out}" in proc.stdout
    script = next((out / "slurm" / "cells").glob(f"{array}_submission.sh")).read_text()
    assert "#SBATCH --array=0-3%2" in script and f"--dependency=afterok:{ids['register']}" in script, script
    # For speed: the local sweep of the same cells (the reference) runs beside the array, which leaves a core
    # idle for much of its time (register, the resubmitted task and each report run alone; scheduling passes)
    local, local_log = tmp_path / "local", tmp_path / "local_sweep.log"
    with local_log.open("w") as log:
        ref = subprocess.Popen(cli("sweep", "--config", CONFIG, *sweep_args(demo_store, local, **{"sweep.workers": 2})),
                               stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=ENV)
    request.addfinalizer(ref.kill)  # should the test fail first (a no-op once it ended)
    # cancel task 1 while its cell trains: it saves at the next step, and stays cancelled
    metrics = out / "sweep" / "cells" / "random_M1_f0_s1" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, "task 1's cell never trained"
        time.sleep(0.5)
    subprocess.run(["scancel", f"{array}_1"], check=True, timeout=30)
    wait_done(list(ids.values()))
    first = status(out, ok=False).stdout
    assert "COMPLETED" in row(first, f"{array}_0") and "CANCELLED" in row(first, f"{array}_1"), first
    assert "CANCELLED" in row(first, ids["report"]) and "not run" in row(first, ids["report"]), first
    assert "cells: 1 CANCELLED, 3 COMPLETED" in first and "--resubmit" in first, first
    assert not (out / "sweep" / "summary.md").exists()
    cell_log = (out / "slurm" / "cells" / f"{array}_1_0_log.out").read_text()
    assert "after SIGTERM" in cell_log and "is ending (CANCELLED): not requeued" in cell_log, cell_log[-2000:]

    again = status(out, "--resubmit", ok=True).stdout
    new = submitted(again)
    assert list(new) == ["cells", "report"] and "resubmitting 2 task(s) of cells, report" in again, again
    wait_done(list(new.values()))
    final = status(out, ok=True).stdout
    assert f"{new['cells']} " in final and f"{array}_1 " not in final, "status shows the latest run of each task"
    resumed = (out / "slurm" / "cells" / f"{new['cells']}_0_log.out").read_text()
    assert "resuming from" in resumed, resumed[-2000:]
    array_wall = time.monotonic() - start

    assert ref.wait(timeout=600) == 0, local_log.read_text()[-6000:]
    assert (out / "sweep" / "summary.md").read_text() == (local / "sweep" / "summary.md").read_text()
    print(f"sweep array: {array_wall:.0f} s with one cancel + resubmit; the local sweep beside it ended "
          f"{time.monotonic() - start - array_wall:.0f} s after it")


def _sacct_times(job_ids) -> dict[str, tuple[datetime, datetime]]:
    text = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,Start,End,State"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    times = {}
    for line in text.splitlines():
        jid, start, end, state = line.split("|")
        assert state == "COMPLETED", line
        base = jid.split("_")[0]
        s, e = datetime.fromisoformat(start), datetime.fromisoformat(end)
        old = times.get(base, (s, e))
        times[base] = (min(old[0], s), max(old[1], e))  # an array: its first start, its last end
    return times


def pipeline_args(root, out, **extra):
    return sweep_args(str(root / "store.zarr"), out, **{
        "data.raw_dir": root / "raw", "data.layout": "generic", "data.folds": 3, "sweep.pretrain": "[pcl]",
        "sweep.folds": "[0]", "sweep.seeds": "[0]", "finetune.epochs": 2, "pretrain.max_steps": 20,
        "pretrain.batch_size": 8, "pretrain.epochs": 1, "slurm.array_tasks": 2, **extra})


def test_pipeline_runs_in_dependency_order_then_skips_and_predicts(tmp_path):
    from pcl_hpc.data.demo_data import make_demo_data

    make_demo_data(tmp_path / "raw", spacing=3.0, seed=0)
    out = tmp_path / "exp"
    start = time.monotonic()
    # every training job gets a SIGUSR1 after its step 3 (as before a time limit): each saves, requeues
    # itself once and finishes (the fault fires in the first run only: the second resumes after step 3)
    proc = launcher("pipeline", "--cluster", "slurm", "--time", "10", "--wait", "--config", CONFIG,
                    *pipeline_args(tmp_path, out), timeout=600, env={"PCL_HPC_FAULT": "signal:3:0"})
    wall = time.monotonic() - start
    ids = submitted(proc.stdout)
    order = ["preprocess", "merge", "pretrain-pcl", "register", "cells", "report"]
    assert list(ids) == order, proc.stdout
    for job in (ids["pretrain-pcl"], f"{ids['cells']}_0", f"{ids['cells']}_1"):
        fields = row(proc.stdout, job).split()
        assert fields[2:4] == ["COMPLETED", "1"], f"{job} must have been requeued once: {fields}"
    assert row(proc.stdout, ids["merge"]).split()[2:4] == ["COMPLETED", "0"]
    times = _sacct_times(list(ids.values()))
    for before, after in zip(order, order[1:]):
        assert times[ids[after]][0] >= times[ids[before]][1], f"{after} started before {before} ended: {times}"
    summary = (out / "sweep" / "summary.md").read_text()
    assert "pcl" in summary and "random" in summary
    print(f"pipeline: {wall:.0f} s for {len(ids)} steps")

    again = launcher("pipeline", "--cluster", "slurm", "--config", CONFIG, *pipeline_args(tmp_path, out))
    assert "every stage is complete and current; nothing to submit" in again.stdout, again.stdout

    # predict over the raw scans as an array of 2 shards, with a model the pipeline fine-tuned
    scans = sorted((tmp_path / "raw" / "imagesTr").glob("*.nii.gz"))[:3]
    masks = tmp_path / "masks"
    cell = out / "sweep" / "cells" / "pcl_M1_f0_s0"
    pred = launcher("predict", "--cluster", "slurm", "--array-tasks", "2", "--time", "10", "--wait", "--model",
                    str(cell), "--input", *map(str, scans), "--output", str(masks), "--device", "cpu", timeout=300)
    assert "(array of 2)" in pred.stdout, pred.stdout
    for scan in scans:
        mask = sitk.ReadImage(str(masks / scan.name))
        assert mask.GetSize() == sitk.ReadImage(str(scan)).GetSize()
        assert json.loads((masks / scan.name.replace(".nii.gz", ".json")).read_text())


def test_failing_stage_stops_its_dependants_and_status_shows_why(tmp_path):
    from pcl_hpc.data.demo_data import make_demo_data

    make_demo_data(tmp_path / "raw", spacing=3.0, seed=0)
    broken = tmp_path / "raw" / "imagesTr" / "dk02.nii.gz"
    broken.write_bytes(broken.read_bytes()[:400_000])  # an interrupted copy: truncated
    out = tmp_path / "exp"
    proc = launcher("pipeline", "--cluster", "slurm", "--time", "10", "--wait", "--config", CONFIG,
                    *pipeline_args(tmp_path, out), timeout=300, ok=False)
    ids = submitted(proc.stdout)
    text = proc.stdout
    failed = [line for line in text.splitlines() if line.startswith("preprocess ") and " FAILED " in line]
    assert len(failed) == 1 and "dk02.nii.gz" in failed[0], text
    for step in ("merge", "pretrain-pcl", "register", "cells", "report"):
        assert "CANCELLED" in row(text, ids[step]) and "not run" in row(text, ids[step]), text
    assert "preprocess: 1 COMPLETED, 1 FAILED" in text and "--resubmit" in text, text
    assert not (out / "pretrain" / "pcl" / "metrics.jsonl").exists(), "nothing after the failed stage ran"


def test_bad_settings_of_a_chain_fail_before_anything_is_written(tmp_path):
    # a pretraining asks for more CPUs than the node has: one line, exit 2, no store, no ledger, no job
    out = tmp_path / "exp"
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout.split()
    proc = launcher("pipeline", "--cluster", "slurm", "--tasks-per-node", str((os.cpu_count() or 1) + 1), "--config",
                    CONFIG, *pipeline_args(tmp_path, out), ok=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "CPUs per node" in lines[0], proc.stdout + proc.stderr
    assert not (tmp_path / "store.zarr").exists() and not (out / "slurm").exists()
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout.split()
    assert not set(after) - set(before), "nothing may be queued"

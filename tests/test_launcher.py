"""launchers/slurm.py without a SLURM: submitit's local executor (`--cluster local`: one process per task),
its debug executor (`--cluster debug`: one task in the launcher's process), the slurm: settings and the
checks against a cluster's answers (canned sinfo / scontrol output)."""

import json
import os
import shlex
import subprocess
import sys
import types

import pytest
import torch

from pcl_hpc.config import SlurmConfig, load_config
from pcl_hpc.engine.loop import REQUEUE_EXIT_CODE
from pcl_hpc.errors import UserError
from tests.conftest import REPO
from tests.test_spine import overrides

LAUNCHER = REPO / "launchers" / "slurm.py"


@pytest.fixture(scope="module")
def launcher():
    """The launcher's modules as one namespace (pcl_hpc.launch sets SUBMITIT_PREEMPT_SIGNAL on import: restored after)."""
    before = os.environ.get("SUBMITIT_PREEMPT_SIGNAL")
    from pcl_hpc.launch import cli, cluster, executors, jobs

    if before is None:
        os.environ.pop("SUBMITIT_PREEMPT_SIGNAL", None)
    else:
        os.environ["SUBMITIT_PREEMPT_SIGNAL"] = before
    return types.SimpleNamespace(**{k: getattr(m, k) for m in (cluster, jobs, executors, cli) for k in dir(m)
                                    if not k.startswith("__")})


def run_launcher(*args, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, str(LAUNCHER), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def logged_steps(out):
    return [json.loads(line)["step"] for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def test_local_submitit_pretrain_two_tasks(demo_store, tmp_path):
    proc = run_launcher("pretrain", "--cluster", "local", "--tasks-per-node", "2", "--config",
                        str(REPO / "configs" / "demo.yaml"), *overrides(demo_store, tmp_path, **{"pretrain.max_steps": 1}),
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished" in proc.stdout
    torch.load(tmp_path / "pretrain" / "encoder.pt", weights_only=True)
    assert logged_steps(tmp_path)[-1] == 1
    logs = "".join(p.read_text() for p in (tmp_path / "pretrain" / "submitit").glob("*_0_log.out"))
    assert "on 2 process(es)" in logs, "both submitit tasks must have joined one process group"


@pytest.mark.slow
def test_local_stop_gives_one_line_whose_command_continues(demo_store, tmp_path):
    # SIGUSR1 on rank 1 after step 1: both local tasks save step 2 and exit 75 (no SLURM to requeue them):
    # the launcher says so in one line, with the command that continues; that command finishes the run.
    args = ["pretrain", "--cluster", "local", "--tasks-per-node", "2", "--config", str(REPO / "configs" / "demo.yaml"),
            *overrides(demo_store, tmp_path, **{"pretrain.max_steps": 4, "checkpoint.every_steps": 0})]
    proc = run_launcher(*args, cwd=tmp_path, env={"PCL_HPC_FAULT": "signal:1:1"})
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(lines) == 1 and "checkpoint" in lines[0] and "(step 2)" in lines[0], proc.stderr
    command = lines[0].split("continue with: ", 1)[1].split("; logs:", 1)[0]
    again = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=600, cwd=tmp_path,
                           stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert logged_steps(tmp_path) == [1, 2, 3, 4], "each step once across the stop and the continuation"


def test_debug_cluster_runs_in_this_process(demo_store, tmp_path):
    proc = run_launcher("pretrain", "--cluster", "debug", "--config", str(REPO / "configs" / "demo.yaml"),
                        *overrides(demo_store, tmp_path, **{"pretrain.max_steps": 1}), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(debug)" in proc.stdout and "finished" in proc.stdout and "on 1 process(es)" in proc.stdout
    torch.load(tmp_path / "pretrain" / "encoder.pt", weights_only=True)


@pytest.mark.parametrize("flags, says", [
    (["--cluster", "debug", "--tasks-per-node", "2"], "--cluster debug runs one task"),
    (["--cluster", "local", "--nodes", "2"], "--cluster local runs on one node"),
    (["--cluster", "local", "slurm.mem=16Q"], "is not a SLURM memory size"),
    (["slurm.cluster=cloud"], "slurm.cluster='cloud' is not allowed"),
])
def test_launcher_refuses_what_cannot_run(tmp_path, flags, says):
    proc = run_launcher("pretrain", "--config", str(REPO / "configs" / "demo.yaml"), f"output_dir={tmp_path}", *flags,
                        cwd=tmp_path, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr
    assert "submitted" not in proc.stdout and not (tmp_path / "pretrain" / "submitit").exists()


def test_launcher_rejects_bad_config(tmp_path):
    cmd = [sys.executable, str(LAUNCHER), "pretrain", "--config", str(tmp_path / "none.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "none.yaml" in proc.stderr


def test_flags_win_over_the_slurm_section(launcher, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("slurm:\n  time: 30\n  partition: cpu\n  setup: [module load x]\n")
    args = launcher.build_parser().parse_intermixed_args(
        ["pretrain", "--config", str(config), "slurm.time=5", "slurm.qos=high", "--time", "7", "--mem", "16G",
         "--setup", "source a b", "--exclusive"])
    cfg = load_config(args.config, args.overrides + launcher.flag_overrides(args))
    s = cfg.slurm
    assert (s.time, s.partition, s.qos, s.mem, s.setup, s.exclusive) == (7, "cpu", "high", "16G", ["source a b"], True)
    assert launcher.CLUSTERS == next(f for f in SlurmConfig.__dataclass_fields__.values()
                                     if f.name == "cluster").metadata["choices"]


def test_sbatch_script_asks_for_the_stepguard_signal(launcher, tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    s = load_config(None, ["slurm.time=2", "slurm.signal_delay_s=60", "slurm.partition=gpu", "slurm.gpus_per_node=4",
                           "slurm.mem=16G", "slurm.setup=[module load cuda]"]).slurm
    script = _make_sbatch_string(command="run", folder=tmp_path, **launcher.slurm_parameters(s, "job"))
    for line in ("#SBATCH --signal=USR1@60", "#SBATCH --requeue", "#SBATCH --time=2", "#SBATCH --partition=gpu",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --mem=16G", "export SUBMITIT_PREEMPT_SIGNAL=USR1",
                 "module load cuda"):
        assert line in script, script
    assert "USR2" not in script


def test_time_memory_and_gres_parsing(launcher):
    assert launcher.slurm_minutes("1-00:00:00") == 1440 and launcher.slurm_minutes("01:00:00") == 60
    assert launcher.slurm_minutes("90") == 90 and launcher.slurm_minutes("2-12") == 3600
    assert launcher.slurm_minutes("UNLIMITED") is None and launcher.slurm_minutes("INFINITE") is None
    assert launcher.mem_mb("16G") == 16384 and launcher.mem_mb("512M") == 512 and launcher.mem_mb("2048") == 2048
    assert launcher.gpus_in_gres("gpu:a100:4(S:0-1),gpu:v100:2") == 6 and launcher.gpus_in_gres("(null)") == 0
    assert launcher.parse_oneliner("NodeName=n1 CPUTot=64 TRES=cpu=64,mem=1T")["TRES"] == "cpu=64,mem=1T"


SINFO = "gpu\ncpu\n"
PARTITIONS = ("PartitionName=gpu AllowGroups=ALL Default=NO MaxTime=2-00:00:00 Nodes=g[1-2] State=UP TotalNodes=2\n"
              "PartitionName=cpu AllowGroups=ALL Default=YES MaxTime=04:00:00 Nodes=c1 State=UP TotalNodes=1\n")
NODES = ("NodeName=g1 Arch=x86_64 CPUTot=32 AvailableFeatures=a100,ib Gres=gpu:a100:4(S:0-1) OS=Linux 6.1 #1 SMP "
         "RealMemory=256000 Partitions=gpu State=IDLE\n"
         "NodeName=g2 Arch=x86_64 CPUTot=32 AvailableFeatures=a100,ib Gres=gpu:a100:4 RealMemory=256000 Partitions=gpu "
         "State=IDLE\n"
         "NodeName=c1 Arch=x86_64 CPUTot=16 AvailableFeatures=(null) Gres=(null) RealMemory=64000 Partitions=cpu "
         "State=IDLE\n")


@pytest.fixture
def fake_cluster(launcher, monkeypatch):
    answers = {("sinfo",): SINFO, ("scontrol", "-o", "show", "partition"): PARTITIONS,
               ("scontrol", "-o", "show", "node"): NODES, ("sacctmgr",): "normal\nhigh\n"}

    def fake_run(cmd, timeout=30):
        for prefix, text in answers.items():
            if tuple(cmd[:len(prefix)]) == prefix:
                return types.SimpleNamespace(returncode=0, stdout=text, stderr="")
        raise AssertionError(f"unexpected command {cmd}")

    monkeypatch.setattr(sys.modules["pcl_hpc.launch.cluster"], "_run", fake_run)  # where check_cluster asks
    return launcher


@pytest.mark.parametrize("settings, says", [
    (["slurm.partition=big"], "slurm.partition='big' is not a partition of this cluster (sinfo lists: cpu, gpu)"),
    (["slurm.partition=gpu", "slurm.gpus_per_node=8"], "have at most 4 GPU(s)"),
    (["slurm.gpus_per_node=1"], "partition cpu have at most 0 GPU(s)"),  # the default partition
    (["slurm.partition=gpu", "slurm.tasks_per_node=4", "slurm.cpus_per_task=16"], "64 CPUs per node"),
    (["slurm.time=300"], "above partition cpu's MaxTime of 240 minutes"),
    (["slurm.partition=gpu", "slurm.nodes=3"], "partition gpu has 2 node(s)"),
    (["slurm.partition=gpu", "slurm.mem=300G"], "at most 256000 MB"),
    (["slurm.partition=gpu", "slurm.constraint=a100&h100"], "no node of partition gpu has the feature 'h100'"),
    (["slurm.qos=urgent"], "slurm.qos='urgent' is not known"),
])
def test_cluster_checks_refuse_with_one_line(fake_cluster, settings, says):
    with pytest.raises(UserError) as err:
        fake_cluster.check_cluster(load_config(None, settings).slurm)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_cluster_checks_pass_what_fits(fake_cluster):
    for settings in ([], ["slurm.partition=gpu", "slurm.nodes=2", "slurm.tasks_per_node=4", "slurm.gpus_per_node=4",
                          "slurm.cpus_per_task=8", "slurm.time=2880", "slurm.mem=200G", "slurm.constraint=a100&ib",
                          "slurm.qos=high"]):
        fake_cluster.check_cluster(load_config(None, settings).slurm)


@pytest.mark.slow
def test_slurm_tests_fail_in_ci_without_slurm(tmp_path):
    """tests/test_slurm.py skips without sbatch/sinfo, but fails under CI=true (CI must not pass without SLURM)."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)  # no sbatch, no sinfo
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_slurm.py", "-k", "two_tasks"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert plain.returncode == 0 and "1 skipped" in plain.stdout, plain.stdout[-2000:]
    ci = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env={**env, "CI": "true"})
    assert ci.returncode == 1 and "CI=true but no SLURM here" in ci.stdout, ci.stdout[-2000:]
    assert "skipped" not in ci.stdout.splitlines()[-1], ci.stdout[-2000:]


def save_checkpoint_at(folder, step):
    """What the requeue bookkeeping reads of a stage's checkpoints: `latest` naming a step_* folder."""
    ckpt = folder / "checkpoints" / f"step_{step:09d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints" / "latest").write_text(ckpt.name)


def test_checkpoint_only_returns_the_resubmission(launcher, monkeypatch, tmp_path):
    """submitit calls checkpoint() inside its SIGUSR1 handler (outside the training loop): it returns the job
    itself to requeue, saves and sends nothing, while the interruptions save new steps; past slurm.max_requeues
    interruptions in a row without one it raises JobStopped with the one line (not requeued)."""
    import submitit

    stage = tmp_path / "pretrain"
    job = launcher.StageJob("pretrain", ["pretrain", "--config", "configs/demo.yaml", "pretrain.max_steps=2"],
                            str(stage), max_requeues=1,
                            continue_command="python launchers/slurm.py pretrain --config configs/demo.yaml")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    launcher.Interruptions.started(stage, "42", launcher.checkpoint_step(stage))  # the job starts: no checkpoint
    for step in (10, 20, 20, 30, 30):  # progress, progress, none (1 <= max_requeues), progress, none
        save_checkpoint_at(stage, step)
        again = job.checkpoint()
        assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function is job
    with pytest.raises(launcher.JobStopped) as stopped:  # a second interruption in a row at step 30
        job.checkpoint()
    assert str(stopped.value) == (
        f"job 42 stopped after 2 interruption(s) without a new checkpoint (slurm.max_requeues=1); checkpoint "
        f"{stage / 'checkpoints' / 'step_000000030'}; continue with: python launchers/slurm.py pretrain --config "
        f"configs/demo.yaml")
    assert json.loads((stage / "requeues.json").read_text()) == {
        "job": "42", "start_step": 0, "last_step": 30, "total": 6, "no_progress": 2}


def test_interruptions_count_those_without_a_new_step_in_a_row(launcher, tmp_path):
    """The progress bookkeeping of a training stage (<stage folder>/requeues.json): an interruption whose latest
    checkpoint step is the one of the previous interruption (or of the job's start) counts as no progress; one
    with another step (a new checkpoint; or a lower one, after --no-resume set the old ones aside) resets the
    count; another job id starts a new record."""
    book, folder = launcher.Interruptions, tmp_path / "stage"
    assert launcher.checkpoint_step(folder) == 0
    save_checkpoint_at(folder, 100)
    assert launcher.checkpoint_step(folder) == 100
    start = book.started(folder, "7", launcher.checkpoint_step(folder))  # continued from step 100
    assert (start.start_step, start.last_step, start.total, start.no_progress) == (100, 100, 0, 0)
    assert book.started(folder, "7", 500) == start, "a restarted run keeps the job's record"
    seen = [(r.total, r.no_progress, r.last_step) for r in (book.note(folder, "7", s) for s in
                                                              (100, 100, 150, 150, 150, 40, 151))]
    assert seen == [(1, 1, 100), (2, 2, 100), (3, 0, 150), (4, 1, 150), (5, 2, 150), (6, 0, 40), (7, 0, 151)]
    assert book.load(folder, "7").total == 7 and book.load(folder, "8") is None
    other = book.note(folder, "8", 151)  # a job whose start was not noted compares with step 0
    assert (other.start_step, other.total, other.no_progress, other.last_step) == (0, 1, 0, 151)
    assert book.load(folder, "7") is None, "one job's record per stage folder"

    job = launcher.StageJob("pretrain", ["pretrain"], str(folder), max_requeues=0)
    save_checkpoint_at(folder, 151)
    assert job.note_interruption("8") == ("", "job 8 stopped after 1 interruption(s) without a new checkpoint "
                                              "(slurm.max_requeues=0)")
    save_checkpoint_at(folder, 160)
    assert job.note_interruption("8") == ("restart 3; new checkpoint at step 160", ""), "max_requeues=0: progress"
    job.max_requeues = 2
    assert job.note_interruption("8") == ("restart 4; 1 interruption(s) in a row without a new checkpoint, "
                                          "at most 2", "")


def test_requeue_bounds_of_command_jobs_and_the_safety_total(launcher, monkeypatch, tmp_path):
    """A command job (no checkpoint step): a plain total of COMMAND_REQUEUES x max_requeues requeues, counted by
    SLURM (SLURM_RESTART_COUNT). A training stage that keeps saving new steps stops at MAX_INTERRUPTIONS in all;
    submitit's own timeout count is only that safety total (it no longer caps a progressing job)."""
    import submitit

    job = launcher.CommandJob("report", ["sweep", "--step", "report"], max_requeues=1, continue_command="again")
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(launcher.COMMAND_REQUEUES - 1))
    assert job.note_interruption("9") == (f"restart 10 of at most {launcher.COMMAND_REQUEUES}", "")
    assert isinstance(job.checkpoint(), submitit.helpers.DelayedSubmission)
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(launcher.COMMAND_REQUEUES))
    with pytest.raises(launcher.JobStopped, match=r"^job 9 stopped after 10 requeue\(s\) \(a command job is requeued "
                       r"at most 10 x slurm.max_requeues=1 times\); continue with: again$"):
        job.checkpoint()
    assert job.stopped.startswith("job 9 stopped after 10 requeue(s)")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    zero = launcher.CommandJob("report", ["sweep"], max_requeues=0)
    assert zero.note_interruption("9") == ("", "job 9 stopped after 0 requeue(s) (a command job is requeued at "
                                               "most 10 x slurm.max_requeues=0 times)")

    stage = launcher.StageJob("pretrain", ["pretrain"], str(tmp_path), max_requeues=3)
    launcher.Interruptions("5", total=launcher.MAX_INTERRUPTIONS - 1, last_step=10).save(tmp_path)
    save_checkpoint_at(tmp_path, 20)
    assert stage.note_interruption("5")[0].startswith(f"restart {launcher.MAX_INTERRUPTIONS}; new checkpoint")
    save_checkpoint_at(tmp_path, 30)
    assert stage.note_interruption("5") == ("", f"job 5 stopped after {launcher.MAX_INTERRUPTIONS + 1} "
                                                f"interruptions (at most {launcher.MAX_INTERRUPTIONS} in all)")
    s = load_config(None, ["slurm.max_requeues=2"]).slurm
    assert launcher.make_executor("slurm", tmp_path / "logs", s, "job").max_num_timeout == launcher.MAX_INTERRUPTIONS


@pytest.mark.gpu
def test_sweep_steps_on_gpu_nodes_pack_one_cell_per_gpu(launcher, tmp_path):
    """What a GPU cluster gets (no GPU here, so only the plan and the #SBATCH settings are checked): with 4
    GPUs per node each cells task holds at least 4 cells (the cells command runs one per visible GPU side by
    side); register and report ask for none; a training stage keeps the slurm: section's."""
    from pcl_hpc.sweep import sweep_plan

    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [
        f"output_dir={tmp_path}", "sweep.pretrain=[pcl]", "sweep.encoders=[random]", "sweep.labeled=[1, 2]",
        "sweep.folds=[0, 1, 2]", "sweep.seeds=[0]", "slurm.gpus_per_node=4", "slurm.tasks_per_node=4",
        "slurm.cpus_per_task=8", "slurm.cells_per_task=1"])
    steps = sweep_plan(cfg, "c.yaml", upstream=["merge"])
    assert [s.name for s in steps] == ["pretrain-pcl", "register", "cells", "report"]
    cells = steps[2]
    assert len(cells.tasks) == 3 and all(len(t.cells) == 4 for t in cells.tasks), cells.tasks  # 12 cells
    assert sorted(c for t in cells.tasks for c in t.cells) == sorted(
        f"{e}_M{m}_f{f}_s0" for e in ("pcl", "random") for m in (1, 2) for f in (0, 1, 2))
    assert all(t.argv == ["sweep", "--step", "cells", "--shard", f"{i}/3", "--config", "c.yaml"]
               for i, t in enumerate(cells.tasks))
    assert steps[0].after == ["merge"] and cells.after == ["register"] and steps[3].after == ["cells"]
    on = {kind: launcher.step_settings(cfg.slurm, kind) for kind in ("stage", "cells", "single", "predict")}
    assert (on["stage"].tasks_per_node, on["stage"].gpus_per_node) == (4, 4)
    assert (on["cells"].tasks_per_node, on["cells"].gpus_per_node, on["cells"].cpus_per_task) == (1, 4, 32)
    assert (on["single"].gpus_per_node, on["predict"].gpus_per_node) == (0, 1)
    params = launcher.slurm_parameters(on["cells"], "cells")
    assert params["gpus_per_node"] == 4 and params["ntasks_per_node"] == 1


def _steps(steps) -> list:
    return [(s.name, s.kind, s.after, [(t.shard, t.argv, t.cells) for t in s.tasks]) for s in steps]


def test_slurm_chain_and_local_runner_run_the_same_plan(launcher, demo_store, tmp_path, monkeypatch):
    """For the same config the SLURM chain submits exactly the steps and commands the local runner
    (`pcl-hpc sweep`) runs: one plan, two runners. With the pretraining and the random cells finished,
    both leave out the same tasks. (The commands are recorded, not run: each is tested on its own.)"""
    import pcl_hpc.engine.harness as harness
    import pcl_hpc.plan as plan_module
    from pcl_hpc import sweep

    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [
        f"output_dir={tmp_path}", f"data.store={demo_store}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
        "sweep.pretrain=[pcl]", "sweep.encoders=[random]", "sweep.labeled=[1]", "sweep.folds=[0, 1]",
        "sweep.seeds=[0]", "sweep.val_patients=1", "sweep.workers=1", "slurm.cluster=local"])
    ran = []

    def record(argv, processes):
        ran.append((argv, processes))
        if argv[:3] == ["sweep", "--step", "report"]:
            (sweep.folder(cfg) / "summary.md").write_text("summary\n")
        return 0

    def compare(expected_names, expected_tasks):
        ran.clear()
        submitted = launcher.chain_steps("sweep", cfg, "local")
        assert [s.name for s in submitted] == expected_names
        assert [len(s.tasks) for s in submitted] == expected_tasks
        sweep.sweep(cfg)
        # the same commands; the cells array runs as one process here (its tasks' shards joined: one pool)
        assert [argv for argv, _ in ran] == [a for s in submitted for a in s.commands()]
        assert [p for _, p in ran] == [2 if s.kind == "stage" else 1 for s in submitted for _ in s.commands()]
        cells = next(s for s in submitted if s.name == "cells")
        shards = ",".join(t.shard for t in cells.tasks)
        assert cells.commands() == [["sweep", "--step", "cells", "--shard", shards, *cells.tasks[0].argv[5:]]]
        return submitted

    monkeypatch.setattr(plan_module, "_run_process", record)
    first = compare(["pretrain-pcl", "register", "cells", "report"], [1, 1, 4, 1])  # 4 cells, 1 per task (workers=1)
    assert first[2].after == ["register"] and first[0].kind == "stage" and first[2].kind == "cells"

    (sweep.folder(cfg) / "summary.md").unlink()
    monkeypatch.setattr(harness, "is_complete", lambda stage: True)  # the pretraining finished
    monkeypatch.setattr(sweep, "_registered", lambda cfg: True)
    monkeypatch.setattr(sweep, "is_cell_complete", lambda cfg, cell, manifest: cell.encoder == "random")
    later = compare(["cells", "report"], [2, 1])
    assert all(c.startswith("pcl_") for t in later[0].tasks for c in t.cells) and later[0].after == []

"""Exact resume: 2N steps straight == N steps + interruption + resume for N more, bit for bit.

Single process, signals and kills sent from outside (this test process): SIGTERM to a running
`pcl-hpc pretrain` exits 75 and the rerun is bit-identical; SIGKILL between two checkpoints re-runs
the lost steps, and metrics.jsonl and MLflow hold each step once; stopping at N with
pretrain.schedule_steps=2N and continuing to 2N equals a straight 2N run.

2 real processes (torchrun, gloo), augmentation on (seeded per batch: in the DDP case a loader
worker of each rank augments, in the DeepSpeed case the trainer does), bf16 autocast where this CPU has it. DDP: a rank dies hard after step N and torchrun --max-restarts
restarts the group from the checkpoint. DeepSpeed (ZeRO 1): SIGUSR1 on one rank, every rank saves at
the next step boundary, the job exits with the requeue status, and starting it again finishes it.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pcl_hpc.engine.checkpoint import latest_checkpoint
from pcl_hpc.engine.loop import REQUEUE_EXIT_CODE
from tests.conftest import REPO, cli

STEPS = 4  # 2N with N = 2


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('resume_db') / 'mlflow.db'}"


def pretrain(store, out, db, strategy, extra=(), env=None, max_restarts=0):
    args = [f"data.store={store}", "data.patch=32", f"output_dir={out}", "model.width=4", "model.projection_dim=32",
            f"pretrain.max_steps={STEPS}", "pretrain.batch_size=4", "pretrain.log_every=1", "pretrain.augment=true",
            "pretrain.warmup_steps=1", f"tracking.uri={db}", "tracking.register_name=resume-test",
            "checkpoint.every_steps=2", f"engine.strategy={strategy}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", "-m", "pcl_hpc", "pretrain", "--config",
           str(REPO / "configs" / "demo.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def final_weights(out, strategy):
    folder = latest_checkpoint(out / "pretrain")
    assert folder is not None and folder.name == f"step_{STEPS:09d}"
    if strategy == "ddp":
        return torch.load(folder / "train_state.pt", weights_only=True)["model"]
    # DeepSpeed's own file (pickled by DeepSpeed, hence weights_only=False here)
    return torch.load(folder / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def assert_identical(a, b, out_a, out_b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    enc_a = torch.load(out_a / "pretrain" / "encoder.pt", weights_only=True)
    enc_b = torch.load(out_b / "pretrain" / "encoder.pt", weights_only=True)
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)


def logged_steps(out):
    return [json.loads(line)["step"] for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_kill_and_torchrun_restart_is_exact(demo_store, tmp_path, mlflow_db):
    extra = ["engine.grad_accum=2", "engine.grad_clip=1.0", "data.num_workers=1"]
    straight = pretrain(demo_store, tmp_path / "a", mlflow_db, "ddp", extra)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    crashed = pretrain(demo_store, tmp_path / "b", mlflow_db, "ddp", extra, max_restarts=1,
                       env={"PCL_HPC_FAULT": "kill:2:0"})
    log = crashed.stdout + crashed.stderr
    assert crashed.returncode == 0, log[-4000:]
    assert "exits hard after step 2" in log and "resuming from" in log
    assert logged_steps(tmp_path / "b") == [1, 2, 3, 4]
    assert_identical(final_weights(tmp_path / "a", "ddp"), final_weights(tmp_path / "b", "ddp"),
                     tmp_path / "a", tmp_path / "b")
    # keep=3 by default: steps 2 and 4 are both kept, and `latest` names the last
    assert sorted(p.name for p in (tmp_path / "b" / "pretrain" / "checkpoints").glob("step_*")) == \
        ["step_000000002", "step_000000004"]


@pytest.mark.slow
def test_deepspeed_zero2_signal_requeue_and_resume_is_exact(demo_store, tmp_path, mlflow_db):
    extra = ["engine.zero_stage=2", "checkpoint.every_steps=0"]
    straight = pretrain(demo_store, tmp_path / "a", mlflow_db, "deepspeed", extra)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    # SIGUSR1 reaches rank 1 after step 1: both ranks save step 2 and exit with the requeue status
    stopped = pretrain(demo_store, tmp_path / "b", mlflow_db, "deepspeed", extra, env={"PCL_HPC_FAULT": "signal:1:1"})
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and f"exitcode  : {REQUEUE_EXIT_CODE}" in log, log[-4000:]
    assert latest_checkpoint(tmp_path / "b" / "pretrain").name == "step_000000002"
    assert not (tmp_path / "b" / "pretrain" / "encoder.pt").exists()
    resumed = pretrain(demo_store, tmp_path / "b", mlflow_db, "deepspeed", extra)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert logged_steps(tmp_path / "b") == [1, 2, 3, 4]
    assert_identical(final_weights(tmp_path / "a", "deepspeed"), final_weights(tmp_path / "b", "deepspeed"),
                     tmp_path / "a", tmp_path / "b")


def test_finetune_preempted_then_resumed_matches_straight_run(demo_store, tmp_path, mlflow_db, monkeypatch):
    """In-process: SIGUSR1 during the first validation; the run saves at the next step and exits 75."""
    from pcl_hpc import evaluate
    from pcl_hpc.config import load_config
    from pcl_hpc.engine.loop import Preempted
    from pcl_hpc.train import finetune as ft

    def config(out):
        return load_config(str(REPO / "configs" / "demo.yaml"), [
            f"data.store={demo_store}", "data.patch=32", "model.width=4", f"tracking.uri={mlflow_db}",
            f"output_dir={out}", "finetune.epochs=2", "finetune.batch_size=8", "finetune.train_volumes=[dk01]",
            "finetune.val_volumes=[dk04]", "finetune.test_volumes=[dk05]"])

    straight = ft.finetune(config(tmp_path / "a"))
    calls = []

    def validate_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), __import__("signal").SIGUSR1)
        return evaluate.score_volumes(*args, **kwargs)

    monkeypatch.setattr(ft, "score_volumes", validate_then_signal)  # the per-epoch validation
    with pytest.raises(Preempted) as stop:
        ft.finetune(config(tmp_path / "b"))
    assert stop.value.code == REQUEUE_EXIT_CODE and not (tmp_path / "b" / "finetune" / "random_M1" / "model.pt").exists()
    monkeypatch.undo()
    resumed = ft.finetune(config(tmp_path / "b"))
    for name in ("model_last.pt", "model.pt"):
        a = torch.load(tmp_path / "a" / "finetune" / "random_M1" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / "finetune" / "random_M1" / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["mean"] == straight["mean"] and resumed["best_val_dice"] == straight["best_val_dice"]


# -- one process, interrupted from outside -----------------------------------------------------------

SOLO = ["data.patch=32", "model.width=4", "model.projection_dim=32", "pretrain.batch_size=8", "pretrain.log_every=1",
        "pretrain.augment=true", "pretrain.warmup_steps=2", "tracking.register_name=resume-solo", "engine.precision=fp32"]


def solo_cmd(store, out, db, *extra):
    return [*cli("pretrain", "--config", str(REPO / "configs" / "demo.yaml")), f"data.store={store}",
            f"output_dir={out}", f"tracking.uri={db}", *SOLO, *extra]


def solo(store, out, db, *extra):
    proc = subprocess.run(solo_cmd(store, out, db, *extra), capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def interrupt(store, out, db, sig, at_step, *extra):
    """Start a pretraining, send `sig` from here once step `at_step` is logged; (exit code, output)."""
    proc = subprocess.Popen(solo_cmd(store, out, db, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    metrics, deadline = out / "pretrain" / "metrics.jsonl", time.monotonic() + 240
    try:
        while not (metrics.is_file() and at_step in logged_steps(out)):
            assert proc.poll() is None, "the run ended before it was interrupted: " + proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output


def encoder(out):
    return torch.load(out / "pretrain" / "encoder.pt", weights_only=True)


def assert_same_encoder(a, b):
    ea, eb = encoder(a), encoder(b)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea), "encoders differ"


@pytest.mark.slow
def test_external_sigterm_exits_75_and_resume_is_exact(demo_store, tmp_path, mlflow_db):
    steps = ["pretrain.max_steps=30"]
    solo(demo_store, tmp_path / "a", mlflow_db, *steps)
    code, output = interrupt(demo_store, tmp_path / "b", mlflow_db, signal.SIGTERM, 3, *steps)
    assert code == REQUEUE_EXIT_CODE, output[-3000:]
    assert "after SIGTERM" in output and "Traceback" not in output
    stopped_at = int(latest_checkpoint(tmp_path / "b" / "pretrain").name.split("_")[1])
    assert 3 <= stopped_at < 30 and not (tmp_path / "b" / "pretrain" / "encoder.pt").exists()
    resumed = solo(demo_store, tmp_path / "b", mlflow_db, *steps)
    assert "resuming from" in resumed.stdout and f"(step {stopped_at})" in resumed.stdout
    assert logged_steps(tmp_path / "b") == list(range(1, 31))
    assert_same_encoder(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_sigkill_between_checkpoints_reruns_lost_steps_once(demo_store, tmp_path):
    from mlflow import MlflowClient

    db = f"sqlite:///{tmp_path / 'kill.db'}"
    steps = ["pretrain.max_steps=40", "checkpoint.every_steps=10", "tracking.experiment=kill-test"]
    solo(demo_store, tmp_path / "a", f"sqlite:///{tmp_path / 'straight.db'}", *steps)
    code, output = interrupt(demo_store, tmp_path / "b", db, signal.SIGKILL, 12, *steps)
    assert code == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "b" / "pretrain").name == "step_000000010", "killed after a checkpoint"
    lost = [s for s in logged_steps(tmp_path / "b") if s > 10]
    assert lost, "steps after the checkpoint were logged before the kill"
    resumed = solo(demo_store, tmp_path / "b", db, *steps)
    assert "(step 10)" in resumed.stdout
    assert logged_steps(tmp_path / "b") == list(range(1, 41)), "each step once in metrics.jsonl"
    assert_same_encoder(tmp_path / "a", tmp_path / "b")
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("kill-test").experiment_id])
    assert len(runs) == 1, "the resumed run continues the killed one"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 41)), "each step once in MLflow"


@pytest.mark.slow
def test_stop_at_n_then_continue_to_2n_with_schedule_steps_is_exact(demo_store, tmp_path, mlflow_db):
    solo(demo_store, tmp_path / "a", mlflow_db, "pretrain.max_steps=8")
    solo(demo_store, tmp_path / "b", mlflow_db, "pretrain.max_steps=4", "pretrain.schedule_steps=8")
    lr_at_4 = [json.loads(line) for line in (tmp_path / "b" / "pretrain" / "metrics.jsonl").read_text().splitlines()][-1]
    assert lr_at_4["step"] == 4 and lr_at_4["lr"] > 0
    solo(demo_store, tmp_path / "b", mlflow_db, "pretrain.max_steps=8", "pretrain.schedule_steps=8")
    assert_same_encoder(tmp_path / "a", tmp_path / "b")
    assert logged_steps(tmp_path / "b") == list(range(1, 9))
    straight = [json.loads(line)["lr"] for line in (tmp_path / "a" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line)["lr"] for line in (tmp_path / "b" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert straight == resumed and min(straight[:-1]) > 0, "the schedule never ran at lr 0 before its end"

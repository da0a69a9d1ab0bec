"""Exact resume: 2N steps straight == N steps + interruption + resume for N more, bit for bit.

Single process, signals and kills sent from outside (this test process): SIGTERM to a running
`pcl-hpc pretrain` exits 75 and the rerun is bit-identical; SIGKILL between two checkpoints re-runs
the lost steps, and metrics.jsonl and MLflow hold each step once; stopping at N with
pretrain.schedule_steps=2N and continuing to 2N equals a straight 2N run.

2 real processes (torchrun, gloo), augmentation on (seeded per batch: in the DDP case a loader
worker of each rank augments, in the DeepSpeed case the trainer does), bf16 autocast where this CPU has it. DDP: a rank dies hard after step N and torchrun --max-restarts
restarts the group from the checkpoint. DeepSpeed (ZeRO 1): SIGUSR1 on one rank, every rank saves at
the next step boundary, the job exits with the requeue status, and starting it again finishes it.

Corrupt checkpoints: garbage in the newest checkpoint and a truncated file in the one before (DDP, 2
processes): the rerun names both in one line, moves them to checkpoints/corrupt/, resumes from the
older one and ends bit-identical. One process: a digest mismatch is skipped (DeepSpeed's own files
too), checkpoints without digests still load, all-corrupt is one line, pruning spares the resumed one.
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


DDP_EXTRA = ["engine.grad_accum=2", "engine.grad_clip=1.0", "data.num_workers=1"]


@pytest.fixture(scope="module")
def ddp_straight(demo_store, tmp_path_factory, mlflow_db):
    """One uninterrupted 2-process DDP run of STEPS steps: the reference of the DDP resume tests."""
    out = tmp_path_factory.mktemp("ddp_straight")
    straight = pretrain(demo_store, out, mlflow_db, "ddp", DDP_EXTRA)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    return out


@pytest.mark.slow
def test_ddp_kill_and_torchrun_restart_is_exact(demo_store, tmp_path, mlflow_db, ddp_straight):
    crashed = pretrain(demo_store, tmp_path / "b", mlflow_db, "ddp", DDP_EXTRA, max_restarts=1,
                       env={"PCL_HPC_FAULT": "kill:2:0"})
    log = crashed.stdout + crashed.stderr
    assert crashed.returncode == 0, log[-4000:]
    assert "exits hard after step 2" in log and "resuming from" in log
    assert logged_steps(tmp_path / "b") == [1, 2, 3, 4]
    assert_identical(final_weights(ddp_straight, "ddp"), final_weights(tmp_path / "b", "ddp"),
                     ddp_straight, tmp_path / "b")
    # keep=3 by default: steps 2 and 4 are both kept, and `latest` names the last
    assert sorted(p.name for p in (tmp_path / "b" / "pretrain" / "checkpoints").glob("step_*")) == \
        ["step_000000002", "step_000000004"]


@pytest.mark.slow
def test_ddp_corrupt_newest_checkpoints_fall_back_to_an_older_one_exactly(demo_store, tmp_path, mlflow_db,
                                                                          ddp_straight):
    """Killed after the last step's checkpoint; then garbage in the newest checkpoint (same size) and a
    truncated rank file in the one before: the rerun names both in one line, moves them aside, resumes
    from step 2 and ends bit-identical to the uninterrupted run."""
    out, extra = tmp_path / "b", [*DDP_EXTRA, "checkpoint.every_steps=1"]  # keep=3: steps 2, 3, 4 kept
    crashed = pretrain(demo_store, out, mlflow_db, "ddp", extra, env={"PCL_HPC_FAULT": f"kill:{STEPS}:0"})
    assert crashed.returncode != 0 and f"exits hard after step {STEPS}" in crashed.stdout + crashed.stderr
    ckpts = out / "pretrain" / "checkpoints"
    assert latest_checkpoint(out / "pretrain").name == "step_000000004"
    garbage = ckpts / "step_000000004" / "train_state.pt"  # rank 0's file
    garbage.write_bytes(bytes(range(256)) * (garbage.stat().st_size // 256) + b"x" * (garbage.stat().st_size % 256))
    truncated = ckpts / "step_000000003" / "rank00001.pt"  # rank 1's file: rank 0 never reads it to load
    size = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:size // 2])
    bad = {garbage.name: garbage.read_bytes(), truncated.name: truncated.read_bytes()}

    resumed = pretrain(demo_store, out, mlflow_db, "ddp", extra)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    named = [line for line in resumed.stdout.splitlines() if " is corrupt (" in line]
    assert named == [f"checkpoint {ckpts}/step_000000004 is corrupt (train_state.pt does not match its sha256); "
                     f"moved to {ckpts}/corrupt/step_000000004; checkpoint {ckpts}/step_000000003 is corrupt "
                     f"(rank00001.pt has {size // 2} bytes, {size} when saved); moved to {ckpts}/corrupt/step_000000003; "
                     f"resuming from {ckpts}/step_000000002"], resumed.stdout[-3000:]
    assert f"resuming from {ckpts}/step_000000002 (step 2)" in resumed.stdout
    assert (ckpts / "corrupt" / "step_000000004" / garbage.name).read_bytes() == bad[garbage.name]  # kept as found
    assert (ckpts / "corrupt" / "step_000000003" / truncated.name).read_bytes() == bad[truncated.name]
    assert logged_steps(out) == [1, 2, 3, 4]
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000000002", "step_000000003", "step_000000004"]
    assert_identical(final_weights(ddp_straight, "ddp"), final_weights(out, "ddp"), ddp_straight, out)


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


# -- corrupt checkpoints, one process: digests, fall back, set aside -----------------------------------


def _saved(tmp_path, steps, keep=3, strategy_name="ddp"):
    """A checkpointer with checkpoints of `steps` (one training step each); ({step: weights}, checkpoints folder)."""
    from pcl_hpc.engine.checkpoint import Checkpointer
    from tests.test_engine import make, save, state_of, train

    strategy, net = make(strategy_name)
    ckpt, weights = Checkpointer(tmp_path, strategy, keep=keep), {}
    for step in steps:
        train(strategy, net, 1)
        save(ckpt, strategy, step)
        weights[step] = state_of(strategy)
    return weights, tmp_path / "checkpoints"


def _resume_fresh(tmp_path, strategy_name="ddp", **kwargs):
    from pcl_hpc.engine.checkpoint import Checkpointer
    from tests.test_engine import make, state_of

    strategy, _ = make(strategy_name, seed=1)
    ckpt = Checkpointer(tmp_path, strategy, **kwargs)
    restored = ckpt.resume()
    return ckpt, restored, state_of(strategy)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


def test_digest_mismatch_is_skipped_moved_aside_and_pruning_keeps_the_resumed_one(tmp_path, capsys):
    weights, ckpts = _saved(tmp_path, [1, 2, 3])
    meta = json.loads((ckpts / "step_000000003" / "meta.json").read_text())
    assert meta["format"] == 3 and set(meta["files"]) == {"train_state.pt", "rank00000.pt"}
    flipped = _flip_byte(ckpts / "step_000000003" / "train_state.pt")  # same size: only the digest tells
    capsys.readouterr()

    ckpt, (folder, meta, rank_state), state = _resume_fresh(tmp_path, keep=2)
    assert folder == ckpts / "step_000000002" and meta["step"] == 2 and rank_state["sampler"]["start"] == 2
    assert all(torch.equal(weights[2][k], v) for k, v in state.items())
    assert capsys.readouterr().out.splitlines() == [
        f"checkpoint {ckpts}/step_000000003 is corrupt (train_state.pt does not match its sha256); "
        f"moved to {ckpts}/corrupt/step_000000003; resuming from {ckpts}/step_000000002"]
    assert (ckpts / "corrupt" / "step_000000003" / "train_state.pt").read_bytes() == flipped  # kept, not deleted
    assert latest_checkpoint(tmp_path) == folder  # no longer pointing at the corrupt one
    assert ckpt.candidates() == [ckpts / "step_000000002", ckpts / "step_000000001"]

    from tests.test_engine import save

    for step in (3, 4, 5):  # keep=2, but the checkpoint this run resumed from is never pruned
        save(ckpt, ckpt.strategy, step)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000000002", "step_000000004", "step_000000005"]
    assert (ckpts / "corrupt" / "step_000000003").is_dir()


def test_truncated_newest_and_checkpoints_without_digests(tmp_path, capsys):
    """Truncation is caught by the digest; a format-2 checkpoint (no digests) is loaded unverified and,
    when it cannot be loaded, skipped the same way."""
    weights, ckpts = _saved(tmp_path, [1, 2, 3])
    for step in (1, 2):  # as written before digests existed
        meta_file = ckpts / f"step_00000000{step}" / "meta.json"
        meta = json.loads(meta_file.read_text())
        del meta["files"]
        meta_file.write_text(json.dumps({**meta, "format": 2}))
    state_file = ckpts / "step_000000003" / "train_state.pt"
    size = state_file.stat().st_size
    state_file.write_bytes(state_file.read_bytes()[:100])
    (ckpts / "step_000000002" / "train_state.pt").write_bytes(b"garbage" * 10)
    capsys.readouterr()

    _, (folder, meta, _), state = _resume_fresh(tmp_path)
    assert folder == ckpts / "step_000000001" and meta["format"] == 2
    assert all(torch.equal(weights[1][k], v) for k, v in state.items())
    line, = capsys.readouterr().out.splitlines()
    assert line.startswith(f"checkpoint {ckpts}/step_000000003 is corrupt (train_state.pt has 100 bytes, {size} "
                           f"when saved); moved to {ckpts}/corrupt/step_000000003; checkpoint {ckpts}/step_000000002 "
                           f"is corrupt (UnpicklingError: ")
    assert line.endswith(f"); moved to {ckpts}/corrupt/step_000000002; resuming from {folder}")
    assert sorted(p.name for p in (ckpts / "corrupt").iterdir()) == ["step_000000002", "step_000000003"]


def test_all_checkpoints_corrupt_is_one_line_and_nothing_moves(tmp_path):
    from pcl_hpc.engine.checkpoint import CheckpointError

    _, ckpts = _saved(tmp_path, [1, 2])
    _flip_byte(ckpts / "step_000000002" / "rank00000.pt")
    (ckpts / "step_000000001" / "meta.json").write_text("{not json")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError) as err:
        _resume_fresh(tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"no usable checkpoint in {ckpts}: step_000000002 "
                                                      f"(rank00000.pt does not match its sha256), step_000000001 "
                                                      f"(meta.json is not readable JSON: ")
    assert "--no-resume" in message
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before

    # checkpoint.path names a corrupt folder: refused, not replaced by another one
    from pcl_hpc.engine.checkpoint import Checkpointer
    from tests.test_engine import make

    with pytest.raises(CheckpointError, match=r"checkpoint.path=.*step_000000002 is corrupt \(rank00000.pt does not"):
        Checkpointer(tmp_path, make()[0]).resume(path=str(ckpts / "step_000000002"))


def test_checkpoint_keep_is_at_least_two():
    from pcl_hpc.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^command line: checkpoint.keep=1 must be >= 2$"):
        load_config(None, ["checkpoint.keep=1"])
    assert load_config(None, ["checkpoint.keep=2"]).checkpoint.keep == 2


def _deepspeed_corrupt_worker(rank, world_size, folder):
    from pathlib import Path

    weights, ckpts = _saved(Path(folder), [1, 2], strategy_name="deepspeed")
    ds_file = ckpts / "step_000000002" / "deepspeed" / "mp_rank_00_model_states.pt"
    ds_file.write_bytes(b"\0" * ds_file.stat().st_size)  # DeepSpeed's own file, zeroed
    _, (folder, _, _), state = _resume_fresh(Path(folder), "deepspeed")
    return {"folder": str(folder), "same": all(torch.equal(weights[1][k], v) for k, v in state.items()),
            "moved": sorted(p.relative_to(ckpts).as_posix() for p in (ckpts / "corrupt").rglob("*.pt"))}


def test_deepspeed_file_with_garbage_is_caught_by_its_digest(tmp_path, capsys):
    """A spawned process (DeepSpeed sets up a process group and environment variables of its own)."""
    from tests.dist_utils import run_distributed

    result, = run_distributed(_deepspeed_corrupt_worker, 1, str(tmp_path), timeout=240)
    ckpts = tmp_path / "checkpoints"
    assert result["folder"] == str(ckpts / "step_000000001") and result["same"]
    assert "corrupt/step_000000002/deepspeed/mp_rank_00_model_states.pt" in result["moved"]

"""pcl_hpc.engine: strategies (2 real processes), checkpoints (atomic, latest, keep K, bad input), step guard."""

import json
import os
import signal

import pytest
import torch

from pcl_hpc.config import Config
from pcl_hpc.dist import DistEnv
from pcl_hpc.engine.checkpoint import CheckpointError, Checkpointer, latest_checkpoint, rng_state
from pcl_hpc.engine.loop import StepGuard, TrainingDiverged
from pcl_hpc.engine.strategy import build_strategy
from pcl_hpc.models.unet import PretrainNet
from tests.dist_utils import free_port, run_distributed


def make(strategy="ddp", width=2, env=None, accum=1, seed=0, zero_stage=0):
    cfg = Config()
    cfg.engine.strategy, cfg.engine.precision, cfg.engine.grad_accum = strategy, "fp32", accum
    cfg.engine.zero_stage = zero_stage
    torch.manual_seed(seed)
    model = PretrainNet(width=width, projection_dim=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    strategy = build_strategy(cfg, env or DistEnv())
    net = strategy.setup(model, optimizer, schedule, micro_batch=2)
    return strategy, net


def train(strategy, net, steps, rank=0, accum=1):
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        for micro in range(accum):
            x = torch.randn(2, 1, 16, 16, generator=g)
            with strategy.micro_step(micro == accum - 1):
                with strategy.autocast():
                    loss = (net(strategy.prepare(x)).float() * torch.arange(8.0)).sum()
                strategy.backward(loss)
        strategy.step()


def state_of(strategy):
    return {k: v.detach().clone() for k, v in strategy.module.state_dict().items()}


# -- strategies, 2 real processes -----------------------------------------------------------------


def _strategy_worker(rank, world_size, name, port, zero_stage=0):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    strategy, net = make(name, env=DistEnv(rank, rank, world_size, "torchrun"), accum=2, zero_stage=zero_stage)
    train(strategy, net, steps=2, rank=rank, accum=2)
    params = {k: v.detach().clone() for k, v in strategy.module.named_parameters()}  # BN buffers are per rank
    return {"state": params, "lr": strategy.lr, "name": strategy.name}


def test_ddp_and_deepspeed_take_the_same_steps_on_two_processes():
    ddp = run_distributed(_strategy_worker, 2, "ddp", free_port(), timeout=240)
    ds = run_distributed(_strategy_worker, 2, "deepspeed", free_port(), 2, timeout=240)  # ZeRO-2, 2 micro-batches
    assert [r["name"] for r in ddp + ds] == ["ddp", "ddp", "deepspeed", "deepspeed"]
    for results in (ddp, ds):  # the ranks stay in lock-step
        assert all(torch.equal(results[0]["state"][k], results[1]["state"][k]) for k in results[0]["state"])
    start = state_of(make("ddp")[0])
    moved = [k for k in ddp[0]["state"] if k.endswith("weight") and not torch.equal(start[k], ddp[0]["state"][k])]
    assert moved, "training changed nothing"
    # Same averaged gradients, same updates, up to float rounding (DDP runs channels_last weights,
    # DeepSpeed contiguous ones; reduction orders differ): compare the updates' sizes.
    flat = lambda state: torch.cat([state[k].flatten().float() for k in ddp[0]["state"]])  # noqa: E731
    update = (flat(ddp[0]["state"]) - flat(start)).norm()
    assert (flat(ds[0]["state"]) - flat(ddp[0]["state"])).norm() <= 1e-3 * update
    assert ddp[0]["lr"] == pytest.approx(ds[0]["lr"]) == pytest.approx(0.1 / 3)


# -- checkpoints ----------------------------------------------------------------------------------


def save(ckpt, strategy, step, generator=None):
    return ckpt.save(step, {"micro": step, "run_id": "run-x", "config": {"seed": 0}},
                     {"rng": rng_state(generator), "sampler": {"epoch": 0, "start": step}})


def test_save_resume_latest_and_keep(tmp_path):
    strategy, net = make()
    ckpt = Checkpointer(tmp_path, strategy, keep=2)
    assert ckpt.find() is None
    gen = torch.Generator().manual_seed(5)
    for step in (1, 2, 3):
        train(strategy, net, 1)
        save(ckpt, strategy, step, gen)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000000002", "step_000000003"]
    folder = latest_checkpoint(tmp_path)
    assert folder.name == "step_000000003" and ckpt.find() == folder
    for file in folder.glob("*.pt"):
        torch.load(file, weights_only=True)  # our own format: tensors and plain values only
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["strategy"] == "ddp" and meta["run_id"] == "run-x" and meta["step"] == 3
    expected, expected_rand = state_of(strategy), torch.rand(3, generator=gen)

    fresh, _ = make(seed=1)
    gen2 = torch.Generator().manual_seed(99)
    meta2, rank = Checkpointer(tmp_path, fresh).load(folder, gen2)
    assert meta2["micro"] == 3 and rank["sampler"]["start"] == 3
    assert all(torch.equal(expected[k], v) for k, v in state_of(fresh).items())
    assert torch.equal(torch.rand(3, generator=gen2), expected_rand)  # the augmentation RNG continues


def test_kill_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    strategy, net = make()
    ckpt = Checkpointer(tmp_path, strategy)
    save(ckpt, strategy, 1)
    train(strategy, net, 1)

    def dies(folder):
        (folder / "train_state.pt").write_bytes(b"half a file")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(strategy, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save(ckpt, strategy, 2)
    assert (tmp_path / "checkpoints" / ".step_000000002.tmp").is_dir()
    assert ckpt.find().name == "step_000000001"
    Checkpointer(tmp_path, make()[0]).load(ckpt.find())  # still usable
    monkeypatch.undo()
    assert save(Checkpointer(tmp_path, strategy), strategy, 2).name == "step_000000002"
    assert not (tmp_path / "checkpoints" / ".step_000000002.tmp").exists()


def test_bad_checkpoints_name_the_file_and_the_way_out(tmp_path):
    strategy, _ = make()
    folder = save(Checkpointer(tmp_path, strategy), strategy, 1)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    with pytest.raises(CheckpointError, match=r"another network.*--no-resume"):
        Checkpointer(tmp_path, make(width=3)[0]).load(folder)

    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "strategy": "deepspeed"}))
    with pytest.raises(CheckpointError, match=r"strategy=deepspeed.*this run has strategy=ddp.*--no-resume"):
        Checkpointer(tmp_path, make()[0]).load(folder)
    (folder / "meta.json").write_text(json.dumps(meta))

    state = folder / "train_state.pt"
    state.write_bytes(before["train_state.pt"][:200])  # truncated
    with pytest.raises(CheckpointError, match="cannot be loaded") as err:
        Checkpointer(tmp_path, make()[0]).load(folder)
    assert str(folder) in str(err.value) and "--no-resume" in str(err.value)
    assert state.read_bytes() == before["train_state.pt"][:200]  # nothing was overwritten

    (tmp_path / "checkpoints" / "latest").write_text("step_000000099\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint.*--no-resume"):
        Checkpointer(tmp_path, strategy).find()
    with pytest.raises(CheckpointError, match="checkpoint.path"):
        Checkpointer(tmp_path, strategy).find(path=str(tmp_path / "nowhere"))


def test_no_resume_sets_old_checkpoints_aside(tmp_path):
    strategy, _ = make()
    save(Checkpointer(tmp_path, strategy), strategy, 1)
    assert Checkpointer(tmp_path, strategy).find(resume=False) is None
    assert not (tmp_path / "checkpoints").exists()
    assert len(list(tmp_path.glob("checkpoints.old-*"))) == 1


def test_cli_no_resume_flag():
    from pcl_hpc.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--config", "c.yaml", "pretrain.max_steps=3", "--no-resume"])
    assert args.no_resume and args.overrides == ["pretrain.max_steps=3"]


# -- non-finite losses and preemption signals -----------------------------------------------------


def test_non_finite_losses_skip_steps_then_abort():
    guard = StepGuard(max_bad_steps=3, install_signals=False)
    assert guard.finite(torch.tensor(1.0)) and guard.end_step(1)
    for step in (2, 3):
        assert not guard.finite(torch.tensor(float("nan")))
        assert not guard.end_step(step)
    assert guard.finite(torch.tensor(2.0)) and guard.end_step(4)  # a good step resets the run of bad ones
    assert guard.skipped_total == 2 and guard.bad_in_a_row == 0
    for step in (5, 6):
        guard.finite(torch.tensor(float("inf")))
        guard.end_step(step)
    guard.finite(torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged, match="3 steps in a row.*step 7"):
        guard.end_step(7)


def _micro(strategy, net, guard, x, scale=1.0, sync=False):
    with strategy.micro_step(sync):
        loss = net(strategy.prepare(x)).float().sum() * scale
        if guard.finite(loss):
            strategy.backward(loss)


def test_skipped_step_leaves_weights_alone():
    """grad_accum=2: a finite micro-batch (its gradients accumulate), then a NaN one: the step is
    skipped, the weights stay, and the finite half's gradients do not leak into the next step."""
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 1, 16, 16, generator=g) for _ in range(4)]
    strategy, net = make(accum=2)
    guard = StepGuard(install_signals=False)
    before = state_of(strategy)
    _micro(strategy, net, guard, batches[0])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in strategy.module.parameters())
    _micro(strategy, net, guard, batches[1], scale=float("nan"), sync=True)
    assert not guard.end_step(1)
    strategy.skip()
    after = state_of(strategy)
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert all(p.grad is None for p in strategy.module.parameters())
    assert guard.skipped_total == 1

    # the next (finite) step equals a fresh run that only skipped a step (schedule advanced), then took it
    _micro(strategy, net, guard, batches[2])
    _micro(strategy, net, guard, batches[3], sync=True)
    assert guard.end_step(2)
    strategy.step()
    reference, ref_net = make(accum=2)
    ref_guard = StepGuard(install_signals=False)
    reference.skip()
    _micro(reference, ref_net, ref_guard, batches[2])
    _micro(reference, ref_net, ref_guard, batches[3], sync=True)
    reference.step()
    mine, ref = state_of(strategy), state_of(reference)
    weights = [k for k in mine if k.endswith("weight")]
    assert any(not torch.equal(mine[k], before[k]) for k in weights), "the finite step must train"
    assert all(torch.equal(mine[k], ref[k]) for k in weights), "gradients of the skipped step leaked"


def test_sigusr1_and_sigterm_request_a_stop():
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        previous = signal.getsignal(sig)
        guard = StepGuard()
        os.kill(os.getpid(), sig)
        assert not guard.stop
        guard.finite(torch.tensor(1.0))
        assert guard.stop and guard.signalled == sig.name
        guard.close()
        assert signal.getsignal(sig) is previous

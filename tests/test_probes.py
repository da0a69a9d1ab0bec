"""Probes of the representation, with known answers: an encoder whose pooled features carry the slice's
position scores R² near 1, a random one on position-free slices near 0; the probes never change the
encoder (bit for bit, BN statistics too); pretraining logs the probe and reports its convergence;
fine-tuning in frozen mode leaves the encoder bit-identical."""

import json

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from pcl_hpc import probes
from pcl_hpc.config import load_config
from pcl_hpc.data import store as zstore
from pcl_hpc.errors import UserError
from pcl_hpc.models.unet import UNetEncoder
from pcl_hpc.train.pretrain import convergence, loss_trend
from tests.conftest import REPO

VOLUMES = [f"v{i}" for i in range(6)]
DEPTH, SIZE = 10, 16


def make_store(path, slices, labels=None) -> str:
    """A store of 6 volumes of DEPTH slices, slice i of volume v = ``slices(v, i, position)``."""
    for v, vid in enumerate(VOLUMES):
        positions = [(i + 1) / DEPTH for i in range(DEPTH)]
        image = np.stack([slices(v, i, p) for i, p in enumerate(positions)]).astype(np.float32)
        label = None if labels is None else labels(image)
        zstore.write_volume(path, vid, image, label, {"positions": positions, "partitions": [0] * DEPTH,
                                                      "spacing": [1.0, 1.0, 1.0]})
    zstore.write_manifest(path, {"folds": 2}, class_names=None if labels is None else ["background", "bright"])
    return str(path)


class PositionFeatures(nn.Module):
    """A synthetic encoder: its deepest map is a 1x1 convolution of the slice then BatchNorm, so in eval
    mode the pooled features are affine in the slice's mean intensity (the coded store's position). In
    train mode the BatchNorm would change its statistics: the probe must not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        return [self.norm(self.conv(x))]


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_untouched(module, before, modes, flags):
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [m.training for m in module.modules()] == modes
    assert [p.requires_grad for p in module.parameters()] == flags


@pytest.fixture(scope="module")
def coded_store(tmp_path_factory):
    rng = np.random.default_rng(0)
    return make_store(tmp_path_factory.mktemp("coded") / "s.zarr",
                      lambda v, i, p: p + 0.02 * rng.standard_normal((SIZE, SIZE)))


@pytest.fixture(scope="module")
def noise_store(tmp_path_factory):
    rng = np.random.default_rng(1)
    return make_store(tmp_path_factory.mktemp("noise") / "s.zarr", lambda v, i, p: rng.standard_normal((SIZE, SIZE)))


def test_features_that_encode_position_give_r2_near_1(coded_store):
    torch.manual_seed(0)
    encoder = PositionFeatures()
    encoder.train()  # the probe runs it in eval mode and gives it back in train mode
    before, rng_state = snapshot(encoder), torch.get_rng_state()
    scores = probes.position_probe(encoder, coded_store, VOLUMES, patch=SIZE)
    assert scores["position_r2"] > 0.99 and scores["position_mae"] < 0.02
    assert_untouched(encoder, before, [True, True, True], [True] * 4)
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_a_random_encoder_on_position_free_slices_gives_r2_near_0(noise_store):
    torch.manual_seed(0)
    encoder = UNetEncoder(1, width=4)
    scores = probes.position_probe(encoder, noise_store, VOLUMES, patch=SIZE)
    # Predicting the mean position gives R² 0 and a mean absolute error of 0.25 here.
    assert -0.5 < scores["position_r2"] < 0.1 and scores["position_mae"] > 0.2


def test_bad_probe_volumes_name_the_key(coded_store):
    with pytest.raises(UserError, match=r"^pretrain.probe_volumes names 1 volume.*at least 2"):
        probes.position_probe(PositionFeatures(), coded_store, ["v0"], SIZE, key="pretrain.probe_volumes")
    with pytest.raises(UserError, match=r"^pretrain.probe_volumes: volume\(s\) nope are not in store"):
        probes.position_probe(PositionFeatures(), coded_store, ["v0", "nope"], SIZE, key="pretrain.probe_volumes")


def test_probe_every_without_volumes_is_one_line_naming_the_key():
    from pcl_hpc.train.pretrain import probe_volumes

    cfg = load_config(None, ["pretrain.probe_every=10"])
    with pytest.raises(UserError, match=r"^pretrain.probe_every=10 needs pretrain.probe_volumes") as err:
        probe_volumes(cfg)
    assert "\n" not in str(err.value)
    assert probe_volumes(load_config(None, ["pretrain.probe_every=10", "pretrain.exclude_volumes=[a, b]"])) == ["a", "b"]
    assert probe_volumes(load_config(None, ["pretrain.probe_volumes=[a, b]"])) == []  # probe_every=0: off


def test_the_frozen_segmentation_probe_never_changes_the_encoder(tmp_path):
    rng = np.random.default_rng(2)

    def bright_square(v, i, p):
        image = 0.1 * rng.standard_normal((SIZE, SIZE))
        image[4:12, 3 + v % 3:11 + v % 3] += 1.0
        return image

    store = make_store(tmp_path / "s.zarr", bright_square, labels=lambda image: (image > 0.5).astype(np.uint8))
    torch.manual_seed(0)
    encoder = UNetEncoder(1, width=4)
    encoder.train()
    encoder.down[0].requires_grad_(False)  # flags of its own: given back as they were
    modes, flags = [m.training for m in encoder.modules()], [p.requires_grad for p in encoder.parameters()]
    before, rng_state = snapshot(encoder), torch.get_rng_state()
    result = probes.segmentation_probe(encoder, store, ["v0", "v1"], ["v4", "v5"], num_classes=1, patch=SIZE,
                                       steps=40, batch_size=8, lr=3e-2)
    assert_untouched(encoder, before, modes, flags)  # weights and BatchNorm statistics, bit for bit
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert list(result["per_volume"]) == ["v4", "v5"] and result["steps"] == 40
    assert result["dice"] > 0.7  # the decoder learned the bright square on the frozen random encoder
    with pytest.raises(UserError, match="v1.*in both"):
        probes.segmentation_probe(encoder, store, ["v0", "v1"], ["v1"], num_classes=1, patch=SIZE, steps=1)


@pytest.mark.parametrize("losses, trend", [
    ([5.0, 4.0, 3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3, 2.2, 2.1, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3], "falling"),
    ([5.0, 4.0] + [2.0, 2.01] * 9, "flat"),
    ([2.0] * 18 + [3.0, 3.0], "rising"),
])
def test_loss_trend_compares_the_last_window_with_the_one_before(losses, trend):
    steps = [10 * (i + 1) for i in range(len(losses))]  # 20 logged losses: windows of 2
    got = loss_trend(steps, losses)
    assert got["trend"] == trend and got["steps"] == 20
    assert got["change"] == pytest.approx((sum(losses[-2:]) - sum(losses[-4:-2])) / sum(losses[-4:-2]))
    assert loss_trend([1], [1.0]) is None and loss_trend([1, 2], [1.0, float("nan")]) is None


@pytest.fixture(scope="module")
def probed_pretraining(demo_store, tmp_path_factory):
    """A 2-step pretraining that probes at every step (held-out dk05, dk06), in this process."""
    from pcl_hpc.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("probed")
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [
        f"data.store={demo_store}", "data.patch=32", f"output_dir={out}", "model.width=4", "model.projection_dim=32",
        "pretrain.max_steps=2", "pretrain.batch_size=4", "pretrain.log_every=1", "pretrain.probe_every=1",
        "pretrain.exclude_volumes=[dk05, dk06]", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
        "tracking.register_name=probe-test", "engine.precision=fp32"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        pretrain(cfg)
    return out, cfg


def test_pretraining_logs_the_probe_and_tags_the_encoder_with_its_final_figures(probed_pretraining):
    out, cfg = probed_pretraining
    logged = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(-10 < r["probe/position_r2"] <= 1 and 0 <= r["probe/position_mae"] < 1 for r in logged)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = mlflow.MlflowClient()
    version = client.get_model_version("probe-test", "1")
    assert float(version.tags["probe_position_r2"]) == pytest.approx(logged[-1]["probe/position_r2"], abs=1e-4)
    assert float(version.tags["probe_position_mae"]) == pytest.approx(logged[-1]["probe/position_mae"], abs=1e-4)
    assert version.tags["convergence"] == convergence(out / "pretrain" / "metrics.jsonl")
    assert version.tags["convergence"].startswith(("loss still falling: ", "loss flat (", "loss rising: "))
    history = client.get_metric_history(version.tags["encoder.run_id"], "probe/position_r2")
    assert sorted(m.step for m in history) == [1, 2]


def test_frozen_finetuning_leaves_the_encoder_bit_identical(probed_pretraining):
    from pcl_hpc.engine.harness import run
    from pcl_hpc.train.finetune import Finetune, folder

    out, cfg = probed_pretraining
    encoder_file = out / "pretrain" / "encoder.pt"
    ft = load_config(str(REPO / "configs" / "demo.yaml"), [
        f"data.store={cfg.data.store}", "data.patch=32", "model.width=4", f"tracking.uri={cfg.tracking.uri}",
        f"output_dir={out}", f"finetune.encoder={encoder_file}", "finetune.mode=frozen", "finetune.max_steps=3",
        "finetune.batch_size=8", "finetune.train_volumes=[dk01]", "finetune.val_volumes=[dk04]",
        "finetune.test_volumes=[dk05]", "tracking.register_name=probe-test", "engine.precision=fp32"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        run(Finetune(ft, ft.finetune, folder(ft), register=False))  # the stage without registering its model
    assert folder(ft) == out / "finetune" / "encoder_M1_frozen"
    encoder = torch.load(encoder_file, weights_only=True)
    for name in ("model.pt", "model_last.pt"):
        model = torch.load(folder(ft) / name, weights_only=True)
        assert all(torch.equal(model[f"encoder.{k}"], encoder[k]) for k in encoder)  # BN statistics too
    decoder_stats = [v for k, v in model.items() if k.startswith("up.") and k.endswith("running_mean")]
    assert decoder_stats and any(v.abs().sum() > 0 for v in decoder_stats)  # the decoder did train


def test_plateaued_means_no_recent_probe_beat_the_best_before_by_delta():
    from pcl_hpc.train.pretrain import plateaued

    assert not plateaued([0.1, 0.2], 2, 0.01), "too few probes to judge"
    assert plateaued([0.1, 0.5, 0.505, 0.502], 2, 0.01) and not plateaued([0.1, 0.5, 0.505, 0.52], 2, 0.01)
    assert plateaued([0.6, 0.5, 0.4], 2, 0.0), "falling is a plateau too"
    assert not plateaued([0.1, 0.2, 0.3], 0, 0.01), "0: never"


def test_plateau_probes_needs_the_probe_one_line_naming_the_keys():
    from pcl_hpc.train.pretrain import probe_volumes

    with pytest.raises(UserError, match=r"^pretrain.plateau_probes=3 .* set pretrain.probe_every"):
        probe_volumes(load_config(None, ["pretrain.plateau_probes=3", "pretrain.exclude_volumes=[a, b]"]))


@pytest.mark.slow  # two torchrun groups of 2 gloo processes (about 30 s here)
def test_a_plateau_stops_every_rank_at_the_same_probe_and_survives_a_kill_between_checkpoints(demo_store, tmp_path):
    """Probes every 2 steps of 20, pretrain.plateau_probes=2 with a gain no probe reaches (10): the run stops at
    the third probe, step 6. Rank 1 dies after step 5 (between the checkpoints of steps 4 and 6): torchrun
    restarts both ranks from step 4; the history in metrics.jsonl (cut back to step 4) still stops them at 6.
    Run again without its encoder: it resumes from step 6 and trains no further."""
    import os
    import subprocess
    import sys

    from pcl_hpc.engine.checkpoint import latest_checkpoint

    out, db = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"

    def pretrain(env):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
               "-m", "pcl_hpc", "pretrain", "--config", str(REPO / "configs" / "demo.yaml"),
               f"data.store={demo_store}", "data.patch=32", f"output_dir={out}", "model.width=4",
               "model.projection_dim=32", "pretrain.max_steps=20", "pretrain.batch_size=4", "pretrain.log_every=1",
               "pretrain.probe_every=2", "pretrain.plateau_probes=2", "pretrain.plateau_delta=10",
               "pretrain.exclude_volumes=[dk05, dk06]", "checkpoint.every_steps=2", f"tracking.uri={db}",
               "tracking.register_name=plateau-test", "engine.precision=fp32"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
                                   **env})

    first = pretrain({"PCL_HPC_FAULT": "kill:5:1"})
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "PCL_HPC_FAULT: rank 1 exits hard after step 5" in first.stdout + first.stderr
    assert "stopped early at step 6 of 20" in first.stdout
    logged = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 7)), "each step once, none after the stop"
    assert [r["step"] for r in logged if "probe/position_r2" in r] == [2, 4, 6]
    assert latest_checkpoint(out / "pretrain").name == f"step_{6:09d}"
    mlflow.set_tracking_uri(db)
    assert mlflow.MlflowClient().get_model_version("plateau-test", "1").tags["stopped_early"] == "step 6 of 20"

    (out / "pretrain" / "encoder.pt").unlink()
    (out / "pretrain" / "complete.json").unlink()
    again = pretrain({})
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "(step 6)" in again.stdout and "stopped early at step 6 of 20" in again.stdout
    assert [json.loads(line)["step"] for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 7)), "the resumed run trained no further step"


def test_the_demo_says_plainly_when_its_encoders_are_under_trained(tmp_path):
    from pcl_hpc.demo import pretraining_report

    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [f"output_dir={tmp_path}"])
    for method, losses in (("pcl", [5.0 - 0.1 * i for i in range(20)]), ("gcl", [5.0, 4.0] + [3.0] * 18)):
        folder = tmp_path / "pretrain" / method
        folder.mkdir(parents=True)
        rows = [{"step": 15 * (i + 1), "loss": v, **({"probe/position_r2": i / 50} if i % 10 == 9 else {})}
                for i, v in enumerate(losses)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = pretraining_report(cfg, ["pcl", "gcl"])
    assert "pcl: loss still falling" in report and "position probe R^2 0.18 -> 0.38 (steps 150..300)" in report
    assert "gcl: loss flat" in report
    assert "The pcl encoder(s) are UNDER-TRAINED at 300 steps" in report
    (tmp_path / "pretrain" / "pcl" / "metrics.jsonl").write_text(
        (tmp_path / "pretrain" / "gcl" / "metrics.jsonl").read_text())
    assert pretraining_report(cfg, ["pcl", "gcl"]).endswith("Every encoder's loss is flat at 300 steps.")

"""The spine's pretraining, run for real: 2 processes (torchrun, gloo), MLflow sqlite, registry."""

import json
import subprocess
import sys

import mlflow
import pytest
import torch

from pcl_hpc.config import load_config
from pcl_hpc.data.dataset import ResumableDistributedSampler, SliceDataset
from pcl_hpc.losses import contrastive_loss
from pcl_hpc.models.unet import build_pretrain_net
from pcl_hpc.engine.harness import seed_everything
from pcl_hpc.train.pretrain import pretrain_volumes
from tests.conftest import REPO

BATCH = 4


def overrides(store, out, **extra):
    values = {
        "data.store": store, "data.patch": 32, "output_dir": out, "model.width": 4,
        "pretrain.max_steps": 2, "pretrain.batch_size": BATCH, "pretrain.log_every": 1, "pretrain.augment": "false",
        "tracking.uri": f"sqlite:///{out / 'mlflow.db'}", "tracking.register_name": "test-encoder",
        "engine.precision": "fp32", **extra,  # fp32: the loss is compared with an fp32 recomputation
    }
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def two_process_run(demo_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain2")
    args = overrides(demo_store, out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pcl_hpc", "pretrain", "--config", str(REPO / "configs" / "demo.yaml"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, load_config(str(REPO / "configs" / "demo.yaml"), args)


def first_batch_features(cfg, rank, world_size, model):
    """What rank `rank` encodes at step 1: its sampler's first batch, both views equal (no augmentation)."""
    dataset = SliceDataset(cfg.data.store, pretrain_volumes(cfg), patch=cfg.data.patch)
    sampler = ResumableDistributedSampler(len(dataset), world_size, rank, seed=cfg.seed)
    sampler.set_epoch(0)
    items = [dataset[i] for i in list(sampler)[:BATCH]]
    images = torch.stack([it["image"] for it in items])
    positions = torch.stack([it["position"] for it in items])
    views = images.unsqueeze(1).expand(-1, 2, -1, -1, -1).reshape(2 * BATCH, *images.shape[1:])
    return model(views).view(BATCH, 2, -1), positions


def test_each_rank_loss_saw_both_ranks(two_process_run):
    out, cfg = two_process_run
    logged = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2]
    seed_everything(cfg.seed)
    model = build_pretrain_net(cfg.model)  # the weights every rank starts from; train-mode BN as in the run
    parts = [first_batch_features(cfg, rank, 2, model) for rank in (0, 1)]
    loss_kwargs = dict(method="pcl", threshold=cfg.loss.threshold, temperature=cfg.loss.temperature,
                       base_temperature=cfg.loss.base_temperature)
    with torch.no_grad():
        global_loss = contrastive_loss(torch.cat([f for f, _ in parts]), torch.cat([p for _, p in parts]), **loss_kwargs)
        per_rank_only = sum(contrastive_loss(f, p, **loss_kwargs) for f, p in parts) / 2
    # The logged value is the mean of the two ranks' losses: it must be the loss of the whole batch of 2N,
    # and must differ from what ranks would get if each saw only its own negatives.
    assert logged[0]["loss"] == pytest.approx(global_loss.item(), rel=1e-4)
    assert abs(per_rank_only.item() - global_loss.item()) > 1e-3


def test_encoder_saved_and_registered(two_process_run):
    out, cfg = two_process_run
    saved = torch.load(out / "pretrain" / "encoder.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in saved)
    from pcl_hpc.models.unet import UNetEncoder
    UNetEncoder(width=cfg.model.width).load_state_dict(saved)

    mlflow.set_tracking_uri(cfg.tracking.uri)
    from pcl_hpc.tracking import load_encoder_state
    loaded = load_encoder_state(f"models:/{cfg.tracking.register_name}@{cfg.tracking.alias}")
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)

    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    assert len(runs) == 1, "exactly one MLflow run for a 2-process job"
    run = runs[0]
    assert run.data.params["model.width"] == "4"
    assert run.data.tags["world_size"] == "2"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2]
    assert (out / "pretrain" / "config.yaml").is_file()


def finetune_config(cfg, out, encoder):
    run = load_config(str(REPO / "configs" / "demo.yaml"), [
        f"data.store={cfg.data.store}", "data.patch=32", "model.width=4", f"tracking.uri={cfg.tracking.uri}",
        f"output_dir={out}", f"finetune.encoder={encoder}", "finetune.epochs=1", "finetune.batch_size=8",
        "finetune.train_volumes=[dk01]", "finetune.val_volumes=[dk04]", "finetune.test_volumes=[dk05]",
        "finetune.name=run"])
    return run


def finetune_from_encoder_file(out, cfg, folder, **settings):
    """Fine-tune from the pretrained encoder.pt with finetune.<key>=value settings; (encoder state, run config)."""
    from pcl_hpc.train.finetune import finetune
    run = finetune_config(cfg, folder, str(out / "pretrain" / "encoder.pt"))
    for key, value in settings.items():
        setattr(run.finetune, key, value)
    finetune(run)
    return torch.load(out / "pretrain" / "encoder.pt", weights_only=True), run


def test_finetune_from_registry_records_lineage(two_process_run, tmp_path):
    out, cfg = two_process_run
    from pcl_hpc.train.finetune import finetune
    uri = f"models:/{cfg.tracking.register_name}@{cfg.tracking.alias}"
    result = finetune(finetune_config(cfg, tmp_path / "ft", uri))
    assert len(result["mean_per_class"]) == 3 and 0.0 <= result["mean"] <= 1.0
    assert list(result["per_volume"]) == ["dk05"]
    model = torch.load(tmp_path / "ft" / "finetune" / "run" / "model.pt", weights_only=True)
    encoder = torch.load(out / "pretrain" / "encoder.pt", weights_only=True)
    assert set(f"encoder.{k}" for k in encoder) <= set(model)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list",
                              filter_string="tags.stage = 'finetune'")
    assert len(runs) == 1
    assert runs[0].data.tags["encoder_name"] == cfg.tracking.register_name
    assert runs[0].data.tags["encoder_version"] == "1"


def test_finetune_from_path_loads_the_encoder(two_process_run, tmp_path):
    """With lr=0 the fine-tuned encoder's weights must be exactly the pretrained ones from encoder.pt."""
    out, cfg = two_process_run
    encoder, _ = finetune_from_encoder_file(out, cfg, tmp_path / "ft", lr=0.0)
    model = torch.load(tmp_path / "ft" / "finetune" / "run" / "model.pt", weights_only=True)
    weights = [k for k in encoder if k.endswith("weight")]
    assert weights and all(torch.equal(model[f"encoder.{k}"], encoder[k]) for k in weights)


def test_evaluate_command_scores_a_finetuned_model(two_process_run, tmp_path, capsys):
    """`pcl-hpc evaluate --model` re-scores model.pt; `--results` tabulates results.json files."""
    out, cfg = two_process_run
    from pcl_hpc.cli import main
    from pcl_hpc.train.finetune import finetune
    run = finetune_config(cfg, tmp_path / "ft", "")
    result = finetune(run)
    capsys.readouterr()
    args = [f"data.store={cfg.data.store}", "model.width=4", "finetune.test_volumes=[dk05]"]
    assert main(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--model",
                 str(tmp_path / "ft" / "finetune" / "run" / "model.pt"), *args]) == 0
    table = capsys.readouterr().out
    assert f"{result['mean']:.3f}" in table  # the same Dice as fine-tuning reported on its test volume
    assert main(["evaluate", "--results", str(tmp_path / "ft" / "finetune" / "run" / "results.json")]) == 0
    assert "| random | 1 |" in capsys.readouterr().out
    assert main(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--model",
                 str(tmp_path / "missing.pt"), *args]) == 2


@pytest.mark.gpu
def test_sync_batchnorm_option():
    """SyncBatchNorm has no CPU kernel: asking for it on a multi-process CPU job fails clearly, up front."""
    from pcl_hpc.dist import DistEnv
    from pcl_hpc.errors import UserError
    from pcl_hpc.train.pretrain import with_sync_batchnorm

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    assert with_sync_batchnorm(model, True, DistEnv()) is model  # one process: nothing to synchronise
    assert with_sync_batchnorm(model, False, DistEnv(world_size=2)) is model
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="model.sync_batchnorm"):
            with_sync_batchnorm(model, True, DistEnv(world_size=2))
    else:  # pragma: no cover - GPU machines
        synced = with_sync_batchnorm(model, True, DistEnv(world_size=2))
        assert isinstance(synced[1], torch.nn.SyncBatchNorm)


def test_finetune_frozen_encoder_epochs(two_process_run, tmp_path):
    """finetune.freeze_encoder_epochs: the encoder's weights stay the pretrained ones while the decoder learns."""
    out, cfg = two_process_run
    encoder, run = finetune_from_encoder_file(out, cfg, tmp_path / "ft", freeze_encoder_epochs=1)
    last = torch.load(tmp_path / "ft" / "finetune" / "run" / "model_last.pt", weights_only=True)
    convs = [k for k in encoder if k.endswith("weight") and encoder[k].dim() == 4]
    assert convs and all(torch.equal(last[f"encoder.{k}"], encoder[k]) for k in convs)
    from pcl_hpc.models.unet import build_unet
    seed_everything(run.seed)
    untrained = build_unet(run.model, run.finetune.num_classes + 1).state_dict()
    decoder = [k for k in last if not k.startswith("encoder.") and k.endswith("weight") and last[k].dim() == 4]
    assert any(not torch.equal(last[k], untrained[k]) for k in decoder), "the decoder must have trained"

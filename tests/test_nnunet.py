"""PCL for nnU-Net, against the real nnunetv2 2.8.1: its planner and preprocessor make the data, pcl-hpc
pretrains the plan's own 2D network on 2 gloo processes, and nnU-Net's trainer loads the export.

The dataset is the demo's anatomy (6 labeled subjects + MNI152) at 6 mm, in nnU-Net's raw layout,
planned and preprocessed once per session by ``nnUNetv2_plan_and_preprocess``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import cli

pytestmark = pytest.mark.nnunet
DATASET_ID, DATASET = 502, "Dataset502_DemoBrain"


def nnunet_env(root: Path) -> dict:
    return {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / "results"), "nnUNet_def_n_proc": "1"}


@pytest.fixture(scope="module")
def nnunet_data(tmp_path_factory):
    """(root, plans file): nnU-Net's plan and preprocessed 2d data of the demo's volumes."""
    from pcl_hpc.data.demo_data import make_demo_data
    from pcl_hpc.nnunet.raw import write_raw_dataset

    root = tmp_path_factory.mktemp("nnunet")
    make_demo_data(root / "demo", spacing=6.0, seed=0)
    write_raw_dataset(root / "demo", root / "raw", DATASET_ID, "DemoBrain")
    planner = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    done = subprocess.run([str(planner), "-d", str(DATASET_ID), "-c", "2d", "-np", "1"], env=nnunet_env(root),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return root, root / "preprocessed" / DATASET / "nnUNetPlans.json"


def config(root: Path, plans: Path, *extra: str):
    from pcl_hpc.config import load_config

    return load_config(None, [f"output_dir={root / 'out'}", "data.layout=nnunet", f"data.store={root / 'store'}",
                              f"data.raw_dir={root / 'raw' / DATASET / 'imagesTs'}", "data.folds=3",
                              "model.arch=nnunet", f"model.plans={plans}", "model.projection_dim=32", *extra])


def test_the_store_holds_nnunets_own_slices(nnunet_data):
    """Every slice pcl-hpc trains on is nnU-Net's preprocessed array, centre-fitted to the plan's patch."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from pcl_hpc.data.dataset import SliceDataset
    from pcl_hpc.data.store import read_manifest
    from pcl_hpc.nnunet.ingest import ingest, store_plan_check
    from pcl_hpc.nnunet.plans import load_plan

    root, plans = nnunet_data
    cfg = config(root, plans)
    summary = ingest(cfg)
    assert summary.ok and sorted(summary.converted) == ["dk01", "dk02", "dk03", "dk04", "dk05", "dk06", "mni152"]
    assert ingest(cfg).skipped == summary.converted  # unchanged files are not read again
    manifest = read_manifest(cfg.data.store)
    patch = store_plan_check(cfg, manifest)
    plan = load_plan(plans)
    assert patch == plan.patch_size
    folder = plan.preprocessed_folder
    data, seg, _, _ = infer_dataset_class(str(folder))(str(folder)).load_case("dk03")
    data, seg = np.asarray(data), np.asarray(seg)
    ids = [v["id"] for v in manifest["volumes"]]
    dataset = SliceDataset(cfg.data.store, ids, patch=patch, with_labels=False)
    first = sum(v["shape"][0] for v in manifest["volumes"] if v["id"] < "dk03")
    z = data.shape[1] // 2
    item = dataset[first + z]
    np.testing.assert_allclose(item["image"][0].numpy(), _fit(data[0, z], patch), rtol=0, atol=1e-6)
    assert item["position"].item() == pytest.approx((z + 1) / data.shape[1])
    label = SliceDataset(cfg.data.store, ["dk03"], patch=patch, with_labels=True)[z]["label"].numpy()
    np.testing.assert_array_equal(label, _fit(np.clip(seg[0, z], 0, None).astype(np.uint8), patch))
    # the unlabeled MNI152 went through the plan's own preprocessor: z-scored (MRI), unlabeled
    mni = [v for v in manifest["volumes"] if v["id"] == "mni152"][0]
    assert not mni["labeled"]
    assert manifest["settings"]["plans_sha256"] == plan.sha256
    assert manifest["class_names"] == ["background", "cortex", "white_matter", "deep_grey"]  # background first


def _fit(array: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    from pcl_hpc.data.dataset import fit_into

    out = np.empty(patch, dtype=array.dtype)
    fit_into(out, array)
    return out


@pytest.mark.slow
def test_sweep_with_nnunet_as_the_trainer_and_nnunet_loads_the_export(nnunet_data, monkeypatch):
    """The protocol with nnU-Net as the fine-tuning trainer: the sweep pretrains the plan's encoder with PCL on 2
    gloo processes and registers it, then nnU-Net's stock trainer fine-tunes from scratch and from PCL, predicts
    the test fold and pcl-hpc scores it. The export of the registered encoder loads through nnU-Net's own path
    (run_training's maybe_load_checkpoint -> load_pretrained_weights, what -pretrained_weights runs): at
    iteration 0 the encoder is the pretrained one, in both places, and the seg layers are nnU-Net's."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    from pcl_hpc.config import load_config
    from pcl_hpc.data.store import read_manifest
    from pcl_hpc.sweep import is_cell_complete, plan_cells

    root, plans = nnunet_data
    env = nnunet_env(root)
    out = root / "sweep_run"
    overrides = [f"output_dir={out}", f"data.store={root / 'store'}", f"data.raw_dir={root / 'raw' / DATASET / 'imagesTs'}",
                 f"model.plans={plans}", "model.projection_dim=32", "pretrain.max_steps=3", "pretrain.batch_size=4",
                 "pretrain.log_every=1", "sweep.pretrain=[pcl]", "sweep.labeled=[1]", "sweep.folds=[0]",
                 "sweep.val_patients=1", "sweep.workers=1", "sweep.nnunet_epochs=1", "sweep.nnunet_iterations=2",
                 f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]
    config_file = str(Path(__file__).parents[1] / "configs" / "demo_nnunet.yaml")
    done = subprocess.run(cli("preprocess", "--config", config_file, *overrides), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    done = subprocess.run(cli("sweep", "--config", config_file, *overrides), env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "pretrain done: 3 steps on 2 process(es)" in done.stdout
    rows = (out / "sweep" / "results.csv").read_text().splitlines()
    assert {r.split(",")[1] for r in rows[1:]} == {"random", "pcl"} and len(rows) == 1 + 2 * 2  # 2 cells x 2 volumes
    summary = (out / "sweep" / "summary.md").read_text()
    assert "Paired comparison against random" in summary and "classes: cortex, white_matter, deep_grey" in summary
    cfg = load_config(config_file, overrides)
    manifest = read_manifest(cfg.data.store)
    assert all(is_cell_complete(cfg, c, manifest) for c in plan_cells(cfg, manifest))  # never rerun
    encoder_file = out / "pretrain" / "pcl" / "encoder.pt"
    encoder = torch.load(encoder_file, map_location="cpu", weights_only=True)
    cell = out / "sweep" / "cells" / "pcl_M1_f0_s0"
    final = torch.load(next(cell.glob("nnunet_results/*/*/fold_0/checkpoint_final.pth")), map_location="cpu",
                       weights_only=False)  # nnU-Net's own checkpoint (it pickles its trainer's settings)
    assert not torch.equal(final["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"],
                           encoder["stages.0.0.convs.0.conv.weight"])  # nnU-Net trained from the pretrained weights

    exported = root / "weights.pt"  # from the registry: the version carries the plan's architecture
    done = subprocess.run(cli("export", "--model", "models:/pcl-demo-nnunet-encoder-pcl@candidate", "--tracking-uri",
                              f"sqlite:///{out / 'mlflow.db'}", "--format", "nnunet", "--plans", str(plans),
                              "--out", str(exported)), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    payload = torch.load(exported, map_location="cpu", weights_only=True)
    assert payload["pcl_hpc"]["encoder_version"] == "1" and payload["pcl_hpc"]["plans_sha256"]
    assert not any(".seg_layers." in k for k in payload["network_weights"])

    for key, value in {**env, "nnUNet_n_proc_DA": "0"}.items():  # augmentation in this process
        if key.startswith("nnUNet_"):
            monkeypatch.setenv(key, value)
    (plans.parent / "splits_final.json").write_text(json.dumps([{"train": ["dk01"], "val": ["dk02"]}]))
    trainer = get_trainer_from_args(str(DATASET_ID), "2d", 0, "nnUNetTrainer", device=torch.device("cpu"))
    trainer.initialize()
    own_seg = {k: v.clone() for k, v in trainer.network.state_dict().items() if ".seg_layers." in k}
    maybe_load_checkpoint(trainer, False, False, str(exported))  # what nnUNetv2_train -pretrained_weights runs
    state = trainer.network.state_dict()
    for name, value in encoder.items():
        assert torch.equal(state[f"encoder.{name}"], value) and torch.equal(state[f"decoder.encoder.{name}"], value)
    assert own_seg and all(torch.equal(state[k], v) for k, v in own_seg.items())
    assert all(torch.equal(state[k], v) for k, v in payload["network_weights"].items())


def _encoder_file(root: Path, plans: Path, name: str) -> Path:
    """An untrained encoder of the plan, saved as pretraining saves one (with its architecture record)."""
    from pcl_hpc.nnunet.network import ARCH_FILE, arch_record, pretrain_net

    cfg = config(root, plans)
    folder = root / name
    folder.mkdir()
    torch.save(pretrain_net(cfg.model).encoder.state_dict(), folder / "encoder.pt")
    (folder / ARCH_FILE).write_text(json.dumps(arch_record(cfg)))
    return folder / "encoder.pt"


def _other_plan(plans: Path, name: str, change) -> Path:
    """A copy of the dataset folder's plans with one change to the 2d architecture."""
    content = json.loads(plans.read_text())
    change(content["configurations"]["2d"]["architecture"]["arch_kwargs"])
    out = plans.parent / f"{name}.json"
    out.write_text(json.dumps(content))
    return out


def test_export_refuses_a_plan_that_does_not_match_with_one_line(nnunet_data, tmp_path):
    root, plans = nnunet_data
    encoder = _encoder_file(root, plans, "untrained")
    wider = _other_plan(plans, "wider", lambda a: a.update(features_per_stage=[2 * f for f in a["features_per_stage"]]))
    strides = _other_plan(plans, "strides", lambda a: a["strides"][1].__setitem__(0, 1))
    batchnorm = _other_plan(plans, "batchnorm", lambda a: a.update(norm_op="torch.nn.BatchNorm2d"))
    for plan, says in ((wider, "features: plan [64"), (strides, "strides"), (batchnorm, "norm: plan batch norm")):
        out = tmp_path / f"{plan.stem}.pt"
        done = subprocess.run(cli("export", "--model", str(encoder), "--format", "nnunet", "--plans", str(plan),
                                  "--out", str(out)), capture_output=True, text=True, timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0] and "Traceback" not in done.stderr, \
            done.stderr[-2000:]
        assert not out.exists()


def test_bad_nnunet_inputs_are_one_line_before_nnunet_runs(nnunet_data, tmp_path):
    from pcl_hpc.errors import UserError
    from pcl_hpc.nnunet.ingest import store_plan_check
    from pcl_hpc.nnunet.plans import load_plan

    root, plans = nnunet_data
    with pytest.raises(UserError, match="does not exist; run nnUNetv2_plan_and_preprocess"):
        load_plan(tmp_path / "nope.json")
    with pytest.raises(UserError, match="3d_lowres.*has: 2d, 3d_fullres"):
        load_plan(plans, "3d_lowres")
    with pytest.raises(UserError, match="3d_fullres is not supported yet"):
        load_plan(plans, "3d_fullres")
    other = json.loads(plans.read_text())
    other["dataset_name"] = "Dataset777_Other"
    (plans.parent / "other.json").write_text(json.dumps(other))
    cfg = config(root, plans.parent / "other.json")
    with pytest.raises(UserError, match="made from another plans file"):
        store_plan_check(cfg, {"settings": {"layout": "nnunet", "plans_sha256": "0" * 64, "configuration": "2d"}})
    paper = tmp_path / "paper"  # an encoder of the paper's U-Net is not the plan's network
    paper.mkdir()
    from pcl_hpc.config import ModelConfig
    from pcl_hpc.models.unet import build_pretrain_net
    torch.save(build_pretrain_net(ModelConfig()).encoder.state_dict(), paper / "encoder.pt")
    done = subprocess.run(cli("export", "--model", str(paper / "encoder.pt"), "--format", "nnunet", "--plans",
                              str(plans), "--out", str(tmp_path / "w.pt")), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "not an nnU-Net encoder" in done.stderr and "Traceback" not in done.stderr
    # nnunetv2 missing: the extra to install is named (import blocked in a fresh interpreter)
    code = ("import sys; sys.modules['nnunetv2'] = None\n"
            "from pcl_hpc.cli import main\n"
            f"sys.argv = ['pcl-hpc', 'export', '--model', {str(paper / 'encoder.pt')!r}, '--format', 'nnunet', "
            f"'--plans', {str(plans)!r}, '--out', {str(tmp_path / 'x.pt')!r}]\nraise SystemExit(main())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "pip install 'pcl-hpc[nnunet]'" in done.stderr and "Traceback" not in done.stderr


def test_the_head_on_an_instancenorm_encoder_learns_from_the_first_step(nnunet_data):
    """nnU-Net's InstanceNorm bottleneck, globally averaged, is nearly the same vector for every slice (the
    loss would start at its uniform value); the head's 2 x 2 grid pooling tells slices apart, and PCL learns."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from pcl_hpc.losses import contrastive_loss
    from pcl_hpc.models.unet import pool_features
    from pcl_hpc.nnunet.network import pretrain_net
    from pcl_hpc.nnunet.plans import load_plan

    root, plans = nnunet_data
    folder = str(load_plan(plans).preprocessed_folder)
    data = np.asarray(infer_dataset_class(folder)(folder).load_case("dk01")[0])[0]
    index = np.linspace(2, data.shape[0] - 3, 16).astype(int)
    patch = load_plan(plans).patch_size
    x = torch.from_numpy(np.stack([_fit(data[i], patch) for i in index]))[:, None].float()
    positions = torch.tensor((index + 1) / data.shape[0], dtype=torch.float32)
    torch.manual_seed(0)
    net = pretrain_net(config(root, plans).model)
    deepest = net.encoder(x)[-1].detach()
    spread = lambda f: (f.std(0) / f.abs().mean(0).clamp_min(1e-6)).mean().item()  # noqa: E731
    assert spread(pool_features(deepest, 2)) > 3 * spread(pool_features(deepest, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(8):
        features = net(torch.cat([x, x.flip(-1)])).view(2, 16, -1).transpose(0, 1)
        loss = contrastive_loss(features, positions, torch.zeros(16, dtype=torch.long), method="pcl", threshold=0.1,
                                temperature=0.1, base_temperature=0.07)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses

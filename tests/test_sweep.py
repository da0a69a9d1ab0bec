"""The label-efficiency protocol: splits (unit), modes and the positive control (unit, and one real
supervised encoder), and a tiny sweep end to end through the CLI (random + PCL pretrained by the sweep,
M=1, 2 folds, 2 cells at a time), run twice."""

import csv
import json
import subprocess

import pytest

from pcl_hpc.data.store import read_manifest
from pcl_hpc.errors import UserError
from pcl_hpc.sweep import protocol_split, split_hash
from tests.conftest import REPO, cli


def test_protocol_split_is_disjoint_nested_and_seeded(demo_store):
    manifest = read_manifest(demo_store)
    patient = {v["id"]: v["patient"] for v in manifest["volumes"]}
    for fold in range(3):
        for seed in (0, 1):
            one = protocol_split(manifest, fold, 1, seed, val_patients=2)
            two = protocol_split(manifest, fold, 2, seed, val_patients=2)
            assert one == protocol_split(manifest, fold, 1, seed, val_patients=2)  # a function of its inputs
            groups = [{patient[v] for v in two[k]} for k in ("train", "val", "test")]
            assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
            assert {v["fold"] for v in manifest["volumes"] if v["id"] in two["test"]} == {fold}
            assert set(one["train"]) <= set(two["train"]) and one["val"] == two["val"] and one["test"] == two["test"]
            assert len({patient[v] for v in one["train"]}) == 1 and len(groups[1]) == 2
    draws = {tuple(protocol_split(manifest, 0, 1, seed, 1)["train"]) for seed in range(8)}
    assert len(draws) > 1, "the seed draws the labeled patients"
    assert split_hash(one) != split_hash(two)
    with pytest.raises(UserError, match="sweep.labeled"):
        protocol_split(manifest, 0, 3, 0, val_patients=2)
    with pytest.raises(UserError, match="sweep.folds"):
        protocol_split(manifest, 5, 1, 0, val_patients=1)


def sweep_config(store, out, *overrides):
    """A tiny in-process sweep config on the demo store (2 fine-tuning steps, 1 worker)."""
    from pcl_hpc.config import load_config

    return load_config(str(REPO / "configs" / "demo.yaml"), [
        f"data.store={store}", f"output_dir={out}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "data.patch=32",
        "model.width=4", "finetune.max_steps=2", "finetune.epochs=1", "finetune.batch_size=4", "engine.precision=fp32",
        "sweep.pretrain=[]", "sweep.labeled=[1]", "sweep.folds=[0]", "sweep.seeds=[0]", "sweep.workers=1",
        "tracking.register_name=sweep-test", *overrides])


def test_modes_name_the_cells_set_their_config_and_rows(demo_store, tmp_path):
    from pcl_hpc.sweep import cell_config, plan_cells, result_rows

    manifest = read_manifest(demo_store)
    cfg = sweep_config(demo_store, tmp_path, "sweep.encoders=[random]", "sweep.modes=[full, frozen]",
                       "sweep.labeled=[1, 2]")
    cells = plan_cells(cfg, manifest)
    assert [c.name for c in cells] == ["random_M1_f0_s0", "random_M2_f0_s0", "random_frozen_M1_f0_s0",
                                       "random_frozen_M2_f0_s0"], "full cells keep their names"
    for cell in cells:
        split = protocol_split(manifest, cell.fold, cell.labeled, cell.seed, cfg.sweep.val_patients)
        assert cell_config(cfg, cell, split).finetune.mode == cell.mode
    rows = result_rows(cells[2], {"per_volume": {"dk02": [0.5, 0.6, 0.7]}}, ["a", "b", "c"])
    assert rows[0]["mode"] == "frozen" and rows[0]["cell"] == "random_frozen_M1_f0_s0"
    assert [c.mode for c in plan_cells(sweep_config(demo_store, tmp_path), manifest)] == ["full"], "the default"
    own = plan_cells(sweep_config(demo_store, tmp_path, "sweep.encoders=[random]", "sweep.modes=[full, frozen]",
                                  "sweep.seeds=[0, 1, 2]", "sweep.frozen_seeds=[0]"), manifest)
    assert [c.name for c in own] == ["random_M1_f0_s0", "random_M1_f0_s1", "random_M1_f0_s2",
                                     "random_frozen_M1_f0_s0"], "frozen cells take sweep.frozen_seeds"
    for overrides, key in ((["sweep.modes=[full, half]"], "sweep.modes"), (["sweep.modes=[]"], "sweep.modes"),
                           (["finetune.mode=frozen"], "finetune.mode=frozen"),
                           (["sweep.frozen_seeds=[]"], "sweep.frozen_seeds"),
                           (["model.arch=nnunet", "sweep.trainer=nnunet", "sweep.modes=[frozen]"], "sweep.modes: frozen"),
                           (["model.arch=nnunet", "sweep.trainer=nnunet", "sweep.encoders=[supervised]"], "supervised"),
                           (["sweep.encoders=[/x/supervised/encoder.pt]"], "the positive control's name")):
        with pytest.raises(UserError, match=key) as err:
            plan_cells(sweep_config(demo_store, tmp_path, *overrides), manifest)
        assert "\n" not in str(err.value)


def test_supervised_split_holds_every_labeled_volume_but_the_test_fold(demo_store, tmp_path):
    from pcl_hpc.sweep import plan_cells, supervised_folder, supervised_split, supervised_stage, sweep_plan

    manifest = read_manifest(demo_store)
    for fold in range(3):
        outside = [v["id"] for v in manifest["volumes"] if v["labeled"] and v["fold"] != fold]
        test_fold = {v["id"] for v in manifest["volumes"] if v["fold"] == fold}
        for seed in (0, 1):
            split = supervised_split(manifest, fold, seed, val_patients=2)
            assert split["train"] == outside and not test_fold & {*split["train"], *split["val"]}
            assert split["val"] == protocol_split(manifest, fold, 1, seed, 2)["val"], "the cells' validation patients"
    cfg = sweep_config(demo_store, tmp_path, "sweep.encoders=[random, supervised]", "sweep.folds=[0, 1]")
    cells = plan_cells(cfg, manifest)
    assert [c.source for c in cells if c.encoder == "supervised"] == [
        str(supervised_folder(cfg, fold, 0) / "encoder.pt") for fold in (0, 1)], "one encoder per fold, any M"
    steps = {s.name: s for s in sweep_plan(cfg, "config.yaml")}
    assert steps["supervised"].after == [] and steps["cells"].after == ["register", "supervised"]
    assert [t.cells for t in steps["supervised"].tasks] == [["f0_s0"], ["f1_s0"]]
    assert "supervised" not in {s.name for s in sweep_plan(sweep_config(demo_store, tmp_path), "config.yaml")}
    split = supervised_split(manifest, 0, 0, 2)
    assert supervised_stage(cfg, 0, 0, split).section.epochs == cfg.finetune.epochs, "by default, a cell's epochs"
    cfg.sweep.supervised_epochs = 3
    assert supervised_stage(cfg, 0, 0, split).section.epochs == 3 and cfg.finetune.epochs != 3


@pytest.mark.slow  # 10 to 22 s here under load (a fine-tuning, MLflow's first database)
def test_the_supervised_encoder_never_sees_its_test_fold(demo_store, tmp_path, capsys):
    """A real (2-step) positive control for fold 0: its written split and the volumes it scored hold no
    volume of the test fold; it is trained once; its encoder.pt is what a cell loads."""
    import torch

    from pcl_hpc.models.unet import build_unet
    from pcl_hpc.sweep import is_supervised_complete, run_step, supervised_folder, sweep_plan

    manifest = read_manifest(demo_store)
    cfg = sweep_config(demo_store, tmp_path, "sweep.encoders=[supervised]", "sweep.modes=[frozen]",
                       "sweep.val_patients=1")
    with pytest.raises(UserError, match="do not exist yet.*supervised"):
        run_step(cfg, "cells")
    run_step(cfg, "supervised")
    where = supervised_folder(cfg, 0, 0)
    split = json.loads((where / "split.json").read_text())
    test_fold = {v["id"] for v in manifest["volumes"] if v["fold"] == 0}
    scored = json.loads((where / "results.json").read_text())["per_volume"]  # its validation volumes
    assert split["test_fold"] == 0 and len(split["train"]) == 4 and len(split["val"]) == 1
    assert not test_fold & {*split["train"], *split["val"], *scored}
    assert is_supervised_complete(cfg, manifest, 0, 0)
    assert all(t.done() for s in sweep_plan(cfg, "config.yaml") if s.name == "supervised" for t in s.tasks)
    run_step(cfg, "supervised")
    assert "0 supervised encoder(s) of task all trained now" in capsys.readouterr().out, "a finished one is kept"
    unet = build_unet(cfg.model, cfg.finetune.num_classes + 1)
    unet.encoder.load_state_dict(torch.load(where / "encoder.pt", weights_only=True))  # strict: a whole encoder


def run_sweep(store, out, *flags, ok=True):
    args = [f"data.store={store}", f"output_dir={out}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
            "data.patch=32", "model.width=4", "model.projection_dim=32", "pretrain.max_steps=2",
            "pretrain.batch_size=8", "pretrain.epochs=1", "finetune.epochs=1", "finetune.batch_size=8",
            "sweep.pretrain=[pcl]", "sweep.encoders=[random]", "sweep.labeled=[1]", "sweep.folds=[0, 1]",
            "sweep.seeds=[0]", "sweep.val_patients=1", "sweep.workers=2", "tracking.register_name=sweep-test"]
    proc = subprocess.run(cli("sweep", "--config", str(REPO / "configs" / "demo.yaml"), *flags, *args),
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_tiny_sweep_end_to_end_and_rerun_runs_nothing(demo_store, tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "exp"
    first = run_sweep(demo_store, out)
    sweep_dir = out / "sweep"
    cells = sorted(p.name for p in (sweep_dir / "cells").iterdir())
    assert cells == ["pcl_M1_f0_s0", "pcl_M1_f1_s0", "random_M1_f0_s0", "random_M1_f1_s0"]
    for cell in cells:
        split = json.loads((sweep_dir / "cells" / cell / "split.json").read_text())
        assert split["hash"] == split_hash({k: split[k] for k in ("train", "val", "test")})
    assert (out / "pretrain" / "pcl" / "encoder.pt").is_file()

    with (sweep_dir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    manifest = read_manifest(demo_store)
    tests = {fold: [v["id"] for v in manifest["volumes"] if v["labeled"] and v["fold"] == fold] for fold in (0, 1)}
    assert len(rows) == 2 * sum(len(t) for t in tests.values()), "one row per test volume x cell"
    assert {r["encoder"] for r in rows} == {"random", "pcl"}
    assert all(0.0 <= float(r["dice_mean"]) <= 1.0 for r in rows)
    for cls in ("cortex", "white_matter", "deep_grey"):
        assert f"dice_{cls}" in rows[0] and f"hd95_mm_{cls}" in rows[0]

    summary = (sweep_dir / "summary.md").read_text()
    assert "random" in summary and "pcl" in summary and "±" in summary
    assert summary.strip() in first.stdout

    import matplotlib.image

    png = matplotlib.image.imread(str(sweep_dir / "label_efficiency.png"))
    assert png.shape[:2] == (480, 640)

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pcl-hpc-demo")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and sorted(r.data.tags["cell"] for r in children) == cells
    for method in ("random", "pcl"):  # each method's best model (by validation Dice) is registered once
        versions = client.search_model_versions(f"name='sweep-test-{method}-seg'")
        assert len(versions) == 1 and versions[0].tags["cell"].startswith(f"{method}_M1_")
        assert 0.0 <= float(versions[0].tags["test_dice"]) <= 1.0

    second = run_sweep(demo_store, out)
    assert "0 run now" in second.stdout and "finetune done" not in second.stdout and "pretrain done" not in second.stdout
    assert (sweep_dir / "summary.md").read_text() == summary, "the same summary"
    again = client.search_runs([experiment.experiment_id])
    assert len(again) == len(runs), "a rerun makes no new runs"
    assert len(client.search_model_versions("name='sweep-test-pcl-seg'")) == 1, "nor registers again"

    # The same cells as the plan's steps one by one (what launchers/slurm.py submits): register, two shards, report.
    import shutil

    shutil.rmtree(sweep_dir)
    run_sweep(demo_store, out, "--step", "register")
    assert not (sweep_dir / "cells").exists() and (sweep_dir / "sweep.json").is_file()
    early = run_sweep(demo_store, out, "--step", "report", ok=False)
    assert "4 of 4 cells are not finished" in early.stderr and "Traceback" not in early.stderr
    for task in ("0/2", "1/2"):
        shard = run_sweep(demo_store, out, "--step", "cells", "--shard", task)
        assert "2 cell(s) of task" in shard.stdout and "pretrain done" not in shard.stdout
    run_sweep(demo_store, out, "--step", "report")
    assert (sweep_dir / "summary.md").read_text() == summary, "array tasks give the local sweep's summary"

"""The segmentation model registry against a real ``mlflow server``: register, load, promote, predict."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from mlflow import MlflowClient

from pcl_hpc.config import Config
from pcl_hpc.errors import UserError
from pcl_hpc.cli import main as cli_main
from pcl_hpc.tracking import Tracker, promote_alias
from pcl_hpc.tracking.models import load_segmentation_model, register_segmentation_model
from tests.mlflow_server import _free_port, isolated_mlflow, mlflow_server  # noqa: F401
from tests.mlflow_server import unique as _unique
from tests.test_export import write_model_folder


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch):
    with isolated_mlflow(monkeypatch, retries=2, timeout_s=20):
        yield


def _assert_same(loaded: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(original)
    for key, value in original.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def _files(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return (torch.load(folder / "model.pt", weights_only=True),
            json.loads((folder / "model_spec.json").read_text()))


def test_register_load_promote_and_predict(mlflow_server, tmp_path):
    first = write_model_folder(tmp_path / "m1", seed=0)
    second = write_model_folder(tmp_path / "m2", seed=1)
    cfg = Config(output_dir=str(tmp_path / "run"))
    cfg.tracking.uri, cfg.tracking.experiment = mlflow_server, _unique("exp")
    tracker = Tracker(cfg, enabled=True)
    run_id = tracker.start("finetune", {"x": 1})
    name = _unique("pcl-encoder-seg")
    lineage = {"encoder_name": "pcl-encoder", "encoder_version": "3", "split_hash": "0123456789abcdef",
               "test_dice": 0.8125}
    assert register_segmentation_model(first, name, tags=lineage, run_id=run_id) == "1"
    assert register_segmentation_model(second / "model.pt", name, tags=lineage) == "2"  # the Tracker's run
    tracker.end()

    for source, folder in ((f"models:/{name}/1", first), (f"models:/{name}@candidate", second),
                           (f"models:/{name}/2", second), (str(first), first), (str(first / "model.pt"), first)):
        state, spec = load_segmentation_model(source)
        want_state, want_spec = _files(folder)
        _assert_same(state, want_state)
        assert spec == want_spec, source

    client = MlflowClient(mlflow_server)
    mv = client.get_model_version(name, "1")
    assert mv.run_id == run_id and client.get_model_version(name, "2").run_id == run_id
    assert mv.tags["test_dice"] == "0.8125" and mv.tags["split_hash"] == "0123456789abcdef"
    assert mv.tags["encoder_version"] == "3" and mv.tags["lineage.encoder"] == "random"
    assert mv.tags["seg.class_names"] == "background,organ,lesion" and len(mv.tags["seg.sha256"]) == 64
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "dl")))
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert {"MLmodel", "artifacts/model.pt", "artifacts/model_spec.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]  # code and tensors only

    # the logged "models from code" pyfunc segments preprocessed slices
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1")
    slices = np.random.default_rng(0).normal(size=(2, 1, 32, 48)).astype(np.float32)
    from pcl_hpc.predict import build_network
    from pcl_hpc.tracking.models import open_segmentation_model

    net = build_network(open_segmentation_model(first), "m1")
    with torch.no_grad():
        expected = net(torch.from_numpy(slices)).argmax(1).numpy()
    assert np.array_equal(pyfunc.predict(slices), expected)

    # champion: promoted from the candidate, then back to version 1
    assert promote_alias(name, "candidate") == "2"
    _assert_same(load_segmentation_model(f"models:/{name}@champion")[0], _files(second)[0])
    assert promote_alias(name, f"models:/{name}/1", tracking_uri=mlflow_server) == "1"
    assert client.get_registered_model(name).aliases == {"candidate": "2", "champion": "1"}

    # predict --model models:/<name>@champion, the registry named on the command line
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    scan = tmp_path / "scan01.nii.gz"
    volume = np.random.default_rng(1).normal(100, 20, size=(24, 20, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.2, 4.0, 1.0])), str(scan))
    out = tmp_path / "masks"
    assert cli_main(["predict", "--model", f"models:/{name}@champion", "--input", str(scan), "--output", str(out),
                         "--tracking-uri", mlflow_server]) == 0
    mask, image = sitk.ReadImage(str(out / "scan01.nii.gz")), sitk.ReadImage(str(scan))
    assert (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection()) == (
        image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    sidecar = json.loads((out / "scan01.json").read_text())
    assert sidecar["model"]["source"] == "registry" and sidecar["model"]["name"] == name
    assert sidecar["model"]["version"] == "1" and sidecar["model"]["tags"]["test_dice"] == "0.8125"
    assert sidecar["model"]["sha256"] == mv.tags["seg.sha256"]


def test_unreachable_server_warns_and_returns_none(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    folder = write_model_folder(tmp_path / "m")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with pytest.warns(RuntimeWarning, match="could not register the segmentation model"):
        assert register_segmentation_model(folder, "never-registered") is None


def test_bad_sources_are_user_errors(mlflow_server, tmp_path):
    mlflow.set_tracking_uri(mlflow_server)
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save(_files(write_model_folder(tmp_path / "m"))[0], bare / "model.pt")
    with pytest.raises(UserError, match="no model_spec.json beside the weights"):
        register_segmentation_model(bare, _unique("x"))
    with pytest.raises(ValueError, match="reserved"):
        register_segmentation_model(tmp_path / "m", _unique("x"), alias="latest")
    name = _unique("empty")
    MlflowClient(mlflow_server).create_registered_model(name)
    with pytest.raises(UserError, match=f"no registered model '{name}' with alias 'champion'"):
        load_segmentation_model(f"models:/{name}@champion")
    with pytest.raises(UserError, match="not a registered model reference"):
        load_segmentation_model(f"models:/{name}")
    with pytest.raises(UserError, match="not found"):
        load_segmentation_model(str(tmp_path / "nowhere"))


def test_encoders_and_segmentation_models_go_through_one_routine(tmp_path, monkeypatch):
    """register_encoder and register_segmentation_model are register_version with their kind: what
    the kind packs, the run and tags passed on, and the same outage handling (warning, None)."""
    import pcl_hpc.tracking.versions as versions
    from pcl_hpc.config import ModelConfig
    from pcl_hpc.tracking import EncoderVersion, SegmentationVersion, register_encoder

    calls = []

    def fake_log_version(version, name, alias, tags, run_id):
        staged = tmp_path / f"staged-{len(calls)}"
        staged.mkdir()
        calls.append((type(version), sorted(p.name for p in version.stage(staged).values()), name, alias, tags, run_id))
        return str(len(calls))

    monkeypatch.setattr(versions, "log_version", fake_log_version)
    folder = write_model_folder(tmp_path / "m")
    state = {"module.w": torch.ones(2, 3), "module.b": torch.zeros(2)}
    assert register_encoder(state, ModelConfig(), "enc", "candidate", tags={"k": 1}, run_id="r1") == "1"
    assert register_segmentation_model(folder, "seg", tags={"k": 2}, run_id="r2") == "2"
    assert calls == [(EncoderVersion, ["encoder.pt", "model_config.json"], "enc", "candidate", {"k": 1}, "r1"),
                     (SegmentationVersion, ["model.pt", "model_spec.json"], "seg", "candidate", {"k": 2}, "r2")]

    def unreachable(*args):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(versions, "log_version", unreachable)
    with pytest.warns(RuntimeWarning, match="could not register the encoder as 'enc'.*register_encoder"):
        assert register_encoder(state, ModelConfig(), "enc", "candidate") is None
    with pytest.warns(RuntimeWarning, match=f"could not register the segmentation model {folder} as 'seg'"):
        assert register_segmentation_model(folder, "seg") is None

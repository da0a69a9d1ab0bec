"""`pcl-hpc export`: TorchScript and ONNX exports give PyTorch's logits, with the preprocessing spec beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pcl_hpc.config import Config, DataConfig
from pcl_hpc.data.preprocess import volume_settings
from pcl_hpc.errors import UserError
from pcl_hpc.export import ONNX_OPSET, export
from pcl_hpc.cli import main as cli_main
from pcl_hpc.models.unet import build_unet
from pcl_hpc.predict import build_network, predict
from pcl_hpc.tracking.models import open_segmentation_model
from pcl_hpc.train.finetune import model_spec


def write_model_folder(folder: Path, seed: int = 0) -> Path:
    """model.pt + model_spec.json as fine-tuning writes them (the spec from finetune.model_spec), with
    BatchNorm statistics that are not the initial ones."""
    cfg = Config()
    cfg.model.width, cfg.finetune.num_classes, cfg.finetune.train_volumes = 4, 2, ["case01"]
    settings = volume_settings(DataConfig(target_spacing=[1.5, 1.5]), ["background", "organ", "lesion"])
    manifest = {"settings": {**settings, "folds": 5, "fold_seed": 0, "id_scheme": "source", "id_key_check": None},
                "content_hash": "ab" * 32}
    torch.manual_seed(seed)
    net = build_unet(cfg.model, cfg.finetune.num_classes + 1)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 1, 32, 32) * 2 + 1)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    spec = model_spec(cfg, manifest, {"encoder": "random"}, ["organ", "lesion"])
    (folder / "model_spec.json").write_text(json.dumps(spec, indent=1))
    return folder


@pytest.fixture
def model(tmp_path):
    folder = write_model_folder(tmp_path / "model")
    net = build_network(open_segmentation_model(folder), str(folder))
    return folder, net


def _inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 1, 32, 48, generator=g), torch.randn(5, 1, 64, 32, generator=g)]  # batch, H, W vary


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_matches_pytorch(model, tmp_path):
    folder, net = model
    paths = export(folder, "torchscript", tmp_path / "ts")
    assert paths["model"] == tmp_path / "ts" / "model.torchscript.pt"
    loaded = torch.jit.load(str(paths["model"]), map_location="cpu")
    with torch.no_grad():
        for x in _inputs():
            torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-5)
    spec = json.loads(paths["spec"].read_text())
    source = json.loads((folder / "model_spec.json").read_text())
    assert spec["preprocessing"] == source["preprocessing"] and spec["class_names"] == source["class_names"]
    assert spec["export"]["formats"] == {"torchscript": {"file": "model.torchscript.pt"}}
    assert spec["export"]["input"]["name"] == "image" and spec["export"]["output"]["shape"][1] == 3
    assert not [p.name for p in (tmp_path / "ts").iterdir() if p.name.startswith(".")]  # no temp files left


def test_onnx_matches_pytorch_with_a_dynamic_batch(model, tmp_path):
    folder, net = model
    paths = export(folder, "onnx", tmp_path / "onnx")
    graph = onnx.load(str(paths["model"]))
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) >= ONNX_OPSET >= 17
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 1
    session = ort.InferenceSession(str(paths["model"]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for x in _inputs():
            got = session.run(["logits"], {"image": x.numpy()})[0]
            np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-4, atol=1e-4)

    # both formats side by side from the same weights; the CLI entry writes the same files
    assert cli_main(["export", "--model", str(folder / "model.pt"), "--format", "torchscript", "--out", str(tmp_path / "onnx")]) == 0
    spec = json.loads(paths["spec"].read_text())
    assert set(spec["export"]["formats"]) == {"onnx", "torchscript"} and spec["export"]["formats"]["onnx"]["opset"] == 17
    assert len(spec["export"]["source"]["sha256"]) == 64


def test_export_errors_are_one_line(model, tmp_path):
    folder, _ = model
    with pytest.raises(UserError, match="format 'tflite' is not known"):
        export(folder, "tflite", tmp_path / "x")
    export(folder, "onnx", tmp_path / "out")
    other = write_model_folder(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="holds an export of another model"):
        export(other, "torchscript", tmp_path / "out")
    # an export folder is not a model to predict with: the spec says so
    with pytest.raises(UserError, match="is an exported model"):
        predict(tmp_path / "out", tmp_path, tmp_path / "masks", progress=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "model.pt", bare / "model.pt")
    assert cli_main(["export", "--model", str(bare), "--format", "onnx", "--out", str(tmp_path / "o2")]) == 2

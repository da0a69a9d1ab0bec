"""`pcl-hpc predict`: a model fine-tuned on real demo anatomy segments new scans on their own grids.

One small fine-tuning (module fixture) on a store built with data.target_spacing = [3, 3] mm;
the scans are the held-out subject dk05 written in other orientations, spacings and formats.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pcl_hpc import metrics
from pcl_hpc.config import DataConfig, load_config
from pcl_hpc.data import store as zstore
from pcl_hpc.data.preprocess import preprocess
from pcl_hpc.errors import UserError
from pcl_hpc.inference import predict_labels, predict_probabilities
from pcl_hpc.predict import build_network, predict
from pcl_hpc.tracking.models import open_segmentation_model
from tests.conftest import REPO
from tests.dicom_utils import write_dicom_series
from tests.mlflow_server import isolated_mlflow

PHI = {"0010|0010": "Doe^Jane", "0010|0020": "PID-93817-X", "0010|0030": "19450317", "0008|0020": "20190512",
       "0008|0080": "St Elsewhere Hospital"}
TEST_CASE = "dk05"


@pytest.fixture(scope="module")
def trained(demo_store, tmp_path_factory):
    """(model folder, store, raw folder): 3 quick epochs on dk01, selected on dk04, in-plane spacing 3 mm."""
    root = tmp_path_factory.mktemp("predict")
    demo_raw = Path(demo_store).parent / "raw"
    raw = root / "raw"
    for case in ("dk01", "dk04", TEST_CASE):
        for sub in ("imagesTr", "labelsTr"):
            (raw / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(demo_raw / sub / f"{case}.nii.gz", raw / sub / f"{case}.nii.gz")
    shutil.copy(demo_raw / "dataset.json", raw / "dataset.json")  # the class names
    store = str(root / "store.zarr")
    summary = preprocess(DataConfig(raw_dir=str(raw), store=store, layout="generic", folds=3, target_spacing=[3.0, 3.0]),
                         progress=False)
    assert summary.ok, summary.format()
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [
        f"data.store={store}", "data.patch=32", "model.width=4", "finetune.epochs=3", "finetune.lr=0.01",
        "finetune.batch_size=8", "finetune.augment=false", "finetune.train_volumes=[dk01]",
        "finetune.val_volumes=[dk04]", f"finetune.test_volumes=[{TEST_CASE}]", "finetune.name=m",
        "engine.precision=fp32", "engine.channels_last=false",  # the fast settings on 2 CPU cores
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"output_dir={root / 'out'}"])
    from pcl_hpc.train.finetune import finetune

    with pytest.MonkeyPatch.context() as mp, isolated_mlflow(mp, retries=0, timeout_s=5):
        finetune(cfg)
    folder = root / "out" / "finetune" / "m"
    assert (folder / "model.pt").is_file() and (folder / "model_spec.json").is_file()
    return folder, store, raw


def _source(raw: Path) -> sitk.Image:
    return sitk.ReadImage(str(raw / "imagesTr" / f"{TEST_CASE}.nii.gz"))  # 3 mm, stored LIP (not canonical)


def _store_prediction(folder: Path, store: str) -> np.ndarray:
    """argmax over the model's softmax on the preprocessed store volume (canonical LPS, 3 mm)."""
    net = build_network(open_segmentation_model(folder), str(folder))
    image = zstore.load_volume(store, TEST_CASE)[0]
    pred = predict_probabilities(net, image, torch.device("cpu")).argmax(-1).astype(np.uint8)
    assert np.array_equal(pred, predict_labels(net, image, torch.device("cpu"), batch=3))  # any batch, same labels
    return pred


def _same_geometry(mask: sitk.Image, scan: sitk.Image) -> None:
    assert mask.GetSize() == scan.GetSize()
    assert mask.GetSpacing() == scan.GetSpacing()
    assert mask.GetOrigin() == scan.GetOrigin()
    assert mask.GetDirection() == scan.GetDirection()


def _resampled_to_2mm(img: sitk.Image, orientation: str) -> sitk.Image:
    """The same anatomy reoriented (axes permuted/flipped) and resampled to 2 mm: a scan from elsewhere."""
    img = sitk.DICOMOrient(img, orientation)
    size = [int(round(n * s / 2.0)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (2.0, 2.0, 2.0),
                         img.GetDirection(), 0.0, sitk.sitkFloat32)


def test_mask_equals_the_store_prediction_where_geometry_round_trips(trained, tmp_path):
    folder, store, raw = trained
    src = _source(raw)
    scans = tmp_path / "scans"
    scans.mkdir()
    sitk.WriteImage(sitk.DICOMOrient(src, "LPS"), str(scans / "canonical.nii.gz"))  # training orientation and spacing
    sitk.WriteImage(src, str(scans / "stored_lip.nii.gz"))  # training spacing, another orientation
    summary = predict(folder, scans, tmp_path / "out", progress=False)
    assert summary.ok and len(summary.written) == 2, summary.format()

    expected = _store_prediction(folder, store)
    assert len(np.unique(expected)) == 4  # a real segmentation: every class is predicted somewhere
    for name in ("canonical", "stored_lip"):
        scan = sitk.ReadImage(str(scans / f"{name}.nii.gz"))
        mask = sitk.ReadImage(str(tmp_path / "out" / f"{name}.nii.gz"))
        _same_geometry(mask, scan)
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert np.array_equal(sitk.GetArrayFromImage(sitk.DICOMOrient(mask, "LPS")), expected), name

    sidecar = json.loads((tmp_path / "out" / "canonical.json").read_text())
    assert sidecar["class_names"] == ["background", "cortex", "white_matter", "deep_grey"]
    assert sidecar["model"]["source"] == "file" and len(sidecar["model"]["sha256"]) == 64
    assert sidecar["model"]["encoder"] == {"encoder": "random"} and sidecar["tta"] == "none"
    assert sum(sidecar["voxels_per_class"].values()) == int(np.prod(src.GetSize()))


def test_the_test_dice_of_finetuning_is_the_dice_of_the_masks_predict_writes(trained, tmp_path):
    """One inference path: the test Dice in results.json (what selects and registers a model) is the Dice of
    the mask predict writes for the same scan, compared with the store's label in the store's space."""
    folder, store, raw = trained
    results = json.loads((folder / "results.json").read_text())
    summary = predict(folder, raw / "imagesTr" / f"{TEST_CASE}.nii.gz", tmp_path / "out", progress=False)
    assert summary.ok and len(summary.written) == 1, summary.format()
    _, label, attrs = zstore.load_volume(store, TEST_CASE)
    mask = sitk.ReadImage(str(tmp_path / "out" / f"{TEST_CASE}.nii.gz"))  # on the scan's own grid (LIP)
    in_store = sitk.GetArrayFromImage(sitk.DICOMOrient(mask, attrs["stored_orientation"]))
    assert in_store.shape == label.shape
    scores = metrics.volume_metrics(in_store, label, attrs["spacing"], 3)
    assert 0.3 < np.mean(scores["dice"]) < 1.0  # a real, imperfect segmentation
    assert scores["dice"] == pytest.approx(results["per_volume"][TEST_CASE], rel=0, abs=1e-6)
    assert results["mean"] == pytest.approx(float(np.mean(scores["dice"])), rel=0, abs=1e-6)
    assert scores["hd95_mm"] == pytest.approx(results["hd95_mm_per_volume"][TEST_CASE], rel=0, abs=1e-6)


def test_non_canonical_scan_at_another_spacing_gets_its_own_grid(trained, tmp_path):
    folder, store, raw = trained
    src = _source(raw)
    scans = tmp_path / "scans"
    scans.mkdir()
    ras = _resampled_to_2mm(src, "RAS")  # flipped x and y
    ras.SetOrigin((12.5, -7.25, 3.0))  # an origin of its own: only the mask's own grid matters
    sitk.WriteImage(ras, str(scans / "ras_2mm.nrrd"))
    sitk.WriteImage(_resampled_to_2mm(src, "SRA"), str(scans / "permuted_2mm.mha"))  # axes permuted too
    summary = predict(str(folder / "model.pt"), scans, tmp_path / "out", fmt="keep", progress=False)
    assert summary.ok and len(summary.written) == 2, summary.format()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "permuted_2mm.json", "permuted_2mm.mha", "ras_2mm.json", "ras_2mm.nrrd"]

    # the prediction at the training grid, put into physical space (the store volume's geometry)
    attrs = zstore.load_volume(store, TEST_CASE)[2]
    reference = sitk.GetImageFromArray(_store_prediction(folder, store))
    reference.SetSpacing(tuple(attrs["spacing"][::-1]))
    reference.SetOrigin(tuple(attrs["origin"]))
    reference.SetDirection(tuple(attrs["direction"]))
    for name, ext, origin in (("ras_2mm", ".nrrd", (12.5, -7.25, 3.0)), ("permuted_2mm", ".mha", None)):
        scan = sitk.ReadImage(str(scans / f"{name}{ext}"))
        mask = sitk.ReadImage(str(tmp_path / "out" / f"{name}{ext}"))
        _same_geometry(mask, scan)  # size, spacing, origin, direction: exactly the input's
        assert scan.GetSpacing() == (2.0, 2.0, 2.0) and (origin is None or mask.GetOrigin() == origin)
        got = sitk.GetArrayFromImage(mask)
        if origin is not None:  # the scan was moved: compare in its own voxel grid, against the un-moved one
            scan.SetOrigin(_resampled_to_2mm(src, "RAS").GetOrigin())
        want = sitk.GetArrayFromImage(sitk.Resample(reference, scan, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        agree = (got == want).mean()
        flipped = max((got == np.flip(want, axis)).mean() for axis in range(3))
        # ~0.965: a 2 mm resampling of the scan against the 3 mm prediction, not the orientation (which alone
        # changes no voxel: test_two_orientations_of_one_scan_give_the_same_mask)
        assert agree > 0.9 and agree > flipped + 0.04, (name, agree, flipped)  # anatomy where it belongs


def _write_dicom_series(folder: Path, img: sitk.Image) -> None:
    """One int16 slice file per z of an LPS image, with patient identifiers in the tags."""
    write_dicom_series(folder, img, PHI, modality="MR", series="1.2.826.0.1.3680043.2.1125.7.1")


def test_nifti_nrrd_and_dicom_series_without_patient_identifiers(trained, tmp_path):
    folder, _, raw = trained
    lps = sitk.DICOMOrient(_source(raw), "LPS")
    scans = tmp_path / "scans"
    _write_dicom_series(scans / "DOE_JANE_series", lps)
    assert b"Doe^Jane" in (scans / "DOE_JANE_series" / "IM0000.dcm").read_bytes()  # the tags really are there
    as_int = sitk.Cast(sitk.Round(lps), sitk.sitkInt16)
    sitk.WriteImage(as_int, str(scans / "same.nii.gz"))
    sitk.WriteImage(as_int, str(scans / "same_nrrd.nrrd"))
    (scans / "notes.txt").write_text("not a scan: ignored")
    summary = predict(folder, scans, tmp_path / "out", fmt="keep", progress=False)
    assert summary.ok and len(summary.written) == 3, summary.format()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "DOE_JANE_series.json", "DOE_JANE_series.nii.gz", "same.json", "same.nii.gz", "same_nrrd.json",
        "same_nrrd.nrrd"]

    series = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(scans / "DOE_JANE_series")))
    dicom_mask = sitk.ReadImage(str(out / "DOE_JANE_series.nii.gz"))
    _same_geometry(dicom_mask, series)
    nifti_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "same.nii.gz")))
    assert np.array_equal(sitk.GetArrayFromImage(dicom_mask), nifti_mask)  # the series is the same scan
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "same_nrrd.nrrd"))), nifti_mask)

    mask = sitk.ReadImage(str(out / "DOE_JANE_series.nii.gz"))
    blob = b"\n".join([gzip.decompress((out / "DOE_JANE_series.nii.gz").read_bytes()),
                       (out / "DOE_JANE_series.json").read_bytes(),
                       "\n".join(f"{k}={mask.GetMetaData(k)}" for k in mask.GetMetaDataKeys()).encode()]).lower()
    for value in PHI.values():
        for form in {value, value.replace("^", " "), "doe", "jane", value[:4] + "-" + value[4:6] + "-" + value[6:]}:
            assert form.lower().encode() not in blob, f"{form!r} leaked into the mask or its sidecar"
    sidecar = json.loads((out / "DOE_JANE_series.json").read_text())
    assert sidecar["input_kind"] == "dicom-series" and sidecar["mask_format"] == "nii.gz"


def test_bad_scans_fail_one_line_each_and_the_rest_is_written(trained, tmp_path):
    folder, _, raw = trained
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(raw / "imagesTr" / f"{TEST_CASE}.nii.gz", scans / "good.nii.gz")
    data = (scans / "good.nii.gz").read_bytes()
    (scans / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    nib.save(nib.Nifti1Image(np.ones((20, 24), np.float32), np.eye(4)), str(scans / "flat2d.nii.gz"))
    nan = np.random.default_rng(0).normal(size=(12, 16, 10)).astype(np.float32)
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(scans / "with_nan.nii.gz"))  # ITK's NIfTI reader reads NaN as 0
    nan[3, 4, 5] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(scans / "with_inf.mha"))  # ITK's MetaImage reader keeps it
    rgb = sitk.Compose([sitk.GetImageFromArray(np.ones((10, 16, 16), np.float32))] * 3)  # 3 values per voxel
    sitk.WriteImage(rgb, str(scans / "rgb.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 16, 16), np.float32)), str(scans / "good.nrrd"))  # same name
    cmd = [sys.executable, "-m", "pcl_hpc", "predict", "--model", str(folder), "--input", str(scans),
           "--output", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("predict: FAILED")]
    for bad, why in (("truncated", "truncated"), ("flat2d", "not a 3D volume"), ("with_nan", "NaN or Inf"),
                     ("with_inf", "NaN or Inf"), ("rgb", "3 components per voxel"),
                     ("good", "would replace the one of")):
        hits = [ln for ln in lines if f"{bad}." in ln]
        assert len(hits) == 1 and why in hits[0], (bad, lines)
    assert len(lines) == 6
    assert done.stdout.splitlines()[-1].startswith("predict: 1 written, 0 skipped") and "6 failed" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.json", "good.nii.gz"]  # no leftovers

    # a requeued job: the finished scan is skipped unless --overwrite
    mask = tmp_path / "out" / "good.nii.gz"
    os.utime(mask, (1_000_000, 1_000_000))
    again = predict(folder, scans / "good.nii.gz", tmp_path / "out", progress=False)
    assert again.ok and again.skipped == [str(scans / "good.nii.gz")] and not again.written
    assert mask.stat().st_mtime == 1_000_000
    forced = predict(folder, scans / "good.nii.gz", tmp_path / "out", overwrite=True, progress=False)
    assert forced.written == [str(scans / "good.nii.gz")] and mask.stat().st_mtime != 1_000_000


def test_tta_runs_and_agrees(trained, tmp_path):
    folder, _, raw = trained
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(raw / "imagesTr" / f"{TEST_CASE}.nii.gz", scan)
    plain = predict(folder, scan, tmp_path / "plain", progress=False)
    tta = predict(folder, scan, tmp_path / "tta", tta=True, progress=False)
    assert plain.ok and tta.ok and tta.written
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / "scan.nii.gz")))
    b = sitk.ReadImage(str(tmp_path / "tta" / "scan.nii.gz"))
    _same_geometry(b, sitk.ReadImage(str(scan)))
    assert (sitk.GetArrayFromImage(b) == a).mean() > 0.9
    assert json.loads((tmp_path / "tta" / "scan.json").read_text())["tta"] == "flips"


def test_a_model_without_its_spec_is_one_clear_error(trained, tmp_path):
    folder, _, raw = trained
    scan = raw / "imagesTr" / f"{TEST_CASE}.nii.gz"
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "model.pt", bare / "model.pt")
    with pytest.raises(UserError, match="no model_spec.json beside the weights") as err:
        predict(bare, scan, tmp_path / "out", progress=False)
    assert "\n" not in str(err.value)
    spec = json.loads((folder / "model_spec.json").read_text())
    (bare / "model_spec.json").write_text(json.dumps({**spec, "format": 2}))
    with pytest.raises(UserError, match="format 2"):
        predict(bare / "model.pt", scan, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="folder of the input scans"):
        predict(folder, scan.parent, scan.parent, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_hashed_store_names_masks_by_the_stores_hashed_ids(trained, tmp_path):
    from pcl_hpc.data.pseudonym import hashed_id, key_check

    folder, _, raw = trained
    hashed = tmp_path / "hashed_model"
    shutil.copytree(folder, hashed)
    key = bytes(range(32))
    (tmp_path / "store.zarr.idkey").write_text(key.hex() + "\n")
    spec = json.loads((hashed / "model_spec.json").read_text())
    spec["preprocessing"].update(id_scheme="hashed", id_key_check=key_check(key))
    (hashed / "model_spec.json").write_text(json.dumps(spec))
    scan = tmp_path / "scans" / "DOE_JANE_19450317.nii.gz"
    scan.parent.mkdir()
    shutil.copy(raw / "imagesTr" / f"{TEST_CASE}.nii.gz", scan)

    summary = predict(hashed, scan, tmp_path / "out", id_key=tmp_path / "store.zarr.idkey", progress=False)
    assert summary.ok, summary.format()
    vid = hashed_id(key, "DOE_JANE_19450317")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["idmap.csv", f"{vid}.json", f"{vid}.nii.gz"]
    assert "DOE" not in (tmp_path / "out" / f"{vid}.json").read_text()
    idmap = tmp_path / "out" / "idmap.csv"
    assert idmap.read_text().splitlines() == ["id,source", f"{vid},DOE_JANE_19450317"]
    assert idmap.stat().st_mode & 0o077 == 0  # readable by its owner only

    (tmp_path / "other.idkey").write_text(bytes(range(1, 33)).hex())
    with pytest.raises(UserError, match="is not the id key of the store"):
        predict(hashed, scan, tmp_path / "out2", id_key=tmp_path / "other.idkey", progress=False)


def test_two_orientations_of_one_scan_give_the_same_mask(trained, tmp_path):
    """The same physical scan, axes permuted and one flipped, as NIfTI and as NRRD: identical masks.

    At 2.2 x 2.4 x 2.0 mm with an origin off the 3 mm grid, so the in-plane resampling to the
    model's 3 mm (and back) is exercised; the NRRD is made from the NIfTI file as read back, so
    both files hold the same object (NIfTI keeps its geometry in float32)."""
    folder, _, raw = trained
    src = _source(raw)
    scans = tmp_path / "scans"
    scans.mkdir()
    scan = sitk.Resample(src, [80, 75, 100], sitk.Transform(), sitk.sitkLinear, (-88.123456, -89.7654321, 108.3333),
                         (2.2, 2.4, 2.0), src.GetDirection(), 0.0, sitk.sitkFloat32)
    sitk.WriteImage(scan, str(scans / "a.nii.gz"))
    a = sitk.ReadImage(str(scans / "a.nii.gz"))
    b = sitk.Flip(sitk.PermuteAxes(a, [2, 0, 1]), [False, True, False])  # geometry follows: the same object
    sitk.WriteImage(b, str(scans / "b.nrrd"))
    b = sitk.ReadImage(str(scans / "b.nrrd"))
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(b.GetDirection()) != \
        sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(a.GetDirection())
    on_a = sitk.Resample(b, a, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    assert np.array_equal(sitk.GetArrayFromImage(on_a), sitk.GetArrayFromImage(a))  # really the same voxels

    summary = predict(folder, scans, tmp_path / "out", fmt="keep", progress=False)
    assert summary.ok and len(summary.written) == 2, summary.format()
    mask_a = sitk.ReadImage(str(tmp_path / "out" / "a.nii.gz"))
    mask_b = sitk.ReadImage(str(tmp_path / "out" / "b.nrrd"))
    _same_geometry(mask_a, a)
    _same_geometry(mask_b, b)
    got = sitk.GetArrayFromImage(sitk.Resample(mask_b, mask_a, sitk.Transform(), sitk.sitkNearestNeighbor, 255))
    want = sitk.GetArrayFromImage(mask_a)
    assert len(np.unique(want)) == 4  # every class is predicted somewhere
    assert np.array_equal(got, want), f"{(got != want).sum()} of {want.size} voxels differ"


@pytest.mark.slow
def test_a_model_fitted_to_one_volume_scores_dice_above_0_9_on_its_source_file(demo_store, tmp_path):
    """Fit one demo volume (train = selection = dk01) at 2.4 mm in-plane, then predict the 3 mm source
    file it came from: the mask, back on the source's own grid, against the source label file.

    Dice: the mean over the three foreground classes (cortex, white matter, deep grey; all present)."""
    demo_raw = Path(demo_store).parent / "raw"  # the files the demo store was made from (make_demo_data)
    raw = tmp_path / "raw"
    for case in ("dk01", "dk06"):  # dk06: finetune's held-out test volume, required and disjoint
        for sub in ("imagesTr", "labelsTr"):
            (raw / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(demo_raw / sub / f"{case}.nii.gz", raw / sub / f"{case}.nii.gz")
    shutil.copy(demo_raw / "dataset.json", raw / "dataset.json")
    store = str(tmp_path / "store.zarr")
    summary = preprocess(DataConfig(raw_dir=str(raw), store=store, layout="generic", folds=2,
                                    target_spacing=[2.4, 2.4]), progress=False)  # 3 mm -> 2.4 mm and back
    assert summary.ok, summary.format()
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [
        f"data.store={store}", "data.patch=80", "model.width=8", "finetune.epochs=25", "finetune.lr=0.01",
        "finetune.batch_size=4", "finetune.augment=false", "finetune.train_volumes=[dk01]", "finetune.val_volumes=[]",
        "finetune.test_volumes=[dk06]", "finetune.name=fit", "finetune.log_every=100", "engine.precision=fp32",
        "engine.channels_last=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"output_dir={tmp_path / 'out'}"])
    from pcl_hpc.train.finetune import finetune

    with pytest.MonkeyPatch.context() as mp, isolated_mlflow(mp, retries=0, timeout_s=5):
        finetune(cfg)  # 375 steps over the 60 slices of 96 x 80 (a slice fits the 80 x 80 patch but for background)
    source = demo_raw / "imagesTr" / "dk01.nii.gz"
    done = predict(tmp_path / "out" / "finetune" / "fit", source, tmp_path / "masks", progress=False)
    assert done.ok, done.format()
    mask = sitk.ReadImage(str(tmp_path / "masks" / "dk01.nii.gz"))
    truth = sitk.ReadImage(str(demo_raw / "labelsTr" / "dk01.nii.gz"))
    _same_geometry(mask, sitk.ReadImage(str(source)))
    got, want = sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(truth)
    dice = [2 * np.sum((got == c) & (want == c)) / (np.sum(got == c) + np.sum(want == c)) for c in (1, 2, 3)]
    assert np.mean(dice) > 0.9, dice


def test_nan_voxels_in_a_nifti_file_fail_preprocess_and_predict_with_one_line(trained, tmp_path):
    """ITK reads NaN/Inf in a NIfTI file as 0: the readers check the stored voxels, so a scan (or a label)
    with them is one line naming the file, in preprocess and in predict alike."""
    folder, _, raw = trained
    bad = tmp_path / "raw"
    for sub in ("imagesTr", "labelsTr"):
        (bad / sub).mkdir(parents=True)
    img = nib.load(str(raw / "imagesTr" / f"{TEST_CASE}.nii.gz"))
    lab = nib.load(str(raw / "labelsTr" / f"{TEST_CASE}.nii.gz"))
    voxels = np.asarray(img.dataobj, dtype=np.float32)
    voxels[30, 30, 30] = np.nan
    nib.save(nib.Nifti1Image(voxels, img.affine), str(bad / "imagesTr" / "nanimage.nii.gz"))
    shutil.copy(raw / "labelsTr" / f"{TEST_CASE}.nii.gz", bad / "labelsTr" / "nanimage.nii.gz")
    shutil.copy(raw / "imagesTr" / f"{TEST_CASE}.nii.gz", bad / "imagesTr" / "nanlabel.nii.gz")
    labels = np.asarray(lab.dataobj, dtype=np.float32)
    labels[1, 2, 3] = np.inf
    nib.save(nib.Nifti1Image(labels, lab.affine), str(bad / "labelsTr" / "nanlabel.nii.gz"))
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(bad / "imagesTr" / "nanimage.nii.gz")))).any()

    summary = preprocess(DataConfig(raw_dir=str(bad), store=str(tmp_path / "s.zarr"), layout="generic", folds=1),
                         progress=False)
    assert not summary.converted
    failed = {Path(path).parent.name + "/" + Path(path).name: reason for path, reason in summary.failed}
    assert sorted(failed) == ["imagesTr/nanimage.nii.gz", "labelsTr/nanlabel.nii.gz"], failed
    assert failed["imagesTr/nanimage.nii.gz"].startswith("image contains NaN or Inf values")
    assert failed["labelsTr/nanlabel.nii.gz"].startswith("label contains NaN or Inf values")
    assert all("\n" not in reason for reason in failed.values())

    done = predict(folder, bad / "imagesTr", tmp_path / "out", progress=False)
    assert done.written == [str(bad / "imagesTr" / "nanlabel.nii.gz")]  # its image is fine
    lines = done.format().splitlines()
    assert lines[0] == (f"predict: FAILED {bad / 'imagesTr' / 'nanimage.nii.gz'}: image contains NaN or Inf values; "
                        "fix the export (e.g. replace them with 0)") and len(lines) == 2


def test_shards_write_every_mask_once_and_a_rerun_skips_the_finished_ones(trained, tmp_path, capsys):
    from pcl_hpc.cli import main

    folder, _, raw = trained
    src = _source(raw)
    scans = tmp_path / "scans"
    scans.mkdir()
    sitk.WriteImage(src, str(scans / "c.nii.gz"))
    sitk.WriteImage(sitk.DICOMOrient(src, "LPS"), str(scans / "a.nrrd"))
    sitk.WriteImage(sitk.DICOMOrient(src, "RAS"), str(scans / "d.mha"))
    sitk.WriteImage(sitk.DICOMOrient(src, "PIL"), str(scans / "b.nii.gz"))
    whole = predict(folder, scans, tmp_path / "whole", progress=False)
    assert whole.ok and len(whole.written) == 4

    out = tmp_path / "sharded"
    first = predict(folder, scans, out, shard=(0, 2), progress=False)
    assert first.written == [str(scans / "a.nrrd"), str(scans / "c.nii.gz")]  # scans[0::2] of the sorted paths
    assert main(["predict", "--model", str(folder), "--input", str(scans), "--output", str(out), "--shard", "1/2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == ["a.json", "a.nii.gz", "b.json", "b.nii.gz", "c.json", "c.nii.gz", "d.json", "d.nii.gz"]
    for name in ("a", "b", "c", "d"):  # the union of the shards is the unsharded run
        sharded = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        single = sitk.ReadImage(str(tmp_path / "whole" / f"{name}.nii.gz"))
        _same_geometry(sharded, single)
        assert np.array_equal(sitk.GetArrayFromImage(sharded), sitk.GetArrayFromImage(single)), name

    (out / "c.nii.gz").unlink()  # a requeued task, killed before its last mask was written
    os.utime(out / "a.nii.gz", (1_000_000, 1_000_000))
    again = predict(folder, scans, out, shard=(0, 2), progress=False)
    assert again.skipped == [str(scans / "a.nrrd")] and again.written == [str(scans / "c.nii.gz")]
    assert (out / "a.nii.gz").stat().st_mtime == 1_000_000  # a finished scan is not predicted again
    assert predict(folder, scans, out, shard=(5, 6), progress=False).line().startswith("predict: 0 written, 0 skipped")
    capsys.readouterr()
    assert main(["predict", "--model", str(folder), "--input", str(scans), "--output", str(out), "--shard", "2/2"]) == 2
    assert capsys.readouterr().err == "pcl-hpc predict: error: predict --shard '2/2': I must be in 0..K-1\n"

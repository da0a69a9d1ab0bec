"""Layout adapters (ACDC, CHD, MMWHS, HVSMR, generic 4D and channels), slice axis, intensity, labeled splits.

Each adapter runs on tiny files written here in that dataset's published layout and naming.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pcl_hpc.config import DataConfig
from pcl_hpc.data import layouts
from pcl_hpc.data import store as zstore
from pcl_hpc.data.preprocess import preprocess
from pcl_hpc.errors import UserError

AFFINE = np.diag([1.5, 1.5, 5.0, 1.0])


def _save(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _img(seed, shape=(12, 10, 4)):
    return np.random.default_rng(seed).normal(200.0, 50.0, size=shape).astype(np.float32)


def _lab(values, shape=(12, 10, 4)):
    lab = np.zeros(shape, dtype=np.int16)
    for i, v in enumerate(values):
        lab[2 + i, 2:8, 1:3] = v
    return lab


def _run(tmp_path, raw, layout, **kw):
    cfg = DataConfig(raw_dir=str(raw), store=str(tmp_path / f"{layout}.zarr"), layout=layout, folds=2, **kw)
    return cfg, preprocess(cfg, progress=False)


def test_acdc_layout_labeled_ed_es_and_all_cine_frames(tmp_path):
    raw = tmp_path / "ACDC" / "training"
    cine = np.stack([_img(t) for t in range(5)], axis=-1)  # (x, y, z, t): 5 cine frames
    for pid in ("patient001", "patient002"):
        folder = raw / pid
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text("ED: 1\nES: 3\nGroup: NOR\nHeight: 170.0\nNbFrame: 5\nWeight: 70.0\n")
        _save(folder / f"{pid}_4d.nii.gz", cine)
        for t in (1, 3):
            _save(folder / f"{pid}_frame{t:02d}.nii.gz", cine[..., t - 1])
            _save(folder / f"{pid}_frame{t:02d}_gt.nii.gz", _lab([1, 2, 3]).astype(np.uint8))
    (raw / "patient002" / "patient002_frame03_gt.nii.gz").unlink()
    _save(raw / "patient002" / "patient002_frame03_gt.nii.gz", _lab([1, 5]).astype(np.uint8))  # 5: no such class
    cfg, summary = _run(tmp_path, tmp_path / "ACDC", "acdc")

    p1 = [f"patient001_frame{t:02d}" for t in range(1, 6)]
    assert [v for v in summary.converted if v.startswith("patient001")] == p1
    assert len(summary.failed) == 1
    path, reason = summary.failed[0]
    assert path.endswith("patient002_frame03_gt.nii.gz") and "[5]" in reason and "0..3" in reason
    manifest = zstore.read_manifest(cfg.store)
    vols = {v["id"]: v for v in manifest["volumes"]}
    assert {v for v in vols if vols[v]["labeled"]} == {"patient001_frame01", "patient001_frame03", "patient002_frame01"}
    assert manifest["class_names"] == ["background", "right_ventricle", "myocardium", "left_ventricle"]
    assert {vols[v]["patient"] for v in p1} == {"patient001"}
    assert len({vols[v]["fold"] for v in p1}) == 1  # a patient's frames never straddle folds
    # Unlabeled cine frame 2 is frame index 1 of the 4D file; the labeled frame 3 equals cine frame 3.
    f2, lab2, a2 = zstore.load_volume(cfg.store, "patient001_frame02")
    f3, lab3, a3 = zstore.load_volume(cfg.store, "patient001_frame03")
    assert lab2 is None and a2["frame"] == 2 and lab3 is not None and a3["frame"] is None
    ref = cine[..., 1][::-1, ::-1, :].transpose(2, 1, 0)  # LPS
    assert np.corrcoef(f2.ravel(), ref.ravel())[0, 1] > 0.99
    assert np.corrcoef(f3.ravel(), cine[..., 2][::-1, ::-1, :].transpose(2, 1, 0).ravel())[0, 1] > 0.99
    assert sorted(np.unique(lab3).tolist()) == [0, 1, 2, 3]
    # Re-run: nothing to do for the 4D frames either.
    again = preprocess(cfg, progress=False)
    assert again.converted == [] and "patient001_frame04" in again.skipped


def test_chd_and_mmwhs_label_conventions(tmp_path):
    chd = tmp_path / "chd"
    _save(chd / "ct_1001_image.nii.gz", _img(1))
    _save(chd / "ct_1001_label.nii.gz", _lab([1, 7, 9, 12]))  # > 7 -> background
    _save(chd / "ct_1002_image.nii.gz", _img(2))  # no label
    cfg, summary = _run(tmp_path, chd, "chd", modality="ct")
    assert summary.converted == ["ct_1001"] and "ct_1002_image" in summary.failed[0][0]
    lab = zstore.load_volume(cfg.store, "ct_1001")[1]
    assert sorted(np.unique(lab).tolist()) == [0, 1, 7] and (lab > 0).sum() == 2 * 6 * 2
    assert len(zstore.read_manifest(cfg.store)["class_names"]) == 8

    mm = tmp_path / "mmwhs"
    _save(mm / "ct_train" / "ct_train_1001_image.nii.gz", _img(3))
    _save(mm / "ct_train" / "ct_train_1001_label.nii.gz", _lab([205, 420, 500, 550, 600, 820, 850][:6]))
    _save(mm / "ct_train" / "ct_train_1002_image.nii.gz", _img(4))
    _save(mm / "ct_train" / "ct_train_1002_label.nii.gz", _lab([205, 421]))  # 421: left-atrium artifact
    _save(mm / "mr_train" / "mr_train_1003_image.nii.gz", _img(6))
    _save(mm / "mr_train" / "mr_train_1003_label.nii.gz", _lab([420, 333]))  # 333 is no MMWHS class
    _save(mm / "ct_test" / "ct_test_2001_image.nii.gz", _img(5))  # test scans: unlabeled
    cfg, summary = _run(tmp_path, mm, "mmwhs", modality="ct")
    assert summary.converted == ["ct_test_2001", "ct_train_1001", "ct_train_1002"]
    assert len(summary.failed) == 1
    path, reason = summary.failed[0]
    assert path.endswith("mr_train_1003_label.nii.gz") and "[333]" in reason and "\n" not in reason
    lab = zstore.load_volume(cfg.store, "ct_train_1001")[1]
    assert lab.dtype == np.uint8 and sorted(np.unique(lab).tolist()) == [0, 1, 2, 3, 4, 5, 6]
    lab = zstore.load_volume(cfg.store, "ct_train_1002")[1]
    assert sorted(np.unique(lab).tolist()) == [0, 1, 2]
    assert (lab == 2).sum() == (lab[:, :, 11 - 3] == 2).sum() == 6 * 2  # raw x=3 (421; LPS flips x) -> class 2
    assert zstore.volume_ids(cfg.store, labeled=False) == ["ct_test_2001"]


def test_hvsmr_layout_prefers_short_axis_crop(tmp_path):
    raw = tmp_path / "hvsmr"
    for pat in (0, 1):
        _save(raw / "Training_dataset_sx_cropped" / f"training_sa_crop_pat{pat}.nii.gz", _img(pat))
        _save(raw / "Ground_truth" / f"training_sa_crop_pat{pat}-label.nii.gz", _lab([1, 2]))
        _save(raw / "Training_dataset" / f"training_axial_full_pat{pat}.nii.gz", _img(10 + pat, (14, 12, 5)))
    _save(raw / "Ground_truth" / "training_sa_crop_pat1-label.nii.gz", _lab([1, 3]))  # 3 classes only
    cfg, summary = _run(tmp_path, raw, "hvsmr")
    assert summary.converted == ["pat0"]
    assert len(summary.failed) == 1 and "0..2" in summary.failed[0][1]
    image, label, _ = zstore.load_volume(cfg.store, "pat0")
    assert image.shape == (4, 10, 12) and label is not None  # the sa_crop variant, not axial_full
    assert zstore.read_manifest(cfg.store)["class_names"] == ["background", "myocardium", "blood_pool"]


@pytest.mark.parametrize("meta", [None, {"modality": {"0": "MRI"}}])  # no or one declared channel
def test_generic_4d_image_is_split_into_frames(tmp_path, meta):
    raw = tmp_path / "raw"
    if meta:
        raw.mkdir()
        (raw / "dataset.json").write_text(json.dumps(meta))
    _save(raw / "imagesTs" / "cine.nii.gz", np.stack([_img(t) for t in range(3)], axis=-1))
    _save(raw / "imagesTs" / "still.nii.gz", _img(9))
    cfg, summary = _run(tmp_path, raw, "generic")
    assert summary.ok and summary.converted == ["cine_frame01", "cine_frame02", "cine_frame03", "still"]
    assert {v["patient"] for v in zstore.read_manifest(cfg.store)["volumes"]} == {"cine", "still"}


def _channels(n, shape=(12, 10, 4)):
    """An MSD multi-modal image: channel c is the same noise plus 1000 * c (tells which was taken)."""
    return np.stack([_img(0, shape) + 1000.0 * c for c in range(n)], axis=-1)


@pytest.mark.parametrize("channel", [0, 2])
def test_generic_msd_4d_image_with_3d_label_takes_one_channel(tmp_path, channel):
    raw = tmp_path / "Task01_BrainTumour"
    _save(raw / "imagesTr" / "BRATS_001.nii.gz", _channels(3))
    _save(raw / "labelsTr" / "BRATS_001.nii.gz", _lab([1, 2, 3]).astype(np.uint8))
    _save(raw / "imagesTr" / "BRATS_002.nii.gz", _channels(2))  # no channel 2
    _save(raw / "labelsTr" / "BRATS_002.nii.gz", _lab([1]).astype(np.uint8))
    cine = np.stack([_img(t) for t in range(2)], axis=-1)
    _save(raw / "imagesTr" / "cine.nii.gz", cine)  # 4D image + 4D label: still time frames
    _save(raw / "labelsTr" / "cine.nii.gz", np.stack([_lab([1]), _lab([2])], axis=-1).astype(np.uint8))
    cfg, summary = _run(tmp_path, raw, "generic", modality="ct", intensity="window", hu_window=[-5000, 5000],
                        channel=channel)
    got, label, attrs = zstore.load_volume(cfg.store, "BRATS_001")
    expected = (np.clip(_channels(3)[..., channel], -5000, 5000) + 5000) / 10000  # window: linear in the input
    np.testing.assert_allclose(got, expected[::-1, ::-1, :].transpose(2, 1, 0), atol=1e-5)
    assert sorted(np.unique(label).tolist()) == [0, 1, 2, 3]
    assert attrs["channel"] == channel and attrs["frame"] is None
    assert zstore.read_manifest(cfg.store)["settings"]["channel"] == channel
    frames = zstore.load_volume(cfg.store, "cine_frame02")
    assert frames[1].max() == 2 and frames[2]["frame"] == 2 and frames[2]["channel"] is None
    if channel == 0:
        assert summary.ok and summary.converted == ["BRATS_001", "BRATS_002", "cine_frame01", "cine_frame02"]
    else:  # out of range for the 2-channel case only: one clear line, the rest converts
        assert summary.converted == ["BRATS_001", "cine_frame01", "cine_frame02"]
        assert len(summary.failed) == 1
        path, reason = summary.failed[0]
        assert path.endswith("imagesTr/BRATS_002.nii.gz") and "has 2 channels" in reason
        assert "data.channel to 0..1" in reason and "\n" not in reason
    # Re-run with the other channel: only the multi-channel case is converted again.
    other = _run(tmp_path, raw, "generic", modality="ct", intensity="window", hu_window=[-5000, 5000],
                 channel=1)[1]
    assert other.ok and other.converted == ["BRATS_001", "BRATS_002"]
    assert other.skipped == ["cine_frame01", "cine_frame02"]


def test_generic_dataset_json_modalities_make_every_4d_image_a_channel_stack(tmp_path):
    raw = tmp_path / "Task01_BrainTumour"
    raw.mkdir()
    (raw / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd"}}))
    _save(raw / "imagesTr" / "BRATS_001.nii.gz", _channels(3))
    _save(raw / "labelsTr" / "BRATS_001.nii.gz", _lab([1, 2]).astype(np.uint8))
    _save(raw / "imagesTs" / "BRATS_485.nii.gz", _channels(3))  # unlabeled: channels too, not time frames
    kw = {"modality": "ct", "intensity": "window", "hu_window": [-5000, 5000]}
    cfg, summary = _run(tmp_path, raw, "generic", channel=1, **kw)
    assert summary.ok and summary.converted == ["BRATS_001", "BRATS_485"]
    expected = ((np.clip(_channels(3)[..., 1], -5000, 5000) + 5000) / 10000)[::-1, ::-1, :].transpose(2, 1, 0)
    for vid, labeled in (("BRATS_001", True), ("BRATS_485", False)):
        got, label, attrs = zstore.load_volume(cfg.store, vid)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert (label is not None) == labeled and attrs["channel"] == 1 and attrs["frame"] is None
    # data.channel out of range: the same one line per file, saying where the channel count comes from.
    jobs, problems = layouts.discover(raw, "generic", channel=3)
    assert jobs == [] and len(problems) == 2
    path, reason = problems[1]
    assert path.endswith("imagesTs/BRATS_485.nii.gz") and "has 3 channels" in reason and "'modality'" in reason
    assert "data.channel to 0..2" in reason and "\n" not in reason


def test_generic_dataset_json_channel_names_mismatch(tmp_path):
    raw = tmp_path / "Dataset005_Prostate"
    raw.mkdir()
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"},
                                                  "labels": {"background": 0, "prostate": 1}}))
    _save(raw / "imagesTr" / "prostate_00_0000.nii.gz", _img(1))
    _save(raw / "imagesTr" / "prostate_00_0001.nii.gz", _img(1) + 1000.0)
    _save(raw / "labelsTr" / "prostate_00.nii.gz", _lab([1]).astype(np.uint8))
    _save(raw / "imagesTs" / "prostate_10.nii.gz", _channels(2))  # 2 channels, as declared
    _save(raw / "imagesTs" / "prostate_11.nii.gz", _channels(3))  # 3 in the 4th axis: matches nothing
    cfg, summary = _run(tmp_path, raw, "generic", channel=1)
    assert summary.converted == ["prostate_00", "prostate_10"]
    assert len(summary.failed) == 1
    path, reason = summary.failed[0]
    assert path.endswith("imagesTs/prostate_11.nii.gz") and "\n" not in reason
    assert "3 entries in its 4th axis" in reason and "'channel_names' declares 2 channels" in reason
    assert zstore.load_volume(cfg.store, "prostate_10")[2]["channel"] == 1
    # A malformed channel map is a clear error, like a malformed 'labels'.
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "2": "ADC"}}))
    with pytest.raises(UserError, match="'channel_names' must map channel ids 0..1"):
        layouts.discover(raw, "generic")
    (raw / "dataset.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        layouts.discover(raw, "generic")


def test_generic_nnunet_channel_files(tmp_path):
    raw = tmp_path / "Dataset005_Prostate"
    for case, seed in (("prostate_00", 1), ("prostate_01", 2)):
        _save(raw / "imagesTr" / f"{case}_0000.nii.gz", _img(seed))
        _save(raw / "imagesTr" / f"{case}_0001.nii.gz", _img(seed) + 1000.0)
        _save(raw / "labelsTr" / f"{case}.nii.gz", _lab([1, 2]).astype(np.uint8))
    _save(raw / "imagesTs" / "prostate_10_0000.nii.gz", _img(3))
    _save(raw / "imagesTs" / "prostate_10_0001.nii.gz", _img(3) + 1000.0)
    (raw / "imagesTr" / "prostate_01_0001.nii.gz").unlink()
    _save(raw / "imagesTr" / "prostate_01_0002.nii.gz", _img(2))  # no _0001: that case cannot give channel 1
    kw = {"modality": "ct", "intensity": "window", "hu_window": [-5000, 5000]}
    cfg, summary = _run(tmp_path, raw, "generic", channel=1, **kw)
    assert summary.converted == ["prostate_00", "prostate_10"]
    assert len(summary.failed) == 1
    path, reason = summary.failed[0]
    assert path.endswith("prostate_01_0000.nii.gz") and "2 channel files" in reason and "data.channel=1" in reason
    got, label, attrs = zstore.load_volume(cfg.store, "prostate_00")
    expected = (np.clip(_img(1) + 1000.0, -5000, 5000) + 5000) / 10000  # the _0001 file
    np.testing.assert_allclose(got, expected[::-1, ::-1, :].transpose(2, 1, 0), atol=1e-5)
    assert label is not None and attrs["channel"] == 1
    assert zstore.load_volume(cfg.store, "prostate_10")[2]["channel"] == 1  # unlabeled cases too
    with pytest.raises(UserError, match="data.channel"):
        _run(tmp_path, raw, "generic", channel=-1, **kw)


@pytest.mark.parametrize("axis,shape", [("axial", (4, 10, 12)), ("coronal", (10, 4, 12)), ("sagittal", (12, 4, 10))])
def test_slice_axis(tmp_path, axis, shape):
    raw = tmp_path / "raw"
    data = _img(1)
    _save(raw / "v.nii.gz", data)
    cfg, _ = _run(tmp_path, raw, "images", slice_axis=axis, modality="ct", clip_percentiles=[0, 100])
    image, _, attrs = zstore.load_volume(cfg.store, "v")
    assert image.shape == shape and attrs["slice_axis"] == axis
    assert attrs["positions"][-1] == 1.0 and len(attrs["positions"]) == shape[0]
    scaled = (data - data.min()) / (data.max() - data.min())  # RAS (x, y, z) source
    expected = {
        "axial": scaled[::-1, ::-1, :].transpose(2, 1, 0),  # z: I->S, rows A->P, cols R->L
        "coronal": scaled[::-1, ::-1, ::-1].transpose(1, 2, 0),  # slices A->P, rows S->I, cols R->L
        "sagittal": scaled[::-1, ::-1, ::-1].transpose(0, 2, 1),  # slices R->L, rows S->I, cols A->P
    }[axis]
    np.testing.assert_allclose(image, expected, atol=1e-5)
    assert attrs["spacing"] == pytest.approx({"axial": [5, 1.5, 1.5], "coronal": [1.5, 5, 1.5],
                                              "sagittal": [1.5, 5, 1.5]}[axis])


def test_intensity_window_percentile_and_resampling(tmp_path):
    raw = tmp_path / "raw"
    hu = np.linspace(-1500, 1500, 12 * 10 * 4, dtype=np.float32).reshape(12, 10, 4)
    _save(raw / "imagesTr" / "ct1.nii.gz", hu)
    _save(raw / "labelsTr" / "ct1.nii.gz", _lab([1, 2]).astype(np.uint8))
    cfg, _ = _run(tmp_path, raw, "generic", modality="ct", intensity="window", hu_window=[-200, 400])
    image = zstore.load_volume(cfg.store, "ct1")[0]
    expected = (np.clip(hu, -200, 400) + 200) / 600
    np.testing.assert_allclose(image, expected[::-1, ::-1, :].transpose(2, 1, 0), atol=1e-5)
    settings = zstore.read_manifest(cfg.store)["settings"]
    assert settings["intensity"] == "window" and settings["hu_window"] == [-200.0, 400.0]

    cfg2, _ = _run(tmp_path / "b", raw, "generic", modality="ct", target_spacing=[0.75, 0.75],
                    interpolation="bspline", compressor="lz4")
    image, label, attrs = zstore.load_volume(cfg2.store, "ct1")
    assert image.shape == label.shape == (4, 20, 24) and attrs["spacing"] == pytest.approx([5.0, 0.75, 0.75])
    assert sorted(np.unique(label).tolist()) == [0, 1, 2]  # nearest: no new label values
    assert abs(int((label > 0).sum()) - 4 * int((_lab([1, 2]) > 0).sum())) <= 8
    assert zstore.read_manifest(cfg2.store)["settings"]["intensity"] == "percentile"  # ct auto
    with pytest.raises(UserError, match="modality=ct"):
        _run(tmp_path / "c", raw, "generic", intensity="window")
    with pytest.raises(UserError, match="slice_axis"):
        _run(tmp_path / "c", raw, "generic", slice_axis="oblique")


def test_labeled_split_per_fold_and_seed(tmp_path):
    path = tmp_path / "s.zarr"
    img = np.zeros((2, 3, 3), np.float32)
    for p in range(10):
        for t in (1, 9):
            zstore.write_volume(path, f"patient{p:03d}_frame{t:02d}", img, np.zeros_like(img, np.uint8), {})
    zstore.write_volume(path, "extra", img, None, {})
    manifest = zstore.write_manifest(path, {"folds": 5, "fold_seed": 1})
    folds = {v["fold"] for v in manifest["volumes"]}
    assert folds == set(range(5))
    tests = []
    for fold in range(5):
        split = zstore.labeled_split(path, fold, m=2, seed=0)
        in_fold = {v["patient"] for v in manifest["volumes"] if v["fold"] == fold and v["labeled"]}
        assert len(split["test"]) == 2 * len(in_fold) and len(split["train"]) == 4  # 2 patients x (ED, ES)
        assert not {zstore.patient_id(v) for v in split["train"]} & {zstore.patient_id(v) for v in split["test"]}
        assert split == zstore.labeled_split(path, fold, m=2, seed=0)
        tests += split["test"]
    assert sorted(tests) == sorted(zstore.volume_ids(path, labeled=True))  # folds partition the labeled set
    a, b = zstore.labeled_split(path, 0, 2, seed=0), zstore.labeled_split(path, 0, 2, seed=1)
    assert a["train"] != b["train"] and a["test"] == b["test"]
    assert set(a["train"]) <= set(zstore.labeled_split(path, 0, 5, seed=0)["train"])  # nested in M
    assert zstore.write_manifest(path, {"folds": 5, "fold_seed": 2})["volumes"] != manifest["volumes"]
    with pytest.raises(UserError, match="choose M between 1 and"):
        zstore.labeled_split(path, 0, 10)

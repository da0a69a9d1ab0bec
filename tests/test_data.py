"""Data pipeline: preprocess -> Zarr store -> SliceDataset / sampler, and augmentation.

Everything runs on small real files in tmp_path: NIfTI written with nibabel, read back by the
pipeline through SimpleITK, stored with Zarr.
"""

from __future__ import annotations

import json
import pickle

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import zarr

from pcl_hpc.config import DataConfig
from pcl_hpc.data import store as zstore
from pcl_hpc.data.augment import BatchAugment, augment_pair, augment_views
from pcl_hpc.data.dataset import (BatchRequest, KeyedBatchSampler, ResumableDistributedSampler, SliceDataset,
                                  center_fit, slice_loader)
from pcl_hpc.data.preprocess import PreprocessSummary, preprocess
from pcl_hpc.errors import UserError

SHAPE = (20, 24, 8)  # nibabel (x, y, z): 8 axial slices of 24 x 20


def _volume(seed: int, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(100.0, 20.0, size=shape).astype(np.float32)


def _label(shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    lab[5:15, 6:18, 2:6] = 1
    lab[8:12, 9:14, 3:5] = 2
    return lab


def _save(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.25, 4.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _generic(raw, with_bad: bool = True):
    _save(raw / "imagesTr" / "caseA_0000.nii.gz", _volume(1))
    _save(raw / "labelsTr" / "caseA.nii.gz", _label())
    _save(raw / "imagesTr" / "caseB.nii.gz", _volume(2))
    _save(raw / "labelsTr" / "caseB.nii.gz", _label())
    _save(raw / "imagesTs" / "caseC.nii.gz", _volume(3))
    if with_bad:
        (raw / "imagesTr" / "broken.nii.gz").write_bytes(b"")  # zero-byte image
        _save(raw / "labelsTr" / "broken.nii.gz", _label())
        _save(raw / "imagesTr" / "mism.nii.gz", _volume(4))
        _save(raw / "labelsTr" / "mism.nii.gz", _label((20, 24, 7)))  # one slice short
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "outer": 1, "inner": 2}}))


def _cfg(tmp_path, raw, **kw) -> DataConfig:
    return DataConfig(raw_dir=str(raw), store=str(tmp_path / "store.zarr"), gcl_partitions=3, folds=2, **kw)


@pytest.fixture
def built(tmp_path):
    raw = tmp_path / "raw"
    _generic(raw)
    cfg = _cfg(tmp_path, raw)
    return cfg, preprocess(cfg, progress=False)


# ---------------------------------------------------------------- preprocess


def test_preprocess_generic_layout(built):
    cfg, summary = built
    assert isinstance(summary, PreprocessSummary)
    assert sorted(summary.converted) == ["caseA", "caseB", "caseC"]
    assert summary.skipped == []
    failed = dict(summary.failed)
    assert len(failed) == 2 and not summary.ok
    broken = next(p for p in failed if p.endswith("broken.nii.gz"))
    assert "0 bytes" in failed[broken]
    mism = next(p for p in failed if "mism" in p)
    assert "shape" in failed[mism] and "labelsTr" in mism
    text = summary.format()
    assert "3 converted" in text and "2 failed" in text and broken in text

    manifest = zstore.read_manifest(cfg.store)
    assert manifest["format"] == "pcl-hpc-store/1"
    assert manifest["class_names"] == ["background", "outer", "inner"]
    vols = {v["id"]: v for v in manifest["volumes"]}
    assert set(vols) == {"caseA", "caseB", "caseC"}
    assert vols["caseA"]["labeled"] and not vols["caseC"]["labeled"]
    assert vols["caseA"]["shape"] == [8, 24, 20]
    assert all(v["fold"] in (0, 1) for v in vols.values())
    assert {v["fold"] for v in vols.values()} == {0, 1}
    assert manifest["settings"]["gcl_partitions"] == 3 and len(manifest["content_hash"]) == 64
    assert zstore.volume_ids(cfg.store, labeled=True) == ["caseA", "caseB"]
    assert zstore.volume_ids(cfg.store, labeled=False) == ["caseC"]

    image, label, attrs = zstore.load_volume(cfg.store, "caseA")
    assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape == (8, 24, 20)
    assert attrs["positions"] == pytest.approx([(i + 1) / 8 for i in range(8)])
    assert attrs["partitions"] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert attrs["spacing"] == pytest.approx([4.0, 1.25, 1.0])
    assert attrs["labeled"] is True and len(attrs["source_sha256"]) == 64
    assert abs(float(image.mean())) < 1e-3 and float(image.std()) == pytest.approx(1.0, abs=1e-3)  # mri z-score
    assert set(np.unique(label)) == {0, 1, 2} and (label > 0).sum() == (_label() > 0).sum()
    # Failed volumes must not leave anything behind in the store.
    assert set(zstore.stored_volume_dirs(cfg.store)) == {"caseA", "caseB", "caseC"}


def test_same_physical_image_with_permuted_flipped_axes_gives_same_array(tmp_path):
    raw = tmp_path / "raw"
    a = _volume(7)
    affine = np.array([[1.0, 0, 0, -10], [0, 1.25, 0, 5], [0, 0, 4.0, 30], [0, 0, 0, 1]])
    _save(raw / "plain.nii.gz", a, affine)
    # b[p, q, r] = a[q, r, Z-1-p] (permute, then flip the new first axis); the affine compensates.
    b = np.flip(a.transpose(2, 0, 1), axis=0).copy()
    permute = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    flip = np.array([[-1, 0, 0, a.shape[2] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    _save(raw / "moved.nii.gz", b, affine @ permute @ flip)

    cfg = _cfg(tmp_path, raw, layout="images", modality="ct", clip_percentiles=[0, 100])
    summary = preprocess(cfg, progress=False)
    assert summary.ok and sorted(summary.converted) == ["moved", "plain"]
    img1, lab1, at1 = zstore.load_volume(cfg.store, "plain")
    img2, _, at2 = zstore.load_volume(cfg.store, "moved")
    assert lab1 is None and at1["labeled"] is False
    np.testing.assert_allclose(img1, img2, atol=1e-6)
    assert at1["spacing"] == at2["spacing"] == pytest.approx([4.0, 1.25, 1.0])
    assert at1["orientation"] != at2["orientation"]  # the sources really were stored differently
    # Canonical LPS: Z = RAS z (inferior -> superior), rows anterior -> posterior, columns right -> left.
    expected = (a - a.min()) / (a.max() - a.min())
    np.testing.assert_allclose(img1, expected[::-1, ::-1, :].transpose(2, 1, 0), atol=1e-5)
    assert img1.min() == 0.0 and img1.max() == pytest.approx(1.0)  # ct: clipped and scaled to [0, 1]


def test_rerun_skips_unchanged_and_reconverts_changed(tmp_path, built):
    cfg, _ = built
    hash1 = zstore.read_manifest(cfg.store)["content_hash"]
    again = preprocess(cfg, progress=False)
    assert again.converted == [] and sorted(again.skipped) == ["caseA", "caseB", "caseC"]
    assert zstore.read_manifest(cfg.store)["content_hash"] == hash1

    raw = tmp_path / "raw"
    _save(raw / "imagesTr" / "caseB.nii.gz", _volume(99))
    (raw / "imagesTs" / "caseC.nii.gz").unlink()
    third = preprocess(cfg, progress=False)
    assert third.converted == ["caseB"] and third.skipped == ["caseA"]
    manifest = zstore.read_manifest(cfg.store)
    assert manifest["content_hash"] != hash1
    assert [v["id"] for v in manifest["volumes"]] == ["caseA", "caseB"]  # vanished source dropped
    assert not any(p.name.startswith(".") for p in (tmp_path / "store.zarr" / "volumes").iterdir())

    cfg.gcl_partitions = 2  # a setting that changes the stored attrs re-converts everything
    fourth = preprocess(cfg, progress=False)
    assert sorted(fourth.converted) == ["caseA", "caseB"]
    assert zstore.load_volume(cfg.store, "caseA")[2]["partitions"] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_parallel_workers_match_serial(tmp_path):
    raw = tmp_path / "raw"
    _generic(raw, with_bad=False)
    serial = preprocess(_cfg(tmp_path, raw), progress=False)
    cfg2 = DataConfig(raw_dir=str(raw), store=str(tmp_path / "par.zarr"), gcl_partitions=3, folds=2)
    parallel = preprocess(cfg2, workers=2, progress=False)
    assert sorted(parallel.converted) == sorted(serial.converted) and parallel.ok
    m1, m2 = zstore.read_manifest(tmp_path / "store.zarr"), zstore.read_manifest(cfg2.store)
    assert m1["content_hash"] == m2["content_hash"]
    np.testing.assert_array_equal(
        zstore.load_volume(cfg2.store, "caseA")[0], zstore.load_volume(tmp_path / "store.zarr", "caseA")[0]
    )


def test_more_bad_inputs_are_reported_per_file(tmp_path):
    raw = tmp_path / "raw"
    _save(raw / "imagesTr" / "good.nii.gz", _volume(1))
    _save(raw / "labelsTr" / "good.nii.gz", _label())
    _save(raw / "imagesTr" / "nolabel.nii.gz", _volume(2))
    nan = _volume(3)
    nan[1, 2, 3] = np.nan
    (raw / "imagesTs").mkdir(parents=True)
    # NRRD, since ITK's NIfTI reader already turns NaN into 0.
    sitk.WriteImage(sitk.GetImageFromArray(nan.transpose(2, 1, 0)), str(raw / "imagesTs" / "nan.nrrd"))
    _save(raw / "imagesTs" / "flat.nii.gz", _volume(4, shape=(20, 24)))
    (raw / "imagesTs" / "garbage.nii.gz").write_bytes(b"not an image at all")
    _save(tmp_path / "whole.nii.gz", _volume(5))
    whole = (tmp_path / "whole.nii.gz").read_bytes()
    (raw / "imagesTs" / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    (raw / "imagesTs" / "stub.nii.gz").write_bytes(whole[:300])  # cut inside the header: ITK still reads it
    summary = preprocess(_cfg(tmp_path, raw), progress=False)
    assert summary.converted == ["good"]
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in summary.failed}
    assert set(reasons) == {"nolabel.nii.gz", "nan.nrrd", "flat.nii.gz", "garbage.nii.gz", "cut.nii.gz", "stub.nii.gz"}
    assert "truncated" in reasons["stub.nii.gz"]
    assert "imagesTs" in reasons["nolabel.nii.gz"]  # says what to do
    assert "NaN" in reasons["nan.nrrd"]
    assert "3D" in reasons["flat.nii.gz"]
    assert "cannot be read" in reasons["garbage.nii.gz"]
    assert "truncated" in reasons["cut.nii.gz"]  # ITK alone would zero-fill it silently


def test_generic_channel_suffixes(tmp_path):
    raw = tmp_path / "raw"
    _save(raw / "imagesTr" / "multi_0000.nii.gz", _volume(1))
    _save(raw / "imagesTr" / "multi_0001.nii.gz", _volume(2))  # a second modality: not used
    _save(raw / "labelsTr" / "multi.nii.gz", _label())
    _save(raw / "imagesTs" / "scan_0012.nii.gz", _volume(3))  # digits in a name, not a channel
    summary = preprocess(_cfg(tmp_path, raw), progress=False)
    assert summary.ok and summary.converted == ["multi", "scan_0012"]
    expected = (_volume(1) - _volume(1).mean()) / _volume(1).std()  # channel 0000, z-scored
    got = zstore.load_volume(tmp_path / "store.zarr", "multi")[0]
    assert np.corrcoef(got.ravel(), expected[::-1, ::-1, :].transpose(2, 1, 0).ravel())[0, 1] > 0.99


@pytest.mark.parametrize("id_scheme", ["source", "hashed"])
def test_preprocess_shards_then_merge_give_the_one_process_store(tmp_path, id_scheme):
    """An array of shards writes disjoint volumes and no manifest; the merge (a plain run) writes the
    manifest: the store equals the one a single process writes (same ids, arrays, manifest)."""
    from pcl_hpc.data.preprocess import prepare_shards

    raw = tmp_path / "raw"
    _generic(raw)
    one = DataConfig(raw_dir=str(raw), store=str(tmp_path / "one.zarr"), gcl_partitions=3, folds=2, id_scheme=id_scheme)
    sharded = DataConfig(**{**one.__dict__, "store": str(tmp_path / "sharded.zarr")})
    preprocess(one, progress=False)
    with pytest.raises(UserError, match="not prepared"):
        preprocess(sharded, shard=(0, 2), progress=False)
    prepare_shards(sharded)
    if id_scheme == "hashed":  # the same key, so that the same ids come out
        (tmp_path / "sharded.zarr.idkey").write_bytes((tmp_path / "one.zarr.idkey").read_bytes())
    parts = [preprocess(sharded, shard=(i, 2), progress=False) for i in range(2)]
    assert not zstore.is_store(sharded.store) or "manifest" not in zarr.open_group(sharded.store).attrs
    assert sorted(parts[0].converted + parts[1].converted) == sorted(zstore.stored_volume_dirs(sharded.store))
    assert not set(parts[0].converted) & set(parts[1].converted), "shards write disjoint volumes"
    merged = preprocess(sharded, progress=False)
    assert merged.converted == [] and merged.skipped, "the merge converts nothing"
    a, b = zstore.read_manifest(one.store), zstore.read_manifest(sharded.store)
    assert a["content_hash"] == b["content_hash"] and a["volumes"] == b["volumes"]
    for vid in zstore.volume_ids(one.store):
        assert np.array_equal(zstore.load_volume(one.store, vid)[0], zstore.load_volume(sharded.store, vid)[0])


def test_preprocess_config_errors(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        preprocess(DataConfig(raw_dir=str(tmp_path / "nowhere"), store=str(tmp_path / "s")), progress=False)
    raw = tmp_path / "raw"
    _generic(raw, with_bad=False)
    with pytest.raises(UserError, match="generic, images"):
        preprocess(DataConfig(raw_dir=str(raw), store=str(tmp_path / "s"), layout="msd"), progress=False)
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a pcl-hpc store"):
        preprocess(DataConfig(raw_dir=str(raw), store=str(other)), progress=False)
    assert (other / "precious.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        preprocess(DataConfig(raw_dir=str(empty), store=str(tmp_path / "s2")), progress=False)


# ---------------------------------------------------------------- store


def test_store_round_trip_and_errors(tmp_path):
    path = tmp_path / "s.zarr"
    image = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    label = (image > 0).astype(np.uint8)
    zstore.write_volume(path, "v1", image, label, {"positions": [0.2, 0.4, 0.6, 0.8, 1.0], "source_sha256": "ab"})
    zstore.write_volume(path, "v2", image[:3], None, {"positions": [1 / 3, 2 / 3, 1.0], "source_sha256": "cd"})
    with pytest.raises(UserError, match="preprocess --config"):
        zstore.read_manifest(path)  # volumes but no manifest yet
    zstore.write_manifest(path, {"folds": 2}, ["bg", "fg"])
    img, lab, attrs = zstore.load_volume(path, "v1")
    np.testing.assert_array_equal(img, image)
    np.testing.assert_array_equal(lab, label)
    assert attrs["positions"] == [0.2, 0.4, 0.6, 0.8, 1.0] and attrs["labeled"] is True
    assert zstore.load_volume(path, "v2")[1] is None
    arr = zarr.open_group(str(path), mode="r")["volumes/v1/image"]
    assert arr.chunks == (1, 6, 7) and arr.dtype == np.float32
    codec = arr.compressors[0]
    assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "zstd" and codec.clevel == 3
    assert codec.shuffle.value == "bitshuffle"
    assert zstore.volume_ids(path) == ["v1", "v2"] and zstore.volume_ids(path, labeled=False) == ["v2"]

    # Rewriting a volume replaces it whole.
    zstore.write_volume(path, "v1", image[:2], None, {"positions": [0.5, 1.0]})
    assert zstore.load_volume(path, "v1")[0].shape == (2, 6, 7)

    with pytest.raises(UserError, match="nope"):
        zstore.load_volume(path, "nope")
    with pytest.raises(UserError, match="preprocess --config"):
        zstore.read_manifest(tmp_path / "missing.zarr")
    with pytest.raises(UserError):
        zstore.write_volume(path, "../escape", image, None, {})


# ---------------------------------------------------------------- dataset and sampler


def test_center_fit_crops_and_pads():
    a = np.arange(5 * 8, dtype=np.float32).reshape(5, 8) + 1
    out = center_fit(a, 6)
    # Rows padded 5 -> 6 (0 above, 1 below); columns cropped 8 -> 6 (one off each side).
    assert out.shape == (6, 6)
    np.testing.assert_array_equal(out[:5], a[:, 1:7])
    np.testing.assert_array_equal(out[5], 0)
    big = center_fit(a, 10)
    assert big.shape == (10, 10) and big.sum() == a.sum()
    np.testing.assert_array_equal(big[2:7, 1:9], a)


def test_slice_dataset_items(built):
    cfg, _ = built
    ds = SliceDataset(cfg.store, patch=16, with_labels=True)
    assert ds.volume_ids == ["caseA", "caseB"] and len(ds) == 16
    item = ds[10]
    assert set(item) == {"image", "position", "partition", "volume", "slice", "label"}
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].shape == (16, 16) and item["label"].dtype == torch.uint8
    assert item["volume"].item() == 1 and item["slice"].item() == 2
    assert item["position"].dtype == torch.float32 and item["position"].item() == pytest.approx(3 / 8)
    assert item["partition"].dtype == torch.int64 and item["partition"].item() == 0
    for t in ("position", "partition", "volume", "slice"):
        assert item[t].dim() == 0
    image, label, _ = zstore.load_volume(cfg.store, "caseB")
    np.testing.assert_array_equal(item["image"][0].numpy(), image[2, 4:20, 2:18])  # centre crop of 24 x 20
    np.testing.assert_array_equal(item["label"].numpy(), label[2, 4:20, 2:18])

    padded = SliceDataset(cfg.store, ["caseC"], patch=32)[0]
    assert padded["image"].shape == (1, 32, 32) and "label" not in padded
    assert padded["image"][0, :4].abs().sum() == 0 and padded["image"][0, 4:28, 6:26].abs().sum() > 0

    clone = pickle.loads(pickle.dumps(ds))  # no open handles travel
    assert torch.equal(clone[10]["image"], item["image"])

    with pytest.raises(UserError, match="caseZ"):
        SliceDataset(cfg.store, ["caseA", "caseZ"])
    with pytest.raises(UserError, match="caseC"):
        SliceDataset(cfg.store, ["caseC"], with_labels=True)


def test_slice_dataset_fast_chunk_reads_match_zarr(tmp_path):
    """The direct chunk-file reader gives zarr's arrays, all-zero (unwritten) chunks included,
    and the dataset falls back to zarr for any other layout."""
    from pcl_hpc.data import dataset as dmod

    path = tmp_path / "s.zarr"
    image = np.random.default_rng(0).normal(size=(4, 6, 7)).astype(np.float32)
    image[2] = 0.0  # zarr writes no chunk for a fill-value slice
    label = (image > 0.5).astype(np.uint8)
    label[1] = 0
    zstore.write_volume(path, "v1", image, label, {"positions": [0.25, 0.5, 0.75, 1.0], "partitions": [0, 0, 1, 1]})
    zstore.write_manifest(path, {"folds": 1})
    assert not (path / "volumes" / "v1" / "image" / "c" / "2").exists()
    ds = SliceDataset(str(path), ["v1"], patch=6, with_labels=True)
    reader, lab_reader, _, _ = ds._volume(0)
    assert isinstance(reader, dmod._ChunkReader) and isinstance(lab_reader, dmod._ChunkReader)
    for z in range(4):
        np.testing.assert_array_equal(reader(z), image[z])
        np.testing.assert_array_equal(lab_reader(z), label[z])
        assert reader(z).dtype == np.float32 and lab_reader(z).dtype == np.uint8
    fast = [ds[z] for z in range(4)]
    meta = path / "volumes" / "v1" / "image" / "zarr.json"
    arr = zarr.open_group(str(path), mode="r")["volumes/v1/image"]
    assert dmod._ChunkReader.make(meta.parent, arr) is not None
    zarr_meta = json.loads(meta.read_text())
    for change in ({"storage_transformers": [{"name": "unknown"}]}, {"data_type": "int16"},
                   {"chunk_key_encoding": {"name": "v2", "configuration": {"separator": "."}}}):
        meta.write_text(json.dumps({**zarr_meta, **change}))  # not the layout we write: zarr reads it
        assert dmod._ChunkReader.make(meta.parent, arr) is None
    meta.write_text(json.dumps(zarr_meta))
    group = zarr.open_group(str(path), mode="r")["volumes/v1"]
    slow = SliceDataset(str(path), ["v1"], patch=6, with_labels=True)
    slow._handles[0] = (group["image"].__getitem__, group["label"].__getitem__, *ds._volume(0)[2:])
    slow._pid = ds._pid
    for z in range(4):
        assert torch.equal(fast[z]["image"], slow[z]["image"]) and torch.equal(fast[z]["label"], slow[z]["label"])


def test_dataloader_with_two_workers(built):
    """Batched reads in 2 worker processes give exactly the per-slice items, each slice once."""
    cfg, _ = built
    ds = SliceDataset(cfg.store, patch=16, with_labels=False)
    assert len(ds) == 24
    ds[0]  # open handles in the parent first: workers must still open their own
    sampler = ResumableDistributedSampler(len(ds), shuffle=False, drop_last=False)
    loader = slice_loader(ds, batch_size=5, sampler=sampler, num_workers=2, drop_last=False)
    seen, index = [], 0
    for batch in loader:
        assert batch["image"].shape[1:] == (1, 16, 16) and batch["image"].dtype == torch.float32
        for i in range(batch["image"].shape[0]):
            item = ds[index]
            for key in item:
                assert torch.equal(batch[key][i], item[key]), key
            index += 1
        seen += list(zip(batch["volume"].tolist(), batch["slice"].tolist()))
    assert sorted(seen) == [(v, z) for v in range(3) for z in range(8)]

    labeled = SliceDataset(cfg.store, patch=16, with_labels=True)
    loader = slice_loader(labeled, batch_size=4, sampler=ResumableDistributedSampler(len(labeled), shuffle=False),
                          num_workers=1, drop_last=True)
    batch = next(iter(loader))
    assert batch["label"].dtype == torch.uint8 and batch["label"].shape == (4, 16, 16)
    assert torch.equal(batch["label"][3], labeled[3]["label"])


def test_sampler_disjoint_deterministic_resumable():
    n = 23
    ranks = [ResumableDistributedSampler(n, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in ranks:
        s.set_epoch(1)
    a, b = list(ranks[0]), list(ranks[1])
    assert len(a) == len(b) == len(ranks[0]) == 11  # drop_last
    assert not set(a) & set(b) and len(set(a) | set(b)) == 22
    assert list(ranks[0]) == a  # deterministic for (seed, epoch)
    ranks[0].set_epoch(2)
    assert list(ranks[0]) != a
    other_seed = ResumableDistributedSampler(n, num_replicas=2, rank=0, seed=4)
    other_seed.set_epoch(1)
    assert list(other_seed) != a

    # Resume after 4 consumed indices: the same remaining ones, via state_dict of a fresh sampler.
    ranks[0].set_epoch(1)
    state = ranks[0].state_dict(consumed=4)
    resumed = ResumableDistributedSampler(n, num_replicas=2, rank=0, seed=3)
    resumed.load_state_dict(state)
    assert list(resumed) == a[4:] and len(resumed) == 7
    with pytest.raises(UserError, match="num_replicas"):
        ResumableDistributedSampler(n, num_replicas=4, rank=0, seed=3).load_state_dict(state)

    keep = [ResumableDistributedSampler(n, num_replicas=2, rank=r, shuffle=False, drop_last=False) for r in range(2)]
    assert len(keep[0]) == 12 and set(keep[0]) | set(keep[1]) == set(range(n))
    assert list(keep[0])[:3] == [0, 2, 4]


# ---------------------------------------------------------------- augmentation


def test_augment_views_shapes_and_randomness():
    x = torch.zeros(3, 1, 32, 32)
    x[:, :, 6:20, 10:14] = 1.0  # an asymmetric bar, so rotations and flips show
    out = augment_views(x, views=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 2, 1, 32, 32) and out.dtype == torch.float32
    assert not torch.allclose(out[:, 0], out[:, 1])  # the two views differ
    assert not torch.allclose(out[0, 0], out[1, 0])  # and so do samples
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6  # bilinear stays in the input's range
    same = augment_views(x, views=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, same)  # seeded
    assert augment_views(x, views=3).shape == (3, 3, 1, 32, 32)


def test_augment_pair_moves_labels_with_images():
    labels = torch.zeros(4, 32, 32, dtype=torch.int64)
    labels[:, 4:20, 6:26] = 1
    labels[:, 10:16, 12:18] = 3
    images = labels[:, None].float()
    out_img, out_lab = augment_pair(images, labels, generator=torch.Generator().manual_seed(1))
    assert out_img.shape == (4, 1, 32, 32) and out_lab.shape == (4, 32, 32) and out_lab.dtype == torch.int64
    assert set(out_lab.unique().tolist()) <= {0, 1, 3}
    assert not torch.equal(out_lab, labels)
    # Same transform: the bilinear image agrees with the nearest label away from edges.
    agree = (out_img[:, 0].round().long() == out_lab).float().mean()
    assert agree > 0.9


def test_elastic_field_matches_the_papers_gaussian_filter():
    """The blocked-noise field has the spread and smoothness of scipy's gaussian_filter of
    full-resolution uniform(-1, 1) noise (mode="constant"), the paper's elastic deformation."""
    from scipy.ndimage import gaussian_filter

    from pcl_hpc.data.augment import elastic_field

    p, n, sigma = 128, 64, 15.0
    rng = np.random.default_rng(0)
    ref = np.stack([gaussian_filter(rng.random((p, p)) * 2 - 1, sigma, mode="constant") for _ in range(n)])
    ours = elastic_field(n, p, torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32,
                         alpha=(1.0, 1.0), sigma=(sigma, sigma))[..., 0].numpy()

    def stats(f):
        c = f[:, 32:96, 32:96]
        lag = [(c[:, :, :-d] * c[:, :, d:]).mean() / (c * c).mean() for d in (8, 16)]
        return np.array([c.std(), f[:, :6].std(), *lag])

    r, o = stats(ref), stats(ours)
    assert np.allclose(o[:2], r[:2], rtol=0.15), (o, r)  # centre and border spread
    # correlation at 8 and 16 px: white noise through a Gaussian filter has exp(-d^2 / (4 sigma^2))
    analytic = np.exp(-np.array([8.0, 16.0]) ** 2 / (4 * sigma ** 2))
    assert np.allclose(r[2:], analytic, atol=0.05) and np.allclose(o[2:], analytic, atol=0.05), (o, r, analytic)


def test_augment_grid_affine_part_is_exact():
    """With the elastic part off, the grid is exactly rotation/flip/scale of the pixel centres."""
    from pcl_hpc.data.augment import _random_grid

    g = _random_grid(5, 40, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(2), 0.0)
    base = (torch.arange(40, dtype=torch.float32) * 2 + 1) / 40 - 1
    ys, xs = torch.meshgrid(base, base, indexing="ij")
    for i in range(5):
        # recover theta from three points and check every pixel against it
        t00, t10 = g[i, 0, 1] - g[i, 0, 0]
        t01, t11 = g[i, 1, 0] - g[i, 0, 0]
        step = base[1] - base[0]
        theta = torch.tensor([[t00, t01], [t10, t11]]) / step
        want = torch.stack([theta[0, 0] * xs + theta[0, 1] * ys, theta[1, 0] * xs + theta[1, 1] * ys], dim=-1)
        assert torch.allclose(g[i], want, atol=1e-5)
        s = torch.linalg.det(theta).abs().sqrt()  # 1 / scale
        assert 1 / 1.3 - 1e-4 <= s <= 1 / 0.7 + 1e-4


@pytest.mark.gpu
def test_grids_do_not_depend_on_chunking():
    """CPU builds grids a few transforms at a time, a GPU all at once: the same draws must give the
    same grids, so a seed means the same augmentation on any device."""
    from pcl_hpc.data import augment as aug

    draws = aug._draw(9, 48, torch.Generator().manual_seed(5), 1.0, aug.ELASTIC_ALPHA, aug.ELASTIC_SIGMA)
    whole = aug._grid(draws, 0, 9, 48, torch.device("cpu"))
    parts = torch.cat([aug._grid(draws, lo, hi, 48, torch.device("cpu")) for lo, hi in aug._chunks(9, torch.device("cpu"))])
    assert aug._chunks(9, torch.device("cpu"))[0] == (0, aug.CPU_CHUNK)
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-6)


def test_keyed_batches_resume_their_numbering():
    sampler = ResumableDistributedSampler(20, seed=1)
    batches = KeyedBatchSampler(sampler, batch_size=4, drop_last=True)
    sampler.set_epoch(3)
    full = list(batches)
    assert [b.number for b in full] == [0, 1, 2, 3, 4] and {b.epoch for b in full} == {3}
    sampler.set_epoch(3, start=8)  # resumed after two batches
    assert [(b.number, b.indices) for b in batches] == [(b.number, b.indices) for b in full[2:]]
    assert len(batches) == 3


@pytest.mark.parametrize("labeled", [False, True])
def test_worker_augmentation_equals_trainer_augmentation(built, labeled):
    """Augmenting in 2 loader workers gives exactly what the trainer gets augmenting the plain
    batch itself: transforms are a function of (seed, rank, epoch, batch number) only."""
    cfg, _ = built
    augment = BatchAugment(seed=7, rank=1, views=0 if labeled else 2)
    sampler = ResumableDistributedSampler(24 if not labeled else 16, seed=0)
    plain = SliceDataset(cfg.store, patch=16, with_labels=labeled)
    in_workers = SliceDataset(cfg.store, patch=16, with_labels=labeled, transform=augment)
    sampler.set_epoch(2)
    expected = [augment(batch) for batch in slice_loader(plain, 4, sampler, num_workers=0, drop_last=True)]
    got = list(slice_loader(in_workers, 4, sampler, num_workers=2, drop_last=True))
    assert len(got) == len(expected) == len(plain) // 4
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and torch.equal(a["key"], b["key"])
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    key = "image" if labeled else "views"
    assert got[0][key].shape == ((4, 1, 16, 16) if labeled else (4, 2, 1, 16, 16))
    if labeled:
        assert got[0]["label"].dtype == torch.uint8
        assert set(torch.cat([g["label"] for g in got]).unique().tolist()) <= {0, 1, 2}
    # another batch number or epoch: other transforms
    batch = plain.__getitems__(BatchRequest(got[0]["slice"].tolist(), 2, 0))
    other = plain.__getitems__(BatchRequest(batch["slice"].tolist(), 2, 1))
    assert not torch.equal(augment(batch)[key], augment(other)[key])


@pytest.mark.gpu
def test_augment_on_choice():
    from pcl_hpc.config import DataConfig
    from pcl_hpc.data.augment import augment_in_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert augment_in_workers(DataConfig(num_workers=2), cpu)
    assert not augment_in_workers(DataConfig(num_workers=0), cpu)
    assert not augment_in_workers(DataConfig(num_workers=2), gpu)  # device only: no GPU needed to decide
    assert augment_in_workers(DataConfig(num_workers=2, augment_on="workers"), gpu)
    assert not augment_in_workers(DataConfig(num_workers=2, augment_on="device"), cpu)
    with pytest.raises(UserError, match="data.augment_on"):
        augment_in_workers(DataConfig(augment_on="gpu"), cpu)

"""DICOM series in, nothing identifying out; and the bad-input corpus, generated here.

The corpus: zero-byte, truncated and garbage files, an unreadable DICOM series, shape and
geometry mismatches, NaN voxels, a 2D image, out-of-class labels, duplicate case ids. Each must
give one line naming the file, and the CLI must exit non-zero while still converting the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import yaml

from pcl_hpc.config import DataConfig
from pcl_hpc.data import store as zstore
from pcl_hpc.data.preprocess import preprocess
from tests.conftest import REPO, cli
from tests.dicom_utils import write_dicom_series as shared_writer

PHI = {"0010|0010": "Doe^Jane", "0010|0020": "PID-93817-X", "0010|0030": "19450317", "0008|0020": "20190512"}


def write_dicom_series(folder, hu: np.ndarray, spacing=(0.8, 0.8, 2.5)) -> None:
    """hu (Z, Y, X) int16 -> one CT slice file per z, with patient tags set."""
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing(spacing)
    shared_writer(folder, image, PHI, modality="CT")


def test_dicom_series_leaves_no_patient_identifiers(tmp_path, capfd):
    raw = tmp_path / "raw"
    hu = np.random.default_rng(0).integers(-1000, 1500, size=(6, 16, 20)).astype(np.int16)
    write_dicom_series(raw / "imagesTs" / "series01", hu)
    assert b"Doe^Jane" in (raw / "imagesTs" / "series01" / "IM0000.dcm").read_bytes()  # the tags really are there
    cfg = DataConfig(raw_dir=str(raw), store=str(tmp_path / "s.zarr"), modality="ct", intensity="window",
                     hu_window=[-1000, 1500])
    summary = preprocess(cfg, progress=True)
    print(summary.format())
    assert summary.ok and summary.converted == ["series01"]
    image, _, attrs = zstore.load_volume(cfg.store, "series01")
    np.testing.assert_allclose(image, (hu[:, :, :] + 1000) / 2500, atol=1e-5)  # LPS already; window scaled
    assert attrs["spacing"] == [2.5, 0.8, 0.8]

    out, err = capfd.readouterr()
    blobs = [out.encode(), err.encode()]
    for root, _, files in os.walk(cfg.store):
        blobs.append(root.encode())
        blobs += [name.encode() for name in files] + [open(os.path.join(root, n), "rb").read() for n in files]
    blob = b"\n".join(blobs).lower()
    for value in PHI.values():
        for form in {value, value.replace("^", " "), "Doe", "Jane", value[:4] + "-" + value[4:6] + "-" + value[6:]}:
            assert form.lower().encode() not in blob, f"{form!r} leaked into the store or the logs"


def _corpus(raw):
    def save(path, data, affine=np.diag([1.0, 1.0, 3.0, 1.0])):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(path))

    vol = lambda s, shape=(10, 8, 4): np.random.default_rng(s).normal(0, 1, shape).astype(np.float32)  # noqa: E731
    lab = np.zeros((10, 8, 4), np.uint8)
    lab[2:6, 2:6, 1:3] = 1
    tr, lt, ts = raw / "imagesTr", raw / "labelsTr", raw / "imagesTs"
    save(tr / "good1.nii.gz", vol(1))
    save(lt / "good1.nii.gz", lab)
    save(ts / "good2.nii.gz", vol(2))
    ts.joinpath("zero.nii.gz").write_bytes(b"")
    save(raw / "whole.nii.gz", vol(3, (30, 30, 8)))
    whole = (raw / "whole.nii.gz").read_bytes()
    ts.joinpath("cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    (raw / "whole.nii.gz").unlink()
    ts.joinpath("junk.nrrd").write_bytes(b"NRRD0004\nthis is not a header\n")
    (ts / "badseries").mkdir()
    (ts / "badseries" / "IM0001").write_bytes(b"\x00" * 300)
    save(tr / "shape.nii.gz", vol(4))
    save(lt / "shape.nii.gz", lab[:, :, :3])
    save(tr / "geom.nii.gz", vol(5))
    save(lt / "geom.nii.gz", lab, np.diag([1.0, 1.0, 2.0, 1.0]))
    nan = vol(6)
    nan[1, 1, 1] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(nan.transpose(2, 1, 0)), str(ts / "inf.mha"))
    save(ts / "flat.nii.gz", vol(7, (10, 8)))
    save(tr / "classes.nii.gz", vol(8))
    save(lt / "classes.nii.gz", lab * 7)
    save(ts / "dup.nii.gz", vol(9))
    save(ts / "dup.nii", vol(10))  # same case id as dup.nii.gz
    (raw / "dataset.json").write_text('{"labels": {"0": "background", "1": "organ"}}')
    return {
        "zero.nii.gz": "0 bytes", "cut.nii.gz": "truncated", "junk.nrrd": "cannot be read",
        "badseries": "DICOM", "shape.nii.gz": "shape", "geom.nii.gz": "spacing", "inf.mha": "Inf",
        "flat.nii.gz": "3D", "classes.nii.gz": "outside", "dup.nii.gz": "also used",
    }


def test_bad_input_corpus_via_cli(tmp_path):
    raw = tmp_path / "raw"
    expected = _corpus(raw)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"raw_dir": str(raw), "store": str(tmp_path / "s.zarr")}}))
    run = subprocess.run(cli("preprocess", "--config", str(config), "--workers", "2"), cwd=REPO,
                         capture_output=True, text=True, errors="replace", timeout=120)
    assert run.returncode == 1, run.stderr
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("  FAILED ")]
    assert len(lines) == len(expected), run.stdout
    for name, word in expected.items():
        hits = [ln for ln in lines if f"/{name}:" in ln]
        assert len(hits) == 1 and word in hits[0], (name, hits)
        assert ";" in hits[0]  # problem; what to do
    assert "3 converted" in run.stdout and "10 failed" in run.stdout
    assert zstore.volume_ids(tmp_path / "s.zarr") == ["dup", "good1", "good2"]


def test_kill_9_loses_at_most_the_volume_in_flight(tmp_path):
    raw = tmp_path / "raw" / "imagesTs"
    raw.mkdir(parents=True)
    for i in range(8):
        data = np.random.default_rng(i).normal(0, 1, (96, 96, 24)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(raw / f"v{i}.nii.gz"))
    store = tmp_path / "s.zarr"
    code = (f"from pcl_hpc.config import DataConfig; from pcl_hpc.data.preprocess import preprocess; "
            f"preprocess(DataConfig(raw_dir={str(raw.parent)!r}, store={str(store)!r}), progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and len(zstore.stored_volume_dirs(store)) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = set(zstore.stored_volume_dirs(store))
    assert 3 <= len(done) < 8
    for vid in done:  # every volume under its real name is complete
        assert zstore.volume_attrs(store, vid)["content_sha256"]
    summary = preprocess(DataConfig(raw_dir=str(raw.parent), store=str(store)), progress=False)
    assert summary.ok and set(summary.skipped) == done and len(summary.converted) == 8 - len(done)
    assert not [p for p in (store / "volumes").iterdir() if p.name.startswith(".")]


def test_hashed_ids_keep_patient_names_out_of_store_and_logs(tmp_path, capfd):
    """id_scheme=hashed: a series in a folder named after the patient, and a broken file named
    after another: neither name nor date reaches the store, its attrs/manifest or the output."""
    from pcl_hpc.data.preprocess import id_key_path, id_map_path

    raw = tmp_path / "raw"
    hu = np.random.default_rng(0).integers(-1000, 1500, size=(6, 16, 20)).astype(np.int16)
    write_dicom_series(raw / "imagesTs" / "DOE_JOHN_19700101", hu)
    (raw / "imagesTs" / "SMITH_ANNA_19800202.nii.gz").write_bytes(b"")  # fails: its line must not name her
    (raw / "labelsTr").mkdir()
    (raw / "labelsTr" / "ROE_RICHARD_19710202.nii.gz").write_bytes(b"x")  # a layout problem (no image)
    store = tmp_path / "s.zarr"
    cfg = DataConfig(raw_dir=str(raw), store=str(store), modality="ct", intensity="window",
                     hu_window=[-1000, 1500], id_scheme="hashed")
    first = preprocess(cfg, progress=True)
    print(first.format())
    assert len(first.converted) == 1 and len(first.failed) == 2
    vid = first.converted[0]
    assert vid.startswith("v") and len(vid) == 13 and zstore.volume_ids(cfg.store) == [vid]
    assert sorted(p.split("/")[0] + "/" + p.split("/")[1][0] for p, _ in first.failed) == ["imagesTs/v", "labelsTr/p"]
    image, _, attrs = zstore.load_volume(cfg.store, vid)
    np.testing.assert_allclose(image, (hu + 1000) / 2500, atol=1e-5)
    manifest = zstore.read_manifest(cfg.store)
    assert manifest["settings"]["id_scheme"] == "hashed" and manifest["volumes"][0]["patient"] == vid

    second = preprocess(cfg, progress=False)  # same key beside the store: same id, nothing converted
    print(second.format())
    assert second.converted == [] and second.skipped == [vid]

    out, err = capfd.readouterr()
    blobs = [out.encode(), err.encode()]
    for root, dirs, files in os.walk(store):
        blobs += [root.encode()] + [d.encode() for d in dirs] + [n.encode() for n in files]
        blobs += [open(os.path.join(root, n), "rb").read() for n in files]
    blob = b"\n".join(blobs).lower()
    leaks = ["DOE", "JOHN", "19700101", "1970-01-01", "SMITH", "ANNA", "19800202", "ROE_", "RICHARD", "19710202",
             *PHI.values(), "Jane"]
    for form in leaks:
        assert form.lower().encode() not in blob, f"{form!r} leaked into the store or the logs"
    # The way back to the sources lives beside the store only, readable by its owner.
    key, idmap = id_key_path(cfg.store), id_map_path(cfg.store)
    assert key.parent == idmap.parent == tmp_path
    assert oct(key.stat().st_mode & 0o777) == "0o600" and oct(idmap.stat().st_mode & 0o777) == "0o600"
    text = idmap.read_text()
    assert f"{vid},imagesTs/DOE_JOHN_19700101," in text and "SMITH_ANNA_19800202.nii.gz" in text

    # A lost key must stop the run, not silently rename (and re-convert) every volume.
    key.unlink()
    try:
        preprocess(cfg, progress=False)
    except Exception as err:  # UserError
        assert "key file" in str(err)
    else:
        raise AssertionError("preprocess ran without the store's id key")

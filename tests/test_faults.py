"""Faults a lab meets in its second month, made for real: a disk that fills during a checkpoint (a small
tmpfs, mounted here). The heap corruption's soak is ``tools/soak.py`` (minutes, not a test); its fix is
checked in tests/test_losses.py (the gather is complete when it returns).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, cli

CONFIG = str(REPO / "configs" / "demo.yaml")
TINY = ["data.patch=32", "model.width=4", "model.projection_dim=32", "pretrain.batch_size=4",
        "pretrain.augment=false", "pretrain.log_every=1", "engine.precision=fp32", "checkpoint.every_steps=2",
        "pretrain.schedule_steps=4", "tracking.register_name=disk-full"]


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (root only; skipped where mount is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def pretrain(store: str, out: Path, db: Path, steps: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    args = ["pretrain", "--config", CONFIG, f"data.store={store}", f"output_dir={out}", f"tracking.uri=sqlite:///{db}",
            f"pretrain.max_steps={steps}", *TINY]
    return subprocess.run(cli(*args), capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_a_rerun_is_exact(demo_store, small_disk, tmp_path):
    from pcl_hpc.engine.checkpoint import verify

    reference = pretrain(demo_store, tmp_path / "straight", tmp_path / "ref.db", 4)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out, db = small_disk / "exp", tmp_path / "mlflow.db"
    first = pretrain(demo_store, out, db, 2)  # checkpoint step 2, on the small disk
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = out / "pretrain" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_000000002"
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as handle:  # leave 4 KiB: less than one checkpoint
        handle.write(b"\0" * (shutil.disk_usage(small_disk).free - 4096))

    full = pretrain(demo_store, out, db, 4)
    shown = f"exit {full.returncode}\n{full.stdout[-2000:]}\n{full.stderr[-2000:]}"
    assert full.returncode == 75, shown  # retryable: run it again once there is space
    assert "Traceback" not in full.stdout + full.stderr, shown
    errors = [line for line in full.stderr.splitlines() if line.startswith("pcl-hpc")]
    assert len(errors) == 1 and re.search(r"no space left on the device writing .*\(\d+\.\d MB free\)", errors[0]), shown
    assert "checkpoint step 4 not saved" in errors[0], shown
    # the previous checkpoint is whole, `latest` names it, nothing partial is left under a checkpoint name
    assert (checkpoints / "latest").read_text().strip() == "step_000000002"
    assert verify(checkpoints / "step_000000002") is None
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000000002"]
    for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # no half-written line

    ballast.unlink()
    rerun = pretrain(demo_store, out, db, 4)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    got = torch.load(out / "pretrain" / "encoder.pt", weights_only=True)
    want = torch.load(tmp_path / "straight" / "pretrain" / "encoder.pt", weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_atomic_writes_on_a_full_disk_are_one_line_and_keep_the_old_file(small_disk):
    from pcl_hpc.atomic import DiskFull, save_torch, write_text

    write_text(small_disk / "result.json", "good")
    save_torch({"w": torch.zeros(4)}, small_disk / "model.pt")
    with pytest.raises(DiskFull, match=r"no space left on the device writing .*result.json \(\d+\.\d MB free\)"):
        write_text(small_disk / "result.json", "x" * (9 << 20))
    with pytest.raises(DiskFull, match="model.pt"):  # torch wraps the ENOSPC in its own RuntimeError
        save_torch({"w": torch.zeros(3 << 20)}, small_disk / "model.pt")
    assert (small_disk / "result.json").read_text() == "good"
    assert torch.equal(torch.load(small_disk / "model.pt", weights_only=True)["w"], torch.zeros(4))
    assert sorted(p.name for p in small_disk.iterdir()) == ["model.pt", "result.json"]


def test_a_store_volume_that_does_not_fit_leaves_nothing_half_written(small_disk):
    import numpy as np

    from pcl_hpc.atomic import DiskFull
    from pcl_hpc.data.store import write_volume

    store = small_disk / "store.zarr"
    rng = np.random.default_rng(0)
    small = rng.random((2, 8, 8), dtype=np.float32)
    write_volume(store, "vol1", small, None, {"positions": [0.5, 1.0], "partitions": [0, 1]})
    noise = rng.random((40, 256, 256), dtype=np.float32)  # ~10 MB that does not compress: more than the disk
    with pytest.raises(DiskFull, match=r"no space left on the device writing .*vol2 \(\d+\.\d MB free\)"):
        write_volume(store, "vol2", noise, None, {"positions": [0.5] * 40, "partitions": [0] * 40})
    assert sorted(p.name for p in (store / "volumes").iterdir()) == ["vol1", "zarr.json"]

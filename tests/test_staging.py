"""Node-local staging (data.stage): volume shards, the shard sampler, and the copy itself on a real Zarr store
(verified, resumed, once per node; a missing or broken copy is read from the shared store with one line).
The two-node run is on the real local SLURM (test_slurm_multinode.py), its reference a two-node torchrun
(``two_node_torchrun`` here: each node in its own UTS namespace), the store's opens counted by inotify
(``OpenCounter`` here)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pcl_hpc import dist
from pcl_hpc.config import DataConfig
from pcl_hpc.data import store as zstore
from pcl_hpc.data.dataset import ResumableDistributedSampler, SliceDataset
from pcl_hpc.data.shards import VolumeShardSampler, shard_volumes
from pcl_hpc.data.staging import MARKER, stage, stage_root
from pcl_hpc.errors import UserError
from tests.test_faults import small_disk  # noqa: F401 - the fixture: an 8 MiB tmpfs

DEPTHS = [6, 9, 5, 7, 8]


def small_store(path: Path) -> str:
    """Five volumes of different depths (one labeled), 12 x 12 slices, each slice distinct."""
    rng = np.random.default_rng(0)
    for k, z in enumerate(DEPTHS):
        image = rng.normal(size=(z, 12, 12)).astype(np.float32) + 10 * k
        label = (image > 10 * k).astype(np.uint8) if k == 0 else None
        zstore.write_volume(path, f"v{k}", image, label,
                            {"positions": [(i + 1) / z for i in range(z)], "partitions": [i * 2 // z for i in range(z)]})
    zstore.write_manifest(path, {"folds": 2})
    return str(path)


def chunk_files(root: Path, vid: str) -> list[Path]:
    return sorted(p for p in (root / "volumes" / vid).rglob("*") if p.is_file() and "c" in p.relative_to(root).parts)


def test_shards_are_balanced_fixed_and_cover_every_volume_once():
    depths = [40, 10, 30, 20, 25, 35, 15]
    for nodes in (1, 2, 3):
        shards = shard_volumes(depths, nodes)
        assert sorted(v for s in shards for v in s) == list(range(len(depths)))
        loads = [sum(depths[v] for v in s) for s in shards]
        assert max(loads) - min(loads) <= max(depths), loads
        assert shard_volumes(depths, nodes) == shards, "a function of depths and node count alone"
    with pytest.raises(UserError, match="2 nodes but only 1 volumes"):
        shard_volumes([5], 2)


def test_shard_sampler_keeps_each_node_on_its_volumes_and_resumes():
    starts = np.concatenate([[0], np.cumsum(DEPTHS)])
    shards = shard_volumes(DEPTHS, 2)
    per_node, world = [2, 2], 4
    volume_of = lambda i: int(np.searchsorted(starts, i, side="right") - 1)  # noqa: E731
    samplers = [VolumeShardSampler(starts, shards, per_node, r // 2, r % 2, world, r, seed=3) for r in range(world)]
    epochs = []
    for epoch in (0, 1):
        drawn = []
        for s in samplers:
            s.set_epoch(epoch)
            drawn.append(list(s))
        assert len({len(d) for d in drawn}) == 1, "every rank steps together"
        assert len(set(sum(drawn, []))) == sum(len(d) for d in drawn), "no slice twice in an epoch"
        for r, d in enumerate(drawn):
            assert {volume_of(i) for i in d} <= set(shards[r // 2]), f"rank {r} read outside its node's shard"
        epochs.append(drawn)
    assert epochs[0][0] != epochs[1][0] and set(epochs[0][0] + epochs[0][1]) <= set(
        range(starts[shards[0][0]], starts[-1])), "reshuffled every epoch"
    s = samplers[1]
    s.set_epoch(1)
    full = list(s)
    resumed = VolumeShardSampler(starts, shards, per_node, 0, 1, world, 1, seed=3)
    resumed.load_state_dict(s.state_dict(consumed=3))
    assert list(resumed) == full[3:], "a mid-epoch resume yields exactly the rest"
    with pytest.raises(UserError, match="volume shards"):
        ResumableDistributedSampler(int(starts[-1]), world, 1, seed=3).load_state_dict(s.state_dict())
    with pytest.raises(UserError, match="volume shards"):
        VolumeShardSampler(starts, shard_volumes(DEPTHS, 1), [4], 0, 1, world, 1, seed=3).load_state_dict(s.state_dict())


def read_all(data: SliceDataset) -> dict[str, torch.Tensor]:
    return data.__getitems__(list(range(len(data))))


def test_stage_copies_once_verifies_resumes_and_falls_back(tmp_path, capsys):
    store = small_store(tmp_path / "store.zarr")
    manifest = zstore.read_manifest(store)
    data_cfg = DataConfig(store=store, stage=True, stage_dir=str(tmp_path / "local"))
    root = stage_root(data_cfg, manifest, dist.node_layout(dist.DistEnv()).host)
    shared = read_all(SliceDataset(store, patch=12))

    opened: list[str] = []  # every file this process opens under the shared store, from Python's audit hook
    hook_on = [True]
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if hook_on[0] and event == "open"
                     and str(args[0]).startswith(store + "/volumes/") and "/c/" in str(args[0]) else None)
    try:
        data = SliceDataset(store, patch=12)
        sampler = stage(data, data_cfg, manifest, dist.DistEnv(), seed=0)
        every_chunk = sorted(str(p) for v in range(5) for p in chunk_files(Path(store), f"v{v}"))
        assert sorted(opened) == every_chunk, "staging reads each chunk file of the store exactly once"
        assert set(data.local) == {f"v{k}" for k in range(5)} and len(list(sampler)) == sum(DEPTHS)
        opened.clear()
        for epoch in range(2):
            sampler.set_epoch(epoch)
            data.__getitems__(list(sampler))
        assert opened == [], "training reads nothing from the shared store once staged"
        assert torch.equal(read_all(data)["image"], shared["image"])
        assert "5/5 volumes staged (5 copied" in capsys.readouterr().out

        shutil.rmtree(root / "volumes" / "v2" / "image" / "c" / "3")  # a partial copy: one chunk gone
        (root / "volumes" / "v4.staged.json").unlink()  # an interrupted copy: no marker
        opened.clear()
        again = SliceDataset(store, patch=12)
        stage(again, data_cfg, manifest, dist.DistEnv(), seed=0)
        assert sorted({Path(p).relative_to(store).parts[1] for p in opened}) == ["v2", "v4"], "only what is missing"
        assert "(2 copied" in capsys.readouterr().out and torch.equal(read_all(again)["image"], shared["image"])
    finally:
        hook_on[0] = False

    # A copy that breaks or disappears mid-run: read from the shared store, one line per volume.
    chunk = chunk_files(root, "v1")[2]
    chunk.write_bytes(b"not a blosc frame" * 4)
    shutil.rmtree(root / "volumes" / "v3")
    mixed = read_all(again)  # its handles are open: the copies fail under a running reader
    assert torch.equal(mixed["image"], shared["image"]) and torch.equal(mixed["position"], shared["position"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "node-local copy" in ln]
    assert len(lines) == 2 and {"v1", "v3"} == {ln.split("volume ")[1].split()[0] for ln in lines}, lines
    assert all("reading it from the shared store" in ln for ln in lines)

    # A copy that does not match the manifest's checksum is not used: one line, the shared store serves it.
    assert [v["content_sha256"] for v in manifest["volumes"]] == [
        zstore.volume_attrs(store, f"v{k}")["content_sha256"] for k in range(5)], "the manifest holds each checksum"
    root_meta = Path(store) / "zarr.json"
    meta = json.loads(root_meta.read_text())
    meta["attributes"]["manifest"]["volumes"][0]["content_sha256"] = "0" * 64
    root_meta.write_text(json.dumps(meta))
    manifest = zstore.read_manifest(store)
    shutil.rmtree(root)
    last = SliceDataset(store, patch=12, with_labels=False)
    stage(last, data_cfg, manifest, dist.DistEnv(), seed=0)
    out = capsys.readouterr().out
    assert "volume v0 is not staged (StageError: its copy does not match" in out and "v0" not in last.local
    assert not (root / "volumes" / "v0").exists() and not (root / "volumes" / f"v0{MARKER}").exists()
    assert torch.equal(read_all(last)["image"], shared["image"])


# ---------------------------------------------------------------- two nodes on this machine

class OpenCounter:
    """Counts, from outside the training processes, every open of a chunk file of the store (inotify on each
    chunk folder): what a node really read from the shared store, whichever process or library opened it."""

    def __init__(self, store: str):
        import threading

        from inotify_simple import INotify, flags

        self.inotify, self.flags, self.paths, self.counts = INotify(), flags, {}, {}
        for folder in Path(store).glob("volumes/*/*/c/*/0"):
            self.paths[self.inotify.add_watch(str(folder), flags.OPEN)] = folder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            for event in self.inotify.read(timeout=200):
                if event.name and not event.mask & self.flags.ISDIR:
                    path = self.paths[event.wd] / event.name
                    self.counts[path] = self.counts.get(path, 0) + 1

    def take(self) -> dict[Path, int]:
        """The opens since the last take (waits for the kernel's queue to drain)."""
        import time

        time.sleep(0.5)
        counts, self.counts = self.counts, {}
        return counts

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.inotify.close()


def staged_volumes(stage_dir: Path, host: str) -> set[str]:
    return {p.name for p in stage_dir.glob(f"pcl-hpc-stage/{host}/*/volumes/*") if p.is_dir()}


def volume_chunks(store: str, vids) -> set[Path]:
    return {p for vid in vids for p in Path(store).glob(f"volumes/{vid}/*/c/*/0/0")}


def two_node_torchrun(store: str, out: Path, hosts=("ref1", "ref2"), **extra) -> list[str]:
    """Pretraining with data.stage over two nodes of one process each, by torchrun: each node a process tree in
    its own UTS namespace (its own host name), meeting on 127.0.0.1. Returns each node's output."""
    import os
    import socket
    import subprocess

    from tests.conftest import REPO
    from tests.test_slurm import TINY
    from tests.test_spine import overrides

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = overrides(store, out, **{**TINY, "engine.threads": 1, "data.stage": "true", **extra})
    procs = [subprocess.Popen(
        ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", sys.executable, "-m",
         "torch.distributed.run", "--nnodes=2", f"--node_rank={k}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
         f"--master_port={port}", "-m", "pcl_hpc", "pretrain", "--config", str(REPO / "configs" / "demo.yaml"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"}) for k, host in enumerate(hosts)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return logs


def test_an_unwritable_or_full_stage_dir_is_one_line_and_the_store_serves(tmp_path, capsys, small_disk):
    store = small_store(tmp_path / "store.zarr")
    manifest = zstore.read_manifest(store)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = SliceDataset(store, patch=12)
    stage(data, DataConfig(store=store, stage=True, stage_dir=str(blocker)), manifest, dist.DistEnv(), seed=0)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning")]
    assert len(lines) == 1 and "5 volume(s) of this node, from v0 on, are read from the shared store" in lines[0], lines
    assert data.local == {} and torch.equal(read_all(data)["image"], read_all(SliceDataset(store, patch=12))["image"])

    # a real full disk: an 8 MiB tmpfs as the stage dir, and a third volume of 10 MB of noise (incompressible)
    big = tmp_path / "big.zarr"
    for k, shape in enumerate([(6, 12, 12), (6, 12, 12), (40, 256, 256)]):
        zstore.write_volume(big, f"v{k}", np.random.default_rng(k).normal(size=shape).astype(np.float32), None,
                            {"positions": [(i + 1) / shape[0] for i in range(shape[0])], "partitions": [0] * shape[0]})
    zstore.write_manifest(big, {"folds": 2})
    data = SliceDataset(str(big), patch=12)
    stage(data, DataConfig(store=str(big), stage=True, stage_dir=str(small_disk)), zstore.read_manifest(big),
          dist.DistEnv(), seed=0)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning")]
    assert len(lines) == 1 and "no space left in" in lines[0] and "1 volume(s) of this node, from v2 on" in lines[0], lines
    assert sorted(data.local) == ["v0", "v1"] and not list(small_disk.rglob(".tmp-*")), "no partial copy is left"


def _stage_all(store: str, root: str, out, start) -> None:
    from pcl_hpc.data.staging import stage_volumes

    start.wait(60)  # both processes begin together
    done = stage_volumes(store, [f"v{k}" for k in range(5)], Path(root))
    out.put((done.copied, done.kept, done.failed))


def test_two_jobs_on_one_node_stage_each_volume_once(tmp_path):
    # two processes (two jobs packed on one node) stage the same store into the same folder at once: they take
    # turns per volume, so each chunk file of the store is opened once in all (counted from outside, inotify)
    import multiprocessing

    store = small_store(tmp_path / "store.zarr")
    root = tmp_path / "local" / "node"
    counter = OpenCounter(store)
    try:
        ctx = multiprocessing.get_context("spawn")
        out, start = ctx.Queue(), ctx.Barrier(2)
        jobs = [ctx.Process(target=_stage_all, args=(store, str(root), out, start)) for _ in range(2)]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join(120)
        results = [out.get(timeout=10) for _ in jobs]
        opened = counter.take()
    finally:
        counter.close()
    assert all(job.exitcode == 0 for job in jobs)
    assert sum(r[0] for r in results) == 5 and sum(r[1] for r in results) == 5 and not any(r[2] for r in results)
    assert opened == {p: 1 for p in volume_chunks(store, [f"v{k}" for k in range(5)])}, "each chunk read once"

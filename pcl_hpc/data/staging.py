"""Node-local staging (``data.stage``): at job start each node copies the volumes its ranks will read from
the shared store to its own disk, and training reads them from there.

* **where**: ``data.stage_dir``, else ``$SLURM_TMPDIR``, else ``$TMPDIR``, else the system temp folder;
  under it ``pcl-hpc-stage/<host>/<store content hash>/volumes/<id>/``, laid out as in the store.
* **what**: the node's shard (``pcl_hpc.data.shards``): each volume is read from the shared store once per
  node per job start, whatever the number of epochs. The node's ranks split the copying among them.
* **verified**: a copy is checked against the volume's ``content_sha256`` in the manifest (what its
  content hash is built from) before it is renamed into place; a marker beside it lists its files and sizes.
* **resumable**: a later job start (a requeue, perhaps on other machines) keeps every copy whose marker
  and files are intact and copies the rest; an interrupted copy is never taken for a finished one. Jobs
  that share a node and a store take turns per volume (a file lock), so each volume is copied once.
* **fallback**: a volume that cannot be staged (disk full, checksum mismatch, read error) is read from the
  shared store, with one line; so is one whose copy disappears or breaks mid-run (``SliceDataset``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import zarr

from pcl_hpc import dist
from pcl_hpc.atomic import is_disk_full, write_text
from pcl_hpc.config import DataConfig
from pcl_hpc.data.dataset import SliceDataset
from pcl_hpc.data.shards import VolumeShardSampler, shard_volumes
from pcl_hpc.data.store import content_digest, read_manifest, volume_attrs

MARKER = ".staged.json"  # <id>.staged.json beside a finished copy: its checksum, files and sizes
STAGE_TIMEOUT_S = 6 * 3600  # how long a node's ranks wait for its copying (the process group's timeout is shorter)


class StageError(Exception):
    """A volume that could not be staged (the reason is its message); it is read from the shared store."""


@dataclass
class Staged:
    """What one rank's share of a node's copying did."""

    copied: int = 0  # volumes copied now
    kept: int = 0  # volumes found staged and intact
    bytes_read: int = 0  # bytes read from the shared store
    failed: int = 0  # volumes left to the shared store


def stage_root(data: DataConfig, manifest: dict, host: str) -> Path:
    """This node's staging folder for this store's content."""
    base = data.stage_dir or os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or tempfile.gettempdir()
    return Path(base) / "pcl-hpc-stage" / host / str(manifest.get("content_hash", "unhashed"))[:16]


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def intact(root: Path, vid: str, checksum: str) -> bool:
    """True when ``vid``'s copy under ``root`` was finished for this checksum and every file it had is there,
    at its size (cheap: stats only; the content was verified when it was copied)."""
    marker, folder = root / "volumes" / f"{vid}{MARKER}", root / "volumes" / vid
    try:
        record = json.loads(marker.read_text())
        return record["content_sha256"] == checksum and all(
            (folder / rel).stat().st_size == size for rel, size in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify(folder: Path) -> str:
    """The content checksum of a volume folder, computed from its arrays."""
    group = zarr.open_group(str(folder), mode="r")
    return content_digest(group["image"][...], group["label"][...] if "label" in group else None)


def _copy(source: Path, target: Path) -> None:
    """Copy a volume folder file by file: the first error is raised as it is (shutil.copytree gathers them into
    one without an errno, and a full disk must be told apart)."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / path.relative_to(source))


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (created if missing) while the block runs: two jobs on one node that stage
    the same volume (sweep cells packed on a node, say) take turns, and the second finds it staged."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stage_volume(store: str, vid: str, root: Path, checksum: str) -> int:
    """Copy one volume to ``root`` and verify it; the bytes read from the store (0 when already staged)."""
    volumes = root / "volumes"
    if intact(root, vid, checksum):
        return 0
    volumes.mkdir(parents=True, exist_ok=True)
    with _locked(volumes / f".{vid}.lock"):
        return 0 if intact(root, vid, checksum) else _copy_volume(store, vid, root, checksum)


def _copy_volume(store: str, vid: str, root: Path, checksum: str) -> int:
    volumes = root / "volumes"
    target, marker = volumes / vid, volumes / f"{vid}{MARKER}"
    marker.unlink(missing_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp = volumes / f".tmp-{vid}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _copy(Path(store) / "volumes" / vid, tmp)
        got = verify(tmp)
        if got != checksum:
            raise StageError(f"its copy does not match the store's checksum ({got[:12]} != {checksum[:12]})")
        files = _files(tmp)
        os.rename(tmp, target)
        write_text(marker, json.dumps({"content_sha256": checksum, "files": files}) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sum(files.values())


def checksums(manifest: dict, store: str, vids: list[str]) -> dict[str, str | None]:
    """Each volume's content checksum: from the manifest (one read for all volumes), else (a store written
    before the manifest held them) from the volume's own attrs."""
    listed = {v["id"]: v.get("content_sha256") for v in manifest["volumes"]}
    return {vid: listed.get(vid) or volume_attrs(store, vid).get("content_sha256") for vid in vids}


def stage_volumes(store: str, vids: list[str], root: Path, table: dict[str, str | None] | None = None) -> Staged:
    """Stage each of ``vids`` (this rank's part of its node's copying), against ``table`` (:func:`checksums`;
    read here when not given). One line for each volume that fails, and one for all the rest when the staging
    folder cannot be written or fills up."""
    done = Staged()
    table = table if table is not None else checksums(read_manifest(store), store, vids)
    for k, vid in enumerate(vids):
        try:
            if k == 0:
                (root / "volumes").mkdir(parents=True, exist_ok=True)
            checksum = table[vid]
            if not checksum:
                raise StageError("the store has no content_sha256 for it (written by an older pcl-hpc: preprocess again)")
            read = stage_volume(store, vid, root, checksum)
            done.copied, done.kept, done.bytes_read = done.copied + bool(read), done.kept + (not read), done.bytes_read + read
        except OSError as err:
            if k and not is_disk_full(err, root):
                _not_staged(done, store, vid, err)
                continue
            why = f"no space left in {root}" if is_disk_full(err, root) else f"cannot write to {root} ({err.strerror})"
            done.failed += len(vids) - k
            print(f"warning: data.stage: {why}; {len(vids) - k} volume(s) of this node, from {vid} on, are read from the "
                  f"shared store {store}; set data.stage_dir to a node-local folder with room", flush=True)
            break
        except (StageError, ValueError, KeyError, RuntimeError) as err:  # RuntimeError: a codec's on a bad chunk
            _not_staged(done, store, vid, err)
    return done


def _not_staged(done: Staged, store: str, vid: str, err: Exception) -> None:
    done.failed += 1
    why = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    print(f"warning: data.stage: volume {vid} is not staged ({why}); it is read from the shared store {store}", flush=True)


def stage(dataset: SliceDataset, data: DataConfig, manifest: dict, env: dist.DistEnv,
          seed: int) -> VolumeShardSampler:
    """Stage this node's shard of ``dataset`` (every rank calls it: a collective), point the dataset at the
    copies, and return the sampler that keeps this rank on them."""
    layout = dist.node_layout(env)
    shards = shard_volumes(dataset.depths, layout.nodes)
    mine = [dataset.volume_ids[v] for v in shards[layout.node]]
    root = stage_root(data, manifest, layout.host)
    start = time.perf_counter()
    table = checksums(manifest, dataset.store, mine)
    done = stage_volumes(dataset.store, mine[layout.local_index::layout.local_count], root, table)
    dist.long_barrier(STAGE_TIMEOUT_S)
    staged = {vid: root / "volumes" / vid for vid in mine if table[vid] and intact(root, vid, table[vid])}
    dataset.use_local(staged)
    report = dist.gather(env, (layout.node, done, time.perf_counter() - start, len(staged), len(mine)))
    if env.is_main:
        print(staging_line(report, root), flush=True)
    return VolumeShardSampler(dataset.starts, shards, layout.per_node, layout.node, layout.local_index,
                              env.world_size, env.rank, seed=seed)


def staging_line(report: list[tuple[int, Staged, float, int, int]], root: Path) -> str:
    """One line for the job: per node, what was copied and read from the shared store, and how long it took."""
    nodes = {}
    for node, done, seconds, staged, volumes in report:
        n = nodes.setdefault(node, {"copied": 0, "kept": 0, "failed": 0, "bytes": 0, "s": 0.0, "of": (staged, volumes)})
        n["copied"], n["kept"], n["failed"] = n["copied"] + done.copied, n["kept"] + done.kept, n["failed"] + done.failed
        n["bytes"], n["s"] = n["bytes"] + done.bytes_read, max(n["s"], seconds)
    parts = [f"node {k}: {n['of'][0]}/{n['of'][1]} volumes staged ({n['copied']} copied, {n['bytes'] / 1e6:.1f} MB "
             f"read from the shared store; {n['kept']} kept; {n['failed']} failed) in {n['s']:.1f} s"
             for k, n in sorted(nodes.items())]
    return f"staging under {root.parent.parent}/<host>/{root.name}: " + "; ".join(parts)

"""Node-local staging benchmark (data.stage): prints one JSON line (timings are benchmarks, never test assertions).

On the store `make demo` pretrains on (6 Desikan-Killiany subjects, 3 unlabeled re-syntheses each, MNI152;
written to a temporary folder), for a
job of ``--nodes`` nodes with one rank each (the rank of node k is rank k):
- shared_mb_per_epoch_per_node: MB read from the shared store in one epoch by each node, without staging (the
  plain sampler: every rank reads slices of every volume) and with it (0: the node reads its staged copy);
  measured as the sizes of the chunk files the loader really opened (Python's audit hook)
- staged_mb_per_node / staging_s_per_node: what each node copies once per job start, and how long it takes
  (copy and checksum verification, one rank per node)
- loader_slices_s_shared / loader_slices_s_staged: slices/s of the training loader (2 workers, reading only)
  over one epoch of node 0's share, from the shared store against from the staged copy; both sit on this
  machine's one disk, so this shows what staging costs the reader, not a shared filesystem's slowness
- compressed_kb_per_slice, compression_ratio: the store's mean image chunk, and float32 bytes over stored
  bytes, for the README's cluster arithmetic

    python tools/bench_staging.py [--nodes 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def demo_store(root: Path) -> str:
    from pcl_hpc.config import DataConfig
    from pcl_hpc.data.demo_data import make_demo_data
    from pcl_hpc.data.preprocess import preprocess
    from pcl_hpc.demo import DEMO_CASES, DEMO_SPACING_MM, DEMO_VARIANTS

    make_demo_data(root / "raw", spacing=DEMO_SPACING_MM, seed=0, variants=DEMO_VARIANTS, variant_cases=DEMO_CASES)
    data = DataConfig(raw_dir=str(root / "raw"), store=str(root / "store.zarr"), layout="generic", folds=3)
    assert preprocess(data, workers=1, progress=False).ok
    return data.store


class OpenedBytes:
    """Bytes of the store's chunk files opened by this process and its loader workers' reports."""

    def __init__(self, store: str):
        self.prefix, self.total = str(Path(store) / "volumes") + "/", 0
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args) -> None:
        if event == "open" and isinstance(args[0], str) and args[0].startswith(self.prefix) and "/c/" in args[0]:
            self.total += Path(args[0]).stat().st_size

    def take(self) -> int:
        total, self.total = self.total, 0
        return total


def epoch(dataset, sampler, workers: int) -> tuple[int, float]:
    """(slices, seconds) of one epoch of the training loader, reading only."""
    from pcl_hpc.data.dataset import slice_loader

    sampler.set_epoch(0)
    loader = slice_loader(dataset, 16, sampler, workers, drop_last=False)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["image"])
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()

    from pcl_hpc.data.dataset import ResumableDistributedSampler, SliceDataset
    from pcl_hpc.data.shards import VolumeShardSampler, shard_volumes
    from pcl_hpc.data.staging import checksums, intact, stage_volumes
    from pcl_hpc.data.store import read_manifest

    with tempfile.TemporaryDirectory() as tmp:
        store = demo_store(Path(tmp))
        chunks = list(Path(store).glob("volumes/*/image/c/*/0/0"))
        raw = sum(4 * v["shape"][0] * v["shape"][1] * v["shape"][2] for v in read_manifest(store)["volumes"])
        store_mb = sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file()) / 1e6
        manifest = read_manifest(store)
        opened = OpenedBytes(store)
        data = SliceDataset(store, patch=64)
        nodes = args.nodes

        unstaged = []  # workers=0 here: the audit hook sees every open in this process
        for node in range(nodes):
            sampler = ResumableDistributedSampler(len(data), nodes, node, seed=0)
            epoch(data, sampler, 0)
            unstaged.append(opened.take() / 1e6)

        shards = shard_volumes(data.depths, nodes)
        staged_mb, staging_s, samplers = [], [], []
        for node in range(nodes):
            root = Path(tmp) / "local" / f"node{node}"
            vids = [data.volume_ids[v] for v in shards[node]]
            start = time.perf_counter()
            table = checksums(manifest, store, vids)
            done = stage_volumes(store, vids, root, table)
            staging_s.append(round(time.perf_counter() - start, 2))
            staged_mb.append(round(done.bytes_read / 1e6, 2))
            opened.take()
            assert done.failed == 0 and all(intact(root, v, table[v]) for v in vids)
            samplers.append((root, vids, VolumeShardSampler(data.starts, shards, [1] * nodes, node, 0, nodes, node)))
        staged = []
        for root, vids, sampler in samplers:
            node_data = SliceDataset(store, patch=64)
            node_data.use_local({v: root / "volumes" / v for v in vids})
            epoch(node_data, sampler, 0)
            staged.append(opened.take() / 1e6)

        root, vids, sampler = samplers[0]
        shared_reader = SliceDataset(store, patch=64)
        plain = VolumeShardSampler(data.starts, shards, [1] * nodes, 0, 0, nodes, 0)  # the same slices, from the store
        staged_reader = SliceDataset(store, patch=64)
        staged_reader.use_local({v: root / "volumes" / v for v in vids})
        rates = {}
        for name, reader, smp in (("shared", shared_reader, plain), ("staged", staged_reader, sampler),
                                  ("shared", shared_reader, plain), ("staged", staged_reader, sampler)):
            n, seconds = epoch(reader, smp, 2)  # twice each, alternating: the second pass of each counts
            rates[name] = n / seconds

        print(json.dumps({
            "bench": "staging", "nodes": nodes, "volumes": len(data.volume_ids), "slices": len(data),
            "store_mb": round(store_mb, 2), "store_hash": read_manifest(store)["content_hash"][:12],
            "compressed_kb_per_slice": round(sum(p.stat().st_size for p in chunks) / len(chunks) / 1e3, 2),
            "compression_ratio": round(raw / sum(p.stat().st_size for p in chunks), 2),
            "shared_mb_per_epoch_per_node": {"unstaged": [round(x, 2) for x in unstaged],
                                             "staged": [round(x, 2) for x in staged]},
            "staged_mb_per_node": staged_mb, "staging_s_per_node": staging_s,
            "loader_slices_s_shared": round(rates["shared"], 1), "loader_slices_s_staged": round(rates["staged"], 1),
            "staged_over_shared": round(rates["staged"] / rates["shared"], 3),
        }))


if __name__ == "__main__":
    main()

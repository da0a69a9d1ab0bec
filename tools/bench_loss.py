"""Benchmark the gathered contrastive loss against the naive full matrix; prints ONE JSON line.

    python tools/bench_loss.py            # global batches of 1k, 4k, 16k, 64k views (a few minutes)
    python tools/bench_loss.py --quick    # 1k and 4k only

For every global batch B (views, V=2, D=128, method pcl) and every variant, 2 real gloo processes
(one torch thread each) run one forward+backward of the loss on random L2-normalised features:

* ``chunked``: ``contrastive_loss(chunk_size=--chunk-size)``: each rank's own N*V anchor rows
  against the B gathered columns, a block of rows at a time;
* ``local``: the same with ``chunk_size=None`` (all local rows in one block);
* ``naive``: every rank builds the full B x B matrix from the gathered features and runs the
  textbook autograd SupCon expression on it.

Reported per configuration: the slower rank's forward+backward seconds and the larger rank's peak
memory. A configuration whose estimated memory exceeds --max-gib per rank is not run: its numbers
are null, with the reason.

How memory is measured, and why it is honest: each configuration runs in fresh processes. Right
before the measured forward+backward, a rank resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs, Linux >= 4.0) and notes its RSS; afterwards ``VmHWM - RSS_before`` is the
most physical memory the step added at any moment: every tensor the loss and autograd created,
gloo buffers included, not an estimate. The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so
glibc serves every allocation above 64 KiB with its own mmap and gives it back on free; with
glibc's default, adaptive threshold, freed blocks of tens of MiB stay in the heap and the RSS
peak reflects allocator retention rather than what the loss allocates (on a GPU the caching
allocator's own statistics would be used instead). The measured step runs once, cold, after one
warm-up step for batches up to 4k views; times at 16k and above are a single run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30
MIB = 1 << 20
WORLD = 2
VIEWS = 2
# Conservative bytes per (anchor row, column) entry, from measurements of this script, used only
# to skip configurations that would not fit: ours keeps ~5 B/entry (float32 logits + bool mask)
# plus gradients; the naive autograd graph keeps several full-size float tensors and a float64
# position difference.
EST_BYTES_OURS = 12
EST_BYTES_NAIVE = 30
EST_BASE = 256 * MIB


def _status_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def _naive_loss(features, positions, threshold, temperature, base_temperature):
    """Textbook SupCon on the full gathered B x B matrix, differentiated by autograd."""
    import torch

    from pcl_hpc.losses import gather_with_grad

    n, views, dim = features.shape
    cols = gather_with_grad(features).reshape(-1, dim)
    pos = gather_with_grad(positions.double()).repeat_interleave(views)
    slice_id = torch.arange(cols.shape[0] // views).repeat_interleave(views)
    logits = cols @ cols.T / temperature
    is_self = torch.eye(cols.shape[0], dtype=torch.bool)
    positive = (slice_id[:, None] == slice_id[None, :]) | ((pos[:, None] - pos[None, :]).abs() < threshold)
    positive &= ~is_self
    log_prob = logits - torch.logsumexp(logits.masked_fill(is_self, float("-inf")), dim=1, keepdim=True)
    mean_pos = torch.where(positive, log_prob, 0.0).sum(1) / positive.sum(1)
    return -(temperature / base_temperature) * mean_pos.mean()


def _worker(rank: int, port: int, conf: dict, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from pcl_hpc.losses import contrastive_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        n = conf["global_views"] // (VIEWS * WORLD)
        g = torch.Generator().manual_seed(rank)
        base = F.normalize(torch.randn(n, VIEWS, conf["dim"], generator=g), dim=-1)
        positions = 1.0 - torch.rand(n, generator=g)
        kw = dict(threshold=0.1, temperature=0.1, base_temperature=0.07)

        def step():
            feats = base.clone().requires_grad_()
            if conf["variant"] == "naive":
                loss = _naive_loss(feats, positions, **kw)
            else:
                chunk = conf["chunk_size"] if conf["variant"] == "chunked" else None
                loss = contrastive_loss(feats, positions, method="pcl", chunk_size=chunk, **kw)
            loss.backward()
            return loss.item()

        if conf["global_views"] <= 4096:
            step()  # warm-up: thread pools, gloo pairs, page faults of the first allocations
        dist.barrier()
        Path("/proc/self/clear_refs").write_text("5")
        rss_before = _status_bytes("VmRSS")
        start = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - start
        peak = _status_bytes("VmHWM") - rss_before
        dist.barrier()
        result = {"rank": rank, "seconds": seconds, "peak_bytes": peak, "loss": loss}
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _estimate(variant: str, global_views: int, chunk: int) -> int:
    local = global_views // WORLD
    if variant == "naive":
        return EST_BYTES_NAIVE * global_views * global_views + EST_BASE
    rows = min(chunk, local) if variant == "chunked" else local
    return EST_BYTES_OURS * rows * global_views + EST_BASE


def run_config(conf: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), conf, out_dir), nprocs=WORLD, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(WORLD)]
    rows = conf["global_views"] // WORLD
    if conf["variant"] == "chunked":
        rows = min(rows, conf["chunk_size"])
    elif conf["variant"] == "naive":
        rows = conf["global_views"]
    peak = max(r["peak_bytes"] for r in ranks)
    return {
        "time_s": round(max(r["seconds"] for r in ranks), 3),
        "peak_mib": round(peak / MIB, 1),
        "bytes_per_entry": round(peak / (rows * conf["global_views"]), 2),  # entry = block row x column
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="global batches of 1k and 4k views only")
    parser.add_argument("--chunk-size", type=int, default=1024, help="anchor rows per block (chunked variant)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip configurations estimated above this per rank")
    args = parser.parse_args(argv)

    # Set before spawning: the children read them at start-up (see the module docstring).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    batches = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
    results = []
    started = time.perf_counter()
    for global_views in batches:
        for variant in ("chunked", "local", "naive"):
            conf = {"global_views": global_views, "variant": variant, "chunk_size": args.chunk_size, "dim": args.dim}
            row = {"global_views": global_views, "variant": variant}
            estimate = _estimate(variant, global_views, args.chunk_size)
            if estimate > args.max_gib * GIB:
                row.update(time_s=None, peak_mib=None,
                           reason=f"would exceed {args.max_gib:g} GiB per rank (estimated {estimate / GIB:.1f} GiB)")
            else:
                row.update(run_config(conf))
            results.append(row)
            print(f"# {row}", file=sys.stderr, flush=True)

    chunked = [r for r in results if r["variant"] == "chunked" and r["peak_mib"] is not None]
    largest = max(chunked, key=lambda r: r["global_views"])
    print(json.dumps({
        "bench": "contrastive_loss forward+backward per rank",
        "world_size": WORLD, "threads_per_rank": 1, "views_per_slice": VIEWS, "dim": args.dim, "method": "pcl",
        "chunk_size": args.chunk_size, "dtype": "float32",
        "memory": "peak RSS added during the step (VmHWM reset), fresh processes, MALLOC_MMAP_THRESHOLD_=65536",
        "time": "slowest rank, one step",
        "host": f"{platform.machine()} {os.cpu_count()} cpus",
        "results": results,
        "largest_chunked": {"global_views": largest["global_views"], "peak_mib": largest["peak_mib"],
                            "under_1_gib": largest["peak_mib"] < 1024},
        "total_s": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()

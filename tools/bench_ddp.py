"""What engine.exact_resume costs: DDP steps with the first gradient-bucket layout kept (exact_resume, the
default: find_unused_parameters, one autograd-graph traversal per step) against DDP's regrouped buckets.

    .venv/bin/python tools/bench_ddp.py                     # 2 gloo processes on CPU, f=16, 64x64, 16 slices each
    .venv/bin/python tools/bench_ddp.py --processes 4 --width 32

Prints one JSON line (rank 0). Both variants run in the same processes on the same batch, each through the
engine's DDP strategy and the pretraining loss, interleaved in rounds so that a shared machine's load hits
both alike; ``ratio`` is the exact variant's step time over the regrouping one's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcl_hpc import dist  # noqa: E402
from pcl_hpc.config import Config  # noqa: E402
from pcl_hpc.engine.strategy import build_strategy  # noqa: E402
from pcl_hpc.models.unet import build_pretrain_net  # noqa: E402
from pcl_hpc.train.pretrain import batch_loss  # noqa: E402


def worker(rank: int, args, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.processes),
                      LOCAL_WORLD_SIZE=str(args.processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.processes))
    env = dist.init("gloo")
    g = torch.Generator().manual_seed(rank)
    batch = {"image": torch.randn(args.batch, 1, args.patch, args.patch, generator=g),
             "position": torch.rand(args.batch, generator=g), "partition": torch.randint(0, 4, (args.batch,), generator=g)}
    steps = {}
    for exact in (True, False):
        cfg = Config()
        cfg.model.width, cfg.data.patch, cfg.pretrain.augment = args.width, args.patch, False
        cfg.engine.precision, cfg.engine.exact_resume = "fp32", exact
        torch.manual_seed(0)
        model = build_pretrain_net(cfg.model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        strategy = build_strategy(cfg, env)
        net = strategy.setup(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), args.batch)

        def step(strategy=strategy, net=net, cfg=cfg):
            with strategy.micro_step(True):
                strategy.backward(batch_loss(net, strategy, batch, cfg, None))
            strategy.step()

        for _ in range(args.warmup):
            step()
        steps[exact] = step
    times = {True: [], False: []}
    for _ in range(args.rounds):
        for exact in (True, False):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[exact]()
            times[exact].append((time.perf_counter() - start) / args.steps)
    if env.is_main:
        exact, regroup = min(times[True]), min(times[False])
        print(json.dumps({"bench": "ddp_exact_resume", "processes": args.processes, "width": args.width,
                          "patch": args.patch, "batch_per_rank": args.batch, "exact_step_s": round(exact, 4),
                          "regroup_step_s": round(regroup, 4), "ratio": round(exact / regroup, 3)}), flush=True)
    dist.teardown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="slices per rank per step (two views each)")
    parser.add_argument("--steps", type=int, default=10, help="steps per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    mp.spawn(worker, args=(args, dist.free_port()), nprocs=args.processes, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

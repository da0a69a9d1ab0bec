"""Pretraining throughput: our step against a step that works like the original code, same network and batch.

    .venv/bin/python tools/bench_train.py                      # CPU: f=32, 64x64, 16 slices (32 views)
    .venv/bin/python tools/bench_train.py --patch 512 --batch 32   # on a CUDA GPU (bf16)
    .venv/bin/python tools/bench_train.py --device cpu --patch 32 --width 4 --batch 4 --steps 2 --warmup 1

(tools/device_check.py runs it at both sizes.) ``--device`` picks the device (auto: CUDA when there
is one, as training does); ``--precision`` is ours (the baseline is always fp32).

Prints one JSON line. Both steps run in this process on the same weights and data, without
augmentation (the network step is what is compared):

* baseline: the encoder is called once per view, fp32, contiguous (NCHW) tensors;
* ours: `pcl_hpc.train.pretrain.batch_loss` through the engine's strategy: both views in one call,
  channels_last, bf16 autocast where the device has native bf16 (engine.precision=auto).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcl_hpc.config import Config  # noqa: E402
from pcl_hpc.dist import DistEnv  # noqa: E402
from pcl_hpc.engine.strategy import build_strategy  # noqa: E402
from pcl_hpc.losses import contrastive_loss  # noqa: E402
from pcl_hpc.models.unet import build_pretrain_net  # noqa: E402
from pcl_hpc.train.pretrain import batch_loss  # noqa: E402


@dataclass(frozen=True)
class PinnedEnv(DistEnv):
    """A single process on the device asked for (``--device cpu`` on a machine with a GPU too)."""

    pinned: str = "cpu"

    @property
    def device(self) -> torch.device:
        return torch.device(self.pinned)


def pick_env(choice: str) -> DistEnv:
    if choice == "auto":
        return DistEnv()
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench_train: --device cuda but torch sees no CUDA device "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
        return PinnedEnv(pinned=f"cuda:{torch.cuda.current_device()}")
    return PinnedEnv(pinned="cpu")


def make_batch(n: int, patch: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(n, 1, patch, patch, generator=g).to(device),
            "position": torch.rand(n, generator=g).to(device),
            "partition": torch.randint(0, 4, (n,), generator=g).to(device)}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA when available (as training), else CPU")
    parser.add_argument("--width", type=int, default=32, help="f, channels of the first level")
    parser.add_argument("--patch", type=int, default=0, help="default: 64 on CPU, 512 on CUDA")
    parser.add_argument("--batch", type=int, default=16, help="slices per step (two views each)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    env = pick_env(args.device)
    device = env.device
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = Config()
    cfg.model.width, cfg.pretrain.augment = args.width, False
    cfg.data.patch = args.patch or (512 if device.type == "cuda" else 64)
    cfg.engine.precision, cfg.engine.compile = args.precision, args.compile
    batch = make_batch(args.batch, cfg.data.patch, device)
    loss_kw = dict(method="pcl", threshold=0.1, temperature=0.1, base_temperature=0.07)

    # The original step: fp32, NCHW, one encoder call per view.
    torch.manual_seed(0)
    base = build_pretrain_net(cfg.model).to(device)
    base_opt = torch.optim.SGD(base.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def baseline_step():
        views = batch["image"].unsqueeze(1).expand(-1, 2, -1, -1, -1)
        features = torch.stack([base(views[:, v].contiguous()) for v in range(2)], dim=1)
        loss = contrastive_loss(features, batch["position"], batch["partition"], **loss_kw)
        base_opt.zero_grad(set_to_none=True)
        loss.backward()
        base_opt.step()

    # Ours: the engine's step.
    torch.manual_seed(0)
    model = build_pretrain_net(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    strategy = build_strategy(cfg, env)
    net = strategy.setup(model, optimizer, schedule, args.batch)

    def our_step():
        with strategy.micro_step(True):
            strategy.backward(batch_loss(net, strategy, batch, cfg, None))  # augment=False, as the baseline
        strategy.step()

    # Interleave the two so that a shared machine's load hits both alike.
    t_base, t_ours = [], []
    for _ in range(2):
        t_base.append(timed(baseline_step, device, args.warmup, args.steps))
        t_ours.append(timed(our_step, device, args.warmup, args.steps))
    views = 2 * args.batch
    base_rate, our_rate = views / min(t_base), views / min(t_ours)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    print(json.dumps({
        "device": name, "width": args.width, "patch": cfg.data.patch, "batch_slices": args.batch, "views_per_step": views,
        "precision": str(strategy.dtype).replace("torch.", ""), "channels_last": strategy.channels_last,
        "compile": args.compile, "baseline_views_per_s": round(base_rate, 1), "ours_views_per_s": round(our_rate, 1),
        "speedup": round(our_rate / base_rate, 2), "omp_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "device_type": device.type, "steps": args.steps, "warmup": args.warmup, "peak_memory_gib": peak,
        "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

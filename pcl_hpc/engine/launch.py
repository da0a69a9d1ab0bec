"""Joining the process group, safe across torchrun restarts (--max-restarts) and multi-node c10d rendezvous."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from pcl_hpc import dist
from pcl_hpc.config import Config


def init_distributed(cfg: Config) -> dist.DistEnv:
    """`dist.init`, except in a group that torchrun restarted after a failure.

    torchrun keeps its store between restarts, so the default process group's keys from the failed
    attempt are still there and a restarted rank may read a dead peer's address (gloo then fails
    with "connectFullMesh ... Connection refused"). A prefix per attempt keeps each attempt's keys apart.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    env = dist.detect()
    if env.distributed and attempt != "0" and not torch_dist.is_initialized():
        timeout = timedelta(seconds=cfg.engine.timeout_s)
        store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                    world_size=env.world_size, is_master=False, timeout=timeout)
        backend = cfg.engine.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)
        torch_dist.init_process_group(backend, store=torch_dist.PrefixStore(f"pcl_hpc_attempt{attempt}", store),
                                      rank=env.rank, world_size=env.world_size, timeout=timeout)
    return dist.init(cfg.engine.backend, cfg.engine.timeout_s)

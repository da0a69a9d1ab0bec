"""Volume shards for node-local staging: which node reads which volumes, and the sampler that keeps every
rank on its own node's volumes (``data.stage``; the copying is ``pcl_hpc.data.staging``).

The shards are a function of the volumes' slice counts and the number of nodes alone, so they are fixed
for a run and the same after a requeue onto other machines (nodes are numbered by their first rank).
Within a shard the order is reshuffled every epoch; batches still mix nodes, as the contrastive loss
gathers every rank's features.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import numpy as np
import torch

from pcl_hpc.data.dataset import ResumableDistributedSampler
from pcl_hpc.errors import UserError


def shard_volumes(depths: Sequence[int], nodes: int) -> list[list[int]]:
    """Volume indices dealt to ``nodes`` shards, balanced by slices: the deepest volume first, each to the
    shard with the fewest slices so far (ties: the lower shard). Each shard's volumes ascending."""
    if nodes > len(depths):
        raise UserError(f"data.stage: {nodes} nodes but only {len(depths)} volumes to share out; every node needs at "
                        f"least one volume: run on fewer nodes or set data.stage=false")
    shards, load = [[] for _ in range(nodes)], [0] * nodes
    for v in sorted(range(len(depths)), key=lambda v: (-int(depths[v]), v)):
        node = min(range(nodes), key=lambda k: (load[k], k))
        shards[node].append(v)
        load[node] += int(depths[v])
    return [sorted(s) for s in shards]


class VolumeShardSampler(ResumableDistributedSampler):
    """Every rank reads only its node's shard: the node's slices in a seeded per-(epoch, node) order, dealt to
    the node's ranks in turn. Every rank takes the same number per epoch (the smallest node's share per rank,
    so all ranks step together); resume, state and mid-epoch start are the base sampler's."""

    def __init__(self, starts: Sequence[int], shards: list[list[int]], ranks_per_node: Sequence[int], node: int,
                 local_index: int, world_size: int, rank: int, seed: int = 0, shuffle: bool = True):
        starts = np.asarray(starts, dtype=np.int64)
        self.shards, self.node, self.local_index = shards, int(node), int(local_index)
        self.ranks_per_node = [int(c) for c in ranks_per_node]
        self.slices = [np.concatenate([np.arange(starts[v], starts[v + 1]) for v in shard]) for shard in shards]
        share = min(len(s) // c for s, c in zip(self.slices, self.ranks_per_node))
        if share < 1:
            raise UserError(f"data.stage: a node's shard has fewer slices ({min(len(s) for s in self.slices)}) than the "
                            f"node has ranks; run on fewer nodes or set data.stage=false")
        self._share = share
        super().__init__(int(starts[-1]), world_size, rank, seed=seed, shuffle=shuffle)

    def _per_rank(self) -> int:
        return self._share

    def _indices(self) -> list[int]:
        mine = self.slices[self.node]
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_009 + self.node)
            mine = mine[torch.randperm(len(mine), generator=g).numpy()]
        count = self.ranks_per_node[self.node]
        return mine[self.local_index:self._share * count:count].tolist()

    def state_dict(self, consumed: int | None = None) -> dict:
        digest = hashlib.sha256(json.dumps(self.shards).encode()).hexdigest()[:16]
        return {**super().state_dict(consumed), "shards": f"{len(self.shards)} node(s), {digest}"}

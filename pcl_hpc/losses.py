"""Contrastive losses for PCL pretraining (SupCon form), exact across any number of ranks.

One process: the loss is SupCon with ``contrast_mode="all"`` over the N*V views of a batch
(Khosla et al. 2020), with positives chosen by the method (Zeng et al. 2021):

* ``simclr``: only the other view(s) of the same slice;
* ``gcl``: also every slice of the same partition (Chaitanya et al. 2020, GCL-D);
* ``pcl``: also every slice whose position differs by less than ``threshold``.

For anchor ``a``, with cosine similarities ``s`` and positives ``P(a)``::

    loss_a = -(T / T_base) * mean_{p in P(a)} [ s_ap / T - log sum_{c != a} exp(s_ac / T) ]

and the loss is the mean of ``loss_a`` over all anchors.

Several ranks: every rank gathers all features (with autograd) and computes only its own N*V
anchor rows against all W*N*V columns, returning the mean over its anchors. The all_gather
backward sums (an all-reduce, of which each rank keeps its block) the gradients that the other
ranks' losses send to this rank's features, so a rank's feature gradient is d(sum_r loss_r)/dx = W * dL/dx, where L is the
single-process loss on the concatenated batch. DDP then averages parameter gradients over ranks,
which divides that W back out: the update equals the single-process one exactly. (The full
matrix on every rank would give the same gradients at W times the work and quadratic memory; a
gather whose backward keeps only the local gradient block, without summing, would be wrong.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

METHODS = ("pcl", "gcl", "simclr")
_MAX_DIMS = 8



class _AllGather(torch.autograd.Function):
    """Every rank's block, concatenated along dim 0; the gradient of a rank's block is the sum over ranks of
    their incoming gradients' rows for it. Both directions are plain synchronous gloo/NCCL collectives
    (``all_gather`` into a list, ``all_reduce``): the heavily used paths. torch's functional collectives
    (``all_gather_single_autograd``) corrupted the heap on gloo (see :func:`gather_with_grad`), and
    ``torch.distributed.nn``'s all_gather has a wrong backward for non-contiguous incoming gradients."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        ctx.group, ctx.rows = group, slice(dist.get_rank(group) * t.shape[0], (dist.get_rank(group) + 1) * t.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place: never the caller's tensor
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rows], None


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_and_rank() -> tuple[int, int]:
    if _is_distributed():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(t: Tensor, group=None) -> Tensor:
    """Concatenate ``t`` from every rank along dim 0, with gradients flowing back to each rank.

    Returns ``t`` unchanged when torch.distributed is not initialised or has one rank. All
    ranks must pass the same shape; otherwise every rank raises ValueError (a gather of
    unequal blocks would otherwise misalign rows silently or hang).
    """
    if not _is_distributed():
        return t
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return t

    if t.dim() == 0 or t.dim() > _MAX_DIMS:
        raise ValueError(f"gather_with_grad needs a tensor with 1 to {_MAX_DIMS} dims, got shape {tuple(t.shape)}")
    # Compare shapes first (padded to a fixed length so every rank sends the same size).
    shape = torch.full((_MAX_DIMS,), -1, dtype=torch.int64, device=t.device)
    shape[: t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        per_rank = ", ".join(
            f"rank {r}: N={int(s[0])} shape={tuple(int(d) for d in s if d >= 0)}" for r, s in enumerate(shapes)
        )
        raise ValueError(
            "gather_with_grad needs the same tensor shape on every rank (equal per-rank batch size, "
            f"e.g. drop_last=True in the sampler); got {per_rank}"
        )

    # Not torch's functional all_gather: on gloo its all_gather_into_tensor path corrupted the heap
    # ("malloc(): unaligned tcache chunk detected" in a gloo thread, about once per 15,000 gathers;
    # reproduced by `tools/soak.py --gather --funcol`), also when each gather was waited for.
    return _AllGather.apply(t.contiguous(), group)


def _validate(features, positions, partitions, method, temperature, base_temperature, chunk_size):
    if method not in METHODS:
        raise ValueError(f"unknown contrastive method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(features, Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a (N, V, D) tensor of L2-normalised views, got {shape}")
    n, views, _ = features.shape
    if n == 0:
        raise ValueError("features is empty (N=0); every rank needs at least one slice")
    if views < 2:
        raise ValueError(f"features needs at least 2 views per slice (V >= 2), got V={views}")
    if method == "pcl":
        if positions is None:
            raise ValueError("method 'pcl' needs positions: a (N,) tensor of slice positions in (0, 1]")
        if positions.shape != (n,):
            raise ValueError(f"positions must have shape ({n},) to match features, got {tuple(positions.shape)}")
    if method == "gcl":
        if partitions is None:
            raise ValueError("method 'gcl' needs partitions: a (N,) integer tensor of partition ids")
        if partitions.shape != (n,):
            raise ValueError(f"partitions must have shape ({n},) to match features, got {tuple(partitions.shape)}")
    if not temperature > 0 or not base_temperature > 0:
        raise ValueError(f"temperature and base_temperature must be > 0, got {temperature} and {base_temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")


# Column-block size (elements) for the temporaries that are not needed at full size: the float64
# position differences, and the masked sums. Keeps them at 32 MiB whatever the batch.
_TEMP_ELEMENTS = 1 << 22


def _column_blocks(rows: int, columns: int):
    step = max(1, _TEMP_ELEMENTS // max(rows, 1))
    for start in range(0, columns, step):
        yield slice(start, min(start + step, columns))


def _positive_mask(first: int, count: int, col_slice: Tensor, col_key: Tensor | None, method: str,
                   threshold: float) -> Tensor:
    """Bool (count x columns): the positives of the anchors at columns ``first, ..., first+count-1``.

    Self-pairs are excluded. One byte per entry; no full-size float temporary.
    """
    rows = slice(first, first + count)
    mask = col_slice[rows, None] == col_slice[None, :]  # views of the same slice
    if method == "pcl":
        key_rows = col_key[rows, None]
        for cols in _column_blocks(count, col_key.shape[0]):
            diff = key_rows - col_key[None, cols]
            mask[:, cols] |= diff.abs_() < threshold
    elif method == "gcl":
        mask |= col_key[rows, None] == col_key[None, :]
    mask.diagonal(first).fill_(False)
    return mask


def _logits(anchors: Tensor, columns: Tensor, first: int, temperature: float) -> Tensor:
    """Similarities / T of the anchors against all columns, with -inf at each anchor's own column."""
    logits = anchors @ columns.T
    logits.div_(temperature)
    logits.diagonal(first).fill_(float("-inf"))
    return logits


class _RowBlockLoss(torch.autograd.Function):
    """Per-anchor loss of a block of anchor rows against all columns, with a hand-written backward.

    For anchor ``a`` with logits ``z_ac = s_ac / T`` (c != a), positives ``P(a)``::

        loss_a = -scale * (sum_{p in P(a)} z_ap / |P(a)| - logsumexp_{c != a} z_ac)
        d loss_a / d z_ac = scale * (softmax_ac - [c in P(a)] / |P(a)|)

    Forward keeps only the inputs and two numbers per row; backward rebuilds the (rows x columns)
    logits and mask in place. Peak memory is about 5 bytes per (row, column) pair (float32 logits
    and a bool mask) plus fixed-size temporaries, against ~20 to 50 for autograd through the same
    expression (which saves several full-size tensors).
    """

    @staticmethod
    def forward(ctx, anchors, columns, first, col_slice, col_key, method, threshold, temperature, scale):
        count = anchors.shape[0]
        mask = _positive_mask(first, count, col_slice, col_key, method, threshold)
        n_pos = mask.sum(1)
        logits = _logits(anchors, columns, first, temperature)
        pos_sum = torch.zeros(count, dtype=logits.dtype, device=logits.device)
        for cols in _column_blocks(count, logits.shape[1]):
            pos_sum += torch.where(mask[:, cols], logits[:, cols], 0.0).sum(1)
        del mask
        # logsumexp in place, stable at any temperature: max + log sum exp(z - max).
        top = logits.amax(1, keepdim=True)
        lse = logits.sub_(top).exp_().sum(1).log_().add_(top.squeeze(1))
        del logits
        ctx.save_for_backward(anchors, columns, col_slice, col_key, lse, n_pos)
        ctx.settings = (first, method, threshold, temperature, scale)
        return -scale * (pos_sum / n_pos - lse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        anchors, columns, col_slice, col_key, lse, n_pos = ctx.saved_tensors
        first, method, threshold, temperature, scale = ctx.settings
        count = anchors.shape[0]
        grad_z = _logits(anchors, columns, first, temperature)
        grad_z.sub_(lse[:, None]).exp_()  # softmax over c != a (exactly 0 on the diagonal)
        row_scale = (grad_loss * scale).to(grad_z.dtype)
        grad_z.mul_(row_scale[:, None])
        per_positive = (row_scale / n_pos)[:, None]
        mask = _positive_mask(first, count, col_slice, col_key, method, threshold)
        for cols in _column_blocks(count, grad_z.shape[1]):
            grad_z[:, cols].sub_(mask[:, cols] * per_positive)
        del mask
        grad_anchors = grad_columns = None
        if ctx.needs_input_grad[0]:
            grad_anchors = (grad_z @ columns).div_(temperature)
        if ctx.needs_input_grad[1]:
            grad_columns = (grad_z.T @ anchors).div_(temperature)
        return grad_anchors, grad_columns, None, None, None, None, None, None, None


def contrastive_loss(
    features: Tensor,
    positions: Tensor | None = None,
    partitions: Tensor | None = None,
    *,
    method: str = "pcl",
    threshold: float = 0.1,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
    chunk_size: int | None = None,
) -> Tensor:
    """SupCon-style PCL / GCL / SimCLR loss on ``features`` (N, V, D), already L2-normalised.

    ``positions`` (N,) in (0, 1] are needed for ``pcl``; ``partitions`` (N,) ints for ``gcl``.
    With torch.distributed initialised, the loss covers all ranks' views and each rank returns the
    mean over its own anchors (see the module docstring for why gradients are then exact under
    DDP). Each block of anchor rows rebuilds its (rows x W*N*V) matrices in backward rather than
    keeping them, at about 5 bytes per entry; ``chunk_size`` bounds a block to that many rows, so
    peak memory is about ``5 B x chunk_size x W*N*V`` instead of ``5 B x N*V x W*N*V`` (linear in
    the global batch; 1024 rows x 64k global views is ~320 MiB).
    """
    _validate(features, positions, partitions, method, temperature, base_temperature, chunk_size)
    n, views, dim = features.shape
    world, rank = _world_and_rank()
    device = features.device

    # Columns are ordered sample-major, (global slice, view), so rank r's rows start at r*N*V.
    columns = gather_with_grad(features).reshape(world * n * views, dim)
    anchors = features.reshape(n * views, dim)
    col_slice = torch.arange(world * n, device=device).repeat_interleave(views)
    first_row = rank * n * views

    if method == "pcl":
        key = gather_with_grad(positions.detach().to(device=device, dtype=torch.float64))
    elif method == "gcl":
        key = gather_with_grad(partitions.detach().to(device=device, dtype=torch.int64))
    else:
        key = None
    col_key = key.repeat_interleave(views) if key is not None else None

    scale = temperature / base_temperature
    total = n * views
    step = total if chunk_size is None else min(chunk_size, total)
    losses = [
        _RowBlockLoss.apply(anchors[start:start + step], columns, first_row + start, col_slice, col_key,
                            method, threshold, temperature, scale)
        for start in range(0, total, step)
    ]
    return torch.cat(losses).mean()



def segmentation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Fine-tuning's loss: cross-entropy plus soft Dice over the foreground classes (as in the PCL code).

    ``logits`` (N, C, H, W) with C = foreground classes + 1, ``labels`` (N, H, W) integer class ids.
    """
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, labels)
    probs = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum((0, 2, 3))
    dice = (2 * inter + 1e-5) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1e-5)
    return ce + (1 - dice.mean())

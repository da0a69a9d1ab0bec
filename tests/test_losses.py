import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pcl_hpc.losses import contrastive_loss, gather_with_grad
from tests.dist_utils import run_distributed

METHODS = ["pcl", "gcl", "simclr"]


# --------------------------------------------------------------------------- independent reference

def naive_loss(features, method, positions=None, partitions=None, threshold=0.1,
               temperature=0.1, base_temperature=0.07):
    """SupCon written out view by view with plain Python floats (no torch, no masks)."""
    f = np.asarray(features, dtype=np.float64)
    n, v, _ = f.shape
    views = [(i, a) for i in range(n) for a in range(v)]

    def related(i, j):
        if i == j:
            return True  # the other views of the same slice
        if method == "pcl":
            return abs(float(positions[i]) - float(positions[j])) < threshold
        if method == "gcl":
            return int(partitions[i]) == int(partitions[j])
        return False

    total = 0.0
    for i, a in views:
        others = [(j, b) for j, b in views if (j, b) != (i, a)]
        sim = {(j, b): float(np.dot(f[i, a], f[j, b])) / temperature for j, b in others}
        log_denominator = math.log(sum(math.exp(s) for s in sim.values()))
        positives = [(j, b) for j, b in others if related(i, j)]
        mean_log_prob = sum(sim[p] - log_denominator for p in positives) / len(positives)
        total += -(temperature / base_temperature) * mean_log_prob
    return total / len(views)


def unit(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# --------------------------------------------------------------------------- single process

# Slices 0 and 1 are 0.05 apart (positives under pcl, threshold 0.1); slices 2 and 3 have no
# positive but their own other view. Partitions pair up slices (0, 1) and (2, 3).
POSITIONS = torch.tensor([0.10, 0.15, 0.50, 0.90])
PARTITIONS = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("method", METHODS)
def test_matches_naive_loop_on_small_batch(method):
    feats = unit((4, 2, 3), seed=0)
    got = contrastive_loss(feats, POSITIONS, PARTITIONS, method=method, threshold=0.1)
    want = naive_loss(feats, method, POSITIONS, PARTITIONS, threshold=0.1)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_methods_differ_where_their_positives_differ():
    feats = unit((4, 2, 3), seed=0)
    pcl = contrastive_loss(feats, POSITIONS, method="pcl", threshold=0.1).item()
    gcl = contrastive_loss(feats, partitions=PARTITIONS, method="gcl").item()
    simclr = contrastive_loss(feats, method="simclr").item()
    assert len({round(pcl, 9), round(gcl, 9), round(simclr, 9)}) == 3
    # A threshold no pair meets leaves only the slice's own views: pcl becomes simclr.
    no_pairs = contrastive_loss(feats, POSITIONS, method="pcl", threshold=0.01).item()
    assert no_pairs == pytest.approx(simclr, rel=1e-12)


def test_all_slices_mutually_positive():
    feats = unit((4, 2, 3), seed=1)
    pcl = contrastive_loss(feats, POSITIONS, method="pcl", threshold=0.85).item()  # max gap 0.8
    gcl = contrastive_loss(feats, partitions=torch.zeros(4, dtype=torch.long), method="gcl").item()
    want = naive_loss(feats, "gcl", partitions=[0, 0, 0, 0])
    assert pcl == pytest.approx(want, rel=1e-12)
    assert gcl == pytest.approx(want, rel=1e-12)


def test_closed_forms():
    # One slice, two views: the only other view is the only positive, so log-softmax is log 1 = 0.
    one = unit((1, 2, 4), seed=2)
    assert contrastive_loss(one, method="simclr").item() == pytest.approx(0.0, abs=1e-12)
    # All views identical: every log-softmax entry is -log(NV - 1), for any choice of positives.
    same = F.normalize(torch.ones(3, 2, 4, dtype=torch.float64), dim=-1)
    want = (0.1 / 0.07) * math.log(3 * 2 - 1)
    for method in METHODS:
        got = contrastive_loss(same, torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0, 1, 1]), method=method)
        assert got.item() == pytest.approx(want, rel=1e-12)


def test_three_views_and_custom_temperatures():
    feats = unit((3, 3, 4), seed=3)
    pos = torch.tensor([0.2, 0.25, 0.6])
    kw = dict(threshold=0.1, temperature=0.5, base_temperature=0.5)
    got = contrastive_loss(feats, pos, method="pcl", **kw).item()
    assert got == pytest.approx(naive_loss(feats, "pcl", pos, **kw), rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_chunked_rows_give_same_loss_and_gradient(method):
    feats = unit((5, 2, 8), seed=4).requires_grad_()
    pos = torch.linspace(0.1, 1.0, 5)
    parts = torch.tensor([0, 0, 1, 1, 2])
    full = contrastive_loss(feats, pos, parts, method=method, threshold=0.3)
    (g_full,) = torch.autograd.grad(full, feats)
    for chunk in (1, 3, 10, 100):  # 3 does not divide N*V = 10
        part = contrastive_loss(feats, pos, parts, method=method, threshold=0.3, chunk_size=chunk)
        (g_part,) = torch.autograd.grad(part, feats)
        torch.testing.assert_close(part, full, rtol=1e-13, atol=0)
        torch.testing.assert_close(g_part, g_full, rtol=1e-12, atol=1e-15)


def test_gradient_matches_finite_differences():
    feats = unit((3, 2, 3), seed=5).requires_grad_()
    pos = torch.tensor([0.1, 0.15, 0.8])
    assert torch.autograd.gradcheck(
        lambda f: contrastive_loss(f, pos, method="pcl", threshold=0.1), (feats,), eps=1e-6, atol=1e-6
    )


def test_stable_at_low_temperature_and_large_dim():
    feats = unit((16, 2, 512), seed=6, dtype=torch.float32)
    feats[1] = feats[0]  # exact duplicates give the largest possible logits
    pos = torch.linspace(0.05, 1.0, 16)
    for temperature in (0.05, 0.005):  # at 0.005, exp(logit) would overflow float32 (e^200)
        f32 = feats.clone().requires_grad_()
        loss = contrastive_loss(f32, pos, method="pcl", threshold=0.1, temperature=temperature)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(f32.grad).all()
        ref = contrastive_loss(feats.double(), pos, method="pcl", threshold=0.1, temperature=temperature)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    want = naive_loss(feats.double(), "pcl", pos, threshold=0.1, temperature=0.05)
    got = contrastive_loss(feats, pos, method="pcl", threshold=0.1, temperature=0.05)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_bad_arguments_are_refused_clearly():
    feats = unit((4, 2, 3), seed=0)
    with pytest.raises(ValueError, match="needs positions"):
        contrastive_loss(feats, method="pcl")
    with pytest.raises(ValueError, match="needs partitions"):
        contrastive_loss(feats, POSITIONS, method="gcl")
    with pytest.raises(ValueError, match="unknown contrastive method 'byol'"):
        contrastive_loss(feats, POSITIONS, method="byol")
    with pytest.raises(ValueError, match=r"positions must have shape \(4,\)"):
        contrastive_loss(feats, POSITIONS[:3], method="pcl")
    with pytest.raises(ValueError, match="at least 2 views"):
        contrastive_loss(feats[:, :1], POSITIONS, method="pcl")
    with pytest.raises(ValueError, match=r"\(N, V, D\)"):
        contrastive_loss(feats[:, 0], POSITIONS, method="pcl")
    with pytest.raises(ValueError, match="chunk_size"):
        contrastive_loss(feats, POSITIONS, chunk_size=0)


def test_gather_is_identity_without_process_group():
    t = torch.randn(3, 2)
    assert gather_with_grad(t) is t


# --------------------------------------------------------------------------- several processes

IN_DIM, FEAT_DIM, VIEWS = 6, 5, 2
KWARGS = dict(threshold=0.3, temperature=0.1, base_temperature=0.07)


def make_global_batch(world_size, n, seed):
    """The concatenated batch of all ranks; every rank builds it and keeps its own block."""
    g = torch.Generator().manual_seed(seed)
    total = world_size * n
    return {
        "inputs": torch.randn(total, VIEWS, IN_DIM, generator=g, dtype=torch.float64),
        "features": F.normalize(torch.randn(total, VIEWS, FEAT_DIM, generator=g, dtype=torch.float64), dim=-1),
        "positions": 1.0 - torch.rand(total, generator=g, dtype=torch.float64),  # in (0, 1]
        "partitions": torch.randint(0, 3, (total,), generator=g),
        "weight": torch.randn(FEAT_DIM, IN_DIM, generator=g, dtype=torch.float64) / IN_DIM**0.5,
        "bias": torch.randn(FEAT_DIM, generator=g, dtype=torch.float64) * 0.1,
    }


def encoder_from(batch):
    lin = torch.nn.Linear(IN_DIM, FEAT_DIM).double()
    with torch.no_grad():
        lin.weight.copy_(batch["weight"])
        lin.bias.copy_(batch["bias"])
    return lin


def loss_and_grads(batch, rows, method, chunk_size=None):
    """Loss, d loss / d features and the Linear encoder's parameter gradients for ``rows``."""
    feats = batch["features"][rows].clone().requires_grad_()
    args = (batch["positions"][rows], batch["partitions"][rows])
    loss = contrastive_loss(feats, *args, method=method, chunk_size=chunk_size, **KWARGS)
    loss.backward()
    lin = encoder_from(batch)
    enc_loss = contrastive_loss(F.normalize(lin(batch["inputs"][rows]), dim=-1), *args,
                                method=method, chunk_size=chunk_size, **KWARGS)
    enc_loss.backward()
    return loss.detach(), feats.grad, enc_loss.detach(), [p.grad for p in lin.parameters()]


def _worker_exactness(rank, world_size, n, seed):
    batch = make_global_batch(world_size, n, seed)
    rows = slice(rank * n, (rank + 1) * n)
    out = {}
    for method in METHODS:
        for chunk_size in (None, 3):
            loss, feat_grad, enc_loss, param_grads = loss_and_grads(batch, rows, method, chunk_size)
            for g in param_grads:  # what DDP does: average the gradients over ranks
                dist.all_reduce(g)
                g /= world_size
            out[method, chunk_size] = (loss, feat_grad, enc_loss, param_grads)

    # gather_with_grad on its own, with a non-contiguous incoming gradient (a transpose) that
    # differs per rank: the gradient of x_r must be the sum over ranks of their row-block r.
    x = batch["inputs"][rows, 0].clone().requires_grad_()
    coeff = torch.arange(world_size * n * IN_DIM, dtype=torch.float64).reshape(IN_DIM, world_size * n)
    (gather_with_grad(x).t() * coeff * (rank + 1)).sum().backward()
    out["gather"] = x.grad
    return out


def _worker_unequal(rank, world_size):
    n = 3 + rank  # rank 0 has 3 slices, rank 1 has 4
    feats = unit((n, 2, 4), seed=rank)
    try:
        contrastive_loss(feats, torch.rand(n), method="pcl")
    except ValueError as err:
        return str(err)
    return None


def check_exactness(results, world_size, n, seed):
    batch = make_global_batch(world_size, n, seed)
    everything = slice(0, world_size * n)
    worst = 0.0
    for method in METHODS:
        loss, feat_grad, enc_loss, param_grads = loss_and_grads(batch, everything, method)
        for chunk_size in (None, 3):
            ranks = [r[method, chunk_size] for r in results]
            # The mean of the per-rank losses is the loss of the concatenated batch.
            torch.testing.assert_close(torch.stack([r[0] for r in ranks]).mean(), loss, rtol=1e-12, atol=0)
            torch.testing.assert_close(torch.stack([r[2] for r in ranks]).mean(), enc_loss, rtol=1e-12, atol=0)
            # Rank r's feature gradient is d(sum of rank losses)/dx_r = W * dL/dx_r; DDP's mean
            # over ranks removes that W again.
            for rank, r in enumerate(ranks):
                torch.testing.assert_close(r[1], world_size * feat_grad[rank * n:(rank + 1) * n],
                                           rtol=1e-10, atol=1e-13)
            # DDP-averaged parameter gradients equal the single-process ones.
            for i, single in enumerate(param_grads):
                averaged = ranks[0][3][i]
                assert all(torch.equal(r[3][i], averaged) for r in ranks)  # all_reduce agrees
                rel = ((averaged - single).norm() / single.norm()).item()
                worst = max(worst, rel)
                assert rel <= 1e-5, f"{method} chunk={chunk_size}: relative gradient error {rel:.2e}"
    coeff = torch.arange(world_size * n * IN_DIM, dtype=torch.float64).reshape(IN_DIM, world_size * n)
    rank_weight_sum = sum(range(1, world_size + 1))
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["gather"], rank_weight_sum * coeff.t()[rank * n:(rank + 1) * n],
                                   rtol=0, atol=0)
    return worst


def _has_cross_rank_positive(batch, world_size, n):
    pos = batch["positions"]
    rank_of = torch.arange(world_size * n) // n
    close = (pos[:, None] - pos[None, :]).abs() < KWARGS["threshold"]
    same_part = batch["partitions"][:, None] == batch["partitions"][None, :]
    cross = rank_of[:, None] != rank_of[None, :]
    return bool((close & cross).any()) and bool((same_part & cross).any())


@pytest.mark.parametrize("world_size,n", [(2, 4), (3, 3)])
def test_distributed_loss_and_gradients_equal_single_process(world_size, n):
    seed = 10 + world_size
    # The test only means something if positives cross rank boundaries.
    assert _has_cross_rank_positive(make_global_batch(world_size, n, seed), world_size, n)
    results = run_distributed(_worker_exactness, world_size, n, seed)
    worst = check_exactness(results, world_size, n, seed)
    assert worst <= 1e-5


def test_unequal_batch_sizes_across_ranks_are_refused():
    messages = run_distributed(_worker_unequal, 2)
    for msg in messages:
        assert msg is not None and "same tensor shape on every rank" in msg
        assert "rank 0: N=3" in msg and "rank 1: N=4" in msg

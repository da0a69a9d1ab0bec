import copy
import math

import pytest
import torch
from torch import nn

from pcl_hpc.config import PretrainConfig
from pcl_hpc.errors import UserError
from pcl_hpc.optim import (LARS, WarmupCosineLR, build_optimizer, build_schedule, scaled_lr,
                           split_parameters)


def cfg(**kw):
    return PretrainConfig(**kw)


# --------------------------------------------------------------------------- linear scaling rule

def test_scaled_lr_linear_rule_and_off_switch():
    assert scaled_lr(cfg(lr=0.1, lr_reference_batch=32), 32) == pytest.approx(0.1)
    assert scaled_lr(cfg(lr=0.1, lr_reference_batch=32), 4096) == pytest.approx(0.1 * 128)
    assert scaled_lr(cfg(lr=0.3, lr_reference_batch=256), 64) == pytest.approx(0.075)
    assert scaled_lr(cfg(lr=0.1, lr_reference_batch=0), 4096) == 0.1  # 0 = lr as given
    with pytest.raises(UserError, match="pretrain.lr_reference_batch"):
        scaled_lr(cfg(lr_reference_batch=-1), 32)


def test_optimizer_starts_at_scaled_rate():
    model = nn.Linear(3, 2)
    for name in ("sgd", "lars"):
        opt = build_optimizer(model, cfg(optimizer=name, lr=0.2, lr_reference_batch=256), 1024)
        assert all(g["lr"] == pytest.approx(0.8) for g in opt.param_groups)


# --------------------------------------------------------------------------- schedule

def closed_form(step, warmup, total):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / (total - warmup), 1.0)))


def lrs_over(sched, opt, steps):
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])  # the rate this optimizer step uses
        opt.step()
        sched.step()
    return out


def test_schedule_warmup_then_cosine_matches_closed_form():
    base, warmup, total = 0.4, 10, 50
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    sched = build_schedule(opt, warmup, total)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    lrs = lrs_over(sched, opt, total + 1)
    assert lrs[0] == pytest.approx(base / warmup)  # ~0, not a wasted step at exactly 0
    assert lrs[warmup - 1] == pytest.approx(base)  # end of warm-up: the base rate
    assert lrs[warmup] == pytest.approx(base)  # cosine starts at its top
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(base / 2)  # half way through the cosine
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)  # 0 at total_steps
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(base * closed_form(step, warmup, total), rel=1e-12, abs=1e-15)
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))


def test_schedule_without_warmup_and_bad_arguments():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = lrs_over(build_schedule(opt, 0, 4), opt, 5)
    assert lrs == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])
    with pytest.raises(UserError, match="pretrain.warmup_steps"):
        build_schedule(opt, -1, 10)


def _train(model, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
@pytest.mark.parametrize("order", ["optimizer_first", "scheduler_first", "schedule_built_after_load"])
def test_schedule_and_optimizer_resume_exactly(optimizer, order):
    c = cfg(optimizer=optimizer, lr=0.5, lr_reference_batch=8)
    ref = _model()
    ref_opt = build_optimizer(ref, c, 16)
    ref_sched = build_schedule(ref_opt, 3, 12)
    _train(ref, ref_opt, ref_sched, 5, seed=1)
    saved = copy.deepcopy((ref.state_dict(), ref_opt.state_dict(), ref_sched.state_dict()))
    _train(ref, ref_opt, ref_sched, 7, seed=2)

    # A fresh process: new model, optimizer and schedule, then the checkpoint.
    res = _model()
    res_opt = build_optimizer(res, c, 16)
    res.load_state_dict(saved[0])
    if order == "schedule_built_after_load":  # the constructor resets the rate; loading restores it
        res_opt.load_state_dict(saved[1])
        res_sched = build_schedule(res_opt, 3, 12)
        res_sched.load_state_dict(saved[2])
    elif order == "scheduler_first":
        res_sched = build_schedule(res_opt, 3, 12)
        res_sched.load_state_dict(saved[2])
        res_opt.load_state_dict(saved[1])
    else:
        res_sched = build_schedule(res_opt, 3, 12)
        res_opt.load_state_dict(saved[1])
        res_sched.load_state_dict(saved[2])
    assert res_opt.param_groups[0]["lr"] == pytest.approx(0.5 * 2 * closed_form(5, 3, 12))
    _train(res, res_opt, res_sched, 7, seed=2)
    for a, b in zip(ref.state_dict().values(), res.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert res_sched.get_last_lr() == ref_sched.get_last_lr()
    assert res_sched.state_dict()["total_steps"] == 12


# --------------------------------------------------------------------------- optimizers

def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match=r"pretrain\.optimizer.*'adamw'.*sgd, lars"):
        build_optimizer(nn.Linear(2, 2), cfg(optimizer="adamw"), 32)


def test_sgd_is_plain_torch_sgd():
    opt = build_optimizer(nn.Linear(3, 2), cfg(optimizer="sgd", momentum=0.8, weight_decay=1e-3), 32)
    assert type(opt) is torch.optim.SGD
    (group,) = opt.param_groups
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.8, 1e-3, False)


def test_lars_groups_exclude_biases_and_norm_parameters():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4),
                          nn.Conv2d(4, 2, 1, bias=False), nn.LayerNorm(2))
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    for m in (model, sync):
        regular, excluded = split_parameters(m)
        assert [tuple(p.shape) for p in regular] == [(4, 1, 3, 3), (2, 4, 1, 1)]
        assert len(excluded) == 1 + 2 + 2 + 2  # conv bias, BN, GN, LN weight+bias
    opt = build_optimizer(model, cfg(optimizer="lars", weight_decay=1e-4, momentum=0.9), 32)
    assert isinstance(opt, LARS)
    lars_group, plain_group = opt.param_groups
    assert (lars_group["lars"], lars_group["weight_decay"], lars_group["eta"]) == (True, 1e-4, 0.001)
    assert (plain_group["lars"], plain_group["weight_decay"]) == (False, 0.0)


def _tiny(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        model[2].weight.mul_(50.0)  # a layer at a very different scale: its own trust ratio
    return model


def test_lars_step_matches_hand_computation():
    lr, momentum, wd, eta = 0.7, 0.9, 1e-2, 0.001
    model = _tiny(0)
    opt = build_optimizer(model, cfg(optimizer="lars", lr=lr, momentum=momentum, weight_decay=wd), 32)
    lin1, bn, lin2 = model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    bufs = {}
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # the second step exercises the momentum buffer
        x = torch.randn(5, 3, generator=g, dtype=torch.float64)
        opt.zero_grad()
        model(x).pow(3).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        opt.step()
        ratios = {}
        for name, w in before.items():
            grad = grads[name]
            if name in ("0.weight", "2.weight"):  # the two Linear weights: weight decay + trust ratio
                d = grad + wd * w
                ratios[name] = eta * w.norm() / d.norm()
                d = ratios[name] * d
            else:  # Linear bias, BN weight and bias: plain SGD with momentum, no decay
                d = grad
            bufs[name] = d if name not in bufs else momentum * bufs[name] + d
            before[name] = w - lr * bufs[name]
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[name], rtol=1e-12, atol=1e-15)
        # Per layer: the two weights' ratios differ by far more than rounding.
        assert ratios["0.weight"] / ratios["2.weight"] > 5 or ratios["2.weight"] / ratios["0.weight"] > 5
    assert lin1.bias is not None and bn.weight is not None and lin2.bias is None


def test_lars_zero_norm_falls_back_to_ratio_one():
    w = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = LARS([w], lr=0.5, momentum=0.0, weight_decay=0.0)
    w.grad = torch.ones(2, 2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.5, dtype=torch.float64))


def test_lars_state_dict_round_trip_keeps_momentum():
    model = _tiny(1)
    opt = build_optimizer(model, cfg(optimizer="lars"), 32)
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    state = opt.state_dict()
    clone = build_optimizer(copy.deepcopy(model), cfg(optimizer="lars"), 32)
    clone.load_state_dict(state)
    assert [g["lars"] for g in clone.param_groups] == [True, False]
    assert len(clone.state_dict()["state"]) == len(list(model.parameters()))
    assert isinstance(build_schedule(clone, 2, 5), WarmupCosineLR)

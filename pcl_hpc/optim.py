"""Optimizers and learning-rate schedules for large-batch contrastive pretraining.

* :func:`scaled_lr`: the linear scaling rule (Goyal et al. 2017): the rate grows with the global
  batch, ``lr * global_batch / lr_reference_batch``; ``lr_reference_batch = 0`` uses ``lr`` as is.
* :func:`build_optimizer`: ``sgd`` (momentum, weight decay on every parameter, as in the PCL paper)
  or ``lars`` (:class:`LARS`, You et al. 2017, the usual choice for contrastive training at global
  batches of thousands: SimCLR, BYOL, Barlow Twins).
* :func:`build_finetune_optimizer`: fine-tuning's Adam.
* :func:`build_schedule`: per-step linear warm-up then cosine decay to 0
  (:class:`WarmupCosineLR`, a real ``LRScheduler`` whose state_dict makes a resume exact).

No installed library provides a maintained LARS (torch.optim has none; torchlars and apex are not
dependencies, and apex's is CUDA-only), so :class:`LARS` is written here from the paper's formulas.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from pcl_hpc.errors import UserError

OPTIMIZERS = ("sgd", "lars")
LARS_ETA = 0.001  # trust coefficient of You et al. 2017 and SimCLR/BYOL

# Parameters of these modules (and every bias / 1-D parameter) get neither weight decay nor the
# LARS trust ratio: their norms say nothing about a useful step size, and decaying BN's scale
# towards 0 only fights the normalisation.
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def scaled_lr(cfg, global_batch: int) -> float:
    """The base learning rate for ``global_batch`` under the linear scaling rule.

    ``cfg`` is a PretrainConfig; ``global_batch`` is in the unit of ``cfg.lr_reference_batch``
    (slices per optimizer step over all ranks and accumulation steps).
    """
    if cfg.lr_reference_batch < 0:
        raise UserError(
            f"pretrain.lr_reference_batch must be >= 0 (0 = use pretrain.lr as given), got {cfg.lr_reference_batch}"
        )
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if cfg.lr_reference_batch > 0:
        return cfg.lr * global_batch / cfg.lr_reference_batch
    return cfg.lr


def is_excluded(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Whether ``param`` (called ``name`` inside ``module``) is a bias or normalisation parameter."""
    return isinstance(module, _NORM_TYPES) or name == "bias" or param.dim() <= 1


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(regular, excluded) trainable parameters of ``model``, each once, in module order."""
    seen: set[int] = set()
    regular: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (excluded if is_excluded(module, name, param) else regular).append(param)
    return regular, excluded


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017, as used by SimCLR/BYOL).

    For each parameter ``w`` with gradient ``g`` in a group with ``lars=True``::

        d     = g + weight_decay * w
        ratio = eta * ||w|| / ||d||        (1 when ||w|| or ||d|| is 0)
        buf   = momentum * buf + ratio * d
        w     = w - lr * buf

    A group with ``lars=False`` (biases, normalisation parameters) takes the plain SGD-momentum
    step ``buf = momentum * buf + d; w = w - lr * buf`` (build it with ``weight_decay=0``).
    The ratio is computed per parameter tensor, i.e. per layer's weight.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = LARS_ETA, lars: bool = True):
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if eta <= 0:
            raise ValueError(f"LARS: eta must be > 0, got {eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=lars)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                d = p.grad.add(p, alpha=decay) if decay != 0 else p.grad.clone()
                if group["lars"]:
                    w_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    # Tensor ops only (no .item()): no host sync per parameter on a GPU.
                    ratio = torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d.mul_(ratio)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d
                else:
                    buf.mul_(momentum).add_(d)
                p.add_(buf, alpha=-lr)
        return loss


def build_optimizer(model: nn.Module, cfg, global_batch: int) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` at the rate :func:`scaled_lr` gives for ``global_batch``.

    ``sgd``: torch.optim.SGD (momentum, weight decay on all parameters, nesterov off), the PCL
    paper's setting. ``lars``: :class:`LARS` with eta 0.001; biases and normalisation parameters
    (BatchNorm, SyncBatchNorm, GroupNorm, LayerNorm, InstanceNorm, any 1-D parameter) go in a
    second group with no weight decay and no trust ratio.
    """
    name = str(cfg.optimizer).strip().lower()
    if name not in OPTIMIZERS:
        raise UserError(
            f"pretrain.optimizer: unknown optimizer {cfg.optimizer!r}; valid values: {', '.join(OPTIMIZERS)}"
        )
    lr = scaled_lr(cfg, global_batch)
    if name == "sgd":
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=False)
    regular, excluded = split_parameters(model)
    groups = []
    if regular:
        groups.append({"params": regular, "weight_decay": cfg.weight_decay, "lars": True})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars": False})
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    return LARS(groups, lr=lr, momentum=cfg.momentum, eta=LARS_ETA)


def build_finetune_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """Fine-tuning's optimizer (``cfg`` a FinetuneConfig): Adam at ``cfg.lr`` with ``cfg.weight_decay``,
    as the PCL fine-tuning code; its schedule is :func:`build_schedule` (cosine to 0, no warm-up). It holds the
    parameters that require gradients when it is built (finetune.mode=frozen: the decoder only)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The multiple of the base rate used for optimizer step ``step`` (0-based).

    ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (so the first step is not wasted at
    0 and step ``warmup_steps - 1`` reaches 1), then
    ``0.5 * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps)))``, which is 1
    at the end of warm-up and 0 at ``total_steps`` (clamped there).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(LRScheduler):
    """Per-step linear warm-up then cosine decay to 0 (see :func:`warmup_cosine_factor`).

    Call ``step()`` once after every optimizer step. ``warmup_steps`` and ``total_steps`` are part
    of the state_dict, so a resumed run keeps the schedule it started with, and
    ``load_state_dict`` also writes the rate for the restored step into the optimizer, so the
    resume is exact whichever of optimizer and scheduler is loaded first.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 last_epoch: int = -1):
        if warmup_steps < 0:
            raise UserError(f"pretrain.warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps)

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)


def build_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LRScheduler:
    """Linear warm-up over ``warmup_steps`` then cosine decay to 0 at ``total_steps``, per step."""
    return WarmupCosineLR(optimizer, warmup_steps, total_steps)

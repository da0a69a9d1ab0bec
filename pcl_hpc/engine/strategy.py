"""DDP or DeepSpeed behind one small interface: the only module that knows which one is running.

    strategy = build_strategy(cfg, env)            # engine.strategy: ddp | deepspeed
    net = strategy.setup(model, optimizer, schedule)
    for micro-batches:
        with strategy.micro_step(sync) :           # sync=False: accumulate without communicating
            with strategy.autocast():
                loss = loss_fn(net(strategy.prepare(x)))
            strategy.backward(loss)                # scaled by 1/grad_accum
        if sync: grad_norm = strategy.step()       # clip, optimizer step, schedule step, zero grads
    strategy.save(folder) / strategy.load(folder)  # called on EVERY rank

The plain module (no DDP/DeepSpeed/compile wrapper) is ``strategy.module``: use it for state_dicts.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from pcl_hpc.atomic import save_torch
from pcl_hpc.config import Config
from pcl_hpc.dist import DistEnv, default_backend
from pcl_hpc.errors import UserError

STRATEGIES = ("ddp", "deepspeed")
TRAIN_STATE_FILE = "train_state.pt"  # DDP: model, optimizer, schedule (rank 0 writes, every rank reads)
DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's own sub-folder inside a checkpoint folder


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"engine.precision={precision!r}: use auto, bf16 or fp32")
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = cpu_has_native_bf16() or precision == "bf16"
    if precision == "bf16" and device.type == "cuda" and not supported:
        raise UserError("engine.precision=bf16 but this GPU has no bf16; use engine.precision=fp32")
    return torch.bfloat16 if supported else torch.float32


class Strategy:
    """What a training loop needs from the distributed engine; see the module docstring."""

    name = "base"

    def __init__(self, cfg: Config, env: DistEnv):
        e = cfg.engine
        if e.grad_accum < 1:
            raise UserError(f"engine.grad_accum={e.grad_accum}: must be >= 1")
        self.cfg, self.env = cfg, env
        self.device = env.device
        self.dtype = resolve_precision(e.precision, self.device)
        self.channels_last, self.exact_resume = e.channels_last, e.exact_resume
        self.grad_accum = e.grad_accum
        self.grad_clip = float(e.grad_clip)
        self.module: nn.Module | None = None
        self.optimizer = None
        self.schedule = None

    # -- set-up and the step ------------------------------------------------------------------

    def setup(self, model: nn.Module, optimizer, schedule, micro_batch: int = 1) -> nn.Module:
        """Move/wrap the model; returns what the loop calls forward on. micro_batch: samples per rank."""
        raise NotImplementedError

    def _maybe_compile(self, net: nn.Module) -> nn.Module:
        return torch.compile(net) if self.cfg.engine.compile else net

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device, in the memory format the model runs in."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def micro_step(self, sync: bool):
        """Context for one micro-batch's forward and backward; sync=False skips gradient communication."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> float:
        """Apply the accumulated gradients; returns the global gradient norm (before clipping)."""
        raise NotImplementedError

    def skip(self) -> None:
        """Drop the accumulated gradients of a step that had a non-finite loss; the schedule still advances."""
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoints (called on every rank) ---------------------------------------------------

    def save(self, folder: Path) -> None:
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        raise NotImplementedError


class DDPStrategy(Strategy):
    """torch DistributedDataParallel (gloo on CPU, NCCL on CUDA); a plain module in a single process."""

    name = "ddp"

    def setup(self, model, optimizer, schedule, micro_batch=1):
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.module, self.optimizer, self.schedule = model, optimizer, schedule
        # DDP regroups its gradient buckets by the order gradients arrive in the first backward. A resumed run's
        # first step would then reduce in the first layout where the uninterrupted run used the regrouped one:
        # with more than 2 ranks the ring all-reduce then adds in another order (not bit-identical). With
        # find_unused_parameters DDP never regroups (it also walks the autograd graph each step, and warns
        # once that it found no unused parameter: expected here).
        self._net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=self.exact_resume) \
            if self.env.distributed else model
        return self._maybe_compile(self._net)

    def micro_step(self, sync):
        if sync or not self.env.distributed:
            return contextlib.nullcontext()
        return self._net.no_sync()

    def backward(self, loss):
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def step(self):
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        return float(norm)

    def skip(self):
        self.optimizer.zero_grad(set_to_none=True)
        _step_schedule_without_optimizer(self.schedule)

    def save(self, folder):
        if self.env.is_main:
            save_torch({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "schedule": self.schedule.state_dict()}, Path(folder) / TRAIN_STATE_FILE)

    def load(self, folder):
        path = Path(folder) / TRAIN_STATE_FILE
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO stage 0/1/2 around a client (torch) optimizer; autocast bf16 where supported.

    The schedule stays ours (stepped per optimizer step, saved in DeepSpeed's client state).
    Gradient accumulation is driven here (DeepSpeed's own is 1 with a manual boundary), so both
    strategies count micro-batches the same way. Loading DeepSpeed's own files goes through its
    ``load_checkpoint``, which reads them with ``torch.load(weights_only=False)``: only resume from
    checkpoint folders you wrote yourself.
    """

    name = "deepspeed"

    def _ds_config(self) -> dict:
        e, batch = self.cfg.engine, self._micro_batch
        if e.zero_stage not in (0, 1, 2):
            raise UserError(f"engine.zero_stage={e.zero_stage}: use 0, 1 or 2")
        config = {
            "train_micro_batch_size_per_gpu": batch,
            "gradient_accumulation_steps": 1,
            "train_batch_size": batch * self.env.world_size,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": e.zero_stage},
            "zero_allow_untested_optimizer": True,
            "torch_adam": True,  # never JIT-compile the fused Adam on CPU
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if e.deepspeed_config:
            try:
                config.update(json.loads(Path(e.deepspeed_config).read_text()))
            except (OSError, ValueError) as err:
                raise UserError(f"engine.deepspeed_config={e.deepspeed_config}: cannot read it as JSON ({err})") from None
        return config

    def setup(self, model, optimizer, schedule, micro_batch: int = 1):
        e = self.cfg.engine
        if e.deepspeed_config and not Path(e.deepspeed_config).is_file():  # before the slow import
            raise UserError(f"engine.deepspeed_config={e.deepspeed_config}: no such file; give a JSON file or leave it empty")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
        try:
            import deepspeed
        except ImportError:
            raise UserError("engine.strategy=deepspeed but deepspeed is not installed; pip install deepspeed "
                            "or use engine.strategy=ddp") from None
        if not self.env.distributed:
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                               ("MASTER_ADDR", "127.0.0.1")):
                os.environ.setdefault(key, value)
            if "MASTER_PORT" not in os.environ:
                from pcl_hpc.dist import free_port

                os.environ["MASTER_PORT"] = str(free_port())
        deepspeed.init_distributed(dist_backend=default_backend(self.cfg.engine.backend),
                                   auto_mpi_discovery=False)
        self._micro_batch = micro_batch
        # Parameters stay contiguous (DeepSpeed flattens and broadcasts them as bytes); channels_last
        # inputs still make the convolutions run NHWC.
        model = model.to(self.device)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self._ds_config())
        self.engine, self.module, self.optimizer, self.schedule = engine, engine.module, ds_optimizer, schedule
        self._client_optimizer = optimizer
        if self.cfg.engine.compile:
            engine.compile()
        return engine

    def backward(self, loss):
        self.engine.backward(loss / self.grad_accum if self.grad_accum > 1 else loss)

    def micro_step(self, sync):
        self.engine.set_gradient_accumulation_boundary(bool(sync))
        return contextlib.nullcontext()

    def step(self):
        self.engine.step()
        self.schedule.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def skip(self):
        self.engine.zero_grad()
        _step_schedule_without_optimizer(self.schedule)

    @property
    def lr(self):
        return float(self._client_optimizer.param_groups[0]["lr"])

    def save(self, folder):
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False,
                                    client_state={"schedule": self.schedule.state_dict()})

    def load(self, folder):
        path, client = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise FileNotFoundError(f"{folder}/{DEEPSPEED_TAG}: DeepSpeed found no checkpoint there")
        self.schedule.load_state_dict(client["schedule"])


def _step_schedule_without_optimizer(schedule) -> None:
    """A skipped step still advances the schedule (the rate is a function of the step), without torch's warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        schedule.step()


def build_strategy(cfg: Config, env: DistEnv) -> Strategy:
    name = cfg.engine.strategy
    if name == "ddp":
        return DDPStrategy(cfg, env)
    if name == "deepspeed":
        return DeepSpeedStrategy(cfg, env)
    raise UserError(f"engine.strategy={name!r}: use one of {', '.join(STRATEGIES)}")

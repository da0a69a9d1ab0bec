"""Typed configuration: one small dataclass per section, loaded from YAML, overridable from the CLI.

A config file is a YAML mapping of sections (``data``, ``model``, ...) to keys. Command-line
overrides are ``section.key=value`` (the value is parsed as YAML, so ``3``, ``0.1``, ``true`` and
``[1, 2]`` get their natural types). Unknown sections or keys fail with the list of valid ones.

After the file and the overrides are applied, every value is checked against its field (see
:func:`validate`): the annotation gives the type and the field's metadata, declared next to it with
:func:`one_of`, :func:`bounded` or :func:`pair`, the allowed values. A bad value fails at load with
one line naming the key, the value that won and what is allowed. Conversions: an int given for a
float becomes a float; a number given for a string (``finetune.name=123``, volume ids ``[1, 2]``)
becomes that string, spelled as written (``[001]`` stays ``"001"``); a float written in exponent
form (``1e-4``, which YAML 1.1 reads as a string) becomes a float. An int field takes only integers
(not ``3.0``, not ``true``); a bool field takes only true/false; choices match case-insensitively
and are stored as listed. Validation is pure: no imports of heavy modules, no filesystem access.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pcl_hpc.atomic import write_text
from pcl_hpc.errors import UserError


class ConfigError(UserError):
    """A config file or override that cannot be used; the message says which and what to do."""


# ---------------------------------------------------------------- field declarations
# The allowed values of a field live in its dataclass field's metadata; ``validate`` reads them.


def one_of(*choices: Any) -> Any:
    """A field whose value must be one of ``choices``; the default is the first one."""
    return field(default=choices[0], metadata={"choices": choices})


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:
    """A number field with bounds: ``ge`` (>=), ``gt`` (>), ``le`` (<=), ``lt`` (<)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"bounds": bounds})


def pair(default: list[float] | None, *, ascending: bool = False, ge: float | None = None,
         gt: float | None = None, le: float | None = None) -> Any:
    """A ``list[float]`` field of exactly two numbers, each within the bounds, low < high if ``ascending``."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    meta = {"pair": True, "ascending": ascending, "bounds": bounds}
    if default is None:
        return field(default=None, metadata=meta)
    return field(default_factory=lambda: list(default), metadata=meta)


@dataclass
class DataConfig:
    raw_dir: str = ""  # folder of input volumes (read by `preprocess`)
    layout: str = one_of("generic", "images", "acdc", "chd", "mmwhs", "hvsmr", "nnunet")  # how raw_dir is organised: generic (imagesTr/labelsTr) | images | acdc | chd | mmwhs | hvsmr | nnunet (nnU-Net's preprocessed cases of model.plans; raw_dir: optional folder of extra unlabeled images in nnU-Net's raw naming)
    store: str = ""  # the Zarr store written by `preprocess` and read by training
    modality: str = one_of("mri", "ct")  # mri: per-volume percentile clip + z-score; ct: percentile clip to [0, 1]
    clip_percentiles: list[float] = pair([1.0, 99.0], ascending=True, ge=0, le=100)  # [low, high] percentiles, 0 <= low < high <= 100
    target_spacing: list[float] | None = pair(None, gt=0)  # in-plane (y, x) spacing in mm; None keeps the source
    patch: int = bounded(64, ge=1)  # slices are centre-cropped / zero-padded to patch x patch
    gcl_partitions: int = bounded(4, ge=1)  # GCL: each volume is split into this many equal partitions along z
    folds: int = bounded(5, ge=1)  # patient-level folds written to the manifest
    num_workers: int = bounded(0, ge=0)  # DataLoader workers per rank
    augment_on: str = one_of("auto", "workers", "device")  # auto (workers when training on CPU with workers, else device) | workers | device
    slice_axis: str = one_of("axial", "coronal", "sagittal")  # axial | coronal | sagittal: the anatomical axis slices are taken along
    intensity: str = one_of("auto", "percentile", "zscore", "window")  # auto (ct: percentile, mri: zscore) | percentile (clip, scale to [0, 1]) | zscore | window
    hu_window: list[float] = pair([-1000.0, 1000.0], ascending=True)  # intensity=window (CT): [low, high] HU
    interpolation: str = one_of("linear", "bspline")  # in-plane image resampling: linear | bspline (labels are always nearest)
    compressor: str = one_of("zstd", "lz4")  # Blosc codec of the store (bitshuffle): zstd | lz4
    fold_seed: int = bounded(0, ge=0)  # seed of the patient-level fold assignment in the manifest
    id_scheme: str = one_of("source", "hashed")  # volume ids: source (file/folder names) | hashed (pseudonymous; see preprocess.py)
    channel: int = bounded(0, ge=0)  # generic layout, multi-channel cases (MSD 4D image + 3D label, nnU-Net _000k files): channel used, 0-based
    stage: bool = False  # training copies each node's share of the store (its volume shard) to node-local disk at job start and reads it from there; each node reads only its shard
    stage_dir: str = ""  # node-local folder for data.stage; "" = $SLURM_TMPDIR, else $TMPDIR, else the system temp folder


@dataclass
class ModelConfig:
    arch: str = one_of("paper", "nnunet")  # paper (the PCL paper's U-Net) | nnunet (nnU-Net's own network, built from model.plans)
    plans: str = ""  # arch=nnunet: nnU-Net's plans file (nnUNet_preprocessed/<Dataset>/nnUNetPlans.json)
    configuration: str = "2d"  # arch=nnunet: the plans' configuration (2d; 3d ones are not supported yet)
    width: int = bounded(16, ge=1)  # f: channels of the first U-Net level (paper: 48 for ACDC, 32 for CHD)
    in_channels: int = bounded(1, ge=1)
    projection_dim: int = bounded(512, ge=1)
    sync_batchnorm: bool = False  # multi-GPU pretraining: one set of BN statistics across ranks


@dataclass
class LossConfig:
    method: str = one_of("pcl", "gcl", "simclr")  # pcl | gcl | simclr
    threshold: float = bounded(0.1, gt=0, le=1)  # pcl: |p_i - p_j| < threshold makes a positive pair
    temperature: float = bounded(0.1, gt=0)
    base_temperature: float = bounded(0.07, gt=0)
    chunk_size: int = bounded(0, ge=0)  # > 0: compute the local anchor rows in blocks of this many (memory linear in the global batch)


@dataclass
class PretrainConfig:
    name: str = ""  # "" = writes to <output_dir>/pretrain; else <output_dir>/pretrain/<name> (the sweep: one per method)
    epochs: int = bounded(1, ge=1)
    max_steps: int = bounded(0, ge=0)  # 0 = run all epochs; otherwise stop after this many optimizer steps
    schedule_steps: int = bounded(0, ge=0)  # length of the LR schedule in optimizer steps; 0 = the run's total (max_steps or epochs)
    batch_size: int = bounded(32, ge=1)  # slices per rank per step (each gives two views)
    lr: float = bounded(0.1, ge=0)  # the paper's SGD rate for a global batch of 32 slices
    lr_reference_batch: int = bounded(0, ge=0)  # linear scaling rule: lr * global_batch / this; 0 = use lr as given
    optimizer: str = one_of("sgd", "lars")  # sgd | lars (LARS for global batches of thousands)
    warmup_steps: int = bounded(0, ge=0)  # linear warm-up before the cosine decay
    momentum: float = bounded(0.9, ge=0, lt=1)
    weight_decay: float = bounded(1e-4, ge=0)
    augment: bool = True
    volumes: list[str] | None = None  # volume ids to pretrain on; None = all in the store
    exclude_volumes: list[str] = field(default_factory=list)  # e.g. the test split
    log_every: int = bounded(10, ge=1)
    probe_every: int = bounded(0, ge=0)  # every this many steps and at the last, rank 0 runs the position probe (pcl_hpc/probes.py) on probe_volumes and logs probe/position_r2, probe/position_mae; 0 = off
    probe_volumes: list[str] = field(default_factory=list)  # the position probe's volumes (>= 2; best held out of pretraining); [] = exclude_volumes
    plateau_probes: int = bounded(0, ge=0)  # > 0: stop early once the position probe's R^2 has not beaten its best before by plateau_delta for this many probes in a row (needs probe_every); 0 = always the configured length
    plateau_delta: float = bounded(0.01, ge=0)  # the R^2 gain that counts as still improving


@dataclass
class FinetuneConfig:
    name: str = ""  # this run's folder under <output_dir>/finetune/; "" = <init>_M<labeled volumes>
    encoder: str = ""  # "" = random init; a path to encoder.pt or models:/<name>@<alias>
    num_classes: int = bounded(4, ge=1)  # foreground classes; the network predicts num_classes + 1
    train_volumes: list[str] = field(default_factory=list)
    val_volumes: list[str] = field(default_factory=list)
    test_volumes: list[str] = field(default_factory=list)
    epochs: int = bounded(10, ge=1)
    max_steps: int = bounded(0, ge=0)  # 0 = run all epochs; otherwise stop after this many optimizer steps
    schedule_steps: int = bounded(0, ge=0)  # length of the cosine LR schedule in optimizer steps; 0 = the run's total
    batch_size: int = bounded(16, ge=1)
    lr: float = bounded(5e-4, ge=0)
    weight_decay: float = bounded(1e-5, ge=0)
    augment: bool = True
    mode: str = one_of("full", "frozen")  # full: encoder and decoder train | frozen: only the decoder trains; the encoder (BN statistics too) stays bit-identical
    freeze_encoder_epochs: int = bounded(0, ge=0)  # mode=full: train only the decoder for this many epochs first (BN statistics still adapt)
    log_every: int = bounded(10, ge=1)


@dataclass
class SweepConfig:
    """The label-efficiency protocol (`pcl-hpc sweep`): cells of encoder x mode x M x fold x seed."""

    pretrain: list[str] = field(default_factory=list)  # methods this sweep pretrains once each and registers: pcl | gcl | simclr
    encoders: list[str] = field(default_factory=lambda: ["random"])  # also: random, supervised (the positive control: trained with the labels outside the test fold), or a path to encoder.pt / models:/<name>@<alias>
    modes: list[str] = field(default_factory=lambda: ["full"])  # fine-tuning modes of the cells (each cell sets finetune.mode): full | frozen (decoder only)
    labeled: list[int] = field(default_factory=lambda: [1, 2])  # M: labeled patients per cell
    folds: list[int] | None = None  # test folds of the manifest's k-fold; None = every fold
    seeds: list[int] = field(default_factory=lambda: [0])  # draws of the M labeled patients (and fine-tuning seeds)
    frozen_seeds: list[int] | None = None  # the frozen cells' seeds when they should differ (e.g. fewer); None = sweep.seeds
    val_patients: int = bounded(1, ge=1)  # validation patients per fold, drawn from outside the test fold and the M
    workers: int = bounded(0, ge=0)  # cells run side by side (locally and in each array task); 0 = one per GPU, else cores // 2 (at least 1)
    pretrain_processes: int = bounded(1, ge=1)  # > 1: each method pretrains with this many processes (torchrun, this node)
    trainer: str = one_of("pcl-hpc", "nnunet")  # who fine-tunes a cell: pcl-hpc (finetune) | nnunet (nnU-Net's stock trainer on model.plans; needs model.arch=nnunet)
    nnunet_epochs: int = bounded(20, ge=1)  # trainer=nnunet: nnU-Net epochs per cell (its stock 1000 x 250 iterations are days on a CPU)
    nnunet_iterations: int = bounded(50, ge=1)  # trainer=nnunet: training iterations per epoch
    supervised_epochs: int = bounded(0, ge=0)  # the positive control's fine-tuning epochs (it trains on every volume outside the test fold, so each epoch is longer than a cell's); 0 = finetune.epochs


@dataclass
class TrackingConfig:
    uri: str = ""  # "" = sqlite file <output_dir>/mlflow.db unless MLFLOW_TRACKING_URI is set
    experiment: str = "pcl-hpc"
    run_name: str = ""
    register_name: str = "pcl-encoder"  # registered model name for pretrained encoders
    alias: str = "candidate"  # MLflow reserves "latest"


@dataclass
class EngineConfig:
    strategy: str = one_of("ddp", "deepspeed")  # ddp | deepspeed
    backend: str = one_of("", "nccl", "gloo")  # "" = nccl on CUDA, gloo otherwise
    threads: int = bounded(0, ge=0)  # torch threads per process; 0 = cores / local ranks
    precision: str = one_of("auto", "bf16", "fp32")  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | bf16 | fp32
    channels_last: bool = True  # NHWC activations for the convolutions
    grad_accum: int = bounded(1, ge=1)  # micro-batches (each pretrain.batch_size per rank) per optimizer step
    grad_clip: float = bounded(0.0, ge=0)  # clip the global gradient norm to this; 0 = no clipping (the norm is still logged)
    compile: bool = False  # torch.compile the model
    max_bad_steps: int = bounded(5, ge=1)  # this many non-finite losses in a row abort the run
    zero_stage: int = one_of(0, 1, 2)  # deepspeed: ZeRO stage 0 | 1 | 2
    deepspeed_config: str = ""  # deepspeed: optional JSON file merged over the generated config
    timeout_s: int = bounded(600, ge=1)  # collectives fail after this long (a dead rank never hangs the job)
    exact_resume: bool = True  # ddp: keep DDP's first gradient-bucket layout all run, so a resumed run sums gradients in the order of an uninterrupted one (bit-identical with any number of ranks); false: DDP regroups its buckets after step 1 (one autograd-graph traversal less per step) and a resume with more than 2 ranks matches to float rounding only


@dataclass
class CheckpointConfig:
    every_steps: int = bounded(0, ge=0)  # save every this many optimizer steps (0 = only at the end and when preempted)
    keep: int = bounded(3, ge=2)  # keep the last K checkpoints (>= 2: a corrupt newest one falls back to an older one)
    resume: bool = True  # resume from <output_dir>/checkpoints/latest when it exists (--no-resume: start fresh)
    path: str = ""  # resume from this checkpoint folder instead of latest


@dataclass
class SlurmConfig:
    """Cluster settings of `launchers/slurm.py` (its flags win); checked against the cluster before submission."""

    cluster: str = one_of("auto", "slurm", "local", "debug")  # auto (SLURM when sbatch is on PATH, else local) | slurm | local (submitit's local processes) | debug (in this process)
    partition: str = ""  # "" = the cluster's default partition
    account: str = ""
    qos: str = ""
    time: int = bounded(60, ge=1)  # time limit of one run of the job, in minutes (each requeue gets it again)
    nodes: int = bounded(1, ge=1)
    tasks_per_node: int = bounded(1, ge=1)  # processes per node (one per GPU)
    gpus_per_node: int = bounded(0, ge=0)
    cpus_per_task: int = bounded(1, ge=1)
    mem: str = ""  # memory per node, e.g. "16G" or "512M"; "" = the partition's default
    constraint: str = ""  # node features, e.g. "a100" or "a100&ib"
    exclusive: bool = False  # whole nodes only
    signal_delay_s: int = bounded(90, ge=10, le=65535)  # SLURM sends SIGUSR1 this long before the time limit (up to 30 s earlier): every rank saves at the next step and the job is requeued
    max_requeues: int = bounded(3, ge=0)  # interruptions in a row (time limit, preemption, requeue, signal, a lost rank) that saved no new checkpoint step (a crash loop) survived by requeueing; past it the job stops with its checkpoint kept. One that saved a new step always requeues (up to 1000 in all), so a job runs for weeks; a command job (preprocess, cells, predict, register, report: no step of its own) is requeued at most 10 x this in all
    setup: list[str] = field(default_factory=list)  # shell lines run before the tasks start, e.g. ["module load cuda/12.4", "source venv/bin/activate"]
    array_parallelism: int = bounded(0, ge=0)  # array tasks (sweep cells, preprocess and predict shards) running at once (%K); 0 = no limit
    cells_per_task: int = bounded(1, ge=1)  # sweep cells packed into one array task; at least gpus_per_node (else sweep.workers), the cells a task runs side by side
    array_tasks: int = bounded(4, ge=1)  # array tasks of preprocess (launchers/slurm.py pipeline) and predict


@dataclass
class Config:
    output_dir: str = "outputs/run"  # the experiment's folder: each stage writes under its own sub-folder (pretrain/, finetune/<name>/)
    seed: int = bounded(0, ge=0)  # seeds every RNG of the run (numpy needs >= 0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def _field_names(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


# ---------------------------------------------------------------- YAML reading


class _Int(int):
    """A YAML int that remembers how it was written (``007``, ``0x1f``), so a str field gets that text."""

    text: str


class _Float(float):
    """A YAML float that remembers how it was written (``1.10``), so a str field gets that text."""

    text: str


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader whose numbers carry their source text; :func:`validate` turns them into plain ones."""


def _construct_number(kind: type, base):
    def construct(loader: yaml.SafeLoader, node: yaml.ScalarNode):
        value = kind(base(loader, node))
        value.text = str(node.value)
        return value
    return construct


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_number(_Int, yaml.SafeLoader.construct_yaml_int))
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_number(_Float, yaml.SafeLoader.construct_yaml_float))


def _parse(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: plain data only, never objects


# ---------------------------------------------------------------- validation

# A float written with an exponent but no dot (``1e-4``) is a string to YAML 1.1; a float field takes it.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OPS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


class _Invalid(Exception):
    """Raised inside :func:`_check`: the value is not allowed; the message says what is."""


def _show(value: Any) -> str:
    """repr of a value given (plain types, one line, not too long)."""
    text = repr(_plain(value))
    return text if len(text) <= 200 else text[:197] + "..."


def _plain(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _choice_text(choices: tuple) -> str:
    return ", ".join('""' if c == "" else str(c) for c in choices)


def _bounds_ok(value: float, bounds: dict[str, float]) -> bool:
    return all(_BOUND_OPS[k](value, limit) for k, limit in bounds.items())


def _bounds_text(bounds: dict[str, float]) -> str:
    return " and ".join(f"{_BOUND_TEXT[k]} {v:g}" for k, v in bounds.items())


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("must be an integer")
    return int(value)


def _as_float(value: Any) -> float:
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid("must be a number")
    if not math.isfinite(value):
        raise _Invalid("must be a finite number")
    return float(value)


def _as_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return getattr(value, "text", None) or str(value)
    raise _Invalid('must be a string (quote it; "" for none)')


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


_SCALARS = {int: _as_int, float: _as_float, str: _as_str, bool: _as_bool}
_KIND_TEXT = {int: "integers", float: "numbers", str: "strings"}


def _check(value: Any, hint: Any, meta: Any) -> Any:
    """``value`` converted to the field type ``hint``, within the field's ``meta``; else raise _Invalid."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
        optional = True
    else:
        optional = False
    if typing.get_origin(hint) is list:
        (item,) = args
        if meta.get("pair"):
            return _check_pair(value, optional, meta)
        example = "[1, 2]" if item is not str else "[a, b]"
        if not isinstance(value, list):
            raise _Invalid(f"must be a list of {_KIND_TEXT[item]}, e.g. {example}" + (" (or null)" if optional else ""))
        try:
            return [_SCALARS[item](v) for v in value]
        except _Invalid:
            raise _Invalid(f"must be a list of {_KIND_TEXT[item]}, e.g. {example}") from None
    converted = _SCALARS[hint](value)
    choices = meta.get("choices")
    if choices is not None:
        if isinstance(converted, str):
            wanted = converted.strip().lower()
            converted = next((c for c in choices if c == wanted), converted)
        if converted not in choices:
            raise _Invalid(f"is not allowed; choose one of: {_choice_text(choices)}")
    bounds = meta.get("bounds")
    if bounds and not _bounds_ok(converted, bounds):
        raise _Invalid(f"must be {_bounds_text(bounds)}")
    return converted


def _check_pair(value: Any, optional: bool, meta: Any) -> list[float] | None:
    bounds, ascending = meta.get("bounds", {}), meta.get("ascending", False)
    if ascending:
        low = f"{bounds['ge']:g} <= " if "ge" in bounds else f"{bounds['gt']:g} < " if "gt" in bounds else ""
        high = f" <= {bounds['le']:g}" if "le" in bounds else ""
        rule = f"two numbers [low, high] with {low}low < high{high}"
    else:
        rule = "two numbers" + (f", each {_bounds_text(bounds)}" if bounds else "")
    rule = ("must be null or " if optional else "must be ") + rule
    if not isinstance(value, list) or len(value) != 2:
        raise _Invalid(rule)
    try:
        numbers = [_as_float(v) for v in value]
    except _Invalid:
        raise _Invalid(rule) from None
    if not all(_bounds_ok(v, bounds) for v in numbers) or (ascending and not numbers[0] < numbers[1]):
        raise _Invalid(rule)
    return numbers


def validate(cfg: Config, sources: dict[str, str] | None = None) -> Config:
    """Check (and convert in place) every value of ``cfg`` against its field; returns ``cfg``.

    Raises ConfigError with one line: ``[source: ]section.key=<value> <what is allowed>``, where
    source is where the value came from (``sources`` maps dotted keys to it) when known.
    """

    def walk(node: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            name = f"{prefix}{f.name}"
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{name}.")
                continue
            try:
                setattr(node, f.name, _check(value, hints[f.name], f.metadata))
            except _Invalid as err:
                where = (sources or {}).get(name)
                message = f"{name}={_show(value)} {err}"
                if where:
                    message = f"{where}: {message}"
                raise ConfigError(" ".join(message.splitlines())) from None

    walk(cfg, "")
    return cfg


def _set(cfg: Config, dotted: str, value: Any, source: str, sources: dict[str, str] | None = None) -> None:
    """Set ``section.key`` (or a top-level key) on ``cfg``; unknown names raise ConfigError."""
    parts = dotted.split(".")
    target: Any = cfg
    for depth, name in enumerate(parts):
        valid = _field_names(target)
        if name not in valid:
            where = ".".join(parts[:depth]) or "top level"
            raise ConfigError(
                f"{source}: unknown key '{dotted}' ({name!r} is not in {where}); "
                f"valid keys there: {', '.join(valid)}"
            )
        if depth == len(parts) - 1:
            current = getattr(target, name)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: '{dotted}' is a section; give it a mapping of keys")
                for key, sub in value.items():
                    _set(cfg, f"{dotted}.{key}", sub, source, sources)
            else:
                setattr(target, name, value)
                if sources is not None:
                    sources[dotted] = source
        else:
            target = getattr(target, name)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(f"{source}: '{'.'.join(parts[:depth + 1])}' is a value, not a section")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from defaults, then the YAML file at ``path``, then ``section.key=value`` overrides.

    The resolved config is then validated (:func:`validate`): a bad value raises ConfigError.
    """
    cfg = Config()
    sources: dict[str, str] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path} (pass --config with an existing YAML file, e.g. configs/demo.yaml)")
        try:
            content = _parse(file.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot be read as UTF-8 text ({' '.join(str(err).split())[:120]}); "
                              f"save the config as UTF-8") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where} ({str(err).splitlines()[0]})") from None
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for key, value in content.items():
            _set(cfg, str(key), value, path, sources)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = _parse(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({str(err).splitlines()[0]})") from None
        _set(cfg, key.strip(), value, "command line", sources)
    return validate(cfg, sources)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` for every leaf (used for MLflow params)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                walk(name, value)
            else:
                out[name] = value

    walk("", to_dict(cfg))
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config next to the outputs, so a run can be reproduced from its folder."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

"""Typed configuration: one small dataclass per section, loaded from YAML, overridable from the CLI.

A config file is a YAML mapping of sections (``data``, ``model``, ...) to keys. Command-line
overrides are ``section.key=value`` (the value is parsed as YAML, so ``3``, ``0.1``, ``true`` and
``[1, 2]`` get their natural types). Unknown sections or keys fail with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pcl_hpc.errors import UserError


class ConfigError(UserError):
    """A config file or override that cannot be used; the message says which and what to do."""


@dataclass
class DataConfig:
    raw_dir: str = ""  # folder of input volumes (read by `preprocess`)
    layout: str = "generic"  # how raw_dir is organised: generic (imagesTr/labelsTr) | images | acdc | chd | mmwhs | hvsmr
    store: str = ""  # the Zarr store written by `preprocess` and read by training
    modality: str = "mri"  # mri: per-volume percentile clip + z-score; ct: percentile clip to [0, 1]
    clip_percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])
    target_spacing: list[float] | None = None  # in-plane (y, x) spacing in mm; None keeps the source
    patch: int = 64  # slices are centre-cropped / zero-padded to patch x patch
    gcl_partitions: int = 4  # GCL: each volume is split into this many equal partitions along z
    folds: int = 5  # patient-level folds written to the manifest
    num_workers: int = 0  # DataLoader workers per rank
    augment_on: str = "auto"  # auto (workers when training on CPU with workers, else device) | workers | device
    slice_axis: str = "axial"  # axial | coronal | sagittal: the anatomical axis slices are taken along
    intensity: str = "auto"  # auto (ct: percentile, mri: zscore) | percentile (clip, scale to [0, 1]) | zscore | window
    hu_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])  # intensity=window (CT): [low, high] HU
    interpolation: str = "linear"  # in-plane image resampling: linear | bspline (labels are always nearest)
    compressor: str = "zstd"  # Blosc codec of the store (bitshuffle): zstd | lz4
    fold_seed: int = 0  # seed of the patient-level fold assignment in the manifest
    id_scheme: str = "source"  # volume ids: source (file/folder names) | hashed (pseudonymous; see preprocess.py)
    channel: int = 0  # generic layout, multi-channel cases (MSD 4D image + 3D label, nnU-Net _000k files): channel used, 0-based


@dataclass
class ModelConfig:
    width: int = 16  # f: channels of the first U-Net level (paper: 48 for ACDC, 32 for CHD)
    in_channels: int = 1
    projection_dim: int = 512
    sync_batchnorm: bool = False  # multi-GPU pretraining: one set of BN statistics across ranks


@dataclass
class LossConfig:
    method: str = "pcl"  # pcl | gcl | simclr
    threshold: float = 0.1  # pcl: |p_i - p_j| < threshold makes a positive pair
    temperature: float = 0.1
    base_temperature: float = 0.07
    chunk_size: int = 0  # > 0: compute the local anchor rows in blocks of this many (memory linear in the global batch)


@dataclass
class PretrainConfig:
    epochs: int = 1
    max_steps: int = 0  # 0 = run all epochs; otherwise stop after this many optimizer steps
    batch_size: int = 32  # slices per rank per step (each gives two views)
    lr: float = 0.1  # the paper's SGD rate for a global batch of 32 slices
    lr_reference_batch: int = 0  # linear scaling rule: lr * global_batch / this; 0 = use lr as given
    optimizer: str = "sgd"  # sgd | lars (LARS for global batches of thousands)
    warmup_steps: int = 0  # linear warm-up before the cosine decay
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: bool = True
    volumes: list[str] | None = None  # volume ids to pretrain on; None = all in the store
    exclude_volumes: list[str] = field(default_factory=list)  # e.g. the test split
    log_every: int = 10


@dataclass
class FinetuneConfig:
    encoder: str = ""  # "" = random init; a path to encoder.pt or models:/<name>@<alias>
    num_classes: int = 4  # foreground classes; the network predicts num_classes + 1
    train_volumes: list[str] = field(default_factory=list)
    val_volumes: list[str] = field(default_factory=list)
    test_volumes: list[str] = field(default_factory=list)
    epochs: int = 10
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-5
    augment: bool = True
    freeze_encoder_epochs: int = 0  # train only the decoder for this many epochs first
    log_every: int = 10


@dataclass
class TrackingConfig:
    uri: str = ""  # "" = sqlite file <output_dir>/../mlflow.db unless MLFLOW_TRACKING_URI is set
    experiment: str = "pcl-hpc"
    run_name: str = ""
    register_name: str = "pcl-encoder"  # registered model name for pretrained encoders
    alias: str = "candidate"  # MLflow reserves "latest"


@dataclass
class EngineConfig:
    strategy: str = "ddp"  # ddp | deepspeed
    backend: str = ""  # "" = nccl on CUDA, gloo otherwise
    threads: int = 0  # torch threads per process; 0 = cores / local ranks
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | bf16 | fp32
    channels_last: bool = True  # NHWC activations for the convolutions
    grad_accum: int = 1  # micro-batches (each pretrain.batch_size per rank) per optimizer step
    grad_clip: float = 0.0  # clip the global gradient norm to this; 0 = no clipping (the norm is still logged)
    compile: bool = False  # torch.compile the model
    max_bad_steps: int = 5  # this many non-finite losses in a row abort the run
    zero_stage: int = 0  # deepspeed: ZeRO stage 0 | 1 | 2
    deepspeed_config: str = ""  # deepspeed: optional JSON file merged over the generated config
    timeout_s: int = 600  # collectives fail after this long (a dead rank never hangs the job)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save every this many optimizer steps (0 = only at the end and when preempted)
    keep: int = 3  # keep the last K checkpoints
    resume: bool = True  # resume from <output_dir>/checkpoints/latest when it exists (--no-resume: start fresh)
    path: str = ""  # resume from this checkpoint folder instead of latest


@dataclass
class Config:
    output_dir: str = "outputs/run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _field_names(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _set(cfg: Config, dotted: str, value: Any, source: str) -> None:
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
                    _set(cfg, f"{dotted}.{key}", sub, source)
            else:
                setattr(target, name, value)
        else:
            target = getattr(target, name)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(f"{source}: '{'.'.join(parts[:depth + 1])}' is a value, not a section")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from defaults, then the YAML file at ``path``, then ``section.key=value`` overrides."""
    cfg = Config()
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path} (pass --config with an existing YAML file, e.g. configs/demo.yaml)")
        try:
            content = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for key, value in content.items():
            _set(cfg, str(key), value, path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        _set(cfg, key.strip(), yaml.safe_load(raw) if raw else "", "command line")
    return cfg


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)

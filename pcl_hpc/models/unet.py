"""The 2D U-Net of the PCL paper (Zeng et al. 2021, after Chaitanya et al. 2020).

Pretraining uses the encoder plus a projection head on the centre map; fine-tuning uses the full
U-Net whose ``.encoder`` is the same module, so a pretrained encoder state_dict loads directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcl_hpc.config import ModelConfig
from pcl_hpc.errors import UserError

DOWNSAMPLE = 16  # four 2x2 max-pools between the five encoder levels


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """[conv3x3 - BN - LeakyReLU] x 2; the convs have no bias since BN adds one."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.01, inplace=True),
    )


def _check_input(x: Tensor, in_channels: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a (N, C, H, W) batch, got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    height, width = x.shape[-2:]
    if height % DOWNSAMPLE or width % DOWNSAMPLE or height == 0 or width == 0:
        raise ValueError(
            f"input height and width must be positive multiples of {DOWNSAMPLE} (the U-Net pools 4 times), "
            f"got {height}x{width}; crop or pad slices, e.g. data.patch=64"
        )


class UNetEncoder(nn.Module):
    """Four levels at f, 2f, 4f, 8f channels with 2x2 max-pool between, then a 16f centre block."""

    def __init__(self, in_channels: int = 1, width: int = 16):
        super().__init__()
        if width < 1 or in_channels < 1:
            raise ValueError(f"width and in_channels must be >= 1, got width={width}, in_channels={in_channels}")
        self.in_channels = in_channels
        self.width = width
        channels = [width * 2**level for level in range(4)]  # f, 2f, 4f, 8f
        self.down = nn.ModuleList()
        previous = in_channels
        for out in channels:
            self.down.append(_double_conv(previous, out))
            previous = out
        self.centre = _double_conv(previous, 16 * width)
        self.pool = nn.MaxPool2d(2)
        self.out_channels = 16 * width

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return [skip1 (f), skip2 (2f), skip3 (4f), skip4 (8f), centre (16f)]."""
        _check_input(x, self.in_channels)
        features = []
        for block in self.down:
            x = block(x)
            features.append(x)
            x = self.pool(x)
        features.append(self.centre(x))
        return features


def pool_features(deepest: Tensor, grid: int = 1) -> Tensor:
    """(N, C, h, w) -> (N, C * grid^2): averages over a grid x grid partition of the map (grid 1: global average).

    An encoder may ask for a grid (its ``pool_grid`` attribute): under InstanceNorm (nnU-Net's networks)
    every channel of every sample is standardised over its own map, so its global average is nearly the
    same for every input and a global-average head starts collapsed (measured: the SupCon loss stuck at
    its uniform value, log(2N-1) * T / T_base); the averages of a 2 x 2 grid still tell inputs apart."""
    if grid == 1:
        return deepest.mean(dim=(-2, -1))
    return F.adaptive_avg_pool2d(deepest, grid).flatten(1)


class ProjectionHead(nn.Module):
    """The pooled centre map (``pool_features``), then Linear - ReLU - Linear (SimCLR-style head)."""

    def __init__(self, in_channels: int, out_dim: int = 512, grid: int = 1):
        super().__init__()
        self.grid = grid
        pooled = in_channels * grid * grid
        self.mlp = nn.Sequential(
            nn.Linear(pooled, in_channels),
            nn.ReLU(inplace=True),
            nn.Linear(in_channels, out_dim),
        )

    def forward(self, centre: Tensor) -> Tensor:
        return self.mlp(pool_features(centre, self.grid))


class PretrainNet(nn.Module):
    """Encoder + projection head; returns L2-normalised embeddings for the contrastive loss.

    ``encoder``: any module that returns its feature maps deepest last with ``out_channels`` at the
    deepest (nnU-Net's encoders, see pcl_hpc.nnunet); default the paper's UNetEncoder."""

    def __init__(self, width: int = 16, in_channels: int = 1, projection_dim: int = 512,
                 encoder: nn.Module | None = None, out_channels: int | None = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else UNetEncoder(in_channels, width)
        self.head = ProjectionHead(out_channels or self.encoder.out_channels, projection_dim,
                                   getattr(self.encoder, "pool_grid", 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.encoder(x)[-1]), dim=1)


class _UpBlock(nn.Module):
    """2x transposed-conv upsampling to the skip's width, concatenation, then a double conv."""

    def __init__(self, in_channels: int, skip_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, skip_channels, kernel_size=2, stride=2)
        self.conv = _double_conv(2 * skip_channels, skip_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """Segmentation U-Net; ``out_classes`` counts the background too. Returns (N, out_classes, H, W) logits."""

    def __init__(self, out_classes: int, width: int = 16, in_channels: int = 1):
        super().__init__()
        if out_classes < 1:
            raise ValueError(f"out_classes must be >= 1 (background included), got {out_classes}")
        self.encoder = UNetEncoder(in_channels, width)
        skips = [width * 2**level for level in range(4)]  # f, 2f, 4f, 8f
        ups = []
        previous = self.encoder.out_channels
        for skip in reversed(skips):
            ups.append(_UpBlock(previous, skip))
            previous = skip
        self.up = nn.ModuleList(ups)
        self.classifier = nn.Conv2d(width, out_classes, kernel_size=1)
        self.out_classes = out_classes

    def forward(self, x: Tensor) -> Tensor:
        *skips, x = self.encoder(x)  # the encoder checks that H and W divide by 16
        for block, skip in zip(self.up, reversed(skips)):
            x = block(x, skip)
        return self.classifier(x)


def build_pretrain_net(cfg: ModelConfig) -> PretrainNet:
    return PretrainNet(width=cfg.width, in_channels=cfg.in_channels, projection_dim=cfg.projection_dim)


def build_unet(cfg: ModelConfig, out_classes: int) -> UNet:
    if cfg.arch != "paper":
        raise UserError(f"model.arch={cfg.arch}: its encoders are fine-tuned in nnU-Net, not by pcl-hpc; "
                        "run pcl-hpc export <encoder> --format nnunet, then nnUNetv2_train ... -pretrained_weights")
    return UNet(out_classes, width=cfg.width, in_channels=cfg.in_channels)


def build_from_spec(spec: Mapping[str, Any], state: Mapping[str, Tensor] | None = None) -> UNet:
    """The segmentation U-Net a model spec describes, in eval mode, with the state_dict ``state`` loaded if given.

    ``spec["model"]``: a ModelConfig or its fields (keys it does not know, from another pcl-hpc
    version, are ignored); ``spec["num_classes"]``: the foreground classes (one more output: the
    background). The spec is model_spec.json as `pcl_hpc.train.finetune.model_spec` writes it.
    What does not fit (a missing key, a bad value, weights of another shape) is a ValueError with
    one line saying what; callers turn it into a UserError naming their file."""
    try:
        model = spec["model"]
        if not isinstance(model, ModelConfig):
            known = {f.name for f in dataclasses.fields(ModelConfig)}
            model = ModelConfig(**{k: v for k, v in dict(model).items() if k in known})
        net = build_unet(model, int(spec["num_classes"]) + 1)
        if state is not None:
            net.load_state_dict(state)
    except KeyError as err:
        raise ValueError(f"the spec has no {err.args[0]!r}") from None
    except (TypeError, ValueError, RuntimeError, AttributeError) as err:  # not a state_dict, or another shape
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        raise ValueError(text if len(text) <= 200 else text[:197] + "...") from None
    return net.eval()

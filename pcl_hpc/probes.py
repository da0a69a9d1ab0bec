"""Probes of a representation: how good an encoder is, measured without fine-tuning it.

* :func:`position_probe`: every slice of some volumes is encoded as training sees it (centre-fit to
  the patch), the deepest feature map average-pooled, and a ridge regression maps those features to
  the slice's position (i+1)/Z. The fit is grouped by volume (k-fold over volumes): each volume is
  predicted by a fit that never saw it, with a penalty chosen by volume too, clipped to [0, 1]. R² near 1: the features say where a slice lies in its
  volume; near 0 (or below): they do not. One forward pass over the volumes, then a small linear fit.
* :func:`segmentation_probe`: a decoder trained for a fixed number of steps on the frozen encoder with
  a few labeled volumes, scored by Dice on others: far less variance than full fine-tuning.

Both are pure: the encoder comes back in the train/eval modes and with the requires_grad flags it had,
its weights and BatchNorm statistics bit-identical (it runs in eval mode, without gradients), and the
global RNGs untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from pcl_hpc.data.dataset import SliceDataset
from pcl_hpc.data.store import volume_ids
from pcl_hpc.errors import UserError
from pcl_hpc.evaluate import check_num_classes, load_labeled, score_volumes
from pcl_hpc.losses import segmentation_loss
from pcl_hpc.models.unet import UNet, pool_features

POSITION_FOLDS = 5  # the position probe's k-fold over volumes (fewer volumes: leave one volume out)
RIDGE_ALPHAS = np.logspace(0, 4, 9)  # ridge penalties the grouped inner cross-validation picks from (standardised features)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode with requires_grad off; each submodule's mode and each flag restored after."""
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def _placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def check_volumes(store: str, volumes: list[str], key: str, least: int = 2) -> None:
    """UserError naming ``key`` unless ``volumes`` are at least ``least`` distinct volumes of ``store``."""
    if len(set(volumes)) < least:
        raise UserError(f"{key} names {len(set(volumes))} volume(s); the probe needs at least {least} "
                        f"(it fits on some volumes and scores on others): name more volumes of {store}")
    missing = sorted(set(volumes) - set(volume_ids(store)))
    if missing:
        raise UserError(f"{key}: volume(s) {', '.join(missing)[:200]} are not in store {store}; name volumes it holds")


@torch.no_grad()
def encode_slices(encoder: nn.Module, store: str, volumes: list[str], patch: int,
                  batch: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, C), positions (N,), volume index (N,)) of every slice of ``volumes``: the
    deepest feature map, ``encoder(x)[-1]``, pooled as the projection head pools it (averaged over
    H and W, or a grid: ``pool_features``), in eval mode."""
    data = SliceDataset(store, volumes, patch=patch)
    device, dtype = _placement(encoder)
    features, positions, groups = [], [], []
    with frozen(encoder):
        for start in range(0, len(data), batch):
            b = data.__getitems__(list(range(start, min(start + batch, len(data)))))
            deepest = encoder(b["image"].to(device=device, dtype=dtype))[-1]
            features.append(pool_features(deepest.float(), getattr(encoder, "pool_grid", 1)).cpu().numpy())
            positions.append(b["position"].numpy())
            groups.append(b["volume"].numpy())
    return np.concatenate(features), np.concatenate(positions), np.concatenate(groups)


def _ridge(alpha: float):
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), Ridge(alpha=alpha))


def _grouped_predictions(features: np.ndarray, positions: np.ndarray, groups: np.ndarray, folds: int,
                         fit) -> np.ndarray:
    """Each group's positions predicted by ``fit(features, positions, groups)`` on the other groups, in [0, 1]."""
    from sklearn.model_selection import GroupKFold

    predicted = np.empty(len(positions), dtype=np.float64)
    for train, held_out in GroupKFold(n_splits=min(folds, len(np.unique(groups)))).split(features, positions, groups):
        predicted[held_out] = fit(features[train], positions[train], groups[train]).predict(features[held_out])
    return np.clip(predicted, 0.0, 1.0)  # a position lies in [0, 1]: a prediction outside is that bound's error


def _fit_by_volume(features: np.ndarray, positions: np.ndarray, groups: np.ndarray):
    """A ridge fit whose penalty is chosen by a grouped cross-validation inside the training volumes: slices of
    one volume are near-copies of each other, so leave-one-slice-out choices overfit and extrapolate badly."""
    if len(np.unique(groups)) < 2:
        return _ridge(RIDGE_ALPHAS[len(RIDGE_ALPHAS) // 2]).fit(features, positions)
    errors = [np.mean((_grouped_predictions(features, positions, groups, POSITION_FOLDS,
                                            lambda x, y, _g, a=alpha: _ridge(a).fit(x, y)) - positions) ** 2)
              for alpha in RIDGE_ALPHAS]
    return _ridge(RIDGE_ALPHAS[int(np.argmin(errors))]).fit(features, positions)


def position_scores(features: np.ndarray, positions: np.ndarray, groups: np.ndarray,
                    folds: int = POSITION_FOLDS) -> dict[str, float]:
    """R² and mean absolute error of ridge predictions of ``positions`` from ``features`` (standardised), each
    group (volume) predicted by a fit on the other groups, its penalty chosen by volume inside them."""
    from sklearn.metrics import mean_absolute_error, r2_score

    predicted = _grouped_predictions(features, positions, groups, folds, _fit_by_volume)
    return {"position_r2": float(r2_score(positions, predicted)),
            "position_mae": float(mean_absolute_error(positions, predicted))}


def position_probe(encoder: nn.Module, store: str, volumes: list[str], patch: int, *,
                   key: str = "volumes") -> dict[str, float]:
    """``{"position_r2", "position_mae"}`` of ``encoder`` on ``volumes`` (at least 2) of ``store``.
    ``key`` names the setting that listed the volumes, for the error line."""
    check_volumes(store, volumes, key)
    return position_scores(*encode_slices(encoder, store, list(dict.fromkeys(volumes)), patch))


def _decoder_on(encoder: nn.Module, out_classes: int) -> UNet:
    """A fresh U-Net decoder (and classifier) on ``encoder`` itself (the paper's UNetEncoder)."""
    net = UNet(out_classes, width=encoder.width, in_channels=encoder.in_channels)
    net.encoder = encoder
    return net


def segmentation_probe(encoder: nn.Module, store: str, train_volumes: list[str], test_volumes: list[str],
                       num_classes: int, patch: int, *, steps: int = 100, batch_size: int = 8, lr: float = 1e-3,
                       seed: int = 0) -> dict:
    """Dice on ``test_volumes`` of a decoder trained ``steps`` steps (Adam, random slices of
    ``train_volumes``, no augmentation) on the frozen ``encoder``: ``{"dice", "dice_per_class",
    "per_volume", "steps"}``. The encoder is never trained: bit-identical after, BN statistics too."""
    if set(train_volumes) & set(test_volumes):
        raise UserError(f"segmentation probe: volumes {sorted(set(train_volumes) & set(test_volumes))} are in both "
                        f"the train and the test volumes; score on volumes the decoder did not see")
    data = SliceDataset(store, train_volumes, patch=patch, with_labels=True)
    test = load_labeled(store, test_volumes, key="test volumes")
    check_num_classes(store, num_classes, test, key="num_classes")
    device, _ = _placement(encoder)
    with frozen(encoder), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        net = _decoder_on(encoder, num_classes + 1).to(device)
        optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
        draw = torch.Generator().manual_seed(seed)
        net.train()
        encoder.eval()  # the encoder's BN statistics stay as they are
        for _ in range(steps):
            b = data.__getitems__(torch.randint(len(data), (batch_size,), generator=draw).tolist())
            loss = segmentation_loss(net(b["image"].to(device)), b["label"].to(device).long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scores = score_volumes(net, test, num_classes, device, hd95=False)
    return {"dice": scores["mean"], "dice_per_class": scores["mean_per_class"], "per_volume": scores["per_volume"],
            "steps": steps}

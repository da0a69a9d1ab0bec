"""Whole-volume evaluation: predict every slice, stitch the volume back, score Dice and HD95 per class.

The slices go through `pcl_hpc.inference.predict_labels`, the forward pass `pcl-hpc predict` uses
too, so a Dice here is the Dice of the masks predict writes. The metrics themselves (definitions
and conventions for absent classes) live in `pcl_hpc.metrics`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from pcl_hpc import metrics
from pcl_hpc.data.store import load_volume, read_manifest
from pcl_hpc.errors import UserError
from pcl_hpc.inference import default_device, predict_labels
from pcl_hpc.models.unet import build_from_spec

VOLUMES_KEY = "finetune.val_volumes / finetune.test_volumes"
RESULT_KEYS = ("init", "labeled", "mean_per_class", "mean", "class_names")  # what format_table and the CLI read


# Volumes read by load_labeled, kept for the next call in this process (a sweep worker scores the same
# validation and test volumes for many cells). Keyed by the store's content hash: a changed store is re-read.
_LOADED: dict[tuple[str, str, str], "LabeledVolume"] = {}
_LOADED_MAX = 64


class LabeledVolume(NamedTuple):
    """One scored volume as `load_labeled` returns it; spacing is in mm, (z, y, x) like the arrays."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Volume Dice for classes 1..num_classes; a class absent from both gets 1.0 (see `pcl_hpc.metrics`)."""
    return metrics.dice_per_class(pred, label, num_classes)


def _spacing(store: str | Path, vid: str, attrs: dict) -> tuple[float, float, float]:
    spacing = attrs.get("spacing")
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise UserError(f"volume {vid!r} in store {store} has no valid 'spacing' attr (got {spacing!r}); "
                        "re-run `pcl-hpc preprocess` into a new store to write it")
    return values  # type: ignore[return-value]


def _no_label(store: str | Path, vid: str, key: str) -> UserError:
    try:
        labeled = [v["id"] for v in read_manifest(store)["volumes"] if v["labeled"]]
    except UserError:
        labeled = []
    listed = ", ".join(labeled[:8]) + (", ..." if len(labeled) > 8 else "") if labeled else "none"
    return UserError(f"volume {vid!r} in store {store} has no label: {key} must name labeled volumes "
                     f"(labeled ones: {listed})")


def load_labeled(store: str, volumes: list[str], *, key: str = VOLUMES_KEY) -> dict[str, LabeledVolume]:
    """{volume id: LabeledVolume(image, label, spacing)}: read once, then scored as often as needed.

    A volume without a label is a UserError naming it (``key`` names the setting that listed it)."""
    manifest = read_manifest(store)
    listed = {v["id"]: bool(v.get("labeled")) for v in manifest["volumes"]}
    for vid in volumes:  # fail before reading any array
        if listed.get(vid) is False:
            raise _no_label(store, vid, key)
    loaded = {}
    for vid in volumes:
        cache_key = (str(Path(store).resolve()), manifest.get("content_hash", ""), vid)
        if cache_key not in _LOADED:
            image, label, attrs = load_volume(store, vid)
            if label is None:
                raise _no_label(store, vid, key)
            _LOADED[cache_key] = LabeledVolume(image, label, _spacing(store, vid, attrs))
            while len(_LOADED) > _LOADED_MAX:
                _LOADED.pop(next(iter(_LOADED)))
        loaded[vid] = _LOADED[cache_key]
    return loaded


def check_num_classes(store: str | Path, num_classes: int,
                      volumes: Mapping[str, Sequence] | Sequence[str] | None = None,
                      *, key: str = "finetune.num_classes") -> None:
    """UserError unless ``num_classes`` fits the store and the volumes.

    Checks that the manifest's ``class_names`` (background first), when present, has exactly
    ``num_classes`` foreground classes, and that no label in ``volumes`` has a value above
    ``num_classes``. ``volumes`` is `load_labeled`'s result (or any {vid: (image, label, ...)}),
    or a list of volume ids (then their labels are read from the store), or None (manifest only)."""
    num_classes = int(num_classes)
    if num_classes < 1:
        raise UserError(f"{key}={num_classes} must be >= 1 (the number of foreground classes)")
    names = (read_manifest(store).get("class_names") or [])[1:]
    if names and len(names) != num_classes:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise UserError(f"{key}={num_classes} but store {store} has {len(names)} foreground classes "
                        f"({shown}); set {key}={len(names)}")
    if volumes is None:
        return
    labels = ((vid, item[1]) for vid, item in volumes.items()) if isinstance(volumes, Mapping) \
        else ((vid, load_volume(store, vid)[1]) for vid in volumes)
    for vid, label in labels:
        if label is None:
            raise _no_label(store, vid, VOLUMES_KEY)
        top = int(np.max(label)) if np.size(label) else 0
        if top > num_classes:
            raise UserError(f"{key}={num_classes} but volume {vid!r} in store {store} has label values up to "
                            f"{top}; set {key}={top}")


def evaluate_volumes(model: torch.nn.Module, store: str, volumes: list[str], num_classes: int,
                     device: torch.device, *, hd95: bool = True) -> dict:
    """Dice and HD95 per class per volume and their means over volumes, reading the volumes from the store."""
    return score_volumes(model, load_labeled(store, volumes), num_classes, device, hd95=hd95)


def _mean_present(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def score_volumes(model: torch.nn.Module, loaded: Mapping[str, Sequence], num_classes: int,
                  device: torch.device, *, hd95: bool = True) -> dict:
    """Scores of `load_labeled`'s volumes (an (image, label) pair without spacing gets HD95 None).

    ``hd95=False`` skips the surface distances (Dice only, HD95 all None): for a quick per-epoch
    selection score, since an untrained model's speckled output makes HD95 the slow part (seconds
    per 256x256x100 volume, see tools/bench_metrics.py).

    Returns ``per_volume`` (vid -> Dice per class 1..num_classes), ``mean_per_class`` (Dice over
    volumes), ``mean`` (over volumes and classes), ``hd95_mm_per_volume`` (vid -> HD95 per class in
    mm, None where a class is in only one of prediction and label) and ``mean_hd95_mm_per_class``
    (mean over the volumes where it is present, None where it is in none)."""
    per_volume, hd = {}, {}
    for vid, item in loaded.items():
        image, label = item[0], item[1]
        spacing = item[2] if len(item) > 2 else None
        pred = predict_labels(model, image, device)
        if spacing is None or not hd95:
            per_volume[vid] = metrics.dice_per_class(pred, label, num_classes)
            hd[vid] = [None] * num_classes
        else:
            scores = metrics.volume_metrics(pred, label, spacing, num_classes)
            per_volume[vid], hd[vid] = scores["dice"], scores["hd95_mm"]
    if not per_volume:
        nan = float("nan")
        return {"per_volume": {}, "mean_per_class": [nan] * num_classes, "mean": nan,
                "hd95_mm_per_volume": {}, "mean_hd95_mm_per_class": [None] * num_classes}
    scores = np.array(list(per_volume.values()))
    return {"per_volume": per_volume, "mean_per_class": scores.mean(0).tolist(), "mean": float(scores.mean()),
            "hd95_mm_per_volume": hd,
            "mean_hd95_mm_per_class": [_mean_present([v[c] for v in hd.values()]) for c in range(num_classes)]}


def format_table(rows: list[dict], class_names: list[str], metric: str = "dice") -> str:
    """Markdown table: one row per fine-tuned model, one column per class, then the mean.

    ``metric``: "dice" (``mean_per_class``, ``mean``) or "hd95_mm" (``mean_hd95_mm_per_class``; the
    mean is over the classes that have a value, '-' marks a missing one)."""
    if metric not in ("dice", "hd95_mm"):
        raise ValueError(f"metric must be 'dice' or 'hd95_mm', got {metric!r}")
    head = ["init", "M"] + class_names + ["mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if metric == "dice":
            values, mean, fmt = row["mean_per_class"], row["mean"], "{:.3f}"
        else:
            values = row.get("mean_hd95_mm_per_class") or [None] * len(class_names)
            mean, fmt = _mean_present(values), "{:.2f}"
        cells = [str(row["init"]), str(row["labeled"])] + ["-" if v is None else fmt.format(v) for v in values]
        lines.append("| " + " | ".join(cells + ["-" if mean is None else fmt.format(mean)]) + " |")
    return "\n".join(lines)


def load_results(paths: list[str | Path]) -> list[dict]:
    """The results.json files written by finetune; a missing, unreadable or invalid one is a UserError naming it."""
    hint = "pass results.json files written by `pcl-hpc finetune` (<output_dir>/results.json)"
    rows = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise UserError(f"results file {path} not found; {hint}")
        try:
            row = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"results file {path} cannot be read ({err.__class__.__name__}: {err}); {hint}") from None
        except json.JSONDecodeError as err:
            raise UserError(f"results file {path} is not valid JSON ({err}); {hint}") from None
        missing = [k for k in RESULT_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise UserError(f"results file {path} is not a finetune results file (missing {', '.join(missing)}); {hint}")
        rows.append(row)
    return rows


def evaluate_model(cfg, model_path: str | None) -> dict:
    """`pcl-hpc evaluate --model model.pt`: Dice and HD95 of a fine-tuned model on cfg.finetune.test_volumes
    (on CUDA when there is one, as predict)."""
    if not model_path:
        raise UserError("evaluate: pass --model <model.pt written by finetune> to score it, or --results <results.json ...> "
                        "to tabulate fine-tuning results")
    if not Path(model_path).is_file():
        raise UserError(f"evaluate: model file not found: {model_path} (pass --model <output_dir>/model.pt from finetune)")
    if not cfg.finetune.test_volumes:
        raise UserError("evaluate: finetune.test_volumes is empty: name the volumes to score")
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - not a torch file, truncated, pickled code, ...
        raise UserError(f"evaluate: {model_path} is not a model.pt written by finetune (cannot be read with "
                        f"torch.load(weights_only=True): {type(err).__name__})") from None
    try:
        model = build_from_spec({"model": cfg.model, "num_classes": cfg.finetune.num_classes}, state)
    except ValueError as err:
        raise UserError(f"evaluate: {model_path} does not fit model.width={cfg.model.width}, "
                        f"finetune.num_classes={cfg.finetune.num_classes} ({err})") from None
    loaded = load_labeled(cfg.data.store, cfg.finetune.test_volumes, key="finetune.test_volumes")
    check_num_classes(cfg.data.store, cfg.finetune.num_classes, loaded)
    device = default_device()
    result = score_volumes(model.to(device), loaded, cfg.finetune.num_classes, device)
    names = (read_manifest(cfg.data.store).get("class_names") or [])[1:]
    names = names if len(names) == cfg.finetune.num_classes else [f"class{c}" for c in range(1, cfg.finetune.num_classes + 1)]
    row = {"init": str(model_path), "labeled": "-", **result}
    print("Dice\n" + format_table([row], names) + "\n\nHD95 (mm)\n" + format_table([row], names, metric="hd95_mm"))
    return result

"""Whole-volume evaluation: predict every slice, stitch the volume back, score Dice per class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pcl_hpc.data.store import load_volume


@torch.no_grad()
def predict_volume(model: torch.nn.Module, image: np.ndarray, device: torch.device, batch: int = 32) -> np.ndarray:
    """(Z,H,W) image -> (Z,H,W) uint8 label map; slices are padded to a multiple of 16 and cropped back."""
    model.eval()
    z, h, w = image.shape
    pad_h, pad_w = (-h) % 16, (-w) % 16
    out = np.zeros((z, h, w), dtype=np.uint8)
    for start in range(0, z, batch):
        x = torch.from_numpy(np.ascontiguousarray(image[start:start + batch])).float().unsqueeze(1).to(device)
        x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = model(x)[:, :, :h, :w]
        out[start:start + batch] = logits.argmax(1).to(torch.uint8).cpu().numpy()
    return out


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Volume Dice for classes 1..num_classes; a class absent from both gets 1.0 (nothing to find, nothing found)."""
    scores = []
    for c in range(1, num_classes + 1):
        p, t = pred == c, label == c
        denom = p.sum() + t.sum()
        scores.append(1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom))
    return scores


def load_labeled(store: str, volumes: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{volume id: (image, label)}: read once, then scored as often as needed (e.g. every epoch)."""
    return {vid: load_volume(store, vid)[:2] for vid in volumes}


def evaluate_volumes(model: torch.nn.Module, store: str, volumes: list[str], num_classes: int,
                     device: torch.device) -> dict:
    """Dice per class per volume and the mean over volumes, reading the volumes from the store."""
    return score_volumes(model, load_labeled(store, volumes), num_classes, device)


def score_volumes(model: torch.nn.Module, loaded: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int,
                  device: torch.device) -> dict:
    """Dice per class per volume of `load_labeled`'s volumes, and the mean over volumes."""
    per_volume = {vid: dice_per_class(predict_volume(model, image, device), label, num_classes)
                  for vid, (image, label) in loaded.items()}
    scores = np.array(list(per_volume.values()))
    return {"per_volume": per_volume, "mean_per_class": scores.mean(0).tolist(), "mean": float(scores.mean())}


def format_table(rows: list[dict], class_names: list[str]) -> str:
    """Markdown table: one row per fine-tuned model, one column per class, then the mean Dice."""
    head = ["init", "M"] + class_names + ["mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["init"], str(row["labeled"])] + [f"{d:.3f}" for d in row["mean_per_class"]] + [f"{row['mean']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_results(paths: list[str | Path]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]


def evaluate_model(cfg, model_path: str | None) -> dict:
    """`pcl-hpc evaluate --model model.pt`: Dice of a fine-tuned model on cfg.finetune.test_volumes."""
    from pcl_hpc.errors import UserError
    from pcl_hpc.models.unet import build_unet

    if not model_path or not Path(model_path).is_file():
        raise UserError(f"evaluate: model file not found: {model_path} (pass --model <output_dir>/model.pt from finetune)")
    if not cfg.finetune.test_volumes:
        raise UserError("evaluate: finetune.test_volumes is empty: name the volumes to score")
    model = build_unet(cfg.model, cfg.finetune.num_classes + 1)
    try:
        model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, EOFError) as err:
        raise UserError(f"evaluate: {model_path} does not fit model.width={cfg.model.width}, "
                        f"finetune.num_classes={cfg.finetune.num_classes} ({str(err).splitlines()[0]})") from None
    result = evaluate_volumes(model, cfg.data.store, cfg.finetune.test_volumes, cfg.finetune.num_classes, torch.device("cpu"))
    from pcl_hpc.data.store import read_manifest

    names = (read_manifest(cfg.data.store).get("class_names") or [])[1:]
    names = names if len(names) == cfg.finetune.num_classes else [f"class{c}" for c in range(1, cfg.finetune.num_classes + 1)]
    print(format_table([{"init": str(model_path), "labeled": "-", **result}], names))
    return result

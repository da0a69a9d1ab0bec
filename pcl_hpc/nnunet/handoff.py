"""`pcl-hpc export <encoder> --format nnunet --plans ...`: the file ``nnUNetv2_train ... -pretrained_weights`` loads.

nnU-Net's loader (``nnunetv2/run/load_pretrained_weights.py``) wants ``{"network_weights": ...}``
with every key of its network except the seg layers, at the same shapes. So the file holds the
whole network of the plan: the pretrained encoder (under ``encoder.*`` and again under
``decoder.encoder.*``, the same module in nnU-Net's decoder) and the decoder as nnU-Net initialises
it (He init, seeded), without the seg layers, which nnU-Net keeps its own. Extra keys carry the
lineage (nnU-Net ignores them). Before anything is written, the encoder is checked against the
plan: its weights (stages, features, kernels, input channels, norm type) and, where pretraining
recorded it, the architecture (strides too). A BatchNorm encoder would load into nnU-Net's
InstanceNorm network without an error, its statistics silently dropped; the check refuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pcl_hpc.atomic import save_torch, sha256_file
from pcl_hpc.errors import UserError
from pcl_hpc.nnunet.network import ARCH_FILE
from pcl_hpc.nnunet.plans import check_architecture, check_encoder, load_plan
from pcl_hpc.tracking import (
    encoder_lineage,
    encoder_version_tags,
    load_encoder_state,
    local_encoder_file,
)

FILE_NAME = "nnunet_pretrained_weights.pt"
SEG_LAYERS = ".seg_layers."  # nnU-Net never transfers these


def _recorded(source: str, tracking_uri: str | None) -> tuple[dict | None, dict]:
    """The architecture pretraining recorded for this encoder (registry tags or the file beside it), and its lineage."""
    if source.startswith("models:/"):
        tags = encoder_version_tags(source, tracking_uri)
        arch = json.loads(tags["nnunet.architecture"]) if "nnunet.architecture" in tags else None
        lineage = {**encoder_lineage(source, tracking_uri), "store_hash": tags.get("store_hash", ""),
                   "pretrain_plans_sha256": tags.get("nnunet.plans_sha256", ""), "method": tags.get("method", "")}
        return arch, lineage
    path = local_encoder_file(source)
    lineage = {"encoder_path": str(path.absolute()), "encoder_sha256": sha256_file(path)}
    side = path.parent / ARCH_FILE
    if not side.is_file():
        return None, lineage
    try:
        record = json.loads(side.read_text())
        return record["architecture"], {**lineage, "store_hash": record.get("store_hash", ""),
                                        "pretrain_plans_sha256": record.get("plans_sha256", "")}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"export: {side} is not the architecture record pretraining writes; remove it or "
                        "pretrain again") from None


def export_nnunet(source: str, plans: str, configuration: str, out: str | Path, *, seed: int = 0,
                  tracking_uri: str | None = None) -> Path:
    """Write the nnU-Net hand-off file for encoder ``source`` and the plan; returns its path."""
    plan = load_plan(plans, configuration, key="--plans")
    state = load_encoder_state(source, tracking_uri)
    arch, lineage = _recorded(source, tracking_uri)
    torch.manual_seed(seed)  # nnU-Net's He init of the decoder, reproducible
    net = plan.network()
    what = f"export: encoder {source}"
    check_encoder(net.encoder.state_dict(), state, what)
    check_architecture(plan, arch, what)
    net.encoder.load_state_dict(state)
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items() if SEG_LAYERS not in k}
    out_path = Path(out).expanduser()
    if out_path.suffix not in (".pt", ".pth"):
        out_path = out_path / FILE_NAME
    payload = {"network_weights": weights, "pcl_hpc": {
        **{k: str(v) for k, v in lineage.items()}, "plans_sha256": plan.sha256, "dataset_name": plan.dataset_name,
        "configuration": plan.configuration, "network_class_name": plan.architecture["network_class_name"],
        "decoder_init_seed": str(seed)}}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return save_torch(payload, out_path)

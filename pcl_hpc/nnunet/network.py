"""The network pcl-hpc pretrains for nnU-Net: the plan's own encoder under the contrastive head,
and what the pretrained encoder records of the plan (for the export's checks)."""

from __future__ import annotations

import json
from typing import Any

from pcl_hpc.config import Config, ModelConfig
from pcl_hpc.errors import UserError
from pcl_hpc.models.unet import PretrainNet
from pcl_hpc.nnunet.plans import Plan, arch_digest, load_plan

POOL_GRID = 2  # the head (and the position probe) average the bottleneck over 2 x 2 cells
ARCH_FILE = "nnunet_arch.json"  # beside encoder.pt: the plan's architecture it was pretrained with


def model_plan(model: ModelConfig) -> Plan:
    plan = load_plan(model.plans, model.configuration)
    if plan.input_channels != model.in_channels:
        raise UserError(f"model.in_channels={model.in_channels} but the plan {plan.path} has {plan.input_channels} "
                        f"input channel(s); pcl-hpc stores one channel per slice, so use a 1-channel dataset "
                        f"(multi-channel plans are not supported yet)")
    return plan


def pretrain_net(model: ModelConfig) -> PretrainNet:
    """The plan's encoder, initialised as nnU-Net initialises it, with the projection head on its bottleneck."""
    net = model_plan(model).network()
    encoder = net.encoder
    encoder.pool_grid = POOL_GRID  # InstanceNorm: a global average says almost nothing (see pool_features)
    return PretrainNet(encoder=encoder, out_channels=int(encoder.output_channels[-1]),
                       projection_dim=model.projection_dim)


def arch_record(cfg: Config, store_hash: str = "") -> dict[str, Any]:
    """What the export checks a pretrained encoder against: the plan's architecture and where it came from."""
    plan = model_plan(cfg.model)
    return {"configuration": plan.configuration, "dataset_name": plan.dataset_name, "plans_sha256": plan.sha256,
            "patch_size": list(plan.patch_size), "input_channels": plan.input_channels,
            "architecture": plan.architecture, "architecture_sha256": arch_digest(plan.architecture),
            "store_hash": store_hash}


def arch_tags(record: dict | None) -> dict[str, str]:
    """The record as registry tags (``nnunet.*``; the architecture as compact JSON): a models:/ encoder carries it."""
    if not record:
        return {}
    return {"nnunet.configuration": record["configuration"], "nnunet.plans_sha256": record["plans_sha256"],
            "nnunet.dataset_name": record["dataset_name"],
            "nnunet.architecture": json.dumps(record["architecture"], separators=(",", ":"), sort_keys=True)}

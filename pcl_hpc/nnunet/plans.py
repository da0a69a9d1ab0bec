"""A plans file and one of its configurations: checked, hashed, and turned into nnU-Net's own network.

The network is the one ``nnUNetTrainer.build_network_architecture`` builds (nnunetv2's
``get_network_from_plans`` with the plan's class and ``arch_kwargs``, He-initialised, deep
supervision on), so its keys, shapes and initialisation are nnU-Net's. pcl-hpc pretrains its
``.encoder`` (PlainConvEncoder, or ResidualEncoder for the ResEnc presets).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from pcl_hpc.errors import UserError

SUPPORTED = ("2d",)  # configurations pcl-hpc pretrains; 3d ones need a 3D loss and store


def require_nnunet() -> None:
    """nnunetv2 is importable, else one line naming the extra to install."""
    try:
        import dynamic_network_architectures  # noqa: F401
        import nnunetv2  # noqa: F401
    except ImportError:
        raise UserError("model.arch=nnunet needs nnU-Net: pip install 'pcl-hpc[nnunet]' "
                        "(nnunetv2 2.8.1 and dynamic-network-architectures)") from None


@dataclass(frozen=True)
class Plan:
    """One configuration of a plans file, with what pcl-hpc needs of it."""

    path: Path
    configuration: str
    plans: dict
    dataset_json: dict
    sha256: str  # of the plans file's bytes

    @cached_property
    def manager(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        return PlansManager(self.plans)

    @cached_property
    def configuration_manager(self):
        return self.manager.get_configuration(self.configuration)

    @property
    def config(self) -> dict:
        return self.configuration_manager.configuration

    @property
    def dataset_name(self) -> str:
        return str(self.plans.get("dataset_name", ""))

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(int(p) for p in self.config["patch_size"])  # type: ignore[return-value]

    @property
    def architecture(self) -> dict:
        """The network class and its arguments, as the plans file spells them (plain JSON)."""
        arch = self.config["architecture"]
        return {"network_class_name": arch["network_class_name"], "arch_kwargs": arch["arch_kwargs"]}

    @property
    def input_channels(self) -> int:
        from nnunetv2.utilities.label_handling.label_handling import (
            determine_num_input_channels,
        )
        return int(determine_num_input_channels(self.manager, self.configuration_manager, self.dataset_json))

    @property
    def output_channels(self) -> int:
        return int(self.manager.get_label_manager(self.dataset_json).num_segmentation_heads)

    @property
    def preprocessed_folder(self) -> Path:
        return self.path.parent / self.configuration_manager.data_identifier

    def network(self) -> torch.nn.Module:
        """nnU-Net's network for this configuration, initialised as nnU-Net initialises it."""
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        arch = self.config["architecture"]
        return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                      arch["_kw_requires_import"], self.input_channels, self.output_channels,
                                      allow_init=True, deep_supervision=True)


def arch_digest(architecture: dict) -> str:
    return hashlib.sha256(json.dumps(architecture, sort_keys=True).encode()).hexdigest()


def load_plan(plans: str | Path, configuration: str = "2d", key: str = "model.plans") -> Plan:
    """The plan, or one line naming the file or configuration that cannot be used."""
    require_nnunet()
    if not str(plans):
        raise UserError(f"{key} is not set; give nnU-Net's plans file "
                        "(nnUNet_preprocessed/<Dataset>/nnUNetPlans.json, written by nnUNetv2_plan_and_preprocess)")
    path = Path(plans).expanduser()
    if not path.is_file():
        raise UserError(f"{key}: {path} does not exist; run nnUNetv2_plan_and_preprocess -d <id> first "
                        "and give nnUNet_preprocessed/<Dataset>/nnUNetPlans.json")
    try:
        raw = path.read_bytes()
        content = json.loads(raw)
        available = list(content["configurations"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{key}: {path} is not an nnU-Net plans file (no 'configurations'); "
                        "give the nnUNetPlans.json nnUNetv2_plan_and_preprocess wrote") from None
    if configuration not in available:
        raise UserError(f"model.configuration={configuration!r} is not in {path}; it has: {', '.join(available)}")
    dataset_json_path = path.parent / "dataset.json"
    try:
        dataset_json = json.loads(dataset_json_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{key}: {dataset_json_path} is missing or not JSON; keep the plans file in the "
                        "preprocessed dataset folder nnU-Net wrote (dataset.json beside it)") from None
    plan = Plan(path, configuration, content, dataset_json, hashlib.sha256(raw).hexdigest())
    dims = len(plan.patch_size)
    if configuration not in SUPPORTED or dims != 2:
        raise UserError(f"model.configuration={configuration!r} is a {dims}D configuration; pcl-hpc pretrains "
                        f"2D networks only ({', '.join(SUPPORTED)}); 3d_fullres is not supported yet")
    return plan


def describe_state(state: dict[str, Any]) -> dict[str, Any]:
    """What an encoder's weights say of its architecture: stages, features, kernels, input channels, norm."""
    stages: dict[int, list[str]] = {}
    for name in state:
        parts = name.split(".")
        if parts[0] == "stages" and parts[1].isdigit():
            stages.setdefault(int(parts[1]), []).append(name)
    convs = {i: [k for k in names if k.endswith("conv.weight") and state[k].dim() == 4] for i, names in stages.items()}
    first = [convs[i][0] for i in sorted(convs) if convs[i]]
    entry = "stem.convs.0.conv.weight" if "stem.convs.0.conv.weight" in state else (first[0] if first else None)
    return {
        "encoder": "residual" if any(".blocks." in k for k in state) else "plain",  # ResEnc presets: residual
        "stages": len(stages),
        "features": [int(state[k].shape[0]) for k in first],
        "kernel sizes": [list(state[k].shape[2:]) for k in first],
        "input channels": int(state[entry].shape[1]) if entry else None,
        "norm": "batch norm" if any(k.endswith("running_mean") for k in state) else "instance norm",
    }


def check_encoder(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    """``got`` has exactly ``expected``'s keys and shapes, else one line saying which property differs."""
    same = expected.keys() == got.keys() and all(expected[k].shape == got[k].shape for k in expected)
    if same:
        return
    if not any(k.startswith("stages.") for k in got):
        raise UserError(f"{what} is not an nnU-Net encoder (pretrained with model.arch=paper?); pretrain with "
                        "model.arch=nnunet and this plans file")
    want, have = describe_state(expected), describe_state(got)
    diffs = [f"{k}: plan {want[k]}, encoder {have[k]}" for k in want if want[k] != have[k]]
    raise UserError(f"{what} does not match the plan's network ({'; '.join(diffs) or 'parameter names differ'}); "
                    "export with the plans file and configuration it was pretrained with")


def check_architecture(plan: Plan, recorded: dict | None, what: str) -> None:
    """The architecture recorded at pretraining (strides included, which weights cannot show) is the plan's."""
    if not recorded:
        return
    want, have = plan.architecture, recorded
    if arch_digest(want) == arch_digest(have):
        return
    wk, hk = want.get("arch_kwargs", {}), have.get("arch_kwargs", {})
    diffs = [f"{k}: plan {wk.get(k)}, encoder {hk.get(k)}" for k in sorted(set(wk) | set(hk)) if wk.get(k) != hk.get(k)]
    if want.get("network_class_name") != have.get("network_class_name"):
        diffs.insert(0, f"network: plan {want.get('network_class_name')}, encoder {have.get('network_class_name')}")
    raise UserError(f"{what} was pretrained with another architecture than the plan's ({'; '.join(diffs)[:300]}); "
                    "export with the plans file and configuration it was pretrained with")

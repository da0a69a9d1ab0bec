"""The segmentation model registry: fine-tuned U-Nets as registered MLflow model versions.

A fine-tuned model is two plain files (``pcl_hpc.train.finetune`` writes them side by side):
``model.pt`` (``torch.save`` of the network's state_dict: tensors only) and ``model_spec.json``
(the store's preprocessing, the network's settings, the class names and where the model came
from). :func:`register_segmentation_model` stores both as the artifacts of a new version of a
registered model (a "models from code" pyfunc, as for the encoders in :mod:`.registry`: the
registry holds no pickled Python objects; :class:`SegmentationVersion` says how, and
:func:`pcl_hpc.tracking.versions.register_version` registers it), with lineage tags; :func:`load_segmentation_model`
reads them back from ``models:/<name>@<alias>``, ``models:/<name>/<version>``, a folder or a
``model.pt`` path, always with ``torch.load(..., weights_only=True)``. Aliases are moved with
:func:`pcl_hpc.tracking.promote_alias` (it works for any registered model name).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pcl_hpc.atomic import sha256_file
from pcl_hpc.errors import UserError
from pcl_hpc.tracking._common import _short, _tag_str
from pcl_hpc.tracking.registry import _load_weights, _parse_models_uri, _resolve_version, _use_uri
from pcl_hpc.tracking.versions import VersionKind, check_alias, register_version

log = logging.getLogger(__package__)

SEG_WEIGHTS_FILE = "model.pt"  # the same names as pcl_hpc.train.finetune writes
SEG_SPEC_FILE = "model_spec.json"
SEG_SPEC_FORMAT = 1
SEG_KIND = "pcl-hpc-segmentation"
SEG_MODEL_NAME_IN_RUN = "segmentation"  # the logged model's name inside its run
SEG_NAME_SUFFIX = "-seg"  # default registered name: <tracking.register_name>-seg

# What a spec must hold for predict to apply the model (volume_arrays reads the preprocessing keys).
_SPEC_KEYS = ("preprocessing", "model", "num_classes", "class_names")
_PREPROCESSING_KEYS = ("slice_axis", "target_spacing", "interpolation", "intensity", "clip_percentiles",
                       "hu_window", "gcl_partitions")

# Logged as the model's code: mlflow.pyfunc.load_model(...) gives a model whose predict takes
# preprocessed (N, C, H, W) slices (H, W multiples of 16) and returns (N, H, W) class ids. It needs
# pcl_hpc importable; `pcl-hpc predict --model models:/...` is the way to segment whole scans.
_PYFUNC_CODE = '''\
"""pcl-hpc segmentation model: a plain state_dict (artifacts/model.pt) plus artifacts/model_spec.json."""
import json

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class PclSegmentation(PythonModel):
    def load_context(self, context):
        from pcl_hpc.models.unet import build_from_spec

        with open(context.artifacts["model_spec"], encoding="utf-8") as f:
            self.spec = json.load(f)
        state = torch.load(context.artifacts["model"], map_location="cpu", weights_only=True)
        self.net = build_from_spec(self.spec, state)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # (N, C, H, W) -> (N, H, W)
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.net(x).argmax(1).to(torch.uint8).numpy()


mlflow.models.set_model(PclSegmentation())
'''


class SegmentationModel(NamedTuple):
    """A loaded segmentation model: the state_dict, its spec and where it came from."""

    state: dict[str, torch.Tensor]
    spec: dict[str, Any]
    lineage: dict[str, Any]


def segmentation_model_name(cfg) -> str:
    """The registered name of a config's fine-tuned models: ``<tracking.register_name>-seg``."""
    return f"{cfg.tracking.register_name}{SEG_NAME_SUFFIX}"


# ----------------------------------------------------------------------------------------------
# the spec


def check_spec(spec: Any, where: str) -> dict[str, Any]:
    """``spec`` if it is a model_spec.json this version applies, else a UserError naming ``where``."""
    if not isinstance(spec, dict):
        raise UserError(f"{where}: model_spec.json holds a {type(spec).__name__}, not a model spec; "
                        "use the model_spec.json that `pcl-hpc finetune` wrote beside model.pt")
    if "export" in spec:
        formats = spec["export"].get("formats") if isinstance(spec["export"], dict) else None
        raise UserError(f"{where}: this is an exported model ({', '.join(formats or ['?'])}), not a "
                        "fine-tuned one; pass the fine-tuning folder (model.pt + model_spec.json) or models:/<name>@<alias>")
    if spec.get("format") != SEG_SPEC_FORMAT or spec.get("kind", SEG_KIND) != SEG_KIND:
        raise UserError(f"{where}: model_spec.json has format {spec.get('format')!r} (kind {spec.get('kind')!r}); this "
                        f"pcl-hpc reads format {SEG_SPEC_FORMAT} ({SEG_KIND}): use the pcl-hpc version that trained it")
    missing = [k for k in _SPEC_KEYS if k not in spec]
    missing += [f"preprocessing.{k}" for k in _PREPROCESSING_KEYS
                if isinstance(spec.get("preprocessing"), dict) and k not in spec["preprocessing"]]
    if missing:
        raise UserError(f"{where}: model_spec.json lacks {', '.join(missing)}; it was not written by "
                        "`pcl-hpc finetune` (re-run the fine-tuning to write it)")
    return spec


def read_spec(path: Path, where: str) -> dict[str, Any]:
    """The checked spec in ``path`` (plain JSON: nothing is executed or unpickled)."""
    if not path.is_file():
        raise UserError(f"{where}: no {SEG_SPEC_FILE} beside the weights ({path} is missing); a model needs the spec "
                        "`pcl-hpc finetune` writes next to model.pt (re-run the fine-tuning, it completes the folder)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{where}: {path} is not readable JSON ({_short(err, 120)}); copy it again") from None
    return check_spec(spec, where)


def local_segmentation_files(source: str | Path | tuple | list) -> tuple[Path, Path]:
    """(weights, spec) of a folder, a ``model.pt`` path (spec beside it) or a (weights, spec) pair."""
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise UserError(f"give (model.pt, model_spec.json), got {len(source)} paths")
        weights, spec = (Path(p).expanduser() for p in source)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            spec = path / SEG_SPEC_FILE
            name = SEG_WEIGHTS_FILE
            if spec.is_file():
                try:
                    name = str(json.loads(spec.read_text(encoding="utf-8")).get("weights") or name)
                except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                    pass  # read_spec reports it
            weights = path / Path(name).name
            if not weights.is_file() and not spec.is_file():
                raise UserError(f"model {source}: folder has no {SEG_WEIGHTS_FILE} and no {SEG_SPEC_FILE}; pass the "
                                "fine-tuning folder (<output_dir>/finetune/<name>), its model.pt or models:/<name>@<alias>")
        elif path.is_file():
            weights, spec = path, path.parent / SEG_SPEC_FILE
        else:
            raise UserError(f"model {source!r} not found: give a fine-tuning folder, a model.pt with model_spec.json "
                            "beside it, models:/<name>@<alias> or models:/<name>/<version>")
    return weights, spec


def _local_model(source: str | Path | tuple | list) -> tuple[Path, dict[str, Any]]:
    """(weights path, checked spec) of a local model: the spec is checked first, then the weights exist."""
    weights, spec_path = local_segmentation_files(source)
    where = str(weights)
    spec = read_spec(spec_path, where)
    if not weights.is_file():
        raise UserError(f"model {source}: weights file {weights} not found (model_spec.json names "
                        f"{spec.get('weights')!r}); put model.pt back beside its model_spec.json")
    return weights, spec


def _spec_tags(spec: dict[str, Any]) -> dict[str, str]:
    """Version tags from the spec: classes, network, preprocessing and the encoder's lineage."""
    pre = spec.get("preprocessing") or {}
    tags = {
        "seg.num_classes": spec.get("num_classes"),
        "seg.class_names": ",".join(map(str, spec.get("class_names") or [])),
        "seg.store_hash": spec.get("store_hash", ""),
        "seg.train_volumes": spec.get("train_volumes", ""),
        "seg.spec_format": spec.get("format"),
        **{f"model.{k}": v for k, v in (spec.get("model") or {}).items()},
        **{f"preprocessing.{k}": pre.get(k) for k in ("slice_axis", "target_spacing", "modality", "intensity")},
    }
    encoder = (spec.get("encoder") or {}).get("encoder")
    if isinstance(encoder, dict):  # a registered encoder: name, version, pretrain run
        tags.update({f"lineage.{k}": v for k, v in encoder.items()})
    elif encoder:
        tags["lineage.encoder"] = encoder  # "random", or the sha256 of an encoder file
    return {k: _tag_str("" if v is None else v) for k, v in tags.items()}


# ----------------------------------------------------------------------------------------------
# registering


class SegmentationVersion(VersionKind):
    """A segmentation model version: ``model.pt`` and ``model_spec.json`` (copied under these names,
    whatever the files are called), with a signature (slices in, class ids out) and tags ``seg.*``,
    ``model.*``, ``preprocessing.*``, ``lineage.*`` from the spec. Nothing is kept during an outage:
    the files stay where they are."""

    label = "segmentation model"
    tag_prefix = "seg"
    name_in_run = SEG_MODEL_NAME_IN_RUN
    model_type = "pcl-segmentation"
    weights_artifact = "model"
    code_file = "pcl_segmentation_model.py"
    pyfunc_code = _PYFUNC_CODE
    temp_prefix = "pcl-seg-"
    log_label = "segmentation model "

    def __init__(self, folder_or_files: str | Path | tuple | list):
        self.weights, self.spec = _local_model(folder_or_files)
        self.spec_path = local_segmentation_files(folder_or_files)[1]
        # a state_dict of tensors, or a UserError before anything is logged
        self.tensors = len(_load_weights(self.weights, str(self.weights)))

    def stage(self, folder: Path) -> dict[str, Path]:
        weights, spec = folder / SEG_WEIGHTS_FILE, folder / SEG_SPEC_FILE
        shutil.copyfile(self.weights, weights)
        shutil.copyfile(self.spec_path, spec)
        return {"model": weights, "model_spec": spec}

    def version_tags(self) -> dict:
        return _spec_tags(self.spec)

    def signature(self):
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        channels = int((self.spec.get("model") or {}).get("in_channels", 1))
        return ModelSignature(  # preprocessed slices in, class ids out
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1))]),
            outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]))

    def describe(self) -> str:
        return f"segmentation model {self.weights.parent}"

    def register_later(self, name: str, kept: Path | None, tracker) -> str:
        return (f"Register it later with pcl_hpc.tracking.register_segmentation_model"
                f"({str(self.weights.parent)!r}, {name!r}).")


def register_segmentation_model(
    folder_or_files: str | Path | tuple | list,
    name: str,
    alias: str = "candidate",
    tags: dict | None = None,
    run_id: str | None = None,
) -> str | None:
    """Register a fine-tuned model (``model.pt`` + ``model_spec.json``) as a new version of ``name``.

    ``folder_or_files``: the fine-tuning folder, its ``model.pt`` (the spec beside it), or a
    (weights, spec) pair. Both files become the version's artifacts ``artifacts/model.pt`` and
    ``artifacts/model_spec.json``; ``alias`` is pointed at the new version; returns the version.
    Version tags: ``seg.sha256``, ``seg.run_id``, ``seg.*`` / ``model.*`` / ``preprocessing.*`` /
    ``lineage.*`` from the spec, then ``tags`` (the caller's lineage: encoder, split hash, test Dice).

    Logged within ``run_id``, else the running Tracker's run, else MLflow's active run, else a new
    run (as :func:`pcl_hpc.tracking.register_encoder`; both go through
    :func:`pcl_hpc.tracking.versions.register_version`). A bad alias raises ValueError, a missing or
    foreign spec UserError, a request the server refuses MlflowException. If the server is
    unreachable it warns (``RuntimeWarning``) and returns None: training never fails for it (the
    files stay where they are; register them later with this function).
    """
    check_alias(alias)  # before the files are looked at
    return register_version(SegmentationVersion(folder_or_files), name, alias, tags, run_id)


# ----------------------------------------------------------------------------------------------
# loading back


def open_segmentation_model(source: str | Path, tracking_uri: str | None = None) -> SegmentationModel:
    """(state_dict, spec, lineage) of ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
    a fine-tuning folder or a ``model.pt`` path with ``model_spec.json`` beside it.

    The weights are read with ``torch.load(..., weights_only=True)`` and the spec as JSON: nothing
    is unpickled. ``lineage`` says where the model came from (registry name, version, run and
    version tags; or the weights' sha256) for the prediction sidecars. Registry sources are looked
    up at ``tracking_uri`` (default: the process's tracking/registry URI)."""
    text = str(source)
    if not text:
        raise UserError("no model given: pass a fine-tuning folder, a model.pt or models:/<name>@<alias>")
    if not text.startswith("models:/"):
        weights, spec = _local_model(source)
        state = _load_weights(weights, text)
        return SegmentationModel(state, spec, {"source": "file", "file": weights.name, "sha256": sha256_file(weights)})
    import mlflow

    _use_uri(tracking_uri)
    try:
        _parse_models_uri(text)
    except UserError:
        raise UserError(f"{text!r} is not a registered model reference; use models:/<name>@<alias> "
                        "(e.g. models:/pcl-encoder-seg@champion) or models:/<name>/<version>") from None
    name, mv = _resolve_version(text)
    with tempfile.TemporaryDirectory(prefix="pcl-seg-") as tmp:
        local = {}
        for fname in (SEG_SPEC_FILE, SEG_WEIGHTS_FILE):
            try:
                local[fname] = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{name}/{mv.version}/artifacts/{fname}", dst_path=tmp))
            except Exception as err:  # noqa: BLE001
                raise UserError(f"{text}: version {mv.version} of {name!r} has no artifacts/{fname} (was it "
                                "registered with pcl_hpc.tracking.register_segmentation_model?): "
                                f"{_short(err, 200)}") from None
        spec = read_spec(local[SEG_SPEC_FILE], text)
        state = _load_weights(local[SEG_WEIGHTS_FILE], text)
        digest = sha256_file(local[SEG_WEIGHTS_FILE])
    lineage = {"source": "registry", "name": name, "version": str(mv.version), "run_id": mv.run_id or "",
               "sha256": digest, "tags": dict(mv.tags or {})}
    return SegmentationModel(state, spec, lineage)


def load_segmentation_model(source: str | Path, tracking_uri: str | None = None
                            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, spec)`` of a registry version or local model; see :func:`open_segmentation_model`."""
    model = open_segmentation_model(source, tracking_uri)
    return model.state, model.spec

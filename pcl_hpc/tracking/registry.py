"""The encoder model registry: :class:`EncoderVersion` (how an encoder version is packed; registered
by :func:`pcl_hpc.tracking.versions.register_version`), :func:`register_encoder`,
:func:`load_encoder_state`, :func:`encoder_lineage`, :func:`promote_alias` and the ``models:/`` lookups."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pcl_hpc.atomic import save_torch
from pcl_hpc.config import ModelConfig
from pcl_hpc.errors import UserError
from pcl_hpc.tracking._common import _DATA_ERROR_CODES, _short
from pcl_hpc.tracking.tracker import Tracker, use_tracking_uri
from pcl_hpc.tracking.versions import VersionKind, check_alias, register_version

log = logging.getLogger(__package__)

ENCODER_FILE = "encoder.pt"
MODEL_CONFIG_FILE = "model_config.json"
MODEL_NAME_IN_RUN = "encoder"  # the logged model's name inside its run


# ----------------------------------------------------------------------------------------------
# the registry

# Logged as the model's code ("models from code"), so the registry holds no pickled objects.
# mlflow.pyfunc.load_model(...) gives a model whose predict lists the tensors; training code should
# use load_encoder_state instead.
_PYFUNC_CODE = '''\
"""pcl-hpc encoder: a plain state_dict (artifacts/encoder.pt) plus model_config.json."""
import mlflow
import torch
from mlflow.pyfunc import PythonModel


class PclEncoder(PythonModel):
    def load_context(self, context):
        self.state = torch.load(context.artifacts["encoder"], map_location="cpu", weights_only=True)

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return [f"{key}: {tuple(value.shape)}" for key, value in self.state.items()]


mlflow.models.set_model(PclEncoder())
'''


def _plain_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A CPU copy of a state_dict, without a DDP/compile ``module.`` / ``_orig_mod.`` prefix."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"encoder_state[{key!r}] is {type(value).__name__}, not a tensor; pass model.state_dict()")
        out[str(key)] = value.detach().cpu().clone()
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


class EncoderVersion(VersionKind):
    """An encoder version: ``encoder.pt`` (the tensors) and ``model_config.json``; tags ``encoder.*``
    and ``model.*``. During an outage a copy of the weights is kept for :func:`replay_fallback`."""

    label = "encoder"
    tag_prefix = "encoder"
    name_in_run = MODEL_NAME_IN_RUN
    model_type = "pcl-encoder"
    weights_artifact = "encoder"
    code_file = "pcl_encoder_model.py"
    pyfunc_code = _PYFUNC_CODE
    temp_prefix = "pcl-encoder-"

    def __init__(self, state: dict[str, torch.Tensor], model_cfg: ModelConfig):
        self.state, self.model_cfg, self.tensors = state, model_cfg, len(state)

    @classmethod
    def from_kept(cls, record: dict) -> "EncoderVersion":
        """The version a fallback file's ``register`` line kept (its weights file and model settings)."""
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        model = ModelConfig(**{k: v for k, v in (record.get("model") or {}).items() if k in fields})
        return cls(_load_weights(Path(record["path"]), record["path"]), model)

    def stage(self, folder: Path) -> dict[str, Path]:
        weights, config = folder / ENCODER_FILE, folder / MODEL_CONFIG_FILE
        torch.save(self.state, weights)
        config.write_text(json.dumps(dataclasses.asdict(self.model_cfg), indent=2))
        return {"encoder": weights, "model_config": config}

    def version_tags(self) -> dict:
        return {f"model.{k}": v for k, v in dataclasses.asdict(self.model_cfg).items()}

    def keep(self, path: Path) -> dict:
        save_torch(self.state, path)
        return {"model": dataclasses.asdict(self.model_cfg)}

    def register_later(self, name: str, kept: Path | None, tracker: Tracker | None) -> str:
        if kept:
            return (f"Weights kept in {kept}; send them later with pcl_hpc.tracking.replay_fallback"
                    f"({str(tracker.fallback_path)!r}, <tracking uri>).")
        return "Register the saved encoder.pt later with pcl_hpc.tracking.register_encoder."


def register_encoder(
    encoder_state: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    name: str,
    alias: str,
    tags: dict | None = None,
    run_id: str | None = None,
) -> str | None:
    """Register ``encoder_state`` as a new version of model ``name``, point ``alias`` at it; returns the version.

    Logged within ``run_id``, else the run of the running :class:`Tracker` of this process, else
    MLflow's active run, else a new run (experiment: ``$MLFLOW_EXPERIMENT_NAME`` or "pcl-hpc"),
    using the process's tracking/registry URI (``Tracker.start`` sets it). ``tags`` become
    model-version tags, alongside ``encoder.sha256``, ``encoder.tensors``, ``encoder.run_id`` and
    ``model.*``.

    A bad alias raises ValueError and a request the server refuses (e.g. an invalid name) raises
    MlflowException. If the server is unreachable it warns (``RuntimeWarning``) and returns None;
    when a Tracker is running, a copy of the weights goes to ``<output_dir>/unregistered/`` and a
    ``register`` line to its fallback file, so :func:`replay_fallback` registers it later.
    (:func:`pcl_hpc.tracking.versions.register_version` does it.)
    """
    check_alias(alias)  # before the weights are looked at
    return register_version(EncoderVersion(_plain_state(encoder_state), model_cfg), name, alias, tags, run_id)


# ----------------------------------------------------------------------------------------------
# loading back


def _parse_models_uri(source: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    rest = source[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise UserError(
        f"{source!r} is not a registered encoder reference; use models:/<name>@<alias> "
        f"(e.g. models:/pcl-encoder@candidate) or models:/<name>/<version>"
    )


def _list_hint(client, name: str) -> str:
    """'versions: 1, 2; aliases: candidate -> 2' for the error messages (best effort)."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
        nums = sorted((int(v.version) for v in versions))
        aliases = client.get_registered_model(name).aliases or {}
        alias_text = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
        return f"versions there: {', '.join(map(str, nums)) or 'none'}; aliases: {alias_text}"
    except Exception:  # noqa: BLE001
        return ""


def _resolve_version(source: str):
    """(name, ModelVersion) for a models:/ URI, or a UserError that names the source and what exists."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version = _parse_models_uri(source)
    client = MlflowClient()
    uri = mlflow.get_registry_uri()
    try:
        if alias is not None:
            return name, client.get_model_version_by_alias(name, alias)
        return name, client.get_model_version(name, version)
    except MlflowException:
        pass
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(
                f"{source}: no registered model {name!r} at {uri}; register one by pretraining, "
                f"or point tracking.uri / MLFLOW_TRACKING_URI at the store that has it"
            ) from None
        raise UserError(f"{source}: cannot query the model registry at {uri}: {_short(err)}") from None
    what = f"alias {alias!r}" if alias is not None else f"version {version}"
    hint = _list_hint(client, name)
    raise UserError(
        f"{source}: no registered model {name!r} with {what} at {uri}{' (' + hint + ')' if hint else ''}; "
        f"list versions with MlflowClient({uri!r}).search_model_versions(\"name='{name}'\")"
    )


def _load_weights(path: Path, source: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors
        raise UserError(
            f"{source}: {path} is not a plain tensor state_dict that loads with weights_only=True "
            f"({_short(err, 200)}); save it with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{source}: {path} holds a {type(state).__name__}, not a state_dict of tensors")
    return _plain_state(state)


def local_encoder_file(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        for candidate in (path / ENCODER_FILE, path / "artifacts" / ENCODER_FILE):
            if candidate.is_file():
                return candidate
        raise UserError(f"{source}: folder has no {ENCODER_FILE}; pass the encoder.pt file or models:/<name>@<alias>")
    if not path.is_file():
        raise UserError(
            f"encoder {source!r} not found: give a path to an existing encoder.pt, "
            f"models:/<name>@<alias> or models:/<name>/<version>"
        )
    return path


def _use_uri(tracking_uri: str | None) -> None:
    if tracking_uri:
        use_tracking_uri(tracking_uri)


def load_encoder_state(source: str, tracking_uri: str | None = None) -> dict[str, torch.Tensor]:
    """The encoder state_dict from ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a path.

    Registry sources are looked up at ``tracking_uri`` (default: the current tracking/registry URI).
    The weights are always read with ``torch.load(..., weights_only=True)``: no code is ever unpickled.
    """
    if not source:
        raise UserError("no encoder given: pass a path to encoder.pt or models:/<name>@<alias>")
    if not source.startswith("models:/"):
        return _load_weights(local_encoder_file(source), source)
    import mlflow

    _use_uri(tracking_uri)

    name, mv = _resolve_version(source)
    with tempfile.TemporaryDirectory(prefix="pcl-encoder-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{mv.version}/artifacts/{ENCODER_FILE}", dst_path=tmp
            )
        except Exception as err:  # noqa: BLE001
            raise UserError(
                f"{source}: version {mv.version} of {name!r} has no artifacts/{ENCODER_FILE} "
                f"(was it registered with pcl_hpc.tracking.register_encoder?): {_short(err, 200)}"
            ) from None
        return _load_weights(Path(local), source)


def encoder_lineage(source: str, tracking_uri: str | None = None) -> dict:
    """Where an encoder came from, for the finetune run's params/tags.

    ``models:/`` URIs: ``{"encoder_name", "encoder_version", "encoder_run_id"}``; a path:
    ``{"encoder_path": <absolute path>}``; ``""`` (random init): ``{}``.
    """
    if not source:
        return {}
    if source.startswith("models:/"):
        _use_uri(tracking_uri)
        name, mv = _resolve_version(source)
        return {"encoder_name": name, "encoder_version": str(mv.version), "encoder_run_id": mv.run_id or ""}
    return {"encoder_path": str(Path(source).expanduser().absolute())}


def encoder_version_tags(source: str, tracking_uri: str | None = None) -> dict[str, str]:
    """The model-version tags of a ``models:/`` encoder (what pretraining recorded); ``{}`` for a path."""
    if not source.startswith("models:/"):
        return {}
    _use_uri(tracking_uri)
    _, mv = _resolve_version(source)
    return dict(mv.tags or {})


# ----------------------------------------------------------------------------------------------
# aliases


def promote_alias(name: str, version_or_alias_source: str | int, alias: str = "champion",
                  tracking_uri: str | None = None) -> str:
    """Point ``alias`` (default ``champion``) of registered model ``name`` at a version; returns the version.

    ``version_or_alias_source``: a version number (``3`` / ``"3"``), an alias of ``name`` whose
    version is promoted (``"candidate"``), or a ``models:/<name>@<alias>`` / ``models:/<name>/<v>``
    URI of the same model. The move is recorded on the version as the tag ``alias.<alias>.set_at``.
    Uses ``tracking_uri`` if given, else the process's registry URI.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    check_alias(alias)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri) if tracking_uri else MlflowClient()
    source = str(version_or_alias_source)
    if source.startswith("models:/"):
        source_name, source_alias, source_version = _parse_models_uri(source)
        if source_name != name:
            raise UserError(f"promote_alias: {source} is not a version of {name!r}")
        source = source_version or source_alias or ""
    try:
        if source.isdigit():
            version = str(client.get_model_version(name, source).version)
        else:
            version = str(client.get_model_version_by_alias(name, source).version)
    except MlflowException as err:
        if getattr(err, "error_code", "") in _DATA_ERROR_CODES:
            what = f"version {source}" if source.isdigit() else f"alias {source!r}"
            hint = _list_hint(client, name)
            raise UserError(f"promote_alias: model {name!r} has no {what}{' (' + hint + ')' if hint else ''}") from None
        raise
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, f"alias.{alias}.set_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    log.info("alias %s of %s -> version %s", alias, name, version)
    return version

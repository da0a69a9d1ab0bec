"""The encoder model registry: :func:`register_encoder`, :func:`load_encoder_state`, :func:`encoder_lineage`,
:func:`promote_alias` and the alias checks."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import pcl_hpc.tracking.tracker as _tracker_module
from pcl_hpc.config import ModelConfig
from pcl_hpc.errors import UserError
from pcl_hpc.tracking._common import _DATA_ERROR_CODES, _ensure_experiment, _is_data_error, _short, _tag_str

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

_RESERVED_ALIAS = re.compile(r"^(latest|[vV]\d+)$", re.IGNORECASE)
_ALIAS_CHARS = re.compile(r"^[\w\-]+$")


def _check_alias(alias: str) -> None:
    if not alias:
        raise ValueError("alias must not be empty (e.g. 'candidate')")
    if alias.lower() == "latest":
        raise ValueError(
            "alias 'latest' is reserved by MLflow (models:/<name>@latest always means the newest "
            "version); choose another alias, e.g. 'candidate' or 'champion'"
        )
    if _RESERVED_ALIAS.match(alias):
        raise ValueError(f"alias {alias!r} is reserved by MLflow for version numbers; choose another alias")
    if not _ALIAS_CHARS.match(alias):
        raise ValueError(f"alias {alias!r}: only letters, digits, '_' and '-' are allowed")


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
    """
    _check_alias(alias)  # before anything is logged
    state = _plain_state(encoder_state)
    _latest_tracker = _tracker_module._latest_tracker  # set by Tracker.start
    tracker = _latest_tracker if (_latest_tracker is not None and _latest_tracker.enabled) else None
    if tracker is not None and (tracker._ended or (run_id is not None and tracker.run_id not in (None, run_id))):
        tracker = None
    if run_id is None and tracker is not None:
        if tracker.run_id is None:
            tracker._reconnect(force=True)  # the server may be back: create the Tracker's run first
        run_id = tracker.run_id
    try:
        if tracker is not None and run_id is None:
            raise ConnectionError(f"the run of this process was never created at {tracker.uri}")
        return _register(state, model_cfg, name, alias, tags, run_id)
    except Exception as err:  # noqa: BLE001 - decided below
        if _is_data_error(err):
            raise
        kept = tracker._keep_unregistered(state, model_cfg, name, alias, tags) if tracker is not None else None
        message = (
            f"could not register the encoder as {name!r} at {_registry_uri()}: {_short(err)}. "
            + (f"Weights kept in {kept}; send them later with pcl_hpc.tracking.replay_fallback"
               f"({str(tracker.fallback_path)!r}, <tracking uri>)." if kept else
               "Register the saved encoder.pt later with pcl_hpc.tracking.register_encoder.")
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        log.warning("tracking: %s", message)
        return None


def _registry_uri() -> str:
    try:
        import mlflow

        return mlflow.get_registry_uri()
    except Exception:  # noqa: BLE001
        return "?"


@contextlib.contextmanager
def registration_run(client, run_id: str | None, name: str):
    """The run a model version is logged in: ``run_id``, else MLflow's active run, else a new run
    ``register-<name>`` (experiment ``$MLFLOW_EXPERIMENT_NAME`` or pcl-hpc) ended FINISHED or FAILED."""
    import mlflow

    own_run = None
    if run_id is None:
        active = mlflow.active_run()
        if active is not None:
            run_id = active.info.run_id
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "pcl-hpc"
            exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or _ensure_experiment(
                client, experiment, mlflow.get_tracking_uri()
            )
            own_run = client.create_run(exp_id, run_name=f"register-{name}")
            run_id = own_run.info.run_id
    try:
        yield run_id
    except BaseException:
        if own_run is not None:
            try:
                client.set_terminated(own_run.info.run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the server may be gone; report the first error
                pass
        raise
    if own_run is not None:
        client.set_terminated(own_run.info.run_id, status="FINISHED")


def _register(
    state: dict[str, torch.Tensor], model_cfg: ModelConfig, name: str, alias: str, tags: dict | None, run_id: str | None
) -> str:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model

    client = MlflowClient()
    with registration_run(client, run_id, name) as run_id:
        with tempfile.TemporaryDirectory(prefix="pcl-encoder-") as tmp:
            weights = Path(tmp) / ENCODER_FILE
            torch.save(state, weights)
            config_file = Path(tmp) / MODEL_CONFIG_FILE
            config_file.write_text(json.dumps(dataclasses.asdict(model_cfg), indent=2))
            code = Path(tmp) / "pcl_encoder_model.py"
            code.write_text(_PYFUNC_CODE)
            digest = hashlib.sha256(weights.read_bytes()).hexdigest()
            # Create the logged model in the run's experiment: Model.log alone would put it in the
            # fluent "current" experiment (often Default, with artifacts in ./mlruns).
            logged = mlflow.initialize_logged_model(
                name=MODEL_NAME_IN_RUN,
                source_run_id=run_id,
                experiment_id=client.get_run(run_id).info.experiment_id,
                model_type="pcl-encoder",
            )
            info = Model.log(
                artifact_path=None,
                name=MODEL_NAME_IN_RUN,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                python_model=str(code),
                artifacts={"encoder": str(weights), "model_config": str(config_file)},
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
                registered_model_name=name,
                flavor_name="pyfunc.ModelFromCode",
                model_id=logged.model_id,
            )
        version = str(info.registered_model_version)
        client.set_registered_model_alias(name, alias, version)
        version_tags = {
            "encoder.sha256": digest,
            "encoder.tensors": str(len(state)),
            "encoder.run_id": run_id,
            **{f"model.{k}": v for k, v in dataclasses.asdict(model_cfg).items()},
            **(tags or {}),
        }
        for key, value in version_tags.items():
            client.set_model_version_tag(name, version, str(key), _tag_str(value))
    log.info("registered %s version %s (alias %s) from run %s", name, version, alias, run_id)
    return version


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
        from pcl_hpc.tracking.tracker import use_tracking_uri

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

    _check_alias(alias)
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

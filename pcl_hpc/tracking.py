"""MLflow experiment tracking and the encoder model registry.

* :func:`resolve_tracking_uri` picks where runs go: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``,
  else a sqlite file next to the output folder (``<output_dir>/../mlflow.db``), so the pretrain and
  finetune runs of one demo share a database and its registry without any server.
* :class:`Tracker` logs one run from rank 0. It never raises into the training loop once the run has
  started: if the tracking server goes away it warns once per outage, appends what could not be
  sent to ``<output_dir>/metrics_fallback.jsonl``, keeps it in memory, retries every
  ``retry_interval_s`` seconds and sends the backlog when the server is back.
* :func:`register_encoder` stores an encoder ``state_dict`` as a registered MLflow model version
  (a "models from code" pyfunc: no pickled Python objects at all) whose artifacts are
  ``encoder.pt`` (``torch.save`` of the tensors) and ``model_config.json``.
* :func:`load_encoder_state` reads ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a
  path to ``encoder.pt``, always with ``torch.load(..., weights_only=True)``.

Medical data hygiene: lists of volume ids in the params (any key ending in ``volumes``, e.g.
``pretrain.volumes``, ``finetune.test_volumes``) are logged as a count and a hash, never as ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pcl_hpc.config import Config, ModelConfig
from pcl_hpc.errors import UserError

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit for a param value
MAX_TAG_CHARS = 8000  # MLflow's limit for a tag value
PARAMS_PER_BATCH = 100  # MLflow's limit of params (and of tags) per log_batch
METRICS_PER_BATCH = 1000  # MLflow's limit of metrics per log_batch
MAX_PENDING_METRICS = 100_000  # metrics kept in memory while offline (all of them also go to the JSONL)
FALLBACK_FILE = "metrics_fallback.jsonl"
ENCODER_FILE = "encoder.pt"
MODEL_CONFIG_FILE = "model_config.json"
MODEL_NAME_IN_RUN = "encoder"  # the logged model's name inside its run

# Without these, one MLflow HTTP call to a dead server retries for ~4 minutes (7 retries with
# exponential backoff, 120 s timeout). The Tracker sets these defaults (only if unset) so an outage
# costs seconds; export the variables to choose other values.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

# Errors that mean "this request is bad", not "the server is unreachable".
_DATA_ERROR_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


# ----------------------------------------------------------------------------------------------
# where runs go


def resolve_tracking_uri(cfg: Config) -> str:
    """``cfg.tracking.uri``; else ``$MLFLOW_TRACKING_URI``; else ``sqlite:///<abs output_dir/..>/mlflow.db``."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    db = (Path(cfg.output_dir).expanduser().absolute().parent / "mlflow.db").resolve()
    return f"sqlite:///{db}"


def _local_sqlite_dir(uri: str) -> Path | None:
    """The folder of a local sqlite tracking db (artifacts of new experiments go next to it)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).absolute().parent


def _ensure_experiment(client, name: str, uri: str) -> str:
    """The id of experiment ``name`` (created, or restored if deleted)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        folder = _local_sqlite_dir(uri)
        # With a local sqlite db MLflow would put artifacts in ./mlruns of whatever the current
        # directory is; keep them next to the db instead.
        location = (folder / "mlartifacts").as_uri() if folder else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as err:  # another process created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise err
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def use_tracking_uri(uri: str) -> None:
    """Make ``uri`` the process's tracking URI; the registry follows it.

    MLflow's registry URI defaults to the tracking URI. It is deliberately not pinned with
    ``mlflow.set_registry_uri`` (which is sticky: a later ``mlflow.set_tracking_uri`` alone would
    leave the registry on the old store). An explicit ``$MLFLOW_REGISTRY_URI`` still wins.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)


# ----------------------------------------------------------------------------------------------
# params


def _hash_ids(values) -> str:
    items = [str(v) for v in values]
    digest = hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:12]
    return f"<{len(items)} ids, sha256 {digest}>"


def _redact(key: str, value: Any) -> Any:
    """Volume/patient id lists become a count and a hash (comparable between runs, not readable)."""
    leaf = key.rsplit(".", 1)[-1].lower()
    if (leaf.endswith("volumes") or leaf.endswith("patients") or leaf.endswith("_ids")) and isinstance(
        value, (list, tuple, set)
    ):
        return _hash_ids(value)
    return value


def _param_str(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 15] + "...[truncated]"


def _tag_str(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_TAG_CHARS else text[: MAX_TAG_CHARS - 15] + "...[truncated]"


def _prepare_params(params: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): _param_str(_redact(str(k), v)) for k, v in params.items()}


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _is_data_error(err: BaseException) -> bool:
    return getattr(err, "error_code", None) in _DATA_ERROR_CODES


# ----------------------------------------------------------------------------------------------
# the run


class Tracker:
    """MLflow on rank 0 only; with enabled=False every method is a cheap no-op (no run is created).

    ``start`` sets the tracking URI, which the registry follows (process-wide, so
    :func:`register_encoder` and :func:`load_encoder_state` use the same store), the experiment ``cfg.tracking.experiment``, and
    creates a run (or resumes ``run_id``). The run is not made MLflow's "active run"; pass
    ``tracker.run_id`` to :func:`register_encoder`.

    No method raises because the server is unreachable: the first failure warns (``RuntimeWarning``
    and a log line), what was not sent goes to ``<output_dir>/metrics_fallback.jsonl`` (one JSON
    object a line, ``{"kind": "metrics", "step": .., "metrics": {..}, ...}``) and stays in memory;
    every ``retry_interval_s`` seconds the next call tries again and, on success, sends the backlog
    (a ``{"kind": "flushed"}`` line then marks what reached the server).
    """

    retry_interval_s: float = 120.0

    def __init__(self, cfg: Config, enabled: bool):
        self.cfg = cfg
        self.enabled = bool(enabled)
        self.uri: str | None = None
        self.fallback_path = Path(cfg.output_dir) / FALLBACK_FILE
        self._client = None
        self._run_id: str | None = None
        self._start_args: dict[str, Any] | None = None  # kept to create the run later if start failed
        self._offline_since: float | None = None  # monotonic time of the last failure
        self._warned = False  # warned during the current outage
        self._pending_metrics: list = []
        self._pending_tags: dict[str, str] = {}
        self._pending_artifacts: list[tuple[str, str | None]] = []
        self._pending_end: str | None = None
        self._fallback_broken = False

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def offline(self) -> bool:
        return self._offline_since is not None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, run_name: str, params: dict, tags: dict | None = None, run_id: str | None = None) -> str | None:
        """Create (or resume ``run_id``) and log ``params``; returns the run id (None when disabled or unreachable)."""
        if not self.enabled:
            return None
        from mlflow import MlflowClient

        for key, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.uri = resolve_tracking_uri(self.cfg)
        use_tracking_uri(self.uri)
        self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._start_args = {
            "run_name": run_name,
            "params": _prepare_params(params or {}),
            "tags": {str(k): _tag_str(v) for k, v in (tags or {}).items()},
            "run_id": run_id,
        }
        try:
            self._open_run()
        except Exception as err:  # noqa: BLE001 - unreachable server must not stop training
            self._failed("start the run", err)
            self._fallback({"kind": "start", **self._start_args})
            return None
        return self._run_id

    def _open_run(self) -> None:
        from mlflow.entities import Param, RunTag

        args = self._start_args
        client = self._client
        params: dict[str, str] = dict(args["params"])
        tags: dict[str, str] = dict(args["tags"])
        if args["run_id"]:
            run = client.get_run(args["run_id"])
            existing = run.data.params
            for key in list(params):
                if key in existing:
                    if existing[key] != params[key]:
                        # MLflow params are immutable; keep the new value visible as a tag.
                        tags[f"changed_param.{key}"] = _tag_str(params[key])
                    del params[key]
            client.update_run(run.info.run_id, status="RUNNING")
            run_id = run.info.run_id
        else:
            exp_id = _ensure_experiment(client, self.cfg.tracking.experiment, self.uri)
            run = client.create_run(exp_id, run_name=args["run_name"] or None, tags=tags)
            run_id = run.info.run_id
            tags = {}
        self._run_id = run_id
        for batch in _chunks([Param(k, v) for k, v in params.items()], PARAMS_PER_BATCH):
            client.log_batch(run_id, params=batch, synchronous=True)
        for batch in _chunks([RunTag(k, v) for k, v in tags.items()], PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=batch, synchronous=True)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED / FAILED / KILLED; sends any backlog first. Never raises for an outage."""
        if not self.enabled or self._client is None:
            return
        if self._run_id is None or self.offline:
            self._pending_end = status
            if not self._reconnect(force=True):
                self._fallback({"kind": "end", "status": status})
                return
        try:
            self._client.set_terminated(self._run_id, status=status)
            self._pending_end = None
        except Exception as err:  # noqa: BLE001
            self._failed("end the run", err)
            self._fallback({"kind": "end", "status": status})

    # -- logging -------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or self._client is None:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        values: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                values[str(key)] = float(value)
            except (TypeError, ValueError):
                log.warning("tracking: metric %r=%r is not a number; skipped", key, value)
        if not values:
            return
        entries = [Metric(k, v, stamp, int(step)) for k, v in values.items()]
        if self._usable():
            try:
                for batch in _chunks(entries, METRICS_PER_BATCH):
                    self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
                return
            except Exception as err:  # noqa: BLE001
                self._failed("log metrics", err)
        self._keep_metrics(entries)
        self._fallback(
            {"kind": "metrics", "step": int(step), "timestamp": stamp,
             "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        )

    def set_tags(self, tags: dict) -> None:
        if not self.enabled or self._client is None or not tags:
            return
        from mlflow.entities import RunTag

        clean = {str(k): _tag_str(v) for k, v in tags.items()}
        if self._usable():
            try:
                for batch in _chunks([RunTag(k, v) for k, v in clean.items()], PARAMS_PER_BATCH):
                    self._client.log_batch(self._run_id, tags=batch, synchronous=True)
                return
            except Exception as err:  # noqa: BLE001
                self._failed("set tags", err)
        self._pending_tags.update(clean)
        self._fallback({"kind": "tags", "tags": clean})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled or self._client is None:
            return
        path = str(path)
        if not os.path.exists(path):
            log.warning("tracking: artifact %s does not exist; not logged", path)
            return
        if self._usable():
            try:
                self._send_artifact(path, artifact_path)
                return
            except Exception as err:  # noqa: BLE001
                self._failed("log an artifact", err)
        self._pending_artifacts.append((path, artifact_path))
        self._fallback({"kind": "artifact", "path": os.path.abspath(path), "artifact_path": artifact_path})

    def _send_artifact(self, path: str, artifact_path: str | None) -> None:
        if os.path.isdir(path):
            self._client.log_artifacts(self._run_id, path, artifact_path)
        else:
            self._client.log_artifact(self._run_id, path, artifact_path)

    # -- outage handling -----------------------------------------------------------------------

    def _usable(self) -> bool:
        """True when the run exists and the server is believed reachable (reconnecting if due)."""
        if self._run_id is not None and not self.offline:
            return True
        return self._reconnect(force=False)

    def _reconnect(self, force: bool) -> bool:
        if self._start_args is None:
            return False
        if not force and self._offline_since is not None:
            if time.monotonic() - self._offline_since < self.retry_interval_s:
                return False
        try:
            if self._run_id is None:
                self._open_run()
            self._flush_pending()
        except Exception as err:  # noqa: BLE001
            self._failed("reconnect", err)
            return False
        if self._offline_since is not None:
            log.warning("tracking: reconnected to %s; backlog sent to run %s", self.uri, self._run_id)
        self._offline_since = None
        self._warned = False
        return True

    def _flush_pending(self) -> None:
        from mlflow.entities import RunTag

        sent = 0
        while self._pending_metrics:
            batch = self._pending_metrics[:METRICS_PER_BATCH]
            self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
            del self._pending_metrics[: len(batch)]
            sent += len(batch)
        if self._pending_tags:
            items = list(self._pending_tags.items())
            for batch in _chunks(items, PARAMS_PER_BATCH):
                self._client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in batch], synchronous=True)
            self._pending_tags.clear()
        while self._pending_artifacts:
            self._send_artifact(*self._pending_artifacts[0])
            self._pending_artifacts.pop(0)
        if sent:
            self._fallback({"kind": "flushed", "metrics": sent, "run_id": self._run_id})

    def _keep_metrics(self, entries: list) -> None:
        self._pending_metrics.extend(entries)
        overflow = len(self._pending_metrics) - MAX_PENDING_METRICS
        if overflow > 0:  # the JSONL still holds them
            del self._pending_metrics[:overflow]

    def _failed(self, what: str, err: BaseException) -> None:
        if _is_data_error(err) and self._run_id is not None and not self.offline:
            # The server answered: the request itself was bad (e.g. an invalid metric name).
            log.warning("tracking: could not %s: %s", what, _short(err))
            return
        self._offline_since = time.monotonic()
        if not self._warned:
            self._warned = True
            message = (
                f"MLflow tracking at {self.uri} failed ({what}): {_short(err)}. Training continues; "
                f"metrics go to {self.fallback_path} and are retried every {self.retry_interval_s:.0f} s."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            log.warning("tracking: %s", message)

    def _fallback(self, record: dict) -> None:
        if self._fallback_broken:
            return
        record = {"time": time.time(), "run_id": self._run_id, **record}
        try:
            self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.fallback_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, default=str) + "\n")
        except OSError as err:
            self._fallback_broken = True
            log.warning("tracking: cannot write %s (%s); unsent metrics are kept in memory only", self.fallback_path, err)


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."


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
) -> str:
    """Register ``encoder_state`` as a new version of model ``name``, point ``alias`` at it; returns the version.

    Logged within ``run_id``, else MLflow's active run, else a new run (experiment: the current one,
    or "pcl-hpc"), using the process's tracking/registry URI (``Tracker.start`` sets it). ``tags``
    become model-version tags, alongside ``encoder.sha256``, ``encoder.tensors`` and ``model.*``.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model

    _check_alias(alias)  # before anything is logged
    state = _plain_state(encoder_state)
    client = MlflowClient()
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
    except BaseException:
        if own_run is not None:
            client.set_terminated(own_run.info.run_id, status="FAILED")
        raise
    if own_run is not None:
        client.set_terminated(own_run.info.run_id, status="FINISHED")
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


def _local_encoder_file(source: str) -> Path:
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


def load_encoder_state(source: str) -> dict[str, torch.Tensor]:
    """The encoder state_dict from ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a path.

    Registry sources are downloaded with the current tracking/registry URI. The weights are always
    read with ``torch.load(..., weights_only=True)``: no code is ever unpickled.
    """
    if not source:
        raise UserError("no encoder given: pass a path to encoder.pt or models:/<name>@<alias>")
    if not source.startswith("models:/"):
        return _load_weights(_local_encoder_file(source), source)
    import mlflow

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


def encoder_lineage(source: str) -> dict:
    """Where an encoder came from, for the finetune run's params/tags.

    ``models:/`` URIs: ``{"encoder_name", "encoder_version", "encoder_run_id"}``; a path:
    ``{"encoder_path": <absolute path>}``; ``""`` (random init): ``{}``.
    """
    if not source:
        return {}
    if source.startswith("models:/"):
        name, mv = _resolve_version(source)
        return {"encoder_name": name, "encoder_version": str(mv.version), "encoder_run_id": mv.run_id or ""}
    return {"encoder_path": str(Path(source).expanduser().absolute())}

"""Constants and helpers shared by the tracking modules: MLflow limits, params/tags, experiments."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_PARAM_CHARS = 6000  # MLflow's limit for a param value
MAX_TAG_CHARS = 8000  # MLflow's limit for a tag value
PARAMS_PER_BATCH = 100  # MLflow's limit of params (and of tags) per log_batch
METRICS_PER_BATCH = 1000  # MLflow's limit of metrics per log_batch
FALLBACK_FILE = "metrics_fallback.jsonl"
UNREGISTERED_DIR = "unregistered"  # encoder copies kept for replay_fallback when registration failed

# Errors that mean "this request is bad", not "the server is unreachable".
_DATA_ERROR_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


# ----------------------------------------------------------------------------------------------
# experiments


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
# shared by the Tracker and replay_fallback


def _log_params_and_tags(client, run_id: str, params: dict[str, str], tags: dict[str, str], existing: Mapping) -> None:
    """Log the params not yet in the run (in batches) and ``tags``; a changed param becomes a tag.

    MLflow params are immutable: a resumed run that passes another value for a logged param keeps
    the first value, and the new one is set as the tag ``changed_param.<key>``.
    """
    from mlflow.entities import Param, RunTag

    tags = dict(tags)
    fresh: dict[str, str] = {}
    for key, value in params.items():
        if key not in existing:
            fresh[key] = value
        elif existing[key] != value:
            tags[f"changed_param.{key}"] = _tag_str(value)
    for batch in _chunks([Param(k, v) for k, v in fresh.items()], PARAMS_PER_BATCH):
        client.log_batch(run_id, params=batch, synchronous=True)
    for batch in _chunks([RunTag(k, v) for k, v in tags.items()], PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=batch, synchronous=True)



def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."

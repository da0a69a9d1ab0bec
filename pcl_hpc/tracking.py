"""MLflow experiment tracking and the encoder model registry.

* :func:`resolve_tracking_uri` picks where runs go: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``,
  else a sqlite file next to the output folder (``<output_dir>/../mlflow.db``), so the pretrain and
  finetune runs of one demo share a database and its registry without any server.
  ``tools/mlflow_server.sh`` starts a shared server (127.0.0.1, sqlite, artifact folder).
* :class:`Tracker` logs one run from global rank 0 only (other ranks: no-ops, no ghost runs). It
  adds :func:`standard_tags` (git commit, world size, SLURM ids), logs the params in batches
  (long values truncated, id lists hashed), logs each metric at most once per step, samples
  system metrics (CPU, memory, GPU), and continues a run given its id (resume/requeue). It never
  raises into the training loop once the run has started: if the tracking server goes away it
  warns once per outage, appends what could not be sent to ``<output_dir>/metrics_fallback.jsonl``,
  keeps it in memory, retries every ``retry_interval_s`` seconds and sends the backlog when the
  server is back.
* :func:`replay_fallback` sends what is in a fallback file and never reached the server (e.g. the
  server was still down when training ended): ``python -m pcl_hpc.tracking replay <file> --uri URI``.
* :func:`register_encoder` stores an encoder ``state_dict`` as a registered MLflow model version
  (a "models from code" pyfunc: no pickled Python objects at all) whose artifacts are
  ``encoder.pt`` (``torch.save`` of the tensors) and ``model_config.json``. If the server is
  unreachable it warns and returns None (and, when a Tracker is running, keeps a copy of the
  weights for :func:`replay_fallback`): a tracking failure never fails the training job.
* :func:`promote_alias` moves an alias (default ``champion``) to a version.
* :func:`load_encoder_state` reads ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a
  path to ``encoder.pt``, always with ``torch.load(..., weights_only=True)``;
  :func:`encoder_lineage` gives the name, version and pretrain run of such a source.

Medical data hygiene: lists of volume ids in the params (any key ending in ``volumes``, e.g.
``pretrain.volumes``, ``finetune.test_volumes``) are logged as a count and a hash, never as ids.
No host or user names are logged.

Fallback file
-------------
``<output_dir>/metrics_fallback.jsonl``: one JSON object a line, appended only when something could
not be sent. Every line has ``time`` (unix seconds), ``session`` (one Tracker, i.e. one process),
``run_id`` (null while the run could not be created) and ``kind``:

* ``start``: ``run_name``, ``experiment``, ``params`` (strings), ``tags``, ``run_id`` (the run to
  resume, or null); written when the run could not be created;
* ``metrics``: ``step``, ``timestamp`` (ms), ``metrics`` ({key: number, or "nan"/"inf"});
* ``tags``: ``tags``; ``artifact``: ``path`` (absolute), ``artifact_path``;
* ``register``: ``name``, ``alias``, ``tags``, ``model`` (ModelConfig fields), ``path`` (a copy of
  the encoder weights under ``<output_dir>/unregistered/``);
* ``end``: ``status``;
* ``flushed``: ``metrics`` (count): the backlog reached the server after an outage (information only).

:func:`read_fallback` parses it; :func:`replay_fallback` sends what is missing (idempotent: a step
already in the run is never sent twice).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
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

SLURM_TAG_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
REPLAY_TAG = "replayed_from_session"  # on a run that replay_fallback created (the Tracker never could)
UNREGISTERED_DIR = "unregistered"  # encoder copies kept for replay_fallback when registration failed

_latest_tracker: "Tracker | None" = None  # the last started Tracker (register_encoder's fallback file)

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
# standard tags and system metrics


def git_commit() -> str:
    """The commit of the pcl_hpc checkout (``$PCL_GIT_COMMIT`` wins, e.g. in a container without .git)."""
    env = os.environ.get("PCL_GIT_COMMIT", "")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _global_rank() -> int:
    """This process's global rank: torch.distributed if initialised, else torchrun's / SLURM's variables."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank()
    from pcl_hpc.dist import detect

    return detect().rank


def _world_size() -> int:
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_world_size()
    from pcl_hpc.dist import detect

    return detect().world_size


def standard_tags() -> dict[str, str]:
    """Tags every run gets from :meth:`Tracker.start`: code version, job size and the SLURM job.

    ``git_commit``, ``world_size`` and, when set, ``slurm_job_id``, ``slurm_array_job_id``,
    ``slurm_array_task_id``, ``slurm_restart_count``. No host names or user names.
    """
    tags = {"git_commit": git_commit(), "world_size": str(_world_size())}
    for var in SLURM_TAG_VARS:
        value = os.environ.get(var, "")
        if value:
            tags[var.lower()] = value
    return tags


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    return value in ("1", "true", "yes", "on")


def _system_metrics_monitor(run_id: str, uri: str, interval_s: float, resume: bool):
    """MLflow's SystemMetricsMonitor for ``run_id``: CPU and memory, GPU where present; None if unavailable.

    Only the CPU/memory monitor (psutil) and a GPU monitor are kept (MLflow's disk and network
    monitors are dropped to keep it cheap). The GPU monitor is MLflow's NVML/ROCm one when
    ``nvidia-ml-py`` / ``pyrsmi`` is installed, else a torch.cuda memory monitor.
    """
    try:
        from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except Exception as err:  # noqa: BLE001 - psutil missing, or an MLflow without system metrics
        log.info("tracking: no system metrics (%s)", _short(err))
        return None

    class TorchCudaMonitor(BaseMetricsMonitor):
        """GPU memory of this process per visible device, when NVML is not installed."""

        def collect_metrics(self):
            for i in range(torch.cuda.device_count()):
                self._metrics[f"gpu_{i}_memory_allocated_megabytes"].append(torch.cuda.memory_allocated(i) / 1e6)
                self._metrics[f"gpu_{i}_memory_reserved_megabytes"].append(torch.cuda.memory_reserved(i) / 1e6)

        def aggregate_metrics(self):
            return {k: round(sum(v) / len(v), 1) for k, v in self._metrics.items() if v}

    class Monitor(SystemMetricsMonitor):
        def finish(self, timeout_s: float = 5.0) -> None:
            """Stop the sampling thread without waiting long for an unreachable server."""
            thread, self._process = self._process, None
            if thread is None:
                return
            self._shutdown_event.set()
            thread.join(timeout=timeout_s)
            if thread.is_alive():
                return
            try:
                if any(m.metrics for m in self.monitors):  # samples since the last publish (short runs)
                    self.publish_metrics(self.aggregate_metrics())
                self.mlflow_logger.flush()
            except Exception as err:  # noqa: BLE001
                log.info("tracking: last system metrics not sent (%s)", _short(err))

    try:
        import psutil

        psutil.cpu_percent()  # the first call only sets the reference point
        monitor = Monitor(run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=uri)
    except Exception as err:  # noqa: BLE001
        log.info("tracking: no system metrics (%s)", _short(err))
        return None
    kept = [m for m in monitor.monitors if isinstance(m, CPUMonitor) or "GPU" in type(m).__name__ or "ROCM" in type(m).__name__]
    if len(kept) == 1 and torch.cuda.is_available():
        kept.append(TorchCudaMonitor())
    monitor.monitors = kept
    return monitor


# ----------------------------------------------------------------------------------------------
# the run


class Tracker:
    """MLflow on global rank 0 only; elsewhere (or with enabled=False) every method is a cheap no-op.

    ``start`` sets the tracking URI, which the registry follows (process-wide, so
    :func:`register_encoder` and :func:`load_encoder_state` use the same store), the experiment
    ``cfg.tracking.experiment``, and creates a run (or resumes ``run_id``). The run is not made
    MLflow's "active run"; pass ``tracker.run_id`` to :func:`register_encoder`.

    * Tags: :func:`standard_tags` (git commit, world size, SLURM ids) plus the caller's.
    * Params are immutable: on resume, a param whose value changed is kept as it was and the new
      value is set as the tag ``changed_param.<key>``.
    * A metric is logged at most once per step: a step <= the last step already logged for that
      key (in this process or, after a resume, in the run) is skipped.
    * System metrics (``system/cpu_utilization_percentage``, ``system/system_memory_usage_*``,
      ``system/gpu_*``) are sampled by MLflow's SystemMetricsMonitor every
      ``system_metrics_interval_s`` seconds (``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` wins).
      On by default; off with ``Tracker.system_metrics = False`` or
      ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``.

    No method raises because the server is unreachable: the first failure warns (``RuntimeWarning``
    and a log line), what was not sent goes to ``<output_dir>/metrics_fallback.jsonl`` (see
    "Fallback file" in the module docs) and stays in memory; every ``retry_interval_s`` seconds
    (``$PCL_TRACKING_RETRY_S``, default 120) the next call tries again and, on success, sends the
    backlog. What never got through can be sent later with :func:`replay_fallback`.
    """

    retry_interval_s: float = 120.0
    system_metrics: bool | None = None  # None: $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING if set, else on
    system_metrics_interval_s: float = 30.0

    def __init__(self, cfg: Config, enabled: bool):
        self.cfg = cfg
        self.enabled = bool(enabled)
        if self.enabled and _global_rank() != 0:
            log.warning("tracking: Tracker(enabled=True) on rank %d; only rank 0 logs to MLflow", _global_rank())
            self.enabled = False
        retry = os.environ.get("PCL_TRACKING_RETRY_S", "")
        if retry:
            try:
                self.retry_interval_s = max(0.0, float(retry))
            except ValueError:
                log.warning("tracking: PCL_TRACKING_RETRY_S=%r is not a number of seconds; using %s", retry, self.retry_interval_s)
        self.uri: str | None = None
        self.fallback_path = Path(cfg.output_dir) / FALLBACK_FILE
        self.session = uuid.uuid4().hex  # groups this process's lines in the fallback file
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
        self._last_step: dict[str, int] = {}  # metric key -> last step logged (or known in the run)
        self._monitor = None
        self._ended = False

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
        global _latest_tracker
        from mlflow import MlflowClient

        for key, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.uri = resolve_tracking_uri(self.cfg)
        use_tracking_uri(self.uri)
        self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._start_args = {
            "run_name": run_name,
            "experiment": self.cfg.tracking.experiment,
            "params": _prepare_params(params or {}),
            "tags": {**standard_tags(), **{str(k): _tag_str(v) for k, v in (tags or {}).items()}},
            "run_id": run_id,
        }
        _latest_tracker = self
        try:
            self._open_run()
        except Exception as err:  # noqa: BLE001 - unreachable server must not stop training
            self._failed("start the run", err)
            self._fallback({"kind": "start", **self._start_args})
            return None
        return self._run_id

    def _open_run(self) -> None:
        args = self._start_args
        client = self._client
        if args["run_id"]:
            run = client.get_run(args["run_id"])
            run_id = run.info.run_id
            # Steps already in the run: a resumed run replays steps from its checkpoint; skip those.
            known = _last_steps(client, run)
            self._pending_metrics = [m for m in self._pending_metrics if m.key not in known or m.step > known[m.key]]
            for key, step in known.items():
                self._last_step[key] = max(step, self._last_step.get(key, step))
            client.update_run(run_id, status="RUNNING")
            _log_params_and_tags(client, run_id, args["params"], args["tags"], existing=run.data.params)
        else:
            exp_id = _ensure_experiment(client, args["experiment"], self.uri)
            run = client.create_run(exp_id, run_name=args["run_name"] or None, tags=args["tags"])
            run_id = run.info.run_id
            _log_params_and_tags(client, run_id, args["params"], {}, existing={})
        self._run_id = run_id
        self._start_system_metrics(resume=bool(args["run_id"]))

    def _system_metrics_on(self) -> bool:
        if self.system_metrics is not None:
            return bool(self.system_metrics)
        flag = _env_flag("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
        return True if flag is None else flag

    def _start_system_metrics(self, resume: bool) -> None:
        """(Re)start sampling; MLflow's sampler stops for good at the first failed request."""
        if self._ended or not self._system_metrics_on() or self._run_id is None:
            return
        if self._monitor is not None and self._monitor._process is not None and self._monitor._process.is_alive():
            return
        self._monitor = _system_metrics_monitor(self._run_id, self.uri, self.system_metrics_interval_s, resume)
        if self._monitor is not None:
            self._monitor.start()

    def _stop_system_metrics(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as err:  # noqa: BLE001
                log.info("tracking: stopping system metrics: %s", _short(err))

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED / FAILED / KILLED; sends any backlog first. Never raises for an outage."""
        if not self.enabled or self._client is None:
            return
        self._ended = True
        self._stop_system_metrics()
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
        """Log ``metrics`` at ``step``; a key already logged at this or a later step is skipped."""
        if not self.enabled or self._client is None:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        step = int(step)
        values: dict[str, float] = {}
        for key, value in metrics.items():
            key = str(key)
            try:
                number = float(value)
            except (TypeError, ValueError):
                log.warning("tracking: metric %r=%r is not a number; skipped", key, value)
                continue
            last = self._last_step.get(key)
            if last is not None and step <= last:
                log.debug("tracking: %s already logged up to step %d; step %d skipped", key, self._last_step[key], step)
                continue
            values[key] = number
            self._last_step[key] = step
        if not values:
            return
        entries = [Metric(k, v, stamp, step) for k, v in values.items()]
        if self._usable():
            try:
                for batch in _chunks(entries, METRICS_PER_BATCH):
                    self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
                return
            except Exception as err:  # noqa: BLE001
                self._failed("log metrics", err)
        self._keep_metrics(entries)
        self._fallback(
            {"kind": "metrics", "step": step, "timestamp": stamp,
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
            self._start_system_metrics(resume=True)
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

    def _keep_unregistered(self, state, model_cfg: ModelConfig, name: str, alias: str, tags: dict | None) -> Path | None:
        """Save encoder weights that could not be registered, and a ``register`` fallback line."""
        folder = self.fallback_path.parent / UNREGISTERED_DIR
        safe = re.sub(r"[^\w\-.]", "_", name)
        path = folder / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{self.session[:6]}.pt"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save(state, tmp)
            tmp.replace(path)
        except OSError as err:
            log.warning("tracking: cannot keep the unregistered encoder in %s: %s", folder, err)
            return None
        self._fallback({"kind": "register", "name": name, "alias": alias, "path": str(path.absolute()),
                        "model": dataclasses.asdict(model_cfg),
                        "tags": {str(k): _tag_str(v) for k, v in (tags or {}).items()}})
        return path

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
        record = {"time": time.time(), "session": self.session, "run_id": self._run_id, **record}
        try:
            self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.fallback_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, default=str) + "\n")
        except OSError as err:
            self._fallback_broken = True
            log.warning("tracking: cannot write %s (%s); unsent metrics are kept in memory only", self.fallback_path, err)


def _last_steps(client, run) -> dict[str, int]:
    """Metric key -> the largest step logged in ``run`` (MLflow keeps it as the run's latest metric)."""
    metrics = getattr(run.data, "_metric_objs", None)
    if metrics is not None:
        return {m.key: int(m.step) for m in metrics}
    return {
        key: max((int(m.step) for m in client.get_metric_history(run.info.run_id, key)), default=0)
        for key in run.data.metrics
    }


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


def _register(
    state: dict[str, torch.Tensor], model_cfg: ModelConfig, name: str, alias: str, tags: dict | None, run_id: str | None
) -> str:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model

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
            try:
                client.set_terminated(own_run.info.run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the server may be gone; report the first error
                pass
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


# ----------------------------------------------------------------------------------------------
# the fallback file, sent later


def read_fallback(path: str | Path) -> list[dict]:
    """The records of a fallback file (format in the module docs); a torn last line is skipped."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("tracking: %s line %d is not JSON (cut off by a kill?); skipped", path, number)
            continue
        if isinstance(record, dict) and "kind" in record:
            records.append(record)
    return records


def _number(value) -> float:
    return float(value)  # "nan" / "inf" / "-inf" strings included


def replay_fallback(fallback_path: str | Path, tracking_uri: str | None = None, experiment: str | None = None) -> dict:
    """Send what a fallback file holds and the tracking server does not: returns a summary per run.

    For each session (one Tracker) of the file: its run is the run id its lines name, else one is
    created from its ``start`` line (in ``experiment`` if given, else the experiment it was meant
    for). Then the params and tags not yet there, every metric step missing from the run's history
    (a step the run already has is never sent again, so replaying twice is harmless), the artifacts
    whose files still exist, the encoder registrations that failed (unless the run already has a
    version of that model), and the final status (only if the run is still RUNNING and no later
    session of the file continued it). ``tracking_uri``: default ``$MLFLOW_TRACKING_URI`` / MLflow's.

    Summary: ``{run_id: {"session", "created", "metrics_sent", "metrics_skipped", "artifacts",
    "registered", "status"}}``.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    records = read_fallback(fallback_path)
    uri = tracking_uri or mlflow.get_tracking_uri()
    use_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    sessions: dict[str, list[dict]] = {}
    for record in records:
        sessions.setdefault(str(record.get("session") or record.get("run_id") or "legacy"), []).append(record)
    session_runs: dict[str, str | None] = {
        s: next((r["run_id"] for r in recs if r.get("run_id")), None) for s, recs in sessions.items()
    }
    order = list(sessions)
    summary: dict[str, dict] = {}
    for index, (session, recs) in enumerate(sessions.items()):
        start = next((r for r in recs if r["kind"] == "start"), None)
        run_id = session_runs[session]
        created = False
        if run_id is None:
            if start is None:
                log.warning("tracking: session %s of %s names no run and has no start line; skipped", session, fallback_path)
                continue
            exp_name = experiment or start.get("experiment") or "pcl-hpc"
            exp_id = _ensure_experiment(client, exp_name, uri)
            # A run created by an earlier replay of this file carries the session as a tag.
            earlier = client.search_runs([exp_id], filter_string=f"tags.`{REPLAY_TAG}` = '{session}'", max_results=1)
            if earlier:
                run_id = earlier[0].info.run_id
            else:
                run = client.create_run(
                    exp_id, run_name=start.get("run_name") or None,
                    tags={**(start.get("tags") or {}), REPLAY_TAG: session},
                    start_time=int(float(start.get("time", time.time())) * 1000))
                run_id, created = run.info.run_id, True
            session_runs[session] = run_id
        run = client.get_run(run_id)
        if start is not None:
            _log_params_and_tags(client, run_id, start.get("params") or {},
                                 {} if created else (start.get("tags") or {}), existing=run.data.params)
        tags: dict[str, str] = {}
        for r in recs:
            if r["kind"] == "tags":
                tags.update({str(k): _tag_str(v) for k, v in (r.get("tags") or {}).items()})
        if tags:
            _log_params_and_tags(client, run_id, {}, tags, existing={})

        # metrics: only the (key, step) pairs the run does not have
        wanted: dict[tuple[str, int], Metric] = {}
        for r in recs:
            if r["kind"] != "metrics":
                continue
            stamp = int(r.get("timestamp") or float(r.get("time", time.time())) * 1000)
            for key, value in (r.get("metrics") or {}).items():
                wanted.setdefault((str(key), int(r["step"])), Metric(str(key), _number(value), stamp, int(r["step"])))
        have: dict[str, set[int]] = {}
        for key in {k for k, _ in wanted}:
            have[key] = {int(m.step) for m in client.get_metric_history(run_id, key)}
        missing = [m for (key, step), m in wanted.items() if step not in have[key]]
        for batch in _chunks(missing, METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=batch, synchronous=True)

        artifacts = 0
        for r in recs:
            if r["kind"] == "artifact":
                path = r.get("path", "")
                if not os.path.exists(path):
                    log.warning("tracking: artifact %s is gone; not sent", path)
                    continue
                if os.path.isdir(path):
                    client.log_artifacts(run_id, path, r.get("artifact_path"))
                else:
                    client.log_artifact(run_id, path, r.get("artifact_path"))
                artifacts += 1

        registered = []
        for r in recs:
            if r["kind"] != "register":
                continue
            name = r["name"]
            try:
                done = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
            except Exception:  # noqa: BLE001 - no such model yet
                done = []
            if done:
                registered.append(str(done[0].version))
                continue
            weights = _load_weights(Path(r["path"]), r["path"])
            model = ModelConfig(**{k: v for k, v in (r.get("model") or {}).items()
                                   if k in {f.name for f in dataclasses.fields(ModelConfig)}})
            registered.append(_register(weights, model, name, r["alias"], r.get("tags") or {}, run_id))

        status = None
        ends = [r for r in recs if r["kind"] == "end"]
        continued_later = any(session_runs.get(s) == run_id for s in order[index + 1:])
        if ends and not continued_later and client.get_run(run_id).info.status == "RUNNING":
            status = ends[-1].get("status") or "FINISHED"
            client.set_terminated(run_id, status=status)
        summary[run_id] = {"session": session, "created": created, "metrics_sent": len(missing),
                           "metrics_skipped": len(wanted) - len(missing), "artifacts": artifacts,
                           "registered": registered, "status": status}
        log.info("tracking: replayed %s into run %s: %s", fallback_path, run_id, summary[run_id])
    return summary


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pcl_hpc.tracking", description="pcl-hpc MLflow tools")
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="send a metrics_fallback.jsonl to the tracking server")
    replay.add_argument("fallback", help="path to metrics_fallback.jsonl")
    replay.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI)")
    replay.add_argument("--experiment", default=None, help="experiment for runs that were never created")
    promote = sub.add_parser("promote", help="move an alias (default champion) to a version")
    promote.add_argument("name")
    promote.add_argument("source", help="version number, alias, or models:/ URI")
    promote.add_argument("--alias", default="champion")
    promote.add_argument("--uri", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "replay":
            if not Path(args.fallback).is_file():
                raise UserError(f"{args.fallback}: no such fallback file (it is <output_dir>/{FALLBACK_FILE})")
            print(json.dumps(replay_fallback(args.fallback, args.uri, args.experiment), indent=2))
        else:
            print(promote_alias(args.name, args.source, args.alias, tracking_uri=args.uri))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

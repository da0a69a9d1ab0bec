"""The run: :class:`Tracker` (rank 0 only, never raises into training), where runs go, standard tags."""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import subprocess
import threading
import time
import uuid
import warnings
import weakref
from collections import deque
from pathlib import Path
from typing import Any


from pcl_hpc import dist
from pcl_hpc.config import Config
from pcl_hpc.tracking._common import (
    FALLBACK_FILE,
    METRICS_PER_BATCH,
    PARAMS_PER_BATCH,
    UNREGISTERED_DIR,
    _chunks,
    _ensure_experiment,
    _is_data_error,
    _log_params_and_tags,
    _prepare_params,
    _short,
    _tag_str,
)
from pcl_hpc.tracking.background import Worker
from pcl_hpc.tracking.system_metrics import _system_metrics_monitor

log = logging.getLogger(__package__)

MAX_PENDING_METRICS = 100_000  # metrics kept in memory while offline (all of them also go to the JSONL)
QUEUE_SIZE = 10_000  # calls (a step's metrics, tags, an artifact) waiting for the tracking worker at most
DRAIN_TIMEOUT_S = 10.0  # end() waits this long for the queue to drain ($PCL_TRACKING_DRAIN_S)

# Without these, one MLflow HTTP call to a dead server retries for ~4 minutes (7 retries with
# exponential backoff, 120 s timeout). The Tracker sets these defaults (only if unset) so an outage
# costs seconds; export the variables to choose other values.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

SLURM_TAG_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")

_latest_tracker: "Tracker | None" = None  # the last started Tracker: Tracker.current()
_live_trackers: "weakref.WeakSet[Tracker]" = weakref.WeakSet()  # started, not ended: drained at exit


# ----------------------------------------------------------------------------------------------
# where runs go


def resolve_tracking_uri(cfg: Config) -> str:
    """``cfg.tracking.uri``; else ``$MLFLOW_TRACKING_URI``; else ``sqlite:///<abs output_dir>/mlflow.db``
    (one database per experiment folder, shared by its stages)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    db = (Path(cfg.output_dir).expanduser().absolute() / "mlflow.db").resolve()
    return f"sqlite:///{db}"


def use_tracking_uri(uri: str) -> None:
    """Make ``uri`` the process's tracking URI; the registry follows it.

    MLflow's registry URI defaults to the tracking URI. It is deliberately not pinned with
    ``mlflow.set_registry_uri`` (which is sticky: a later ``mlflow.set_tracking_uri`` alone would
    leave the registry on the old store). An explicit ``$MLFLOW_REGISTRY_URI`` still wins.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)


# ----------------------------------------------------------------------------------------------
# standard tags


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


def standard_tags() -> dict[str, str]:
    """Tags every run gets from :meth:`Tracker.start`: code version, job size and the SLURM job.

    ``git_commit``, ``world_size`` and, when set, ``slurm_job_id``, ``slurm_array_job_id``,
    ``slurm_array_task_id``, ``slurm_restart_count``. No host names or user names.
    """
    tags = {"git_commit": git_commit(), "world_size": str(dist.global_rank_and_world()[1])}
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


# ----------------------------------------------------------------------------------------------
# the run


class Tracker:
    """MLflow on global rank 0 only; elsewhere (or with enabled=False) every method is a cheap no-op.

    ``start`` sets the tracking URI, which the registry follows (process-wide, so
    :func:`register_encoder` and :func:`load_encoder_state` use the same store), the experiment
    ``cfg.tracking.experiment``, and creates a run (or resumes ``run_id``). The run is not made
    MLflow's "active run"; pass ``tracker.run_id`` to :func:`register_encoder` (which also finds
    it with :meth:`Tracker.current`).

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

    Tracking never stalls training. ``start`` is synchronous (run, params, tags): with a server
    that does not answer it takes at most about one MLflow request's time, i.e.
    ``(MLFLOW_HTTP_REQUEST_MAX_RETRIES + 1) x MLFLOW_HTTP_REQUEST_TIMEOUT`` plus the retries'
    backoff (the defaults set here, :data:`HTTP_ENV_DEFAULTS`: 3 x 20 s plus a few seconds),
    then training goes on offline. Everything after it goes through a bounded queue
    (``queue_size`` calls) to one daemon worker thread per Tracker, started by ``start``, which
    makes every MLflow call: ``log_metrics``, ``set_tags`` and ``log_artifact`` only queue and
    return at once. If the queue is full (the worker stuck on a server that does not answer), a
    call goes straight to the fallback file instead (one warning): :func:`replay_fallback` sends
    it later. ``end`` waits at most ``drain_timeout_s`` (``$PCL_TRACKING_DRAIN_S``, default 10)
    for the queue to drain and the run to be marked ended; what is still queued then goes to the
    fallback file. :meth:`flush` waits (bounded) until everything queued so far was handled.
    Warnings found by the worker are issued by the next call on the caller's thread.

    No method raises because the server is unreachable: the first failure warns (``RuntimeWarning``
    and a log line), what was not sent goes to ``<output_dir>/metrics_fallback.jsonl`` (see
    "Fallback file" in :mod:`pcl_hpc.tracking.fallback`) and stays in memory; every ``retry_interval_s`` seconds
    (``$PCL_TRACKING_RETRY_S``, default 120) the next call tries again and, on success, sends the
    backlog. What never got through can be sent later with :func:`replay_fallback`.

    A Tracker is used from one thread (the training loop's). After ``start``, its MLflow client,
    its backlog and its last steps belong to the worker thread; the caller's thread shares only
    the queue and plain flags with it.
    """

    retry_interval_s: float = 120.0
    system_metrics: bool | None = None  # None: $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING if set, else on
    system_metrics_interval_s: float = 30.0
    drain_timeout_s: float = DRAIN_TIMEOUT_S  # end()/flush()/ensure_run() wait at most this long
    queue_size: int = QUEUE_SIZE

    def __init__(self, cfg: Config, enabled: bool, folder: str | Path | None = None):
        """``folder``: the stage's output folder, where the fallback file goes (default ``cfg.output_dir``)."""
        self.cfg = cfg
        self.enabled = bool(enabled)
        if self.enabled and dist.global_rank_and_world()[0] != 0:
            log.warning("tracking: Tracker(enabled=True) on rank %d; only rank 0 logs to MLflow", dist.global_rank_and_world()[0])
            self.enabled = False
        self.retry_interval_s = _env_seconds("PCL_TRACKING_RETRY_S", self.retry_interval_s)
        self.drain_timeout_s = _env_seconds("PCL_TRACKING_DRAIN_S", self.drain_timeout_s)
        self.uri: str | None = None
        self.fallback_path = Path(folder or cfg.output_dir) / FALLBACK_FILE
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
        self._fallback_lock = threading.Lock()  # the worker and the caller both append to the fallback file
        self._fallback_handle = None  # kept open while the Tracker writes to it (closed by end)
        self._last_step: dict[str, int] = {}  # metric key -> last step logged (or known in the run)
        self._monitor = None
        self._ended = False
        self._worker: Worker | None = None
        self._due: deque[str] = deque()  # warnings found on the worker, issued on the caller's thread
        self._overflowed = 0  # calls that found the queue full (written to the fallback file)
        self._pid = os.getpid()  # the process whose worker thread this is (a forked child has none)

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @classmethod
    def current(cls) -> "Tracker | None":
        """The Tracker this process started last, while it is enabled and not ended; else None.

        Registrations (:func:`pcl_hpc.tracking.versions.register_version`) log into its run and,
        during an outage, keep what could not be registered in its fallback file."""
        tracker = _latest_tracker
        if tracker is None or not tracker.enabled or tracker._ended:
            return None
        return tracker

    @classmethod
    def clear_current(cls) -> None:
        """Forget the last started Tracker (:meth:`current` is None until the next ``start``)."""
        global _latest_tracker
        _latest_tracker = None

    def ensure_run(self) -> str | None:
        """The run id; if the run could not be created yet (server down at ``start``), try again now
        (and send the backlog), after everything queued before. Waits at most ``drain_timeout_s``.
        None while it still cannot be created, or when not started."""
        if self.enabled and self._run_id is None and self._worker is not None:
            self._worker.call(lambda: self._reconnect(force=True), self.drain_timeout_s)
            self._emit_warnings()
        return self._run_id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far was sent (or kept in the fallback file), at most
        ``timeout`` seconds (default ``drain_timeout_s``); True if it was. Issues pending warnings."""
        if not self.enabled or self._worker is None or not self._worker.running:
            return True
        command = self._worker.call(lambda: None, self.drain_timeout_s if timeout is None else timeout)
        self._emit_warnings()
        return command.done.is_set()

    def unregistered_path(self, name: str, suffix: str = ".pt") -> Path:
        """A new file under ``<folder>/unregistered/`` for a copy of model ``name`` that could not be registered."""
        safe = re.sub(r"[^\w\-.]", "_", name)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.fallback_path.parent / UNREGISTERED_DIR / f"{safe}-{stamp}-{self.session[:6]}{suffix}"

    def write_fallback(self, record: dict) -> None:
        """Append ``record`` (with its ``kind``) to the fallback file, with this session and run; after
        what is queued (the file keeps the order of the calls)."""
        record = {"time": time.time(), **record}
        if self._worker is None or not self._worker.put(("record", record)):
            self._fallback(record)

    @property
    def offline(self) -> bool:
        """The server was unreachable at the last attempt (of the calls handled so far: see :meth:`flush`)."""
        return self._offline_since is not None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, run_name: str, params: dict, tags: dict | None = None, run_id: str | None = None) -> str | None:
        """Create (or resume ``run_id``) and log ``params``; returns the run id (None when disabled or unreachable).

        Synchronous; with a server that does not answer it returns None after one request's HTTP
        timeout and retries (see the class docs), and the worker tries again later."""
        if not self.enabled:
            return None
        global _latest_tracker
        from mlflow import MlflowClient

        if self._worker is not None and self._worker.running:  # started before: finish what it queued
            self._worker.close(None, self.drain_timeout_s)
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
        self._ended = False
        self._pid = os.getpid()
        try:
            self._open_run()
        except Exception as err:  # noqa: BLE001 - unreachable server must not stop training
            self._failed("start the run", err)
            self._fallback({"kind": "start", **self._start_args})
        finally:
            # From here on the MLflow client, the backlog and the last steps belong to the worker.
            if self._worker is None:
                self._worker = Worker(self._handle, self._spill, self.queue_size)
            self._worker.start()
            _live_trackers.add(self)
        self._emit_warnings()
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
        """Mark the run FINISHED / FAILED / KILLED after sending what is queued (and any backlog).

        Waits at most ``drain_timeout_s`` seconds; what is still queued then, and the status, go to
        the fallback file (:func:`replay_fallback` sends them). Never raises for an outage."""
        if not self.enabled or self._client is None or self._worker is None:
            return
        self._ended = True
        _live_trackers.discard(self)
        done, spilled = self._worker.close(lambda: self._finish(status), self.drain_timeout_s)
        if not done:
            self._fallback({"kind": "end", "status": status})
            log.warning("tracking: the run was not marked %s within %.1f s (tracking server at %s not answering); "
                        "%d queued call(s) and the status are in %s for replay_fallback",
                        status, self.drain_timeout_s, self.uri, spilled, self.fallback_path)
        if self._overflowed:
            log.warning("tracking: %d call(s) found the tracking queue full and went to %s only; "
                        "replay_fallback sends them", self._overflowed, self.fallback_path)
        self._close_fallback()  # a worker still stuck in a request opens it again if it must
        self._emit_warnings()

    def _finish(self, status: str) -> None:
        """On the worker: stop the system metrics, send the backlog, mark the run ended."""
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

    def _drain_at_exit(self) -> None:
        """At interpreter exit without ``end``: send what is queued (bounded), else keep it in the file."""
        if self._worker is not None and self._worker.running and os.getpid() == self._pid:
            self._worker.close(None, self.drain_timeout_s)
            self._close_fallback()

    # -- logging: the caller's side (queue and return) -----------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``; a key already logged at this or a later step is skipped.

        Only converts the values to numbers and queues them (the worker sends them)."""
        if not self.enabled or self._client is None:
            return
        stamp = int(time.time() * 1000)
        step = int(step)
        values: dict[str, float] = {}
        for key, value in metrics.items():
            key = str(key)
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                log.warning("tracking: metric %r=%r is not a number; skipped", key, value)
        if values:
            self._submit(("metrics", (step, stamp, values)))
        if self._due:
            self._emit_warnings()

    def set_tags(self, tags: dict) -> None:
        if not self.enabled or self._client is None or not tags:
            return
        self._submit(("tags", {str(k): _tag_str(v) for k, v in tags.items()}))
        if self._due:
            self._emit_warnings()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file or folder for upload (it is read when the worker sends it)."""
        if not self.enabled or self._client is None:
            return
        path = str(path)
        if not os.path.exists(path):
            log.warning("tracking: artifact %s does not exist; not logged", path)
            return
        self._submit(("artifact", (os.path.abspath(path), artifact_path)))
        if self._due:
            self._emit_warnings()

    def _submit(self, item: tuple) -> None:
        worker = self._worker
        if worker is not None:
            if not worker.running:  # a call after end(): a new worker thread, drained at exit
                _live_trackers.add(self)
            if worker.put(item):
                return
        # The queue is full (the worker waits on a server that does not answer): never block the step.
        self._overflowed += 1
        self._spill(item)
        if self._overflowed == 1:
            self._due.append(
                f"MLflow tracking at {self.uri} is not keeping up (queue of {self.queue_size} calls full). Training "
                f"continues; calls that do not fit go to {self.fallback_path} only (send them with replay_fallback).")
            log.warning("tracking: %s", self._due[-1])

    def _emit_warnings(self) -> None:
        while self._due:
            warnings.warn(self._due.popleft(), RuntimeWarning, stacklevel=3)

    # -- logging: the worker's side -------------------------------------------------------------

    def _handle(self, items: list) -> None:
        """On the worker: a run of queued calls, in order (consecutive metrics go in one request)."""
        index = 0
        while index < len(items):
            kind, payload = items[index]
            if kind == "metrics":
                end = index
                while end < len(items) and items[end][0] == "metrics":
                    end += 1
                self._send_metrics([p for _, p in items[index:end]])
                index = end
                continue
            if kind == "tags":
                self._send_tags(payload)
            elif kind == "artifact":
                self._send_artifact_item(*payload)
            elif kind == "record":
                self._fallback(payload)
            index += 1

    def _send_metrics(self, calls: list[tuple[int, int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        entries = []
        for step, stamp, values in calls:
            for key, number in values.items():
                last = self._last_step.get(key)
                if last is not None and step <= last:
                    log.debug("tracking: %s already logged up to step %d; step %d skipped", key, last, step)
                    continue
                entries.append(Metric(key, number, stamp, step))
                self._last_step[key] = step
        if not entries:
            return
        sent = 0
        if self._usable():
            try:
                for batch in _chunks(entries, METRICS_PER_BATCH):
                    self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
                    sent += len(batch)
                return
            except Exception as err:  # noqa: BLE001
                self._failed("log metrics", err)
        unsent = entries[sent:]
        self._keep_metrics(unsent)
        steps: dict[tuple[int, int], dict[str, float]] = {}
        for m in unsent:
            steps.setdefault((m.step, m.timestamp), {})[m.key] = m.value
        for (step, stamp), values in steps.items():
            self._fallback(_metrics_record(step, stamp, values))

    def _send_tags(self, clean: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if self._usable():
            try:
                for batch in _chunks([RunTag(k, v) for k, v in clean.items()], PARAMS_PER_BATCH):
                    self._client.log_batch(self._run_id, tags=batch, synchronous=True)
                return
            except Exception as err:  # noqa: BLE001
                self._failed("set tags", err)
        self._pending_tags.update(clean)
        self._fallback({"kind": "tags", "tags": clean})

    def _send_artifact_item(self, path: str, artifact_path: str | None) -> None:
        if not os.path.exists(path):  # removed after it was queued: not an outage
            log.warning("tracking: artifact %s no longer exists; not logged", path)
            return
        if self._usable():
            try:
                self._send_artifact(path, artifact_path)
                return
            except Exception as err:  # noqa: BLE001
                self._failed("log an artifact", err)
        self._pending_artifacts.append((path, artifact_path))
        self._fallback({"kind": "artifact", "path": path, "artifact_path": artifact_path})

    def _send_artifact(self, path: str, artifact_path: str | None) -> None:
        if os.path.isdir(path):
            self._client.log_artifacts(self._run_id, path, artifact_path)
        else:
            self._client.log_artifact(self._run_id, path, artifact_path)

    def _spill(self, item: tuple) -> None:
        """A queued call that will not be handled (queue full, or still queued when ``end`` gave up):
        into the fallback file, in the format the worker would have written."""
        kind, payload = item
        if kind == "metrics":
            step, stamp, values = payload
            self._fallback(_metrics_record(step, stamp, values))
        elif kind == "tags":
            self._fallback({"kind": "tags", "tags": payload})
        elif kind == "artifact":
            self._fallback({"kind": "artifact", "path": payload[0], "artifact_path": payload[1]})
        elif kind == "record":
            self._fallback(payload)

    # -- outage handling (on the worker) --------------------------------------------------------

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
                f"metrics go to {self.fallback_path} and are retried every {self.retry_interval_s:g} s."
            )
            self._due.append(message)  # issued by the caller's thread (see _emit_warnings)
            log.warning("tracking: %s", message)

    def _fallback(self, record: dict) -> None:
        if self._fallback_broken:
            return
        record = {"time": time.time(), "session": self.session, "run_id": self._run_id, **record}
        line = json.dumps(record, default=str) + "\n"
        with self._fallback_lock:
            try:
                if self._fallback_handle is None:
                    self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
                    self._fallback_handle = open(self.fallback_path, "a", encoding="utf-8")
                self._fallback_handle.write(line)
                self._fallback_handle.flush()  # whole lines on disk: read_fallback, a kill
            except OSError as err:
                self._fallback_broken = True
                log.warning("tracking: cannot write %s (%s); unsent metrics are kept in memory only", self.fallback_path, err)

    def _close_fallback(self) -> None:
        with self._fallback_lock:
            handle, self._fallback_handle = self._fallback_handle, None
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass


def _metrics_record(step: int, stamp: int, values: dict[str, float]) -> dict:
    return {"kind": "metrics", "step": step, "timestamp": stamp,
            "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}


@atexit.register
def _drain_trackers_at_exit() -> None:
    for tracker in list(_live_trackers):
        try:
            tracker._drain_at_exit()
        except Exception:  # noqa: BLE001 - never fail the interpreter's exit
            pass


def _env_seconds(name: str, default: float) -> float:
    """A number of seconds from ``$name`` (>= 0), else ``default`` (with a warning when it is not a number)."""
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return max(0.0, float(text))
    except ValueError:
        log.warning("tracking: %s=%r is not a number of seconds; using %s", name, text, default)
        return default


def _last_steps(client, run) -> dict[str, int]:
    """Metric key -> the largest step logged in ``run`` (MLflow keeps it as the run's latest metric)."""
    metrics = getattr(run.data, "_metric_objs", None)
    if metrics is not None:
        return {m.key: int(m.step) for m in metrics}
    return {
        key: max((int(m.step) for m in client.get_metric_history(run.info.run_id, key)), default=0)
        for key in run.data.metrics
    }

"""The fallback file that a :class:`~pcl_hpc.tracking.Tracker` writes during an outage, and sending it later.

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

import json
import logging
import os
import time
from pathlib import Path

from pcl_hpc.tracking._common import METRICS_PER_BATCH, _chunks, _ensure_experiment, _log_params_and_tags, _tag_str
from pcl_hpc.tracking.registry import EncoderVersion
from pcl_hpc.tracking.tracker import use_tracking_uri
from pcl_hpc.tracking.versions import log_version

log = logging.getLogger(__package__)

REPLAY_TAG = "replayed_from_session"  # on a run that replay_fallback created (the Tracker never could)


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
            registered.append(log_version(EncoderVersion.from_kept(r), name, r["alias"], r.get("tags") or {}, run_id))

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

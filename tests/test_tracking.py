"""pcl_hpc.tracking against a real ``mlflow server`` on 127.0.0.1 and against the default sqlite file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch import nn

from pcl_hpc.config import Config, ModelConfig, flatten
from pcl_hpc.errors import UserError
from pcl_hpc.tracking import (
    FALLBACK_FILE,
    Tracker,
    encoder_lineage,
    git_commit,
    load_encoder_state,
    promote_alias,
    read_fallback,
    register_encoder,
    replay_fallback,
    resolve_tracking_uri,
)
from tests.mlflow_server import _free_port, experiment_runs, isolated_mlflow, mlflow_server  # noqa: F401
from tests.mlflow_server import unique as _unique


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch):
    with isolated_mlflow(monkeypatch, retries=2, timeout_s=20):
        yield


def _cfg(tmp_path: Path, uri: str = "") -> Config:
    cfg = Config(output_dir=str(tmp_path / "demo"))
    cfg.tracking.uri = uri
    cfg.tracking.experiment = _unique("exp")
    return cfg


def _encoder_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    net.train()
    net(torch.randn(2, 1, 8, 8))  # non-trivial BatchNorm running stats and num_batches_tracked
    return net.state_dict()


def _assert_same(loaded: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(original)
    for key, value in original.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key


def _fallback_records(cfg: Config) -> list[dict]:
    path = Path(cfg.output_dir) / FALLBACK_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    cfg = Config(output_dir=str(tmp_path / "demo"))  # the experiment's folder: every stage shares its db
    assert resolve_tracking_uri(cfg) == f"sqlite:///{(tmp_path / 'demo' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(cfg) == "http://127.0.0.1:5999"
    cfg.tracking.uri = "http://127.0.0.1:6000"
    assert resolve_tracking_uri(cfg) == "http://127.0.0.1:6000"


def test_tracker_logs_one_run(mlflow_server, tmp_path):
    cfg = _cfg(tmp_path, mlflow_server)
    cfg.pretrain.volumes = ["patient001", "patient002"]
    cfg.finetune.test_volumes = ["patient003"]
    cfg.data.raw_dir = "x" * 7000  # longer than MLflow's 6000-char param limit
    params = flatten(cfg)
    tracker = Tracker(cfg, enabled=True)
    run_id = tracker.start("pretrain", params, tags={"stage": "pretrain"})
    assert run_id and tracker.run_id == run_id
    tracker.log_metrics({"loss": 1.0, "lr": torch.tensor(0.1)}, step=0)
    tracker.log_metrics({"loss": 0.5}, step=1)
    tracker.set_tags({"epochs_done": 1})
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker.log_artifact(note, artifact_path="notes")
    tracker.end()

    client = MlflowClient(mlflow_server)
    runs = experiment_runs(client, cfg.tracking.experiment)
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    assert len(run.data.params) == len(params)
    assert run.data.params["pretrain.lr"] == "0.1" and run.data.params["model.width"] == "16"
    assert len(run.data.params["data.raw_dir"]) <= 6000
    # medical data hygiene: volume/patient ids are logged as a count and a hash only
    assert not any("patient00" in value for value in run.data.params.values())
    assert run.data.params["pretrain.volumes"].startswith("<2 ids")
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["epochs_done"] == "1"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5)]
    assert run.data.metrics["lr"] == pytest.approx(0.1)
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    assert _fallback_records(cfg) == []


def test_resume_keeps_run_and_records_changed_params(mlflow_server, tmp_path):
    cfg = _cfg(tmp_path, mlflow_server)
    first = Tracker(cfg, enabled=True)
    run_id = first.start("pretrain", {"lr": 0.1, "batch": 32})
    first.log_metrics({"loss": 1.0}, step=0)
    first.end("KILLED")

    second = Tracker(cfg, enabled=True)
    assert second.start("pretrain", {"lr": 0.05, "batch": 32, "resumed_from": 1}, run_id=run_id) == run_id
    second.log_metrics({"loss": 0.9}, step=0)  # a step the killed run already logged: skipped
    second.log_metrics({"loss": 0.8}, step=1)
    second.log_metrics({"loss": 0.7, "lr": 0.01}, step=1)  # loss again at step 1: skipped; lr is new
    second.end()

    client = MlflowClient(mlflow_server)
    runs = experiment_runs(client, cfg.tracking.experiment)
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "batch": "32", "resumed_from": "1"}
    assert run.data.tags["changed_param.lr"] == "0.05"
    assert "changed_param.batch" not in run.data.tags
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.8)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "lr")] == [(1, 0.01)]


def test_register_and_load_encoder(mlflow_server, tmp_path):
    cfg = _cfg(tmp_path, mlflow_server)
    tracker = Tracker(cfg, enabled=True)
    run_id = tracker.start("pretrain", {"x": 1})
    name = _unique("enc")
    state = _encoder_state()
    # a DDP-wrapped state_dict is registered without its "module." prefix
    ddp_state = {f"module.{k}": v for k, v in state.items()}
    version = register_encoder(ddp_state, cfg.model, name, "candidate", tags={"stage": "pretrain"}, run_id=run_id)
    tracker.end()
    assert version == "1"

    _assert_same(load_encoder_state(f"models:/{name}@candidate"), state)
    _assert_same(load_encoder_state(f"models:/{name}/1"), state)
    assert encoder_lineage(f"models:/{name}@candidate") == {
        "encoder_name": name, "encoder_version": "1", "encoder_run_id": run_id,
    }

    client = MlflowClient(mlflow_server)
    mv = client.get_model_version(name, "1")
    assert mv.run_id == run_id and "candidate" in mv.aliases
    assert mv.tags["stage"] == "pretrain" and mv.tags["model.width"] == str(cfg.model.width)
    assert len(mv.tags["encoder.sha256"]) == 64
    # the registry holds no pickled Python objects, only code, weights and the config
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "dl")))
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert {"MLmodel", "artifacts/encoder.pt", "artifacts/model_config.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert json.loads((model_dir / "artifacts" / "model_config.json").read_text())["width"] == cfg.model.width

    # a second version moves the alias; version 1 stays loadable
    newer = {k: (v + 1 if v.is_floating_point() else v) for k, v in state.items()}
    assert register_encoder(newer, ModelConfig(), name, "candidate", run_id=run_id) == "2"
    _assert_same(load_encoder_state(f"models:/{name}@candidate"), newer)
    _assert_same(load_encoder_state(f"models:/{name}/1"), state)

    # champion: moved by a later step, from an alias, a version or a models:/ URI
    assert promote_alias(name, "candidate") == "2"
    _assert_same(load_encoder_state(f"models:/{name}@champion"), newer)
    assert promote_alias(name, 1) == "1"
    assert promote_alias(name, f"models:/{name}/2", alias="best") == "2"
    aliases = client.get_registered_model(name).aliases
    assert aliases == {"candidate": "2", "champion": "1", "best": "2"}
    assert "alias.champion.set_at" in client.get_model_version(name, "1").tags
    with pytest.raises(UserError, match="no alias 'nope'"):
        promote_alias(name, "nope")
    with pytest.raises(ValueError, match="reserved"):
        promote_alias(name, "1", alias="latest")


def test_alias_latest_is_refused():
    state = _encoder_state()
    for alias in ("latest", "Latest", "v3"):
        with pytest.raises(ValueError, match="reserved"):
            register_encoder(state, ModelConfig(), "never-created", alias)


def test_missing_model_or_alias_is_a_user_error(mlflow_server):
    mlflow.set_tracking_uri(mlflow_server)
    name = _unique("empty")
    MlflowClient(mlflow_server).create_registered_model(name)
    with pytest.raises(UserError, match=f"no registered model '{name}' with alias 'nope'") as err:
        load_encoder_state(f"models:/{name}@nope")
    assert f"models:/{name}@nope" in str(err.value) and "search_model_versions" in str(err.value)
    with pytest.raises(UserError, match="with version 7"):
        load_encoder_state(f"models:/{name}/7")
    with pytest.raises(UserError, match="no registered model 'does-not-exist'"):
        encoder_lineage("models:/does-not-exist@candidate")
    with pytest.raises(UserError, match="not a registered encoder reference"):
        load_encoder_state(f"models:/{name}")


def test_disabled_tracker_creates_no_run(mlflow_server, tmp_path):
    cfg = _cfg(tmp_path, mlflow_server)
    tracker = Tracker(cfg, enabled=False)
    assert tracker.start("pretrain", {"a": 1}) is None and tracker.run_id is None
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.set_tags({"a": "b"})
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.end()
    assert MlflowClient(mlflow_server).get_experiment_by_name(cfg.tracking.experiment) is None
    assert not (Path(cfg.output_dir) / FALLBACK_FILE).exists()


def test_dead_server_does_not_stop_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = _cfg(tmp_path, f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    tracker = Tracker(cfg, enabled=True)
    with pytest.warns(RuntimeWarning, match="Training continues") as caught:
        assert tracker.start("pretrain", {"a": 1}) is None
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracker.set_tags({"k": "v"})
        tracker.log_artifact(__file__)
        tracker.end()
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1  # warned once
    records = _fallback_records(cfg)
    metrics = [r for r in records if r["kind"] == "metrics"]
    assert [(r["step"], r["metrics"]["loss"]) for r in metrics] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert {"start", "tags", "artifact", "end"} <= {r["kind"] for r in records}


def test_outage_backlog_is_sent_after_reconnect(mlflow_server, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, mlflow_server)
    tracker = Tracker(cfg, enabled=True)
    run_id = tracker.start("pretrain", {})
    tracker.log_metrics({"loss": 1.0}, step=0)
    assert tracker.flush()  # the worker sends it: with the real client, before the outage below

    real_log_batch = tracker._client.log_batch

    def down(*args, **kwargs):
        raise MlflowException("API request failed: Max retries exceeded (connection refused)")

    monkeypatch.setattr(tracker._client, "log_batch", down)
    with pytest.warns(RuntimeWarning):
        tracker.log_metrics({"loss": 0.9}, step=1)
        tracker.flush()  # the worker found the outage; the warning comes on this thread
    tracker.log_metrics({"loss": 0.8}, step=2)  # offline: straight to the fallback file
    assert tracker.flush() and tracker.offline
    monkeypatch.setattr(tracker._client, "log_batch", real_log_batch)
    tracker.retry_interval_s = 0.0
    tracker.log_metrics({"loss": 0.7}, step=3)  # reconnects, sends the backlog, then this one
    tracker.end()
    assert not tracker.offline
    history = MlflowClient(mlflow_server).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7)]
    kinds = [r["kind"] for r in _fallback_records(cfg)]
    assert kinds == ["metrics", "metrics", "flushed"]


def test_default_sqlite_store_without_server(tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    cfg = _cfg(tmp_path)  # no tracking.uri, no MLFLOW_TRACKING_URI
    tracker = Tracker(cfg, enabled=True)
    run_id = tracker.start("pretrain", {"a": 1})
    assert tracker.uri == f"sqlite:///{(tmp_path / 'demo' / 'mlflow.db').resolve()}"
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == tracker.uri
    tracker.log_metrics({"loss": 0.25}, step=0)
    state = _encoder_state()
    assert register_encoder(state, cfg.model, "pcl-encoder", cfg.tracking.alias, run_id=run_id) == "1"
    tracker.end()

    # the finetune stage of the same experiment sees the same store and registry
    assert resolve_tracking_uri(Config(output_dir=str(tmp_path / "demo"))) == tracker.uri
    _assert_same(load_encoder_state("models:/pcl-encoder@candidate"), state)
    client = MlflowClient(tracker.uri)
    assert client.get_run(run_id).data.metrics["loss"] == 0.25
    assert (tmp_path / "demo" / "mlflow.db").is_file()
    assert (tmp_path / "demo" / "mlartifacts").is_dir()  # artifacts next to the db ...
    assert not (workdir / "mlruns").exists() and not (workdir / "mlflow.db").exists()  # ... not in the cwd


def test_load_encoder_from_path(tmp_path):
    state = _encoder_state()
    path = tmp_path / "encoder.pt"
    torch.save(state, path)
    _assert_same(load_encoder_state(str(path)), state)
    _assert_same(load_encoder_state(str(tmp_path)), state)  # a folder holding encoder.pt
    assert encoder_lineage(str(path)) == {"encoder_path": str(path)}
    assert encoder_lineage("") == {}
    with pytest.raises(UserError, match="not found"):
        load_encoder_state(str(tmp_path / "nope.pt"))
    # anything that needs code to unpickle is refused (weights_only=True)
    torch.save({"weight": torch.ones(1), "net": nn.Linear(1, 1)}, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="weights_only=True"):
        load_encoder_state(str(tmp_path / "pickled.pt"))
    assert os.path.exists(path)


def test_standard_tags_and_system_metrics(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    cfg = _cfg(tmp_path, mlflow_server)
    tracker = Tracker(cfg, enabled=True)
    tracker.system_metrics_interval_s = 0.2
    run_id = tracker.start("pretrain", {"a": 1}, tags={"method": "pcl"})
    client = MlflowClient(mlflow_server)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.end()
    run = client.get_run(run_id)
    tags = run.data.tags
    assert tags["git_commit"] == git_commit() and tags["world_size"] == "1" and tags["method"] == "pcl"
    assert tags["slurm_job_id"] == "4242" and tags["slurm_array_task_id"] == "3"
    assert "slurm_array_job_id" not in tags
    # system metrics (MLflow's sampler; at least the samples taken before end() are sent)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    quiet = Tracker(_cfg(tmp_path, mlflow_server), enabled=True)
    quiet.system_metrics_interval_s = 0.2
    quiet_id = quiet.start("pretrain", {})
    quiet.end()
    assert not [k for k in client.get_run(quiet_id).data.metrics if k.startswith("system/")]


def test_only_rank_zero_tracks(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _cfg(tmp_path, mlflow_server)
    tracker = Tracker(cfg, enabled=True)  # a caller's mistake: still no ghost run from rank 1
    assert not tracker.enabled and tracker.start("pretrain", {"a": 1}) is None
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.end()
    assert MlflowClient(mlflow_server).get_experiment_by_name(cfg.tracking.experiment) is None


def test_offline_run_and_registration_are_replayed(mlflow_server, tmp_path, monkeypatch):
    """Server down for the whole run: training output survives, and replay_fallback sends all of it later."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = _cfg(tmp_path, f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    name = _unique("offline-enc")
    state = _encoder_state()
    tracker = Tracker(cfg, enabled=True)
    with pytest.warns(RuntimeWarning):
        assert tracker.start("pretrain", {"model.width": 4, "lr": 0.1}, tags={"method": "pcl"}) is None
        for step in range(1, 4):
            tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)
        tracker.log_metrics({"loss": float("nan")}, step=4)
        note = tmp_path / "config.yaml"
        note.write_text("model: {width: 4}\n")
        tracker.log_artifact(note)
        assert register_encoder(state, cfg.model, name, "candidate", tags={"method": "pcl"}, run_id=tracker.run_id) is None
        tracker.end()
    kept = list((Path(cfg.output_dir) / "unregistered").glob("*.pt"))
    assert len(kept) == 1
    records = read_fallback(Path(cfg.output_dir) / FALLBACK_FILE)
    assert [r["kind"] for r in records] == ["start", "metrics", "metrics", "metrics", "metrics", "artifact", "register", "end"]
    assert len({r["session"] for r in records}) == 1

    summary = replay_fallback(Path(cfg.output_dir) / FALLBACK_FILE, mlflow_server)
    (run_id, result), = summary.items()
    assert result["created"] and result["metrics_sent"] == 7 and result["registered"] == ["1"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    assert run.data.params == {"model.width": "4", "lr": "0.1"} and run.data.tags["method"] == "pcl"
    assert run.data.tags["git_commit"] == git_commit()
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4] and math.isnan(history[-1].value)
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    _assert_same(load_encoder_state(f"models:/{name}@candidate"), state)
    assert encoder_lineage(f"models:/{name}@candidate")["encoder_run_id"] == run_id

    again = replay_fallback(Path(cfg.output_dir) / FALLBACK_FILE, mlflow_server)  # idempotent
    assert again[run_id]["metrics_sent"] == 0 and again[run_id]["registered"] == ["1"]
    assert len(client.get_metric_history(run_id, "loss")) == 4
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_new_kind_of_version_is_a_small_class(mlflow_server, tmp_path):
    """A kind says how its files are packed and which tags it adds; register_version does the rest."""
    from pcl_hpc.tracking import VersionKind, register_version

    class NotesVersion(VersionKind):
        label, tag_prefix, name_in_run, model_type = "notes", "notes", "notes", "pcl-notes"
        weights_artifact, code_file, temp_prefix = "weights", "pcl_notes_model.py", "pcl-notes-"
        pyfunc_code = ("import mlflow\nfrom mlflow.pyfunc import PythonModel\n\n\nclass Notes(PythonModel):\n"
                       "    def predict(self, context, model_input: list[str], params=None) -> list[str]:\n"
                       "        return model_input\n\n\nmlflow.models.set_model(Notes())\n")
        tensors = 1

        def stage(self, folder):
            torch.save({"w": torch.ones(3)}, folder / "weights.pt")
            (folder / "notes.txt").write_text("hello")
            return {"weights": folder / "weights.pt", "notes": folder / "notes.txt"}

        def version_tags(self):
            return {"notes.lines": 1}

    cfg = _cfg(tmp_path, mlflow_server)
    tracker = Tracker(cfg, enabled=True)
    run_id = tracker.start("export", {})
    name = _unique("notes")
    assert register_version(NotesVersion(), name, "candidate", tags={"stage": "export"}) == "1"  # the Tracker's run
    tracker.end()
    mv = MlflowClient(mlflow_server).get_model_version(name, "1")
    assert mv.run_id == run_id and "candidate" in mv.aliases
    assert mv.tags["notes.run_id"] == run_id and mv.tags["notes.tensors"] == "1" and len(mv.tags["notes.sha256"]) == 64
    assert mv.tags["notes.lines"] == "1" and mv.tags["stage"] == "export"
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "dl")))
    assert (model_dir / "artifacts" / "notes.txt").read_text() == "hello"


# ---------------------------------------------------------------------------------------------
# the background queue: tracking never stalls the step loop


@contextlib.contextmanager
def _silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never answers: ``http://127.0.0.1:<port>``."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # kept open, never read, never answered
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        server.close()


def test_worker_queue_is_bounded_ordered_and_spills_on_close():
    """The worker on its own: put never blocks, items arrive in order, close() spills what is left."""
    from pcl_hpc.tracking.background import Worker

    handled, spilled, gate, threads = [], [], threading.Event(), set()

    def handle(items):
        threads.add(threading.current_thread().name)
        gate.wait(5)  # stuck, like a request to a server that does not answer
        handled.extend(items)

    worker = Worker(handle, spilled.append, maxsize=3)
    worker.batch = 2
    started = time.monotonic()
    accepted = [worker.put(i) for i in range(8)]
    assert time.monotonic() - started < 0.1
    assert accepted.count(False) >= 3  # the queue holds 3 (+ what the worker took): the rest is refused at once
    done, count = worker.close(None, timeout=0.2)
    assert not done and count == len(spilled)
    taken = [i for i, ok in zip(range(8), accepted) if ok]
    assert spilled == taken  # in flight and still queued, in order
    gate.set()
    worker.thread.join(timeout=5)
    assert not worker.thread.is_alive()  # the stuck thread ends once its call returns
    assert threads == {"pcl-tracking"}

    order = []
    worker = Worker(order.extend, spilled.append, maxsize=1000)
    for i in range(500):
        assert worker.put(i)
    assert worker.call(lambda: len(order), timeout=5).result == 500  # after everything queued
    assert worker.close(lambda: order.append("end"), timeout=5) == (True, 0)
    assert order == [*range(500), "end"]
    assert worker.put(500)  # a later call starts a new worker thread
    assert worker.close(None, timeout=5) == (True, 0) and order[-1] == 500


def test_hanging_server_never_stalls_logging_and_replay_sends_each_step_once(mlflow_server, tmp_path, monkeypatch):
    """A server that accepts and never answers: each log call returns at once, end() within its bound,
    nothing is lost: replay_fallback sends every step to a real server exactly once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    steps = 200
    with _silent_server() as uri:
        cfg = _cfg(tmp_path, uri)
        tracker = Tracker(cfg, enabled=True)
        tracker.system_metrics = False
        tracker.retry_interval_s = 0.0  # the worker tries again at every call: stuck 1 s each time
        tracker.queue_size = 50  # smaller than the steps: some calls find it full
        tracker.drain_timeout_s = 1.0
        with pytest.warns(RuntimeWarning) as caught:
            started = time.monotonic()
            assert tracker.start("pretrain", {"a": 1}) is None  # bounded by the HTTP timeout
            assert time.monotonic() - started < 15
            spent = 0.0
            for step in range(steps):
                begin = time.perf_counter()
                tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
                spent += time.perf_counter() - begin
            tracker.set_tags({"epochs_done": 1})
            started = time.monotonic()
            tracker.end()
            ended_in = time.monotonic() - started
        assert spent < 0.5, f"{steps} log_metrics calls took {spent:.3f} s"
        assert ended_in < tracker.drain_timeout_s + 1.0
        assert any("not keeping up" in str(w.message) for w in caught)  # the full queue warned once
        assert sum("not keeping up" in str(w.message) for w in caught) == 1
        tracker._worker.thread.join(timeout=5)  # the stuck worker ends once its request times out
        assert not tracker._worker.thread.is_alive()

    records = _fallback_records(cfg)
    assert {r["step"] for r in records if r["kind"] == "metrics"} == set(range(steps))
    assert {"start", "tags", "end"} <= {r["kind"] for r in records}
    summary = replay_fallback(Path(cfg.output_dir) / FALLBACK_FILE, mlflow_server)
    (run_id, result), = summary.items()
    assert result["created"] and result["metrics_sent"] == 2 * steps
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["epochs_done"] == "1"
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / (s + 1)) for s in range(steps)]
    assert len(client.get_metric_history(run_id, "lr")) == steps


def test_metrics_go_through_the_worker_in_order_each_step_once(mlflow_server, tmp_path):
    cfg = _cfg(tmp_path, mlflow_server)
    tracker = Tracker(cfg, enabled=True)
    tracker.system_metrics = False
    run_id = tracker.start("pretrain", {"a": 1})
    callers: set[str] = set()
    real_log_batch = tracker._client.log_batch

    def log_batch(*args, **kwargs):  # the real call, noting the thread that makes it
        callers.add(threading.current_thread().name)
        return real_log_batch(*args, **kwargs)

    tracker._client.log_batch = log_batch
    steps = 300
    for step in range(steps):
        tracker.log_metrics({"loss": float(step), "acc": step / steps}, step=step)
        if step == 100:
            tracker.log_metrics({"loss": -1.0}, step=50)  # an earlier step again: skipped
    tracker.set_tags({"epochs_done": 3})
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker.log_artifact(note)
    assert tracker.flush()
    tracker.end()
    assert callers == {"pcl-tracking"}  # every MLflow call after start() on the worker thread
    client = MlflowClient(mlflow_server)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(s, float(s)) for s in range(steps)]
    assert len(client.get_metric_history(run_id, "acc")) == steps
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["epochs_done"] == "3"
    assert [a.path for a in client.list_artifacts(run_id)] == ["note.txt"]
    assert _fallback_records(cfg) == []

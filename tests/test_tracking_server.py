"""Issue 6 end to end against real ``mlflow server`` processes on 127.0.0.1.

* a 2-process pretrain (torchrun, gloo) makes exactly one run with the expected params, tags,
  metrics and config artifact, and registers an encoder equal to encoder.pt; a fine-tune from
  ``models:/<name>@candidate`` records the lineage;
* killing the server mid-run does not stop training, and no step's loss is lost (the fallback
  file holds what the server missed, and ``replay_fallback`` sends it, each step once); a Tracker
  reconnects to the restarted server and sends its backlog;
* a killed run resumed by id continues the same MLflow run without logging a step twice.

The kill tests use their own server (``MlflowTestServer``, started through tools/mlflow_server.sh),
never the shared one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from pcl_hpc.config import flatten, load_config
from pcl_hpc.data.store import read_manifest
from pcl_hpc.tracking import FALLBACK_FILE, Tracker, git_commit, load_encoder_state, read_fallback, replay_fallback
from tests.conftest import REPO
from tests.mlflow_server import MlflowTestServer, experiment_runs, isolated_mlflow, mlflow_server  # noqa: F401
from tests.mlflow_server import unique as _unique

CONFIG = REPO / "configs" / "demo.yaml"
RUN_TIMEOUT_S = 600  # a 2-process pretrain on a busy 2-core machine


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch):
    with isolated_mlflow(monkeypatch, retries=0, timeout_s=10):
        yield


@pytest.fixture(scope="module")
def own_server():
    """A server only the kill test uses (started through tools/mlflow_server.sh)."""
    server = MlflowTestServer(script=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        server.cleanup()


def _args(store: str, out: Path, uri: str, experiment: str, name: str, **extra) -> list[str]:
    values = {
        "data.store": store, "data.patch": 32, "output_dir": out, "model.width": 4,
        "pretrain.max_steps": 3, "pretrain.batch_size": 4, "pretrain.log_every": 1, "pretrain.augment": "false",
        "tracking.uri": uri, "tracking.experiment": experiment, "tracking.register_name": name, **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def _pretrain_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "pcl_hpc", "pretrain", "--config", str(CONFIG), *args]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_REGISTRY_"))}
    env.update({
        "OMP_NUM_THREADS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PYTHONUNBUFFERED": "1", **extra,
    })
    return env


def _assert_same_weights(loaded: dict, saved: dict) -> None:
    assert list(loaded) == list(saved)
    for key, value in saved.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def _poll(condition, timeout_s: float, what: str, interval_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# ---------------------------------------------------------------------------------------------


def test_two_process_pretrain_one_run_registered_and_lineage(demo_store, mlflow_server, tmp_path):
    experiment, name, steps = _unique("pretrain2"), _unique("enc"), 3
    args = _args(demo_store, tmp_path, mlflow_server, experiment, name, **{"pretrain.max_steps": steps})
    proc = subprocess.run(_pretrain_cmd(args), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = load_config(str(CONFIG), args)

    client = MlflowClient(mlflow_server)
    runs = experiment_runs(client, experiment)
    assert len(runs) == 1, "exactly one MLflow run for a 2-process job (rank 1 logs nothing)"
    run = runs[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert len(params) == len(flatten(cfg))
    assert params["model.width"] == "4" and params["pretrain.max_steps"] == str(steps)
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["git_commit"] == git_commit() and tags["method"] == "pcl"
    assert tags["store_hash"] == read_manifest(demo_store)["content_hash"] != ""
    assert tags["stage"] == "pretrain"
    for key in ("loss", "lr", "views_per_s"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, steps + 1)), key
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]
    assert not (tmp_path / "pretrain" / FALLBACK_FILE).exists()

    # the registered encoder (not the wrapper) equals encoder.pt, weight for weight
    mlflow.set_tracking_uri(mlflow_server)
    saved = torch.load(tmp_path / "pretrain" / "encoder.pt", weights_only=True)
    _assert_same_weights(load_encoder_state(f"models:/{name}@candidate"), saved)
    versions = client.search_model_versions(f"name='{name}'")
    assert [v.version for v in versions] == ["1"]
    mv = client.get_model_version(name, "1")
    assert mv.run_id == run_id and mv.aliases == ["candidate"]
    assert mv.tags["method"] == "pcl" and mv.tags["store_hash"] == tags["store_hash"]
    assert mv.tags["global_batch"] == "8"

    # a fine-tune from the registry URI records the lineage on its run
    from pcl_hpc.train.finetune import finetune

    source = f"models:/{name}@candidate"
    ft = load_config(str(CONFIG), [
        f"data.store={demo_store}", "data.patch=32", "model.width=4", f"tracking.uri={mlflow_server}",
        f"tracking.experiment={experiment}", f"output_dir={tmp_path / 'ft'}", f"finetune.encoder={source}",
        "finetune.epochs=1", "finetune.batch_size=8", "finetune.augment=false",
        "finetune.train_volumes=[dk01]", "finetune.val_volumes=[dk04]", "finetune.test_volumes=[dk05]"])
    finetune(ft)
    ft_runs = [r for r in experiment_runs(client, experiment) if r.data.tags.get("stage") == "finetune"]
    assert len(ft_runs) == 1
    lineage = ft_runs[0].data.tags
    assert (lineage["encoder_name"], lineage["encoder_version"], lineage["encoder_run_id"]) == (name, "1", run_id)


@pytest.mark.slow
def test_server_killed_mid_run_training_continues(demo_store, own_server, tmp_path):
    """Kill the server under a running 2-process pretrain (and an in-process Tracker), restart it."""
    if not own_server.running:
        own_server.start()
    experiment, name, steps = _unique("kill"), _unique("enc"), 150
    uri = own_server.uri
    args = _args(demo_store, tmp_path, uri, experiment, name, **{"pretrain.max_steps": steps})
    log_path = tmp_path / "pretrain.log"
    client = MlflowClient(uri)

    # next to the pretrain, a Tracker in this process: deterministic proof that the backlog is sent
    tracker = _quiet_tracker(tmp_path / "tracker", uri, "restart", retry_s=0.2)
    tracker_run = tracker.start("pretrain", {"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)

    with open(log_path, "w") as log:
        proc = subprocess.Popen(_pretrain_cmd(args), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=_env(PCL_TRACKING_RETRY_S="1"), start_new_session=True)
    try:
        def first_losses():
            if proc.poll() is not None:
                raise AssertionError(f"pretrain ended before any metric reached the server:\n{log_path.read_text()[-3000:]}")
            runs = experiment_runs(client, experiment)
            return runs and client.get_metric_history(runs[0].info.run_id, "loss")

        _poll(first_losses, RUN_TIMEOUT_S, "the first loss on the server")
        own_server.kill()
        assert proc.poll() is None, "the pretrain must still be running when the server dies"
        with pytest.warns(RuntimeWarning, match="Training continues"):
            tracker.log_metrics({"loss": 0.9}, step=2)
            tracker.flush()  # the worker thread found the outage; the warning comes on this thread
        tracker.log_metrics({"loss": 0.8}, step=3)
        assert tracker.offline
        time.sleep(2)
        own_server.start()  # same port, same db and artifacts
        step = 3

        def back() -> bool:
            nonlocal step
            step += 1
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
            return not tracker.offline

        _poll(back, 60, "the tracker to reconnect")
        tracker.end()
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    # the in-process Tracker: everything arrived after the restart, each step once
    assert [m.step for m in client.get_metric_history(tracker_run, "loss")] == list(range(1, step + 1))
    assert client.get_run(tracker_run).info.status == "FINISHED"
    assert "flushed" in [r["kind"] for r in read_fallback(tracker.fallback_path)]

    # the pretrain: finished normally, its encoder saved
    output = log_path.read_text()
    assert rc == 0, output[-3000:]
    assert (tmp_path / "pretrain" / "encoder.pt").is_file()
    runs = experiment_runs(client, experiment)
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    on_server = {m.step for m in client.get_metric_history(run_id, "loss")}
    fallback = tmp_path / "pretrain" / FALLBACK_FILE
    records = read_fallback(fallback) if fallback.exists() else []
    in_fallback = {r["step"] for r in records if r["kind"] == "metrics" and "loss" in r["metrics"]}
    assert on_server | in_fallback == set(range(1, steps + 1)), "every step's loss is on the server or in the fallback"
    assert in_fallback, "the outage left a record in the fallback file"

    # whatever the server still misses (training ended before the restart) is sent by a replay
    replay_fallback(fallback, uri)
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1)), "each step exactly once"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(experiment_runs(client, experiment)) == 1
    mlflow.set_tracking_uri(uri)
    saved = torch.load(tmp_path / "pretrain" / "encoder.pt", weights_only=True)
    _assert_same_weights(load_encoder_state(f"models:/{name}@candidate"), saved)
    assert client.get_model_version_by_alias(name, "candidate").run_id == run_id


_KILLED_RUN = """
import sys, time
from pcl_hpc.config import load_config
from pcl_hpc.tracking import Tracker
cfg = load_config(None, sys.argv[1:])
tracker = Tracker(cfg, enabled=True)
tracker.system_metrics = False
print(tracker.start("pretrain", {"lr": 0.1}), flush=True)
for step in range(1, 1000):
    tracker.log_metrics({"loss": 1.0 / step}, step=step)
    time.sleep(0.05)
"""


def test_resume_after_kill_continues_the_same_run(mlflow_server, tmp_path):
    overrides = [f"output_dir={tmp_path / 'pretrain'}", f"tracking.uri={mlflow_server}",
                 f"tracking.experiment={_unique('resume')}"]
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=_env())
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id, "the run was not created"
        client = MlflowClient(mlflow_server)
        _poll(lambda: len(client.get_metric_history(run_id, "loss")) >= 3, 120, "three logged steps")
    finally:
        proc.kill()  # SIGKILL: no end(), the run stays RUNNING
        proc.wait(timeout=30)
    assert client.get_run(run_id).info.status == "RUNNING"
    counts = [-1]

    def settled() -> bool:  # a request sent just before the kill may still land: read the history once it stops growing
        counts.append(len(client.get_metric_history(run_id, "loss")))
        return counts[-1] == counts[-2]

    _poll(settled, 30, "the killed run's last request", interval_s=0.5)
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    last = max(logged)

    # the requeued job: run id from its checkpoint, replays from an earlier step, changed lr
    cfg = load_config(None, overrides)
    tracker = Tracker(cfg, enabled=True)
    tracker.system_metrics = False
    assert tracker.start("pretrain", {"lr": 0.05, "resumed_from_step": 1}, run_id=run_id) == run_id
    for step in range(2, last + 3):
        tracker.log_metrics({"loss": -1.0}, step=step)
    tracker.end()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.1" and run.data.tags["changed_param.lr"] == "0.05"
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, last + 3)), "no step logged twice"
    assert all(m.value == logged[m.step] for m in history if m.step <= last), "logged steps kept their values"
    assert len(experiment_runs(client, cfg.tracking.experiment)) == 1



def _quiet_tracker(out, uri: str, experiment: str, retry_s: float) -> Tracker:
    """A Tracker of this process on ``uri``: no system metrics, a short retry interval."""
    cfg = load_config(None, [f"output_dir={out}", f"tracking.uri={uri}", f"tracking.experiment={_unique(experiment)}"])
    tracker = Tracker(cfg, enabled=True)
    tracker.system_metrics = False
    tracker.retry_interval_s = retry_s
    return tracker


def _shut(socks) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

class _HangingProxy:
    """A TCP proxy on 127.0.0.1 to a real server; after ``hang()`` (until ``recover()``) it accepts
    connections and never answers (the connections it was forwarding are dropped)."""

    def __init__(self, target_uri: str):
        target = urlparse(target_uri)
        self.target = (target.hostname, target.port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.hanging = threading.Event()
        self.held: list[socket.socket] = []
        self.piped: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.server.accept()[0]
            except OSError:
                return
            if self.hanging.is_set():
                self.held.append(conn)  # never read, never answered
                continue
            upstream = socket.create_connection(self.target)
            self.piped += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut((src, dst))

    def hang(self) -> None:
        self.hanging.set()
        _shut(self.piped)  # kept-alive connections would still answer

    def recover(self) -> None:
        self.hanging.clear()

    def close(self) -> None:
        self.server.close()
        for sock in self.held + self.piped:
            sock.close()


def test_server_that_stops_answering_mid_run_never_stalls_steps_and_backlog_arrives_once(mlflow_server, tmp_path, monkeypatch):
    """The issue's case: the server accepts connections but never answers, in the middle of a run.
    Each log call returns at once; once the server answers again the Tracker reconnects and sends its
    backlog: every step exactly once, in the same run, no replay needed."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    proxy = _HangingProxy(mlflow_server)
    try:
        tracker = _quiet_tracker(tmp_path / "out", proxy.uri, "hang", retry_s=0.3)
        run_id = tracker.start("pretrain", {"a": 1})
        assert run_id
        step = 0
        for step in range(5):
            tracker.log_metrics({"loss": float(step)}, step=step)
        assert tracker.flush()

        proxy.hang()
        spent = 0.0
        with pytest.warns(RuntimeWarning, match="Training continues"):
            for step in range(5, 205):
                begin = time.perf_counter()
                tracker.log_metrics({"loss": float(step)}, step=step)
                spent += time.perf_counter() - begin
            _poll(lambda: tracker.offline, 20, "the worker to find the outage", interval_s=0.1)
            tracker.flush(timeout=5)  # the warning comes on this thread
        assert spent < 0.5, f"200 log_metrics calls took {spent:.3f} s while the server hung"

        proxy.recover()

        def back() -> bool:
            nonlocal step
            step += 1
            tracker.log_metrics({"loss": float(step)}, step=step)
            return not tracker.offline

        _poll(back, 30, "the tracker to reconnect", interval_s=0.2)
        tracker.end()
    finally:
        proxy.close()

    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(step + 1)], "each step once"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "flushed" in [r["kind"] for r in read_fallback(tracker.fallback_path)]

"""pytest fixture ``mlflow_server``: a real ``mlflow server`` on 127.0.0.1 for the test session.

Use it from a test module (or conftest.py) with::

    from tests.mlflow_server import mlflow_server  # noqa: F401

and take ``mlflow_server`` as an argument: it is the server's ``http://127.0.0.1:<port>`` URI.

The server (``sys.executable -m mlflow server``, one worker, job runner off) uses a sqlite backend
and proxied artifacts (``--artifacts-destination``) in a temporary folder, is started on first use
(~5-10 s; up to ``MLFLOW_TEST_SERVER_TIMEOUT`` s, default 120, on a busy machine) and is shared by
every module that imports the fixture: the process is reference-counted, and stopped (its whole
process group) and its folder deleted when the last user is torn down. Tests sharing it should
use their own experiment and model names.

A test that must stop, kill or restart a server uses its own :class:`MlflowTestServer`::

    server = MlflowTestServer(script=True)  # started through tools/mlflow_server.sh
    uri = server.start()                    # picks a free port, then keeps it
    server.kill()                           # SIGKILL of the process group (uvicorn included)
    server.start()                          # same port, same sqlite db and artifact folder
    server.stop(); server.cleanup()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "mlflow_server.sh"
START_TIMEOUT_S = float(os.environ.get("MLFLOW_TEST_SERVER_TIMEOUT", "120"))


# What could point a test's Tracker somewhere else, make it think it is not rank 0, or change a
# subprocess it starts (the fault-injection variable of the resume tests).
MLFLOW_ENV_VARS = (
    "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
    "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "PCL_TRACKING_RETRY_S",
    "PCL_TRACKING_DRAIN_S",
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
    "TORCHELASTIC_RESTART_COUNT", "PCL_HPC_FAULT",
)


def _reset_process_state() -> None:
    """Forget what an earlier test (of any module) left in this process: MLflow's tracking and
    registry URIs, the last started Tracker (register_encoder's fallback), a process group (a
    stage that raised before its teardown; with one, the Tracker reads its rank from the group,
    not from RANK)."""
    import mlflow
    import torch.distributed as torch_dist

    from pcl_hpc.tracking.tracker import Tracker

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    Tracker.clear_current()
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def unique(prefix: str) -> str:
    """A name no other test (or earlier run against the same server) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextmanager
def isolated_mlflow(monkeypatch, retries: int, timeout_s: int):
    """A test starts and ends with no tracking state from elsewhere: the variables above unset
    (and restored afterwards, even the ones MLflow itself sets: mlflow.set_tracking_uri exports
    MLFLOW_TRACKING_URI), MLflow's URIs, the last Tracker and any process group reset before and
    after, torch's thread count restored (an in-process stage sets it); MLflow's HTTP retries set
    here so that monkeypatch restores them afterwards."""
    import torch

    for var in MLFLOW_ENV_VARS:
        # set, then delete: monkeypatch records the original state (set or unset) and restores it,
        # whatever the test (or MLflow) does with the variable meanwhile
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    threads = torch.get_num_threads()
    _reset_process_state()
    try:
        yield
    finally:
        _reset_process_state()
        torch.set_num_threads(threads)


def experiment_runs(client, experiment: str) -> list:
    """Every run of ``experiment`` (none if it does not exist)."""
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class MlflowTestServer:
    """One ``mlflow server`` subprocess in its own process group, with its folder.

    ``start()`` picks a free port the first time and keeps it: after ``stop()`` / ``kill()``,
    ``start()`` again serves the same sqlite db and artifact folder on the same port (a restart).
    """

    def __init__(self, root: Path | None = None, port: int | None = None, script: bool = False) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="pcl-mlflow-server-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen | None = None
        self.port = port
        self.uri = f"http://127.0.0.1:{port}" if port else ""
        self.script = script  # start through tools/mlflow_server.sh (same db/artifact layout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_REGISTRY_"))}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no extra job-runner process
        env["PYTHONUNBUFFERED"] = "1"
        fixed = self.port is not None
        last_error = ""
        for _ in range(1 if fixed else 3):  # a free port can be taken between probing and binding
            port = self.port if fixed else _free_port()
            self.uri = f"http://127.0.0.1:{port}"
            if self.script:
                env["PYTHON"] = sys.executable
                cmd = ["bash", str(SCRIPT), str(self.root), str(port)]
            else:
                cmd = [
                    sys.executable, "-m", "mlflow", "server",
                    "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                    "--artifacts-destination", str(self.root / "mlartifacts"),
                ]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    last_error = f"exited with code {self.proc.returncode}"
                    break
                if _healthy(self.uri):
                    self.port = port
                    return self.uri
                time.sleep(0.25)
            else:
                last_error = f"no /health answer within {START_TIMEOUT_S:.0f} s"
                self.stop()
                break
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        self.stop()
        raise RuntimeError(f"mlflow server did not start ({last_error}); log tail:\n{tail}")

    def kill(self) -> None:
        """SIGKILL the whole server (a crash, not a shutdown); its db and artifacts stay."""
        self.stop(sig=signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        # The server runs uvicorn in a child process: signal the group we created (it is ours alone),
        # even if the parent has already exited.
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)
        # uvicorn may outlive the parent briefly; make sure nothing of the group is left.
        for _ in range(20):
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.25)
        else:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_Server = MlflowTestServer  # the former name

_shared: MlflowTestServer | None = None
_users = 0


@pytest.fixture(scope="session")
def mlflow_server():
    """``http://127.0.0.1:<port>`` of a running ``mlflow server`` (sqlite backend, proxied artifacts)."""
    global _shared, _users
    if _shared is None:
        server = MlflowTestServer()
        try:
            server.start()
        except BaseException:
            server.cleanup()
            raise
        _shared = server
    _users += 1
    try:
        yield _shared.uri
    finally:
        _users -= 1
        if _users == 0 and _shared is not None:
            server, _shared = _shared, None
            server.stop()
            server.cleanup()

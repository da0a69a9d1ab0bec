"""launchers/slurm.py runs the same pretraining through submitit (its local executor: no SLURM here)."""

import json
import subprocess
import sys

import torch

from tests.conftest import REPO
from tests.test_spine import overrides


def test_local_submitit_pretrain_two_tasks(demo_store, tmp_path):
    cmd = [sys.executable, str(REPO / "launchers" / "slurm.py"), "pretrain", "--cluster", "local",
           "--tasks-per-node", "2", "--config", str(REPO / "configs" / "demo.yaml"),
           *overrides(demo_store, tmp_path, **{"pretrain.max_steps": 1})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished" in proc.stdout
    torch.load(tmp_path / "pretrain" / "encoder.pt", weights_only=True)
    logged = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 1
    logs = "".join(p.read_text() for p in (tmp_path / "pretrain" / "submitit").glob("*_0_log.out"))
    assert "on 2 process(es)" in logs, "both submitit tasks must have joined one process group"


def test_launcher_rejects_bad_config(tmp_path):
    cmd = [sys.executable, str(REPO / "launchers" / "slurm.py"), "pretrain", "--config", str(tmp_path / "none.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "none.yaml" in proc.stderr

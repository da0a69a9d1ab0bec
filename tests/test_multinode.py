"""Multi-node entry point: two torchrun "nodes" on this machine meet through c10d rendezvous.

Each node is its own torchrun (--nnodes=2, one process each), as on two hosts of a cluster; the
job must form one process group of 2 whose loss gathers across the nodes, like a single-node run.
"""

import json
import os
import subprocess
import sys

from pcl_hpc.dist import free_port
from tests.conftest import REPO


def test_two_nodes_c10d_rendezvous_train_one_job(demo_store, tmp_path):
    port = free_port()
    args = [f"data.store={demo_store}", "data.patch=32", f"output_dir={tmp_path / 'run'}", "model.width=4",
            "model.projection_dim=32", "pretrain.max_steps=2", "pretrain.batch_size=4", "pretrain.log_every=1",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.register_name=multinode-test"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
             "--rdzv_id=pcl-multinode-test", "-m", "pcl_hpc", "pretrain", "--config",
             str(REPO / "configs" / "demo.yaml"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
            cwd=REPO, env=env)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "on 2 process(es)" in "".join(outputs)
    logged = [json.loads(line) for line in (tmp_path / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2]
    assert (tmp_path / "run" / "pretrain" / "encoder.pt").is_file()

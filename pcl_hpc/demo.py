"""`pcl-hpc demo`: the whole pipeline, offline, on real brain anatomy, in minutes on a laptop.

demo volumes -> Zarr store -> 2-process PCL pretraining (torchrun, gloo) -> MLflow registry ->
fine-tuning from models:/<name>@<alias> and from random init with M=1 and M=2 labeled volumes ->
a Dice table on held-out volumes.

Pretraining sees the non-test subjects, DEMO_VARIANTS unlabeled brain-cropped re-syntheses of each
of them and the MNI152 template; the test subjects dk05/dk06 only ever appear in the final scoring.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

from pcl_hpc.config import load_config
from pcl_hpc.data.demo_data import make_demo_data
from pcl_hpc.data.preprocess import preprocess
from pcl_hpc.errors import UserError
from pcl_hpc.evaluate import format_table
from pcl_hpc.train.finetune import finetune

DEMO_SPACING_MM = 3.0  # coarse enough that 2 CPU cores finish in minutes, fine enough to see anatomy
PRETRAIN_PROCESSES = 2
DEMO_VARIANTS = 3  # extra unlabeled, brain-cropped images per pretraining subject (see make_demo_data)
DEMO_CASES = [f"dk{n:02d}" for n in range(1, 7)]


def variant_cases(cfg) -> list[str]:
    """The subjects that get extra unlabeled variants for pretraining: never a test volume, nor
    anything pretraining excludes."""
    held_out = set(cfg.finetune.test_volumes) | set(cfg.pretrain.exclude_volumes)
    return [c for c in DEMO_CASES if c not in held_out]


def run_pretrain_processes(config_path: str, overrides: list[str]) -> None:
    """Two real processes through torchrun, so the loss gathers features across ranks as on a cluster."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PRETRAIN_PROCESSES}",
           "-m", "pcl_hpc", "pretrain", "--config", config_path, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if subprocess.run(cmd, env=env).returncode != 0:
        raise UserError("demo: the 2-process pretraining failed (see its output above)")


def run_demo(config_path: str, out: str, overrides: list[str]) -> None:
    start = time.time()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the demo's output readable
    out_dir = Path(out).resolve()
    tracking_uri = f"sqlite:///{out_dir / 'mlflow.db'}"
    shared = [f"data.raw_dir={out_dir / 'raw'}", f"data.store={out_dir / 'store.zarr'}", f"tracking.uri={tracking_uri}",
              f"output_dir={out_dir}"]  # the stages write under pretrain/ and finetune/<name>/
    cfg = load_config(config_path, [*overrides, *shared])  # fail on a bad config before any work

    print(f"[1/4] demo volumes from real anatomy -> {out_dir / 'raw'}", flush=True)
    make_demo_data(out_dir / "raw", spacing=DEMO_SPACING_MM, seed=cfg.seed, variants=DEMO_VARIANTS,
                   variant_cases=variant_cases(cfg))
    print(f"[2/4] preprocess -> {cfg.data.store}", flush=True)
    summary = preprocess(cfg.data, workers=2)
    print(summary.format(), flush=True)
    if not summary.ok:
        raise UserError("demo: preprocessing failed for some volumes (see the summary above)")

    print(f"[3/4] PCL pretraining with {PRETRAIN_PROCESSES} processes (torchrun, gloo)", flush=True)
    run_pretrain_processes(config_path, [*overrides, *shared])
    encoder_uri = f"models:/{cfg.tracking.register_name}@{cfg.tracking.alias}"

    print(f"[4/4] fine-tuning from {encoder_uri} and from random init", flush=True)
    rows = []
    pool = cfg.finetune.train_volumes
    for labeled in (1, 2):
        for init, encoder in (("random", ""), ("pcl", encoder_uri)):
            run = copy.deepcopy(cfg)
            run.finetune.name = f"{init}_M{labeled}"
            run.finetune.train_volumes = pool[:labeled]
            run.finetune.encoder = encoder
            run.tracking.run_name = init
            rows.append(finetune(run))

    table = format_table(rows, rows[0]["class_names"])
    (out_dir / "dice_table.md").write_text(table + "\n")
    minutes = (time.time() - start) / 60
    print(f"\nTest Dice on held-out volumes {', '.join(cfg.finetune.test_volumes)}:\n{table}\n")
    print(f"demo finished in {minutes:.1f} min. Outputs: {out_dir}\n"
          f"  table:      {out_dir / 'dice_table.md'}\n"
          f"  encoder:    {out_dir / 'pretrain' / 'encoder.pt'} (registered as {encoder_uri})\n"
          f"  MLflow db:  {out_dir / 'mlflow.db'}\n"
          f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")

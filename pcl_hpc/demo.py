"""`pcl-hpc demo`: the label-efficiency protocol in miniature, offline, on real brain anatomy.

With ``data.layout: nnunet`` (configs/demo_nnunet.yaml) the same anatomy goes through nnU-Net's planner
and preprocessor, the methods pretrain the plan's own 2D network and nnU-Net's stock trainer fine-tunes
every cell (from scratch = ``random``).

demo volumes -> Zarr store -> the sweep (`pcl_hpc.sweep`): PCL, GCL and SimCLR pretrained briefly
with 2 processes each (torchrun, gloo) and registered in MLflow, then fine-tuned with random init
beside them at the M labeled subjects of ``sweep.labeled`` over the folds of ``sweep.folds`` -> results.csv,
summary.md (mean ± std, paired differences against random init) and label_efficiency.png.

Pretraining sees every subject's image without its label, DEMO_VARIANTS unlabeled brain-cropped
re-syntheses of each and the MNI152 template, minus ``pretrain.exclude_volumes``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pcl_hpc.config import load_config
from pcl_hpc.data.demo_data import make_demo_data
from pcl_hpc.data.preprocess import preprocess
from pcl_hpc.errors import UserError

DEMO_SPACING_MM = 3.0  # coarse enough that 2 CPU cores finish in minutes, fine enough to see anatomy
DEMO_VARIANTS = 3  # extra unlabeled, brain-cropped images per subject (see make_demo_data)
DEMO_CASES = [f"dk{n:02d}" for n in range(1, 7)]
NNUNET_DATASET_ID = 990  # the nnU-Net variant's dataset: nnUNet_raw/Dataset990_DemoBrain under --out


def variant_cases(cfg) -> list[str]:
    """The subjects that get extra unlabeled variants for pretraining: none that pretraining excludes."""
    return [c for c in DEMO_CASES if c not in set(cfg.pretrain.exclude_volumes)]


def _nnunet_store(cfg, config_path: str, out_dir: Path, overrides: list[str]):
    """The nnU-Net variant's data: the demo in nnU-Net's raw layout, planned and preprocessed by nnU-Net (2d),
    read into the store (its unlabeled images through the plan's preprocessor); returns the config with the plan."""
    from pcl_hpc.nnunet.ingest import ingest
    from pcl_hpc.nnunet.plans import require_nnunet
    from pcl_hpc.nnunet.raw import plan_and_preprocess, write_raw_dataset

    require_nnunet()
    raw = write_raw_dataset(out_dir / "raw", out_dir / "nnUNet_raw", NNUNET_DATASET_ID, "DemoBrain")
    print(f"[2/3] nnUNetv2_plan_and_preprocess -d {NNUNET_DATASET_ID} -c 2d -> {out_dir / 'nnUNet_preprocessed'}; "
          f"its preprocessed cases -> {cfg.data.store}", flush=True)
    plans = plan_and_preprocess(out_dir / "nnUNet_raw", out_dir / "nnUNet_preprocessed", NNUNET_DATASET_ID)
    cfg = load_config(config_path, [*overrides, f"model.plans={plans}", f"data.raw_dir={raw / 'imagesTs'}"])
    summary = ingest(cfg)
    print(summary.format(), flush=True)
    return cfg


def pretraining_report(cfg, methods: list[str]) -> str:
    """Per method: its pretraining's loss trend and position-probe curve, then one plain sentence on whether the
    encoders are still under-trained (a loss still falling at the last step) and what that means for the table."""
    from pcl_hpc.engine.harness import METRICS_FILE
    from pcl_hpc.train.pretrain import PROBE_R2, convergence, logged

    lines, falling = [], []
    for method in methods:
        metrics = Path(cfg.output_dir) / "pretrain" / method / METRICS_FILE
        trend, probes = convergence(metrics), logged(metrics, PROBE_R2)
        curve = "; position probe R^2 " + " -> ".join(f"{v:.2f}" for _, v in probes) + \
            f" (steps {probes[0][0]}..{probes[-1][0]})" if probes else ""
        lines.append(f"  {method}: {trend}{curve}")
        if trend.startswith("loss still falling"):
            falling.append(method)
    steps = cfg.pretrain.max_steps or f"{cfg.pretrain.epochs} epochs"
    verdict = (f"The {', '.join(falling)} encoder(s) are UNDER-TRAINED at {steps} steps (loss still falling): this "
               f"table shows that the pipeline runs, not what pretraining is worth. `make experiment` pretrains "
               f"longer, watched by the probe, with enough pairs to compare." if falling else
               f"Every encoder's loss is flat at {steps} steps.")
    return "pretraining:\n" + "\n".join(lines) + "\n" + verdict


def run_demo(config_path: str, out: str, overrides: list[str]) -> None:
    from pcl_hpc.sweep import sweep

    start = time.time()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the demo's output readable
    out_dir = Path(out).resolve()
    tracking_uri = f"sqlite:///{out_dir / 'mlflow.db'}"
    shared = [f"data.raw_dir={out_dir / 'raw'}", f"data.store={out_dir / 'store.zarr'}", f"tracking.uri={tracking_uri}",
              f"output_dir={out_dir}"]  # the stages write under pretrain/<method>/ and sweep/
    cfg = load_config(config_path, [*overrides, *shared])  # fail on a bad config before any work

    print(f"[1/3] demo volumes from real anatomy -> {out_dir / 'raw'}", flush=True)
    make_demo_data(out_dir / "raw", spacing=DEMO_SPACING_MM, seed=cfg.seed, variants=DEMO_VARIANTS,
                   variant_cases=variant_cases(cfg))
    if cfg.data.layout == "nnunet":
        cfg = _nnunet_store(cfg, config_path, out_dir, [*overrides, *shared])
    else:
        print(f"[2/3] preprocess -> {cfg.data.store}", flush=True)
        summary = preprocess(cfg.data, workers=2)
        print(summary.format(), flush=True)
        if not summary.ok:
            raise UserError("demo: preprocessing failed for some volumes (see the summary above)")

    s = cfg.sweep
    print(f"[3/3] sweep: pretrain {', '.join(s.pretrain)} ({s.pretrain_processes} processes each), then fine-tune "
          f"{', '.join(dict.fromkeys([*s.encoders, *s.pretrain]))} ({', '.join(s.modes)}) at M = {s.labeled} on folds "
          f"{s.folds} x seeds {s.seeds}", flush=True)
    sweep(cfg)
    sweep_dir = out_dir / "sweep"
    if s.pretrain:
        print(pretraining_report(cfg, s.pretrain), flush=True)
    print(f"demo finished in {(time.time() - start) / 60:.1f} min. Outputs: {out_dir}\n"
          f"  summary:    {sweep_dir / 'summary.md'}\n"
          f"  plot:       {sweep_dir / 'label_efficiency.png'}\n"
          f"  per volume: {sweep_dir / 'results.csv'}\n"
          f"  encoders:   {out_dir / 'pretrain'}/<method>/encoder.pt (registered as "
          f"models:/{cfg.tracking.register_name}-<method>@{cfg.tracking.alias})\n"
          f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")

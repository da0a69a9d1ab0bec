"""Run pcl-hpc jobs through submitit: on SLURM when `sbatch` is on PATH, as local processes otherwise.

    python launchers/slurm.py pretrain --config configs/acdc_pcl.yaml --nodes 2 --tasks-per-node 8 \
        --partition gpu pretrain.epochs=50

The job reuses the training config unchanged; this script adds only cluster settings. Each task
learns its rank from submitit and joins one torch.distributed group.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import submitit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pcl_hpc import dist  # noqa: E402
from pcl_hpc.config import load_config  # noqa: E402
from pcl_hpc.engine.loop import Preempted  # noqa: E402
from pcl_hpc.errors import UserError  # noqa: E402


class StageJob:
    """A picklable job: one task per process; sets the torch.distributed variables, then runs the stage."""

    def __init__(self, stage: str, config_path: str, overrides: list[str]):
        self.stage, self.config_path, self.overrides = stage, config_path, list(overrides)

    def __call__(self):
        job = submitit.JobEnvironment()
        os.environ.update(
            RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank),
            LOCAL_WORLD_SIZE=str(job.num_tasks // max(job.num_nodes, 1)),
            MASTER_ADDR=job.hostnames[0] if job.num_nodes > 1 else "127.0.0.1",
            MASTER_PORT=str(dist.master_port(job.job_id)),
        )
        cfg = load_config(self.config_path, self.overrides)
        try:
            return self.run_stage(cfg)
        except Preempted:
            # Every rank saved at the same step; one requeue brings the job back, and it resumes
            # from <output_dir>/checkpoints/latest, the name the checkpointer writes.
            if job.global_rank == 0 and os.environ.get("SLURM_JOB_ID"):
                subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False, timeout=60)
            raise

    def run_stage(self, cfg):
        if self.stage == "pretrain":
            from pcl_hpc.train.pretrain import pretrain

            return str(pretrain(cfg))
        from pcl_hpc.train.finetune import finetune

        return finetune(cfg)


def stage_folder(cfg, stage: str) -> Path:
    """Where the stage writes (its submitit logs go beside its outputs)."""
    if stage == "pretrain":
        from pcl_hpc.train.pretrain import folder
    else:
        from pcl_hpc.train.finetune import folder
    return folder(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Submit pcl-hpc pretrain / finetune with submitit.")
    parser.add_argument("stage", choices=["pretrain", "finetune"])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--cluster", choices=["auto", "slurm", "local"], default="auto",
                        help="auto: SLURM when sbatch is available, else local processes")
    parser.add_argument("--folder", default="", help="submitit logs (default: <output_dir>/submitit)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--tasks-per-node", type=int, default=1, help="processes per node (one per GPU)")
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--cpus-per-task", type=int, default=1)
    parser.add_argument("--timeout-min", type=int, default=60)
    parser.add_argument("--partition", default="")
    parser.add_argument("--no-wait", action="store_true", help="submit and return without waiting for the result")
    return parser


def submit(args: argparse.Namespace):
    cfg = load_config(args.config, args.overrides)  # a bad config fails here, not in the queue
    if args.stage == "finetune" and args.nodes * args.tasks_per_node > 1:
        raise UserError("finetune runs as a single task: use --nodes 1 --tasks-per-node 1")
    folder = Path(args.folder or stage_folder(cfg, args.stage) / "submitit")
    cluster = None if args.cluster == "auto" else args.cluster
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = dict(nodes=args.nodes, tasks_per_node=args.tasks_per_node, timeout_min=args.timeout_min,
                  name=f"pcl-hpc-{args.stage}")
    if executor.cluster == "slurm":
        params.update(gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task)
        if args.partition:
            params["slurm_partition"] = args.partition
    elif args.nodes > 1:
        raise UserError("the local executor runs one node: use --nodes 1, or submit from a SLURM login node")
    executor.update_parameters(**params)
    job = executor.submit(StageJob(args.stage, args.config, args.overrides))
    print(f"submitted {args.stage} as job {job.job_id} ({executor.cluster}); logs in {folder}", flush=True)
    if args.no_wait:
        return job
    results = job.results()
    print(f"job {job.job_id} finished: {results[0]}", flush=True)
    return job


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        submit(args)
    except UserError as err:
        print(f"launchers/slurm.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

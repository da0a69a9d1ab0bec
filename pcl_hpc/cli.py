"""`pcl-hpc <command>` (also `python -m pcl_hpc`): preprocess, pretrain, finetune, evaluate, sweep, demo."""

from __future__ import annotations

import argparse
import faulthandler
import io
import os
import sys

from pcl_hpc.errors import UserError

COMMANDS = {
    "preprocess": "convert raw volumes (NIfTI, NRRD, MHA, DICOM series) into a chunked Zarr store",
    "pretrain": "contrastive pretraining of the encoder (use torchrun for several processes)",
    "finetune": "fine-tune a U-Net from a pretrained encoder (path or models:/<name>@<alias>) or random init",
    "evaluate": "score a fine-tuned model on the test volumes, or tabulate results.json files",
    "sweep": "the label-efficiency protocol: encoders x M x fold x seed -> results.csv, summary.md, plot",
    "demo": "the whole pipeline offline on real brain anatomy: data, 2-process PCL, registry, fine-tune, Dice",
    "predict": "segment new scans with a fine-tuned model (folder, model.pt or models:/<name>@<alias>): masks on "
               "each scan's own grid",
    "export": "export a fine-tuned model to TorchScript or ONNX, its preprocessing spec beside it",
}
TEMPFAIL = 75  # EX_TEMPFAIL: start the same command again (after a preemption signal, or once there is disk space)
MODEL_HELP = ("fine-tuning folder, model.pt (model_spec.json beside it) or models:/<name>@<alias>; "
              "export --format nnunet: the pretrained encoder (encoder.pt or models:/<name>@<alias>)")


def model_command_arguments(cmd: argparse.ArgumentParser, name: str) -> None:
    """predict / export: no config file, the model carries its preprocessing (model_spec.json).

    Also the arguments of the SLURM launcher's predict job array (it adds its own shards)."""
    cmd.add_argument("--model", required=True, help=MODEL_HELP)
    cmd.add_argument("--tracking-uri", default="", help="registry for models:/ sources (default: $MLFLOW_TRACKING_URI)")
    if name == "export":
        cmd.add_argument("--format", required=True, choices=("torchscript", "onnx", "nnunet"),
                         help="torchscript | onnx (a fine-tuned model) | nnunet (a pretrained encoder, as the file "
                         "nnUNetv2_train -pretrained_weights loads)")
        cmd.add_argument("--out", required=True, help="folder for the exported model and its model_spec.json "
                         "(nnunet: the .pt file, or a folder for nnunet_pretrained_weights.pt)")
        cmd.add_argument("--plans", default="", help="nnunet: nnU-Net's plans file the encoder was pretrained with")
        cmd.add_argument("--configuration", default="2d", help="nnunet: the plans' configuration (default 2d)")
        return
    cmd.add_argument("--input", required=True, nargs="+",
                     help="scan (.nii.gz/.nii/.nrrd/.mha/.mhd), DICOM series folder, or a folder of them")
    cmd.add_argument("--output", required=True, help="folder for the masks and their .json sidecars")
    cmd.add_argument("--tta", action="store_true", help="average the softmax over identity + horizontal + vertical flips")
    cmd.add_argument("--format", choices=("nii.gz", "keep"), default="nii.gz",
                     help="mask format: nii.gz, or keep (the input's: .nrrd, .mha; DICOM -> .nii.gz)")
    cmd.add_argument("--overwrite", action="store_true", help="replace existing masks (default: skip them)")
    cmd.add_argument("--device", default="", help="cpu, cuda, cuda:<n> (default: cuda if available)")
    cmd.add_argument("--batch", type=int, default=0, help="slices per forward pass (0: 32 on CUDA, 8 on CPU)")
    cmd.add_argument("--id-key", default="", help="<store>.idkey of a hashed-id store: name masks by its hashed ids")


def parse_shard(text: str | None, command: str = "sweep") -> tuple[int, int] | None:
    """``--shard I/K`` -> (I, K) with 0 <= I < K; None stays None."""
    if not text:
        return None
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"{command} --shard {text!r}: give I/K, e.g. --shard 0/4 (array task 0 of 4)") from None
    if not 0 <= i < k:
        raise UserError(f"{command} --shard {text!r}: I must be in 0..K-1")
    return i, k


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcl-hpc", description="Positional Contrastive Learning for CT/MRI at scale.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, text in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text)
        if name in ("predict", "export"):
            model_command_arguments(cmd, name)
            if name == "predict":  # here, not in the shared arguments: the SLURM launcher makes the shards itself
                cmd.add_argument("--shard", metavar="I/K", help="an array task: predict every K-th scan (sorted by "
                                 "path) from the I-th; finished masks are skipped, so a requeued task resumes")
            continue
        cmd.add_argument("--config", required=name != "evaluate" and name != "demo",
                         help="YAML config file (see configs/)")
        cmd.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
        if name in ("pretrain", "finetune"):
            cmd.add_argument("--no-resume", action="store_true",
                             help="start fresh even if <output_dir>/checkpoints/latest exists")
        if name == "pretrain":
            cmd.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                             help="start N processes on this machine (as torchrun --standalone does); a bad input is "
                             "reported once, without a traceback")
        if name == "preprocess":
            cmd.add_argument("--workers", type=int, default=1, help="volumes converted in parallel")
            cmd.add_argument("--shard", metavar="I/K", help="an array task: convert every K-th source from the I-th; "
                             "no manifest (a plain run afterwards merges)")
            cmd.add_argument("--prepare-shards", action="store_true", help="create the store (and id key) before an array")
        if name == "evaluate":
            cmd.add_argument("--model", help="model.pt written by finetune, scored on finetune.test_volumes")
            cmd.add_argument("--results", nargs="+", default=[], help="results.json files to tabulate")
        if name == "sweep":
            cmd.add_argument("--step", metavar="NAME", help="run one step of the sweep's plan: pretrain-<method>, "
                             "register (the tracking run, the encoders in the registry), supervised (the positive "
                             "control's encoders), cells, report")
            cmd.add_argument("--shard", metavar="I/K", help="with --step cells (or supervised): only array task I's "
                             "cells of K (I/K,J/K,...: several tasks' cells in one pool of workers)")
            cmd.add_argument("--plan", action="store_true", help="print the plan (steps, tasks, what is left) and exit")
        if name == "demo":
            cmd.add_argument("--out", default="outputs/demo", help="folder for data, store, runs and MLflow db")
    return parser


def run(args: argparse.Namespace) -> None:
    from pcl_hpc.config import load_config

    if args.command == "demo":
        from pcl_hpc.demo import run_demo

        run_demo(args.config or "configs/demo.yaml", args.out, args.overrides)
        return
    if args.command == "predict":
        from pcl_hpc.predict import predict

        summary = predict(args.model, args.input, args.output, tta=args.tta, fmt=args.format, overwrite=args.overwrite,
                          device=args.device or None, batch=args.batch, tracking_uri=args.tracking_uri or None,
                          id_key=args.id_key or None, shard=parse_shard(args.shard, "predict"))
        print(summary.format(), flush=True)
        if not summary.ok:  # a scan failed: the others were written, the summary names it
            raise SystemExit(1)
        return
    if args.command == "export" and args.format == "nnunet":
        from pcl_hpc.nnunet.handoff import export_nnunet

        path = export_nnunet(args.model, args.plans, args.configuration, args.out,
                             tracking_uri=args.tracking_uri or None)
        print(f"export: nnU-Net weights {path}; train with nnUNetv2_train <dataset> {args.configuration} <fold> "
              f"-pretrained_weights {path}", flush=True)
        return
    if args.command == "export":
        from pcl_hpc.export import export

        paths = export(args.model, args.format, args.out, tracking_uri=args.tracking_uri or None)
        print(f"export: {args.format} model {paths['model']}, preprocessing spec {paths['spec']}", flush=True)
        return
    if args.command == "evaluate" and args.results:
        from pcl_hpc.evaluate import format_table, load_results

        rows = load_results(args.results)
        print(format_table(rows, rows[0]["class_names"]))
        return
    overrides = [*args.overrides, *(["checkpoint.resume=false"] if getattr(args, "no_resume", False) else [])]
    cfg = load_config(args.config, overrides)
    if args.command == "preprocess" and cfg.data.layout == "nnunet" and not (args.shard or args.prepare_shards):
        from pcl_hpc.nnunet.ingest import ingest

        summary = ingest(cfg)  # nnU-Net's preprocessed cases; its own preprocessor for data.raw_dir
        print(summary.format())
    elif args.command == "preprocess":
        from pcl_hpc.data.preprocess import prepare_shards, preprocess

        if args.prepare_shards:
            prepare_shards(cfg.data)
            print(f"preprocess: store {cfg.data.store} prepared for shards", flush=True)
            return
        summary = preprocess(cfg.data, workers=args.workers, shard=parse_shard(args.shard, "preprocess"))
        print(summary.format())
        if not summary.ok:
            raise SystemExit(1)
    elif args.command == "pretrain":
        from pcl_hpc.train.pretrain import pretrain

        pretrain(cfg)
    elif args.command == "finetune":
        from pcl_hpc.train.finetune import finetune

        finetune(cfg)
    elif args.command == "sweep":
        from pcl_hpc import sweep

        if args.shard and args.step not in sweep.ARRAYS:
            raise UserError(f"sweep --shard {args.shard}: only with --step cells or supervised (the plan's arrays)")
        if args.plan:
            from pcl_hpc.pipeline import plan_for
            from pcl_hpc.plan import describe

            print(describe(plan_for("sweep", cfg)))
        elif args.step:
            sweep.run_step(cfg, args.step, [parse_shard(t) for t in args.shard.split(",")] if args.shard else None)
        else:
            sweep.sweep(cfg)
    elif args.command == "evaluate":
        from pcl_hpc.evaluate import evaluate_model

        evaluate_model(cfg, args.model)


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line for each worker: ``--nproc-per-node N`` (or ``=N``) left out."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc_per_node", 1) > 1 and "RANK" not in os.environ:
        from pcl_hpc.dist import run_workers

        return run_workers(args.nproc_per_node, _without_nproc(argv))
    try:  # a crash in native code (SIGSEGV, SIGABRT) shows every thread's Python stack
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, io.UnsupportedOperation):  # stderr is not a file (called in-process)
        pass
    try:
        run(args)
    except UserError as err:
        from pcl_hpc.atomic import DiskFull
        from pcl_hpc.dist import detect, report_error

        status = TEMPFAIL if isinstance(err, DiskFull) else 2  # a full disk: nothing lost, run it again with space
        report_error(f"pcl-hpc {args.command}: error: {err}", status)  # once, when several processes fail alike
        if detect().distributed:  # a rank of several: leave now, not through gloo's exit-time teardown, which can
            sys.stdout.flush()    # abort ("terminate called without an active exception") once a peer has gone
            sys.stderr.flush()
            os._exit(status)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())

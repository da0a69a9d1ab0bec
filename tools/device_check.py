#!/usr/bin/env python3
"""Every CUDA path of the toolkit in one script, on one GPU, in under 8 minutes; figures as JSON lines.

  python tools/device_check.py                      # on a machine with one NVIDIA GPU (full sizes)
  DEVICE_CHECK_TINY=1 python tools/device_check.py  # on CPU at tiny sizes (what CI runs; ~2 minutes)

On a lent GPU machine (a bare copy of this working tree, its own python3 with a CUDA torch, no .venv): from
the repository root, with the project's other requirements importable by that python3 (pip-installed there,
or carried as wheels), run `python3 tools/device_check.py 2>&1 | tee "$OUT/device_check.jsonl"` under a time
limit above the budget (470 s) plus start-up; every figure is in the JSON lines on stdout, each section's full
log under <work>/logs/.

Options (or the environment variables in brackets):
  --tiny          [DEVICE_CHECK_TINY=1]   tiny sizes (patch 32, f=4, a few steps); the CPU mode
  --work DIR      [DEVICE_CHECK_WORK]     where data, runs, logs and results go (default: a new /tmp folder)
  --only a,b      [DEVICE_CHECK_ONLY]     run only these sections (build_data is run first when its store is missing)
  --budget S      [DEVICE_CHECK_BUDGET_S] the script's wall-clock budget (default 470 full, 300 tiny): each
                                          section's timeout is cut to what is left; a section that finds
                                          less than 15 s left is reported failed, not run
  [DEVICE_CHECK_COMPILE=1]  also run the torch.compile section on CPU (cold compile ~50 s on 2 cores)
  [PYTHON]        the interpreter of the sections (default .venv/bin/python when it exists, else python3);
                  this script itself needs only Python 3.11+ and its standard library

Sections, in order (SECTIONS below: name, time limits, function); each is a short real run through the
project's own entry points (the CLI `python -m pcl_hpc <command> --config configs/demo.yaml key=value...`,
torchrun, tools/bench_train.py) on a small Zarr store it builds itself, in its own process group under its
time limit, and prints ONE JSON line {"check": <name>, "ok": ..., "seconds": ...}:
  environment        GPU name, torch / CUDA / cuDNN / NCCL / DeepSpeed versions (CPU model in tiny mode)
  build_data         the demo's real-anatomy volumes (tools/make_demo_data.py) -> `pcl_hpc preprocess` -> Zarr
  pretrain           1-process pretraining, 512x512 patches, f=32, bf16 (loop views/s from metrics.jsonl),
                     then tools/bench_train.py: our step against the original-style step (one encoder
                     call per view, fp32, NCHW): img_per_s, baseline_img_per_s, speedup
  finetune_evaluate  one fine-tune epoch from pretrain's encoder.pt (whole-volume prediction of the test
                     volume on the device), then `pcl_hpc evaluate --model model.pt`: Dice of both
  deepspeed_zero2    DeepSpeed ZeRO-2 steps, bf16
  augment_device     pretraining with data.augment_on=device, plus one augmentation batch timed on the device
  sync_batchnorm     CUDA: a 1-process NCCL group (torchrun), with_sync_batchnorm's conversion, DDP, steps.
                     CPU: 2-process torchrun with model.sync_batchnorm=true must fail with the one-line
                     error (outcome "refused_on_cpu"); the conversion helper must refuse the same way
  save_resume        pretrain N steps, stop, rerun to 2N (resumes from checkpoints/latest), against a
                     straight 2N run: encoder.pt bit-identical? (deterministic algorithms on)
  compile            pretraining with engine.compile=true (compile seconds, steady views/s); on CPU
                     skipped with the reason unless DEVICE_CHECK_COMPILE=1
Then {"summary": {"ok": n, "failed": m, ...}}; the exit status is 1 when any check failed.
A failing or timed-out section never stops the others. Each section's full log is under <work>/logs/.

Internal: `--section NAME` runs one section in this process (the main process starts each so);
`--probe NAME ARGS...` runs one of the in-process probes (PROBES) as its own program.
"""

import contextlib
import dataclasses
import functools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(os.path.abspath(__file__)).parent.parent
SELF = REPO / "tools" / "device_check.py"
DEMO = "configs/demo.yaml"
SIZES = {  # per mode: patch, model width, batches (slices), step counts, DataLoader / preprocess workers
    "tiny": dict(patch=32, width=4, batch=4, small_batch=4, steps=3, short_steps=2, resume_n=2, ft_batch=8,
                 workers=0, prep_workers=1, bench_steps=2, bench_warmup=1, compile_steps=2),
    "full": dict(patch=512, width=32, batch=32, small_batch=16, steps=40, short_steps=10, resume_n=5, ft_batch=16,
                 workers=4, prep_workers=4, bench_steps=10, bench_warmup=3, compile_steps=12),
}
BUDGET_S = {"tiny": 300, "full": 470}
OPTIONS = {"--work": "DEVICE_CHECK_WORK", "--only": "DEVICE_CHECK_ONLY", "--budget": "DEVICE_CHECK_BUDGET_S"}
ERROR_MARKS = ("error", "Error", "Exception", "Traceback", "Killed", "FAILED")
NONDETERMINISTIC = re.compile(r"[A-Za-z_0-9.]* does not have a deterministic implementation")
SYNC_BN_REFUSAL = "pcl-hpc pretrain: error: model.sync_batchnorm=true needs CUDA"


@dataclasses.dataclass(frozen=True)
class Run:
    """One run's settings, the same in every process (derived from the environment the main process exports)."""

    mode: str
    py: str
    work: Path
    budget: int
    device_kind: str
    patch: int
    width: int
    batch: int
    small_batch: int
    steps: int
    short_steps: int
    resume_n: int
    ft_batch: int
    workers: int
    prep_workers: int
    bench_steps: int
    bench_warmup: int
    compile_steps: int
    name: str = "main"  # the section being reported
    t0: float = 0.0  # when it started (time.monotonic)

    data = property(lambda self: self.work / "data")
    store = property(lambda self: self.work / "data" / "store.zarr")
    runs = property(lambda self: self.work / "runs")
    logs = property(lambda self: self.work / "logs")
    results = property(lambda self: self.work / "results")
    db = property(lambda self: f"sqlite:///{self.work}/mlflow.db")


# ------------------------------------------------------------------ reading the runs' files
def read(path):
    return Path(path).read_text(encoding="utf-8", errors="replace")


def value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def log_lines(path):
    """The lines of a log as grep and tail see them (split at newlines only)."""
    text = read(path)
    lines = text.split("\n")
    return lines[:-1] if text.endswith("\n") else lines


def last_line(path):
    """`tail -n 1 PATH`."""
    return (log_lines(path) or [""])[-1]


def first_line_with(path, text):
    """`grep -m 1 TEXT PATH` ("" when no line has it)."""
    return next((line for line in log_lines(path) if text in line), "")


def last_brace_line(path):
    """`grep '^{' PATH | tail -n 1`: the last line that starts a JSON object ("" when none)."""
    return ([line for line in log_lines(path) if line.startswith("{")] or [""])[-1]


def last_json(path):
    """A whole-file JSON object (results.json), else the last line that parses as one ({} when none)."""
    text = read(path)
    with contextlib.suppress(ValueError):
        whole = json.loads(text)
        if isinstance(whole, dict):
            return whole
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return {}


def lenient(figure):
    """A figure for a report: an error in reading it goes (traceback) to the section's log, and the figure is ""."""

    @functools.wraps(figure)
    def wrapper(*args):
        try:
            return figure(*args)
        except Exception:  # noqa: BLE001 - one unreadable figure must not lose the section's line
            traceback.print_exc()
            return ""

    return wrapper


@lenient
def get(path, key):
    """KEY of the last JSON object in PATH (None when absent)."""
    try:
        return last_json(path).get(key)
    except OSError:
        return None


def metric_rows(path):
    """The rows of a metrics.jsonl (None when there is no file)."""
    try:
        return [json.loads(x) for x in read(path).splitlines() if x.strip()]
    except OSError:
        return None


@lenient
def rate(path, key="views_per_s", skip=1):
    """The median throughput of the logged steps after the first `skip` (warm-up, compile)."""
    rows = metric_rows(path)
    if rows is None:
        return None
    values = [r[key] for r in rows if r.get("step", 0) > skip and key in r] or [r[key] for r in rows if key in r]
    return round(statistics.median(values), 1) if values else None


@lenient
def steps(path):
    """The last logged step and its loss."""
    rows = metric_rows(path) or []
    return {"steps": rows[-1]["step"] if rows else None, "final_loss": round(rows[-1]["loss"], 4) if rows else None}


@lenient
def evaluate_dice(log):
    """The mean Dice in the table `pcl_hpc evaluate` printed (the Dice table's first row; None when none)."""
    lines = read(log).splitlines()
    try:
        start = lines.index("Dice")
        row = next(x for x in lines[start + 1:] if x.startswith("|") and not x.startswith(("| init", "|---")))
        return float(row.strip().strip("|").split("|")[-1])
    except (ValueError, StopIteration):
        return None


@lenient
def same_dice(a, b):
    return abs(float(a) - float(b)) < 6e-4


def error_line(path):
    """The line of a log that says what went wrong (the last error-looking line, else the last line)."""
    try:  # "+ command" is the log's header
        lines = [x.strip() for x in read(path).splitlines() if x.strip() and not x.startswith("+ ")]
    except OSError:
        return f"no log at {path}"
    hits = [x for x in lines if any(m in x for m in ERROR_MARKS) and not x.startswith("Traceback")]
    return (hits or lines or [f"(no output in {Path(path).name})"])[-1][:400]


def newest_log(r, name):
    """The section's most recently written sub-log (<name>.*.log), else its own log."""
    logs = sorted(r.logs.glob(f"{name}.*.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else r.logs / f"{name}.log"


# ------------------------------------------------------------------ reporting
def write_line(path, line):
    Path(path).write_text(json.dumps(line) + "\n")


def report(r, ok, **fields):
    """This section's JSON line in results/<name>.json (the main process prints it). Text values are parsed as
    JSON where they are JSON (a log's last line, a probe's output)."""
    head = {"check": r.name, "ok": ok, "seconds": int(time.monotonic() - r.t0), "mode": r.mode,
            "device_type": r.device_kind}
    write_line(r.results / f"{r.name}.json",
               {**head, **{k: value(v) if isinstance(v, str) else v for k, v in fields.items()}})


def fail(r, log, message, **fields):
    """ok=false with the error line of LOG."""
    report(r, False, error=f"{message}: {error_line(log)}", log=str(log), **fields)


# ------------------------------------------------------------------ running commands
def exit_status(returncode):
    """A subprocess's exit status as a shell reports it (128 + N for a process ended by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def run_logged(log, cmd, header=None):
    """Run cmd with stdout and stderr to LOG (after the `+ command` header line, when given); its exit status."""
    with open(log, "w", encoding="utf-8") as out:
        if header:
            print(header, file=out, flush=True)
        try:
            return exit_status(subprocess.run([str(x) for x in cmd], stdout=out, stderr=subprocess.STDOUT).returncode)
        except OSError as err:  # as a shell: "command not found", 127
            print(f"error: cannot run {cmd[0]}: {err}", file=out)
            return 127


def cli(r, log, command, *args):
    """`python -m pcl_hpc <command> --config configs/demo.yaml ...`, output to LOG; its exit status."""
    return run_logged(log, [r.py, "-m", "pcl_hpc", command, "--config", DEMO, *args],
                      f"+ {r.py} -m pcl_hpc {command} --config {DEMO} {' '.join(args)}")


def torchrun(r, processes):
    return [r.py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


def shared(r):
    """The overrides every pretraining here shares: the store, tracking, a small projection head, every step logged."""
    return [f"data.store={r.store}", f"tracking.uri={r.db}", "tracking.register_name=device-check",
            "model.projection_dim=32", "pretrain.log_every=1", f"data.num_workers={r.workers}"]


def overrides(r, out):
    """The shared overrides, the output folder and the mode's size."""
    return [*shared(r), f"output_dir={out}", f"data.patch={r.patch}", f"model.width={r.width}"]


def fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    Path(path).mkdir(parents=True)


def pretrain_cli(r, log, out, *extra):
    """A pretraining from scratch into OUT through the CLI, with the shared overrides and EXTRA; its exit status."""
    fresh(out)
    return cli(r, log, "pretrain", *overrides(r, out), *extra)


def stop_group(proc):
    """`timeout -k 10`'s end: SIGTERM to the whole process group, SIGKILL 10 s later; 124, or 137 when killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
        return 124
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 137


def run_limited(cmd, limit, log):
    """`timeout -k 10 LIMIT cmd >LOG 2>&1`: cmd in its own process group, so that at the limit its children
    (torchrun's workers, DataLoader workers) end with it; subprocess.run's timeout would end cmd alone."""
    with open(log, "w", encoding="utf-8") as out:
        try:
            proc = subprocess.Popen([str(x) for x in cmd], stdout=out, stderr=subprocess.STDOUT, process_group=0)
        except OSError as err:
            print(f"error: cannot run {cmd[0]}: {err}", file=out)
            return 127
        try:
            return exit_status(proc.wait(timeout=limit))
        except subprocess.TimeoutExpired:
            return stop_group(proc)
        except BaseException:  # Ctrl-C or SIGTERM: the section's processes end with this one
            stop_group(proc)
            raise


# ------------------------------------------------------------------ probes (run as their own programs)
def cuda_info(torch):
    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}", "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "bf16": torch.cuda.is_bf16_supported(), "cudnn": torch.backends.cudnn.version(),
            "nccl": nccl_version(torch), "driver": driver_version()}


def nccl_version(torch):
    try:
        version = torch.cuda.nccl.version()
        return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)
    except Exception as err:  # noqa: BLE001
        return f"unavailable ({err})"


def driver_version():
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None


def cpu_info(torch):
    from pcl_hpc.engine.strategy import cpu_has_native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    model = next((x.split(":", 1)[1].strip() for x in cpuinfo.read_text().splitlines() if x.startswith("model name")),
                 platform.processor()) if cpuinfo.exists() else ""
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "native_bf16": cpu_has_native_bf16()}


def library_versions():
    info = {}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as err:  # noqa: BLE001
        info["deepspeed"] = f"not importable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    for name in ("mlflow", "zarr"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            info[name] = None
    return info


def store_summary(store):
    from pcl_hpc.data.store import volume_ids

    ids = volume_ids(store)
    return {"volumes": len(ids), "ids": ids}


def compare(a, b):
    """Are two state dicts bit-identical (same keys, torch.equal per tensor)?"""
    import torch

    x, y = (torch.load(path, map_location="cpu", weights_only=True) for path in (a, b))
    differ = sorted(k for k in x.keys() & y.keys() if not torch.equal(x[k], y[k]))
    same_keys = x.keys() == y.keys()
    return {"identical": same_keys and not differ, "tensors": len(x), "same_keys": same_keys,
            "differing_tensors": len(differ), "first_differing": differ[:3]}


def augment_probe(store, patch, batch):
    """One pretraining batch augmented (2 views) on the training device: where it ran and how long it took."""
    import torch

    from pcl_hpc.data.augment import BatchAugment
    from pcl_hpc.data.dataset import SliceDataset
    from pcl_hpc.data.store import volume_ids

    patch, device = int(patch), torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    data = SliceDataset(store, volume_ids(store), patch=patch)
    image = data.__getitems__(list(range(min(int(batch), len(data)))))["image"].to(device)
    augment, times = BatchAugment(seed=0, views=2), []
    for number in range(4):
        start = synchronized(device)
        out = augment({"image": image, "key": torch.tensor([0, number])})["views"]
        times.append(synchronized(device) - start)
    ok = out.device.type == device.type and tuple(out.shape) == (image.shape[0], 2, 1, patch, patch) \
        and bool(torch.isfinite(out).all())
    print(json.dumps({"probe_ok": ok, "views_device": str(out.device), "views_shape": list(out.shape),
                      "augment_ms_per_batch": round(1000 * min(times[1:]), 2)}))


def synchronized(device):
    """time.perf_counter() once the device's queued work is done."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def sync_bn_step(config, *args):
    """Under torchrun (1 process): a process group on the default backend (NCCL on CUDA), the
    project's SyncBatchNorm conversion, DDP, and two pretraining steps (batch_loss, bf16, channels_last).
    On CPU the conversion must refuse with the one-line error: prints that as the outcome."""
    import torch
    import torch.distributed as td

    from pcl_hpc import dist
    from pcl_hpc.config import load_config
    from pcl_hpc.models.unet import build_pretrain_net

    cfg, env = load_config(config, list(args)), dist.detect()
    if env.source != "torchrun":
        raise SystemExit("sync_bn_step runs under torchrun")
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    td.init_process_group(dist.default_backend(cfg.engine.backend))
    out = {"backend": td.get_backend(), "world_size": td.get_world_size(), "device": str(env.device)}
    torch.manual_seed(0)
    model = convert_sync_bn(build_pretrain_net(cfg.model), env, out)
    if model is not None:
        out.update(two_steps(cfg, env, model))
        out["step_ok"] = out["finite"] and out["sync_bn_modules"] > 0 and (
            env.device.type != "cuda" or out["backend"] == "nccl")
    print(json.dumps(out))
    td.destroy_process_group()


def convert_sync_bn(model, env, out):
    """The project's rule: one process keeps the model as it is; each rank of a multi-GPU job converts every
    BatchNorm to SyncBatchNorm. Records both in OUT; None when the conversion refused (on CPU)."""
    import torch

    from pcl_hpc.errors import UserError
    from pcl_hpc.train.pretrain import with_sync_batchnorm

    out["one_process_unchanged"] = with_sync_batchnorm(model, True, env) is model
    as_rank_of_many = dataclasses.replace(env, world_size=max(2, env.world_size))
    try:
        model = with_sync_batchnorm(model, True, as_rank_of_many)
    except UserError as err:
        out.update(outcome="refused_on_cpu" if env.device.type == "cpu" else "refused", error=str(err))
        return None
    out["sync_bn_modules"] = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    return model


def two_steps(cfg, env, model):
    """DDP and two pretraining steps on one batch, with the strategy's precision, channels_last and device."""
    import torch

    from pcl_hpc.data.dataset import SliceDataset
    from pcl_hpc.engine.strategy import build_strategy
    from pcl_hpc.train.pretrain import batch_loss, pretrain_volumes

    strategy, cuda = build_strategy(cfg, env), env.device.type == "cuda"
    model = model.to(env.device)
    if strategy.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = SliceDataset(cfg.data.store, pretrain_volumes(cfg), patch=cfg.data.patch)
    batch = data.__getitems__(list(range(min(cfg.pretrain.batch_size, len(data)))))
    losses = []
    for _ in range(2):
        loss = batch_loss(net, strategy, batch, cfg, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 4))
    synchronized(env.device)
    return {"outcome": "converted_and_stepped", "losses": losses,
            "precision": str(strategy.dtype).replace("torch.", ""),
            "finite": all(x == x and abs(x) != float("inf") for x in losses),
            "note": "1 rank: SyncBatchNorm runs its local-statistics path; the cross-rank kernel needs >= 2 GPUs"}


def deterministic_cli(*args):
    """`pcl_hpc.cli.main(ARGS)` with deterministic kernels (cuDNN/cuBLAS); warn_only lists any op without one."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    from pcl_hpc.cli import main

    sys.exit(main(list(args)))


PROBES = {"sync_bn_step": sync_bn_step, "augment_probe": augment_probe, "deterministic_cli": deterministic_cli}


# ------------------------------------------------------------------ sections
def environment(r):
    """The machine as one JSON line (no seconds, mode; libraries may print to stdout: that goes to the log),
    and its device type in <work>/device_kind, which decides the device branch of the other sections."""
    info = {"check": "environment", "ok": True, "python": platform.python_version()}
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        info.update(ok=False, error=f"cannot import torch: {err}")
        return write_line(r.results / "environment.json", info)
    cuda = torch.cuda.is_available()
    info.update(torch=torch.__version__, cuda_build=torch.version.cuda, device_type="cuda" if cuda else "cpu")
    info.update(cuda_info(torch) if cuda else cpu_info(torch))
    info.update(library_versions())
    (r.work / "device_kind").write_text(info["device_type"])
    write_line(r.results / "environment.json", info)


def build_data(r):
    log, raw = r.logs / "build_data.make.log", r.data / "raw"
    if rc := run_logged(log, [r.py, "tools/make_demo_data.py", "--out", raw, "--spacing", "3.0", "--seed", "0"],
                        f"+ tools/make_demo_data.py --out {raw}"):
        return fail(r, log, f"tools/make_demo_data.py exited {rc}")
    log = r.logs / "build_data.preprocess.log"
    if rc := cli(r, log, "preprocess", f"data.raw_dir={raw}", f"data.store={r.store}",
                 "--workers", str(r.prep_workers)):
        return fail(r, log, f"pcl_hpc preprocess exited {rc}")
    try:
        summary = store_summary(r.store)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return fail(r, log, "cannot read the store")
    report(r, True, store=str(r.store), summary=summary, preprocess=last_line(log))


def pretrain(r):
    out, log, t0 = r.runs / "pretrain", r.logs / "pretrain.cli.log", time.monotonic()
    if rc := pretrain_cli(r, log, out, "engine.precision=bf16", f"pretrain.batch_size={r.batch}",
                          f"pretrain.max_steps={r.steps}"):
        return fail(r, log, f"pretraining exited {rc}")
    run_s, metrics = int(time.monotonic() - t0), out / "pretrain" / "metrics.jsonl"
    if not (out / "pretrain" / "encoder.pt").is_file():
        return fail(r, log, f"no {out}/pretrain/encoder.pt")
    blog, sizes = r.logs / "pretrain.bench.log", ["--patch", r.patch, "--width", r.width, "--batch", r.batch]
    device = "cuda" if r.mode == "full" else "auto"
    rc = run_logged(blog, [r.py, "tools/bench_train.py", "--device", device, *sizes, "--steps", r.bench_steps,
                           "--warmup", r.bench_warmup, "--precision", "bf16"],
                    f"+ tools/bench_train.py --device {device} {' '.join(map(str, sizes))}")
    if rc:
        return fail(r, blog, f"tools/bench_train.py exited {rc}", loop_img_per_s=rate(metrics))
    report(r, True, patch=r.patch, width=r.width, batch_slices=r.batch, precision="bf16",
           img_per_s=get(blog, "ours_views_per_s"), baseline_img_per_s=get(blog, "baseline_views_per_s"),
           speedup=get(blog, "speedup"), bench_precision=get(blog, "precision"),
           bench_peak_memory_gib=get(blog, "peak_memory_gib"), loop_img_per_s=rate(metrics), loop=steps(metrics),
           loop_seconds=run_s, encoder=str(out / "pretrain" / "encoder.pt"),
           note="img_per_s: views/s of our step (both views in one call, channels_last, bf16) against the "
                "original-style step (one encoder call per view, fp32, NCHW), same net and batch; loop_img_per_s: "
                "the CLI run's median with data loading and augmentation")


def finetune_evaluate(r):
    exp, log = r.runs / "pretrain", r.logs / "finetune_evaluate.finetune.log"
    encoder, folder = exp / "pretrain" / "encoder.pt", exp / "finetune" / "device-check"
    if not encoder.is_file():
        log.write_text(f"no encoder at {encoder} (the pretrain section failed or did not run)\n")
        return fail(r, log, "needs the pretrain section's encoder")
    shutil.rmtree(folder, ignore_errors=True)
    splits = ["finetune.train_volumes=[dk01]", "finetune.val_volumes=[dk04]", "finetune.test_volumes=[dk05]"]
    if rc := cli(r, log, "finetune", f"data.store={r.store}", f"tracking.uri={r.db}", f"output_dir={exp}",
                 f"data.patch={r.patch}", f"model.width={r.width}", "engine.precision=bf16",
                 f"finetune.encoder={encoder}", "finetune.name=device-check", "finetune.epochs=1",
                 f"finetune.batch_size={r.ft_batch}", f"data.num_workers={r.workers}", *splits):
        return fail(r, log, f"finetune exited {rc}")
    if not ((folder / "model.pt").is_file() and (folder / "results.json").is_file()):
        return fail(r, log, f"no model.pt / results.json in {folder}")
    evaluate(r, log, folder)


def evaluate(r, log, folder):
    """`pcl_hpc evaluate --model model.pt`: does it show the Dice the fine-tuning wrote in results.json?"""
    elog = r.logs / "finetune_evaluate.evaluate.log"
    if rc := cli(r, elog, "evaluate", f"data.store={r.store}", f"model.width={r.width}",
                 "finetune.test_volumes=[dk05]", "--model", str(folder / "model.pt")):
        return fail(r, elog, f"evaluate exited {rc}")
    dice, shown = get(folder / "results.json", "mean"), evaluate_dice(elog)
    if dice is None:
        return fail(r, log, "results.json has no test Dice (mean)")
    if shown is None:
        return fail(r, elog, "no Dice table in the evaluate output")
    report(r, True, patch=r.patch, width=r.width, finetune_test_dice=dice, evaluate_test_dice=shown,
           best_val_dice=get(folder / "results.json", "best_val_dice"), evaluate_shows_same_dice=same_dice(dice, shown),
           model=str(folder / "model.pt"),
           note="fine-tuning predicts the test volume on the training device; "
                "pcl_hpc evaluate re-scores model.pt on CPU")


def deepspeed_zero2(r):
    out, log = r.runs / "deepspeed", r.logs / "deepspeed_zero2.cli.log"
    if rc := pretrain_cli(r, log, out, "engine.strategy=deepspeed", "engine.zero_stage=2", "engine.precision=bf16",
                          f"pretrain.batch_size={r.small_batch}", f"pretrain.max_steps={r.short_steps}"):
        return fail(r, log, f"DeepSpeed pretraining exited {rc}")
    if not (out / "pretrain" / "encoder.pt").is_file():
        return fail(r, log, "no encoder.pt")
    metrics = out / "pretrain" / "metrics.jsonl"
    report(r, True, patch=r.patch, width=r.width, batch_slices=r.small_batch, zero_stage=2, precision="bf16",
           img_per_s=rate(metrics), loop=steps(metrics))


def augment_device(r):
    out, log = r.runs / "augment", r.logs / "augment_device.cli.log"
    if rc := pretrain_cli(r, log, out, "engine.precision=bf16", "data.augment_on=device", "pretrain.augment=true",
                          f"pretrain.batch_size={r.batch}", f"pretrain.max_steps={r.short_steps}"):
        return fail(r, log, f"pretraining with data.augment_on=device exited {rc}")
    plog, metrics = r.logs / "augment_device.probe.log", out / "pretrain" / "metrics.jsonl"
    if rc := run_logged(plog, [r.py, SELF, "--probe", "augment_probe", r.store, r.patch, r.batch]):
        return fail(r, plog, f"the augmentation probe exited {rc}")
    report(r, get(plog, "probe_ok") is True, patch=r.patch, batch_slices=r.batch, img_per_s=rate(metrics),
           loop=steps(metrics), probe=last_line(plog))


def sync_batchnorm(r):
    log = r.logs / "sync_batchnorm.step.log"
    args = [f"data.store={r.store}", f"data.patch={r.patch}", f"model.width={r.width}", "model.projection_dim=32",
            "engine.precision=bf16", f"pretrain.batch_size={r.small_batch}", "model.sync_batchnorm=true"]
    if rc := run_logged(log, [*torchrun(r, 1), SELF, "--probe", "sync_bn_step", DEMO, *args],
                        "+ torchrun --nproc_per_node=1 tools/device_check.py --probe sync_bn_step"):
        return fail(r, log, f"the 1-process torchrun step exited {rc}")
    step, outcome = last_brace_line(log), get(log, "outcome")
    if r.device_kind == "cuda":
        return report(r, outcome == "converted_and_stepped" and get(log, "step_ok") is True, step=step)
    refused_on_cpu(r, step, outcome)


def refused_on_cpu(r, step, outcome):
    """CPU: the user's path, 2 processes under torchrun, must stop with the one-line error."""
    log, out = r.logs / "sync_batchnorm.cli_cpu.log", r.runs / "sync_batchnorm"
    fresh(out)
    rc = run_logged(log, [*torchrun(r, 2), "-m", "pcl_hpc", "pretrain", "--config", DEMO, *overrides(r, out),
                          f"pretrain.batch_size={r.small_batch}", "pretrain.max_steps=1", "model.sync_batchnorm=true"],
                    "+ torchrun --nproc_per_node=2 -m pcl_hpc pretrain ... model.sync_batchnorm=true")
    line = first_line_with(log, SYNC_BN_REFUSAL)
    if rc != 0 and line and outcome == "refused_on_cpu":
        return report(r, True, outcome="refused_on_cpu", cli_exit=rc, error_line=line, helper_step=step,
                      note="SyncBatchNorm has no CPU kernel: on CPU the documented outcome is this one-line refusal")
    report(r, False, outcome="not_refused_as_documented", cli_exit=rc, error=error_line(log), helper_step=step,
           log=str(log))


def run_deterministic(r, log, *args):
    """A CLI pretraining with deterministic algorithms on; its exit status."""
    return run_logged(log, [r.py, SELF, "--probe", "deterministic_cli", "pretrain", "--config", DEMO, *args],
                      f"+ pcl_hpc.cli.main (deterministic algorithms) pretrain --config {DEMO} {' '.join(args)}")


def save_resume(r):
    n, two, a, b = r.resume_n, 2 * r.resume_n, r.runs / "resume_straight", r.runs / "resume_split"
    fresh(a)
    fresh(b)
    # Deterministic kernels (cuDNN/cuBLAS), else two straight GPU runs already differ.
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    args = [*shared(r), f"data.patch={r.patch}", f"model.width={r.width}", "engine.precision=bf16",
            f"pretrain.batch_size={r.small_batch}", f"pretrain.schedule_steps={two}", f"checkpoint.every_steps={n}",
            "pretrain.augment=true", "data.num_workers=0"]
    la, l1, l2 = (r.logs / f"save_resume.{part}.log" for part in ("straight", "first", "resumed"))
    if rc := run_deterministic(r, la, *args, f"output_dir={a}", f"pretrain.max_steps={two}"):
        return fail(r, la, f"the straight {two}-step run exited {rc}")
    if rc := run_deterministic(r, l1, *args, f"output_dir={b}", f"pretrain.max_steps={n}"):
        return fail(r, l1, f"the first {n} steps exited {rc}")
    if not (b / "pretrain" / "checkpoints" / "latest").exists():
        return fail(r, l1, f"no {b}/pretrain/checkpoints/latest after {n} steps")
    if rc := run_deterministic(r, l2, *args, f"output_dir={b}", f"pretrain.max_steps={two}"):
        return fail(r, l2, f"the resumed run exited {rc}")
    compare_resumed(r, (la, l1, l2), a / "pretrain" / "encoder.pt", b / "pretrain" / "encoder.pt")


def compare_resumed(r, logs, straight, resumed):
    """The straight run's encoder.pt against the stopped-and-resumed one's: torch.equal on every tensor."""
    n, two, l2 = r.resume_n, 2 * r.resume_n, logs[-1]
    try:
        with open(l2, "a", encoding="utf-8") as err, contextlib.redirect_stderr(err):
            cmp = compare(straight, resumed)
    except Exception:  # noqa: BLE001
        with open(l2, "a", encoding="utf-8") as err:
            traceback.print_exc(file=err)
        return fail(r, l2, "cannot compare the two encoder.pt")
    text = "\n".join(read(log) for log in logs)
    nondeterministic = [x.split()[0] for x in sorted(set(NONDETERMINISTIC.findall(text)))]
    resumed_line = first_line_with(l2, "resuming from")
    report(r, cmp["identical"] is True and bool(resumed_line), identical=cmp["identical"], steps=two,
           stopped_after=n, resumed=resumed_line or "not resumed", compare=cmp,
           nondeterministic_ops=nondeterministic, patch=r.patch, width=r.width,
           note=f"encoder.pt of {n} steps + resume to {two} against a straight {two}-step run: "
                "torch.equal on every tensor")


def compile_check(r):
    if r.device_kind != "cuda" and os.environ.get("DEVICE_CHECK_COMPILE", "0") != "1":
        return report(r, True, skipped="a cold torch.compile on CPU measured 53 s at the smallest size (patch 32, "
                      "f=4) on 2 shared cores, most of the tiny run's budget; the GPU run does it "
                      "(DEVICE_CHECK_COMPILE=1 runs it here)")
    out, log, t0 = r.runs / "compile", r.logs / "compile.cli.log", time.monotonic()
    if rc := pretrain_cli(r, log, out, "engine.precision=bf16", "engine.compile=true",
                          f"pretrain.batch_size={r.small_batch}", f"pretrain.max_steps={r.compile_steps}"):
        return fail(r, log, f"pretraining with engine.compile=true exited {rc}")
    if not (out / "pretrain" / "encoder.pt").is_file():
        return fail(r, log, "no encoder.pt")
    metrics = out / "pretrain" / "metrics.jsonl"
    report(r, True, patch=r.patch, width=r.width, batch_slices=r.small_batch, run_seconds=int(time.monotonic() - t0),
           img_per_s_after_compile=rate(metrics, "views_per_s", 2), loop=steps(metrics),
           note="run_seconds includes compiling the first steps; img_per_s_after_compile is the median from step 3 on")


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    full_s: int  # time limit at full sizes
    tiny_s: int  # time limit at tiny sizes (--tiny)
    run: Callable[[Run], None]  # writes results/<name>.json through report()


ENVIRONMENT = Section("environment", 120, 60, environment)  # first, always; decides the device branch
SECTIONS = [
    Section("build_data", 240, 90, build_data),
    Section("pretrain", 240, 120, pretrain),
    Section("finetune_evaluate", 180, 90, finetune_evaluate),
    Section("deepspeed_zero2", 180, 120, deepspeed_zero2),
    Section("augment_device", 120, 90, augment_device),
    Section("sync_batchnorm", 120, 90, sync_batchnorm),
    Section("save_resume", 240, 150, save_resume),
    Section("compile", 300, 150, compile_check),
]


# ------------------------------------------------------------------ main
def usage_error(message):
    print(f"device_check.py: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    """The options, exported as their environment variables (each section's process reads them); --section's name."""
    section, args = None, list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        if arg == "--tiny":
            os.environ["DEVICE_CHECK_TINY"] = "1"
        elif arg in (*OPTIONS, "--section") and not args:
            usage_error(f"{arg} needs a value (see --help)")
        elif arg in OPTIONS:
            os.environ[OPTIONS[arg]] = args.pop(0)
        elif arg == "--section":
            section = args.pop(0)
        else:
            usage_error(f"unknown argument '{arg}' (see --help)")
    return section


def export_environment():
    """The interpreter, unbuffered output, no MLflow progress bars, this checkout importable (torchrun runs the
    probes as a script), torch extensions built under .cache; a work folder."""
    venv = REPO / ".venv" / "bin" / "python"
    python = os.environ.get("PYTHON") or (str(venv) if os.access(venv, os.X_OK) else "python3")
    paths = os.environ.get("PYTHONPATH", "")
    if paths.split(os.pathsep)[0] != str(REPO):
        paths = os.pathsep.join(filter(None, [str(REPO), paths]))
    os.environ.update(PYTHON=python, PYTHONUNBUFFERED="1", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
                      PYTHONPATH=paths)
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".cache" / "torch_extensions")
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions
    if not os.environ.get("DEVICE_CHECK_WORK"):
        tmp = os.environ.get("TMPDIR") or "/tmp"
        os.environ["DEVICE_CHECK_WORK"] = tempfile.mkdtemp(prefix="device_check.", dir=tmp)


def load_run():
    """The Run the exported environment describes; makes its folders."""
    mode = "tiny" if os.environ.get("DEVICE_CHECK_TINY", "0") == "1" else "full"
    work = Path(os.path.abspath(os.environ["DEVICE_CHECK_WORK"]))
    for folder in ("data", "runs", "logs", "results"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    return Run(mode=mode, py=os.environ["PYTHON"], work=work,
               budget=int(os.environ.get("DEVICE_CHECK_BUDGET_S") or BUDGET_S[mode]),
               device_kind=os.environ.get("DEVICE_KIND") or "unknown", **SIZES[mode])


def run_one(r, name):
    """--section NAME: one section in this process (the main process runs each so, under its time limit)."""
    section = next((s for s in [ENVIRONMENT, *SECTIONS] if s.name == name), None)
    if section is None:
        usage_error(f"--section {name}: no such section")
    section.run(dataclasses.replace(r, name=name, t0=time.monotonic()))
    return 0


def start_section(r, section, limit):
    """Run one section in its own process under LIMIT seconds; its exit status (124/137: timed out)."""
    return run_limited([r.py, SELF, "--section", section.name], limit, r.logs / f"{section.name}.log")


def tally(results, file, name):
    """Print a section's line; note whether it is ok."""
    text = file.read_text(encoding="utf-8")
    print(text, end="")
    try:
        results.append((name, json.loads(text).get("ok") is True))
    except (ValueError, AttributeError):
        results.append((name, False))


def run_environment(r, results, start):
    """The environment section: what the machine is; its device type (exported as DEVICE_KIND)."""
    file, kind_file = r.results / "environment.json", r.work / "device_kind"
    file.unlink(missing_ok=True)
    kind_file.unlink(missing_ok=True)
    start_section(r, ENVIRONMENT, ENVIRONMENT.tiny_s if r.mode == "tiny" else ENVIRONMENT.full_s)
    if not file.is_file() or file.stat().st_size == 0:
        fail(dataclasses.replace(r, name="environment", t0=start), r.logs / "environment.log",
             "the environment probe failed")
    kind = (kind_file.read_text().strip() if kind_file.is_file() else "") or "unknown"
    os.environ["DEVICE_KIND"] = kind
    tally(results, file, "environment")
    return kind


def run_section(r, section, results, start):
    """One section under its time limit, cut to the budget left; a line for it whatever happens."""
    file, here = r.results / f"{section.name}.json", dataclasses.replace(r, name=section.name, t0=time.monotonic())
    file.unlink(missing_ok=True)
    left = r.budget - int(time.monotonic() - start)
    if left < 15:
        report(here, False, error=f"not run: the script's budget of {r.budget}s is spent (--budget)")
    else:
        limit = min(section.tiny_s if r.mode == "tiny" else section.full_s, left)
        rc = start_section(r, section, limit)
        if not file.is_file() or file.stat().st_size == 0:
            why = f"timed out after {limit}s" if rc in (124, 137) else f"exited {rc} without a result"
            fail(here, newest_log(r, section.name), why)
    tally(results, file, section.name)


def chosen(r):
    """The sections to run: every one, or --only's (build_data as well while its store is missing)."""
    names = [s.name for s in SECTIONS]
    only = os.environ.get("DEVICE_CHECK_ONLY", "").replace(",", " ").split()
    for name in only:
        if name not in names:
            usage_error(f"--only {name}: no such section (sections: {' '.join(names)})")
    missing_store = not (r.store / "zarr.json").exists()
    return [s for s in SECTIONS if not only or s.name in only or (s.name == "build_data" and missing_store)]


def run_all(r):
    """The environment, then each chosen section; their lines and the summary on stdout; 1 when any failed."""
    sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # ends the running section too
    start, results = time.monotonic(), []
    r = dataclasses.replace(r, device_kind=run_environment(r, results, start))
    if r.mode == "full" and r.device_kind != "cuda":
        usage_error(f"no CUDA device visible to {r.py}; the full run needs one GPU "
                    "(DEVICE_CHECK_TINY=1 or --tiny for the CPU run)")
    print(json.dumps({"info": f"mode {r.mode}, work folder {r.work}, logs in {r.logs}"}))
    for section in chosen(r):
        run_section(r, section, results, start)
    failed = [name for name, ok in results if not ok]
    print(json.dumps({"summary": {"ok": len(results) - len(failed), "failed": len(failed), "failed_checks": failed,
                                  "seconds": int(time.monotonic() - start), "mode": r.mode, "work": str(r.work)}}))
    return 1 if failed else 0


def main(argv):
    if argv[:1] == ["--probe"]:  # under torchrun, or a program of its own: only its arguments follow
        return PROBES[argv[1]](*argv[2:])
    section = parse_args(argv)
    os.chdir(REPO)
    export_environment()
    r = load_run()
    return run_one(r, section) if section else run_all(r)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env bash
# Every CUDA path of the toolkit in one script, on one GPU, in under 8 minutes; figures as JSON lines.
#
#   bash tools/device_check.sh                      # on a machine with one NVIDIA GPU (full sizes)
#   DEVICE_CHECK_TINY=1 bash tools/device_check.sh  # on CPU at tiny sizes (what CI runs; ~2 minutes)
#
# Options (or the environment variables in brackets):
#   --tiny          [DEVICE_CHECK_TINY=1]   tiny sizes (patch 32, f=4, a few steps); the CPU mode
#   --work DIR      [DEVICE_CHECK_WORK]     where data, runs, logs and results go (default: a new /tmp folder)
#   --only a,b      [DEVICE_CHECK_ONLY]     run only these sections (build_data is run first when its store is missing)
#   --budget S      [DEVICE_CHECK_BUDGET_S] the script's wall-clock budget (default 470 full, 300 tiny): each
#                                           section's timeout is cut to what is left; a section that finds
#                                           less than 15 s left is reported failed, not run
#   [DEVICE_CHECK_COMPILE=1]  also run the torch.compile section on CPU (cold compile ~50 s on 2 cores)
#   [PYTHON]        the interpreter (default .venv/bin/python when it exists, else python3)
#
# Sections, in order; each is a short real run through the project's own entry points (the CLI
# `python -m pcl_hpc <command> --config configs/demo.yaml key=value...`, torchrun, tools/bench_train.py)
# on a small Zarr store it builds itself, and prints ONE JSON line {"check": <name>, "ok": ..., "seconds": ...}:
#   environment        GPU name, torch / CUDA / cuDNN / NCCL / DeepSpeed versions (CPU model in tiny mode)
#   build_data         the demo's real-anatomy volumes (tools/make_demo_data.py) -> `pcl_hpc preprocess` -> Zarr
#   pretrain           1-process pretraining, 512x512 patches, f=32, bf16 (loop views/s from metrics.jsonl),
#                      then tools/bench_train.py: our step against the original-style step (one encoder
#                      call per view, fp32, NCHW): img_per_s, baseline_img_per_s, speedup
#   finetune_evaluate  one fine-tune epoch from pretrain's encoder.pt (whole-volume prediction of the test
#                      volume on the device), then `pcl_hpc evaluate --model model.pt`: Dice of both
#   deepspeed_zero2    DeepSpeed ZeRO-2 steps, bf16
#   augment_device     pretraining with data.augment_on=device, plus one augmentation batch timed on the device
#   sync_batchnorm     CUDA: a 1-process NCCL group (torchrun), with_sync_batchnorm's conversion, DDP, steps.
#                      CPU: 2-process torchrun with model.sync_batchnorm=true must fail with the one-line
#                      error (outcome "refused_on_cpu"); the conversion helper must refuse the same way
#   save_resume        pretrain N steps, stop, rerun to 2N (resumes from checkpoints/latest), against a
#                      straight 2N run: encoder.pt bit-identical? (deterministic algorithms on)
#   compile            pretraining with engine.compile=true (compile seconds, steady views/s); on CPU
#                      skipped with the reason unless DEVICE_CHECK_COMPILE=1
# Then {"summary": {"ok": n, "failed": m, ...}}; the exit status is 1 when any check failed.
# A failing or timed-out section never stops the others. Each section's full log is under <work>/logs/.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/tools/device_check.sh"
cd "$REPO" || exit 2

SECTION=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) export DEVICE_CHECK_TINY=1 ;;
    --work) export DEVICE_CHECK_WORK="$2"; shift ;;
    --only) export DEVICE_CHECK_ONLY="$2"; shift ;;
    --budget) export DEVICE_CHECK_BUDGET_S="$2"; shift ;;
    --section) SECTION="$2"; shift ;;  # internal: run one section (the script calls itself under `timeout`)
    -h|--help) sed -n '2,/^set -u/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

TINY=${DEVICE_CHECK_TINY:-0}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
PY=$PYTHON
# PYTHONPATH: the helper runs as a script from the work folder (torchrun), and must import this checkout.
export PYTHON PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}

if [ "$TINY" = 1 ]; then
  MODE=tiny
  PATCH=32 WIDTH=4 BATCH=4 SMALL_BATCH=4 STEPS=3 SHORT_STEPS=2 RESUME_N=2 FT_BATCH=8 WORKERS=0 PREP_WORKERS=1
  BENCH_STEPS=2 BENCH_WARMUP=1 COMPILE_STEPS=2
  BUDGET=${DEVICE_CHECK_BUDGET_S:-300}
else
  MODE=full
  PATCH=512 WIDTH=32 BATCH=32 SMALL_BATCH=16 STEPS=40 SHORT_STEPS=10 RESUME_N=5 FT_BATCH=16 WORKERS=4 PREP_WORKERS=4
  BENCH_STEPS=10 BENCH_WARMUP=3 COMPILE_STEPS=12
  BUDGET=${DEVICE_CHECK_BUDGET_S:-470}
fi
SECTIONS="build_data pretrain finetune_evaluate deepspeed_zero2 augment_device sync_batchnorm save_resume compile"
declare -A LIMIT_FULL=([environment]=120 [build_data]=240 [pretrain]=240 [finetune_evaluate]=180
  [deepspeed_zero2]=180 [augment_device]=120 [sync_batchnorm]=120 [save_resume]=240 [compile]=300)
declare -A LIMIT_TINY=([environment]=60 [build_data]=90 [pretrain]=120 [finetune_evaluate]=90
  [deepspeed_zero2]=120 [augment_device]=90 [sync_batchnorm]=90 [save_resume]=150 [compile]=150)

if [ -z "${DEVICE_CHECK_WORK:-}" ]; then
  DEVICE_CHECK_WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
fi
export DEVICE_CHECK_WORK
WORK=$(mkdir -p "$DEVICE_CHECK_WORK" && cd "$DEVICE_CHECK_WORK" && pwd)
DATA=$WORK/data STORE=$WORK/data/store.zarr RUNS=$WORK/runs LOGS=$WORK/logs RESULTS=$WORK/results
DB="sqlite:///$WORK/mlflow.db"
HELPER=$WORK/device_check_helper.py
mkdir -p "$DATA" "$RUNS" "$LOGS" "$RESULTS"

# ------------------------------------------------------------------ the Python side (JSON, figures, probes)
write_helper() {
cat >"$HELPER" <<'PYEOF'
"""device_check.sh's helper: JSON result lines, figures from the runs' files, and the in-process probes."""
import json
import statistics
import sys
import time
from pathlib import Path


def value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def last_json(path):
    text = Path(path).read_text(errors="replace")
    try:  # a whole-file JSON object (results.json)
        whole = json.loads(text)
        if isinstance(whole, dict):
            return whole
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def result(path, *pairs):
    """result FILE check=NAME ok=true seconds=3 key=value...: one JSON line (values parsed as JSON when they are)."""
    out = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        out[key] = value(text)
    first = {k: out.pop(k) for k in ("check", "ok", "seconds") if k in out}
    line = json.dumps({**first, **out})
    Path(path).write_text(line + "\n")


def get(path, key):
    """get FILE KEY: KEY of the last JSON line of FILE, as JSON (null when absent)."""
    try:
        print(json.dumps(last_json(path).get(key)))
    except OSError:
        print("null")


def rate(path, key="views_per_s", skip=1):
    """rate metrics.jsonl: the median throughput of the logged steps after the first `skip` (warm-up, compile)."""
    try:
        rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    except OSError:
        print("null")
        return
    values = [r[key] for r in rows if r.get("step", 0) > int(skip) and key in r] or [r[key] for r in rows if key in r]
    print(json.dumps(round(statistics.median(values), 1) if values else None))


def steps(path):
    """steps metrics.jsonl: [first, last] logged step and the last loss."""
    try:
        rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    except OSError:
        rows = []
    print(json.dumps({"steps": rows[-1]["step"] if rows else None, "final_loss": round(rows[-1]["loss"], 4) if rows else None}))


def error_line(path):
    """error_line LOG: the line that says what went wrong (the last error-looking line, else the last line)."""
    try:
        lines = [x.strip() for x in Path(path).read_text(errors="replace").splitlines()
                 if x.strip() and not x.startswith("+ ")]  # "+ command" is the log's header
    except OSError:
        print(f"no log at {path}")
        return
    marks = ("error", "Error", "Exception", "Traceback", "Killed", "FAILED")
    hits = [x for x in lines if any(m in x for m in marks) and not x.startswith("Traceback")]
    line = (hits or lines or [f"(no output in {Path(path).name})"])[-1]
    print(line[:400])


def evaluate_dice(log):
    """evaluate_dice LOG: the mean Dice in the table `pcl_hpc evaluate` printed (the Dice table's first row)."""
    lines = Path(log).read_text(errors="replace").splitlines()
    try:
        start = lines.index("Dice")
        row = next(x for x in lines[start + 1:] if x.startswith("|") and not x.startswith(("| init", "|---")))
        print(json.dumps(float(row.strip().strip("|").split("|")[-1])))
    except (ValueError, StopIteration):
        print("null")


def environment(out_file, device_kind_file):
    """environment OUT KIND: the machine as one JSON line in OUT (libraries may print to stdout; that goes to the log)."""
    import os
    import platform
    import subprocess

    info = {"check": "environment", "ok": True, "python": platform.python_version()}
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        info.update(ok=False, error=f"cannot import torch: {err}")
        Path(out_file).write_text(json.dumps(info) + "\n")
        return
    cuda = torch.cuda.is_available()
    info.update(torch=torch.__version__, cuda_build=torch.version.cuda, device_type="cuda" if cuda else "cpu")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
        try:
            version = torch.cuda.nccl.version()
            info["nccl"] = ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)
        except Exception as err:  # noqa: BLE001
            info["nccl"] = f"unavailable ({err})"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        from pcl_hpc.engine.strategy import cpu_has_native_bf16

        model = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                      if x.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
        info.update(cpu=model, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                    native_bf16=cpu_has_native_bf16())
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
    Path(device_kind_file).write_text(info["device_type"])
    Path(out_file).write_text(json.dumps(info) + "\n")


def store_summary(store):
    from pcl_hpc.data.store import volume_ids

    ids = volume_ids(store)
    print(json.dumps({"volumes": len(ids), "ids": ids}))


def compare(a, b):
    """compare A.pt B.pt: are two state dicts bit-identical (same keys, torch.equal per tensor)?"""
    import torch

    x, y = torch.load(a, map_location="cpu", weights_only=True), torch.load(b, map_location="cpu", weights_only=True)
    differ = sorted(k for k in x.keys() & y.keys() if not torch.equal(x[k], y[k]))
    same_keys = x.keys() == y.keys()
    print(json.dumps({"identical": same_keys and not differ, "tensors": len(x), "same_keys": same_keys,
                      "differing_tensors": len(differ), "first_differing": differ[:3]}))


def augment_probe(store, patch, batch):
    """One pretraining batch augmented (2 views) on the training device: where it ran and how long it took."""
    import torch

    from pcl_hpc.data.augment import BatchAugment
    from pcl_hpc.data.dataset import SliceDataset
    from pcl_hpc.data.store import volume_ids

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    data = SliceDataset(store, volume_ids(store), patch=int(patch))
    items = data.__getitems__(list(range(min(int(batch), len(data)))))
    image = items["image"].to(device)
    augment = BatchAugment(seed=0, views=2)
    times = []
    for number in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = augment({"image": image, "key": torch.tensor([0, number])})["views"]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    ok = out.device.type == device.type and tuple(out.shape) == (image.shape[0], 2, 1, int(patch), int(patch)) \
        and bool(torch.isfinite(out).all())
    print(json.dumps({"probe_ok": ok, "views_device": str(out.device), "views_shape": list(out.shape),
                      "augment_ms_per_batch": round(1000 * min(times[1:]), 2)}))


def sync_bn_step(config, *overrides):
    """Under torchrun (1 process): a process group on the default backend (NCCL on CUDA), the
    project's SyncBatchNorm conversion, DDP, and two pretraining steps (batch_loss, bf16, channels_last).
    On CPU the conversion must refuse with the one-line error: prints that as the outcome."""
    import dataclasses

    import torch
    import torch.distributed as td

    from pcl_hpc import dist
    from pcl_hpc.config import load_config
    from pcl_hpc.data.dataset import SliceDataset
    from pcl_hpc.engine.strategy import build_strategy
    from pcl_hpc.errors import UserError
    from pcl_hpc.models.unet import build_pretrain_net
    from pcl_hpc.train.pretrain import batch_loss, pretrain_volumes, with_sync_batchnorm

    cfg = load_config(config, list(overrides))
    env = dist.detect()
    if env.source != "torchrun":
        raise SystemExit("sync_bn_step runs under torchrun")
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    td.init_process_group(dist.default_backend(cfg.engine.backend))
    out = {"backend": td.get_backend(), "world_size": td.get_world_size(), "device": str(env.device)}
    torch.manual_seed(0)
    model = build_pretrain_net(cfg.model)
    # One process: nothing to synchronise, the model comes back as it is (the project's rule).
    out["one_process_unchanged"] = with_sync_batchnorm(model, True, env) is model
    # What each rank of a multi-GPU job does: convert every BatchNorm to SyncBatchNorm.
    as_rank_of_many = dataclasses.replace(env, world_size=max(2, env.world_size))
    try:
        model = with_sync_batchnorm(model, True, as_rank_of_many)
    except UserError as err:
        out.update(outcome="refused_on_cpu" if env.device.type == "cpu" else "refused", error=str(err))
        print(json.dumps(out))
        td.destroy_process_group()
        return
    out["sync_bn_modules"] = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    strategy = build_strategy(cfg, env)  # the step's precision, channels_last and device
    model = model.to(env.device)
    if strategy.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
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
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    out.update(outcome="converted_and_stepped", losses=losses, precision=str(strategy.dtype).replace("torch.", ""),
               finite=all(x == x and abs(x) != float("inf") for x in losses),
               note="1 rank: SyncBatchNorm runs its local-statistics path; the cross-rank kernel needs >= 2 GPUs")
    out["step_ok"] = out["finite"] and out["sync_bn_modules"] > 0 and (env.device.type != "cuda" or out["backend"] == "nccl")
    print(json.dumps(out))
    td.destroy_process_group()


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    globals()[command](*args)
PYEOF
}

helper() { "$PY" "$HELPER" "$@"; }

# ------------------------------------------------------------------ section plumbing
SECTION_T0=$SECONDS
NAME=${SECTION:-main}

# report ok|fail key=value...: this section's JSON line (the main script prints it)
report() {
  local ok=$1; shift
  helper result "$RESULTS/$NAME.json" "check=$NAME" "ok=$ok" "seconds=$((SECONDS - SECTION_T0))" \
    "mode=$MODE" "device_type=${DEVICE_KIND:-unknown}" "$@"
}

# fail LOG MESSAGE key=value...: ok=false with the error line of LOG
fail() {
  local log=$1 message=$2; shift 2
  report false "error=$message: $(helper error_line "$log")" "log=$log" "$@"
}

# cli LOG command args...: `python -m pcl_hpc <command> --config configs/demo.yaml ...`, output to LOG
cli() {
  local log=$1 command=$2; shift 2
  echo "+ $PY -m pcl_hpc $command --config configs/demo.yaml $*" >"$log"
  "$PY" -m pcl_hpc "$command" --config configs/demo.yaml "$@" >>"$log" 2>&1
}

# The overrides every pretraining here shares: the store, tracking, a small projection head, every step logged.
COMMON=("data.store=$STORE" "tracking.uri=$DB" "tracking.register_name=device-check" "model.projection_dim=32"
        "pretrain.log_every=1" "data.num_workers=$WORKERS")

fresh() { rm -rf "$1"; mkdir -p "$1"; }

# ------------------------------------------------------------------ sections
sec_build_data() {
  local log=$LOGS/build_data.make.log
  echo "+ tools/make_demo_data.py --out $DATA/raw" >"$log"
  "$PY" tools/make_demo_data.py --out "$DATA/raw" --spacing 3.0 --seed 0 >>"$log" 2>&1 \
    || { fail "$log" "tools/make_demo_data.py exited $?"; return; }
  log=$LOGS/build_data.preprocess.log
  cli "$log" preprocess "data.raw_dir=$DATA/raw" "data.store=$STORE" --workers "$PREP_WORKERS" \
    || { fail "$log" "pcl_hpc preprocess exited $?"; return; }
  local summary; summary=$(helper store_summary "$STORE") || { fail "$log" "cannot read the store"; return; }
  report true "store=$STORE" "summary=$summary" "preprocess=$(tail -n 1 "$log")"
}

sec_pretrain() {
  local out=$RUNS/pretrain log=$LOGS/pretrain.cli.log t0=$SECONDS
  fresh "$out"
  cli "$log" pretrain "${COMMON[@]}" "output_dir=$out" "data.patch=$PATCH" "model.width=$WIDTH" "engine.precision=bf16" \
    "pretrain.batch_size=$BATCH" "pretrain.max_steps=$STEPS" \
    || { fail "$log" "pretraining exited $?"; return; }
  local run_s=$((SECONDS - t0))
  [ -f "$out/pretrain/encoder.pt" ] || { fail "$log" "no $out/pretrain/encoder.pt"; return; }
  local blog=$LOGS/pretrain.bench.log device=auto
  [ "$MODE" = full ] && device=cuda
  echo "+ tools/bench_train.py --device $device --patch $PATCH --width $WIDTH --batch $BATCH" >"$blog"
  "$PY" tools/bench_train.py --device "$device" --patch "$PATCH" --width "$WIDTH" --batch "$BATCH" \
    --steps "$BENCH_STEPS" --warmup "$BENCH_WARMUP" --precision bf16 >>"$blog" 2>&1 \
    || { fail "$blog" "tools/bench_train.py exited $?" "loop_img_per_s=$(helper rate "$out/pretrain/metrics.jsonl")"; return; }
  report true "patch=$PATCH" "width=$WIDTH" "batch_slices=$BATCH" "precision=bf16" \
    "img_per_s=$(helper get "$blog" ours_views_per_s)" "baseline_img_per_s=$(helper get "$blog" baseline_views_per_s)" \
    "speedup=$(helper get "$blog" speedup)" "bench_precision=$(helper get "$blog" precision)" \
    "bench_peak_memory_gib=$(helper get "$blog" peak_memory_gib)" \
    "loop_img_per_s=$(helper rate "$out/pretrain/metrics.jsonl")" "loop=$(helper steps "$out/pretrain/metrics.jsonl")" \
    "loop_seconds=$run_s" "encoder=$out/pretrain/encoder.pt" \
    "note=img_per_s: views/s of our step (both views in one call, channels_last, bf16) against the original-style step (one encoder call per view, fp32, NCHW), same net and batch; loop_img_per_s: the CLI run's median with data loading and augmentation"
}

sec_finetune_evaluate() {
  local exp=$RUNS/pretrain encoder=$RUNS/pretrain/pretrain/encoder.pt log=$LOGS/finetune_evaluate.finetune.log
  [ -f "$encoder" ] || { echo "no encoder at $encoder (the pretrain section failed or did not run)" >"$log"
                         fail "$log" "needs the pretrain section's encoder"; return; }
  rm -rf "$exp/finetune/device-check"
  local splits=("finetune.train_volumes=[dk01]" "finetune.val_volumes=[dk04]" "finetune.test_volumes=[dk05]")
  cli "$log" finetune "data.store=$STORE" "tracking.uri=$DB" "output_dir=$exp" "data.patch=$PATCH" \
    "model.width=$WIDTH" "engine.precision=bf16" "finetune.encoder=$encoder" "finetune.name=device-check" \
    "finetune.epochs=1" "finetune.batch_size=$FT_BATCH" "data.num_workers=$WORKERS" "${splits[@]}" \
    || { fail "$log" "finetune exited $?"; return; }
  local folder=$exp/finetune/device-check
  [ -f "$folder/model.pt" ] && [ -f "$folder/results.json" ] || { fail "$log" "no model.pt / results.json in $folder"; return; }
  local elog=$LOGS/finetune_evaluate.evaluate.log
  cli "$elog" evaluate "data.store=$STORE" "model.width=$WIDTH" "finetune.test_volumes=[dk05]" --model "$folder/model.pt" \
    || { fail "$elog" "evaluate exited $?"; return; }
  local dice; dice=$(helper get "$folder/results.json" mean)
  local shown; shown=$(helper evaluate_dice "$elog")
  [ "$dice" != null ] || { fail "$log" "results.json has no test Dice (mean)"; return; }
  [ "$shown" != null ] || { fail "$elog" "no Dice table in the evaluate output"; return; }
  local same; same=$("$PY" -c "import sys; print('true' if abs(float(sys.argv[1]) - float(sys.argv[2])) < 6e-4 else 'false')" "$dice" "$shown")
  report true "patch=$PATCH" "width=$WIDTH" "finetune_test_dice=$dice" "evaluate_test_dice=$shown" "best_val_dice=$(helper get "$folder/results.json" best_val_dice)" \
    "evaluate_shows_same_dice=$same" "model=$folder/model.pt" \
    "note=fine-tuning predicts the test volume on the training device; pcl_hpc evaluate re-scores model.pt on CPU"
}

sec_deepspeed_zero2() {
  local out=$RUNS/deepspeed log=$LOGS/deepspeed_zero2.cli.log
  fresh "$out"
  cli "$log" pretrain "${COMMON[@]}" "output_dir=$out" "data.patch=$PATCH" "model.width=$WIDTH" "engine.strategy=deepspeed" \
    "engine.zero_stage=2" "engine.precision=bf16" "pretrain.batch_size=$SMALL_BATCH" "pretrain.max_steps=$SHORT_STEPS" \
    || { fail "$log" "DeepSpeed pretraining exited $?"; return; }
  [ -f "$out/pretrain/encoder.pt" ] || { fail "$log" "no encoder.pt"; return; }
  report true "patch=$PATCH" "width=$WIDTH" "batch_slices=$SMALL_BATCH" "zero_stage=2" "precision=bf16" \
    "img_per_s=$(helper rate "$out/pretrain/metrics.jsonl")" "loop=$(helper steps "$out/pretrain/metrics.jsonl")"
}

sec_augment_device() {
  local out=$RUNS/augment log=$LOGS/augment_device.cli.log
  fresh "$out"
  cli "$log" pretrain "${COMMON[@]}" "output_dir=$out" "data.patch=$PATCH" "model.width=$WIDTH" "engine.precision=bf16" \
    "data.augment_on=device" "pretrain.augment=true" "pretrain.batch_size=$BATCH" "pretrain.max_steps=$SHORT_STEPS" \
    || { fail "$log" "pretraining with data.augment_on=device exited $?"; return; }
  local plog=$LOGS/augment_device.probe.log probe
  helper augment_probe "$STORE" "$PATCH" "$BATCH" >"$plog" 2>&1 || { fail "$plog" "the augmentation probe exited $?"; return; }
  probe=$(tail -n 1 "$plog")
  local ok=true
  [ "$(helper get "$plog" probe_ok)" = true ] || ok=false
  report "$ok" "patch=$PATCH" "batch_slices=$BATCH" "img_per_s=$(helper rate "$out/pretrain/metrics.jsonl")" \
    "loop=$(helper steps "$out/pretrain/metrics.jsonl")" "probe=$probe"
}

sec_sync_batchnorm() {
  local log=$LOGS/sync_batchnorm.step.log
  local args=("data.store=$STORE" "data.patch=$PATCH" "model.width=$WIDTH" "model.projection_dim=32"
              "engine.precision=bf16" "pretrain.batch_size=$SMALL_BATCH" "model.sync_batchnorm=true")
  echo "+ torchrun --nproc_per_node=1 device_check_helper.py sync_bn_step" >"$log"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$HELPER" sync_bn_step configs/demo.yaml "${args[@]}" \
    >>"$log" 2>&1 || { fail "$log" "the 1-process torchrun step exited $?"; return; }
  local step; step=$(grep '^{' "$log" | tail -n 1)
  local outcome; outcome=$(helper get "$log" outcome)
  if [ "${DEVICE_KIND:-}" = cuda ]; then
    local ok=false
    [ "$outcome" = '"converted_and_stepped"' ] && [ "$(helper get "$log" step_ok)" = true ] && ok=true
    report "$ok" "step=$step"
    return
  fi
  # CPU: the user's path, 2 processes under torchrun, must stop with the one-line error.
  local clog=$LOGS/sync_batchnorm.cli_cpu.log out=$RUNS/sync_batchnorm
  fresh "$out"
  echo "+ torchrun --nproc_per_node=2 -m pcl_hpc pretrain ... model.sync_batchnorm=true" >"$clog"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m pcl_hpc pretrain --config configs/demo.yaml \
    "${COMMON[@]}" "output_dir=$out" "data.patch=$PATCH" "model.width=$WIDTH" "pretrain.batch_size=$SMALL_BATCH" \
    "pretrain.max_steps=1" "model.sync_batchnorm=true" >>"$clog" 2>&1
  local rc=$?
  local line; line=$(grep -m 1 "pcl-hpc pretrain: error: model.sync_batchnorm=true needs CUDA" "$clog")
  local ok=false
  [ "$rc" -ne 0 ] && [ -n "$line" ] && [ "$outcome" = '"refused_on_cpu"' ] && ok=true
  if [ "$ok" = true ]; then
    report true "outcome=refused_on_cpu" "cli_exit=$rc" "error_line=$line" "helper_step=$step" \
      "note=SyncBatchNorm has no CPU kernel: on CPU the documented outcome is this one-line refusal"
  else
    report false "outcome=not_refused_as_documented" "cli_exit=$rc" "error=$(helper error_line "$clog")" \
      "helper_step=$step" "log=$clog"
  fi
}

sec_save_resume() {
  local n=$RESUME_N two=$((2 * RESUME_N)) a=$RUNS/resume_straight b=$RUNS/resume_split
  fresh "$a"; fresh "$b"
  # Deterministic kernels (cuDNN/cuBLAS), else two straight GPU runs already differ; warn_only lists any op without one.
  export CUBLAS_WORKSPACE_CONFIG=:4096:8
  local det='import sys, torch
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.benchmark = False
from pcl_hpc.cli import main
sys.exit(main(sys.argv[1:]))'
  local args=("${COMMON[@]}" "data.patch=$PATCH" "model.width=$WIDTH" "engine.precision=bf16" "pretrain.batch_size=$SMALL_BATCH"
              "pretrain.schedule_steps=$two" "checkpoint.every_steps=$n" "pretrain.augment=true" "data.num_workers=0")
  run_det() {
    local log=$1; shift
    echo "+ pcl_hpc.cli.main (deterministic algorithms) pretrain --config configs/demo.yaml $*" >"$log"
    "$PY" -c "$det" pretrain --config configs/demo.yaml "$@" >>"$log" 2>&1
  }
  local la=$LOGS/save_resume.straight.log l1=$LOGS/save_resume.first.log l2=$LOGS/save_resume.resumed.log
  run_det "$la" "${args[@]}" "output_dir=$a" "pretrain.max_steps=$two" || { fail "$la" "the straight $two-step run exited $?"; return; }
  run_det "$l1" "${args[@]}" "output_dir=$b" "pretrain.max_steps=$n" || { fail "$l1" "the first $n steps exited $?"; return; }
  [ -e "$b/pretrain/checkpoints/latest" ] || { fail "$l1" "no $b/pretrain/checkpoints/latest after $n steps"; return; }
  run_det "$l2" "${args[@]}" "output_dir=$b" "pretrain.max_steps=$two" || { fail "$l2" "the resumed run exited $?"; return; }
  local resumed; resumed=$(grep -m 1 "resuming from" "$l2")
  local cmp; cmp=$(helper compare "$a/pretrain/encoder.pt" "$b/pretrain/encoder.pt" 2>>"$l2") \
    || { fail "$l2" "cannot compare the two encoder.pt"; return; }
  local nondet; nondet=$(cat "$la" "$l1" "$l2" | grep -o "[A-Za-z_0-9.]* does not have a deterministic implementation" | sort -u \
    | "$PY" -c "import json, sys; print(json.dumps([x.split()[0] for x in sys.stdin.read().splitlines()]))")
  local identical; identical=$(printf '%s' "$cmp" | "$PY" -c "import json, sys; print(json.dumps(json.load(sys.stdin)['identical']))")
  local ok=false
  [ "$identical" = true ] && [ -n "$resumed" ] && ok=true
  report "$ok" "identical=$identical" "steps=$two" "stopped_after=$n" "resumed=${resumed:-not resumed}" "compare=$cmp" \
    "nondeterministic_ops=$nondet" "patch=$PATCH" "width=$WIDTH" \
    "note=encoder.pt of $n steps + resume to $two against a straight $two-step run: torch.equal on every tensor"
}

sec_compile() {
  if [ "${DEVICE_KIND:-}" != cuda ] && [ "${DEVICE_CHECK_COMPILE:-0}" != 1 ]; then
    report true "skipped=a cold torch.compile on CPU measured 53 s at the smallest size (patch 32, f=4) on 2 shared cores, most of the tiny run's budget; the GPU run does it (DEVICE_CHECK_COMPILE=1 runs it here)"
    return
  fi
  local out=$RUNS/compile log=$LOGS/compile.cli.log t0=$SECONDS
  fresh "$out"
  cli "$log" pretrain "${COMMON[@]}" "output_dir=$out" "data.patch=$PATCH" "model.width=$WIDTH" "engine.precision=bf16" \
    "engine.compile=true" "pretrain.batch_size=$SMALL_BATCH" "pretrain.max_steps=$COMPILE_STEPS" \
    || { fail "$log" "pretraining with engine.compile=true exited $?"; return; }
  [ -f "$out/pretrain/encoder.pt" ] || { fail "$log" "no encoder.pt"; return; }
  report true "patch=$PATCH" "width=$WIDTH" "batch_slices=$SMALL_BATCH" "run_seconds=$((SECONDS - t0))" \
    "img_per_s_after_compile=$(helper rate "$out/pretrain/metrics.jsonl" views_per_s 2)" \
    "loop=$(helper steps "$out/pretrain/metrics.jsonl")" \
    "note=run_seconds includes compiling the first steps; img_per_s_after_compile is the median from step 3 on"
}

# ------------------------------------------------------------------ one section (the script calling itself)
if [ -n "$SECTION" ]; then
  DEVICE_KIND=${DEVICE_KIND:-unknown}
  "sec_$SECTION"
  exit 0
fi

# ------------------------------------------------------------------ main
START=$SECONDS
write_helper
OK=0 FAILED=0 FAILED_NAMES=""

count() {  # count RESULT_FILE: print the line, tally ok / failed
  cat "$1"
  if grep -q '"ok": true' "$1"; then OK=$((OK + 1)); else FAILED=$((FAILED + 1)); FAILED_NAMES="$FAILED_NAMES $2"; fi
}

run_section() {
  local name=$1 limit file=$RESULTS/$1.json
  if [ "$MODE" = tiny ]; then limit=${LIMIT_TINY[$name]}; else limit=${LIMIT_FULL[$name]}; fi
  local left=$((BUDGET - (SECONDS - START)))
  rm -f "$file"
  if [ "$left" -lt 15 ]; then
    NAME=$name SECTION_T0=$SECONDS report false "error=not run: the script's budget of ${BUDGET}s is spent (--budget)"
  else
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    DEVICE_KIND=${DEVICE_KIND:-unknown} timeout -k 10 "$limit" bash "$SELF" --section "$name" >"$LOGS/$name.log" 2>&1
    local rc=$?
    if [ ! -s "$file" ]; then
      local why="exited $rc without a result"
      { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && why="timed out after ${limit}s"
      local newest; newest=$(ls -t "$LOGS/$name".*.log 2>/dev/null | head -n 1)
      NAME=$name SECTION_T0=$t0 fail "${newest:-$LOGS/$name.log}" "$why"
    fi
  fi
  count "$file" "$name"
}

# The environment: what the machine is; also decides the device branch of the sections.
rm -f "$WORK/device_kind" "$RESULTS/environment.json"
ENV_LIMIT=${LIMIT_FULL[environment]}
[ "$MODE" = tiny ] && ENV_LIMIT=${LIMIT_TINY[environment]}
timeout -k 10 "$ENV_LIMIT" "$PY" "$HELPER" environment "$RESULTS/environment.json" "$WORK/device_kind" \
  >"$LOGS/environment.log" 2>&1
if [ ! -s "$RESULTS/environment.json" ]; then
  NAME=environment SECTION_T0=$START fail "$LOGS/environment.log" "the environment probe failed"
fi
DEVICE_KIND=$(cat "$WORK/device_kind" 2>/dev/null || echo unknown)
export DEVICE_KIND
count "$RESULTS/environment.json" environment
if [ "$MODE" = full ] && [ "$DEVICE_KIND" != cuda ]; then
  echo "device_check.sh: no CUDA device visible to $PY; the full run needs one GPU (DEVICE_CHECK_TINY=1 or --tiny for the CPU run)" >&2
  exit 2
fi
echo "{\"info\": \"mode $MODE, work folder $WORK, logs in $LOGS\"}"

ONLY=${DEVICE_CHECK_ONLY:-}
for name in ${ONLY//,/ }; do
  [[ " $SECTIONS " == *" $name "* ]] || { echo "device_check.sh: --only $name: no such section (sections: $SECTIONS)" >&2; exit 2; }
done
for name in $SECTIONS; do
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    # a section left out is not reported; build_data still runs when the store it makes is missing
    if [ "$name" != build_data ] || [ -e "$STORE/zarr.json" ]; then continue; fi
  fi
  run_section "$name"
done

"$PY" -c 'import json, sys
ok, failed, names, seconds, mode, work = sys.argv[1:]
print(json.dumps({"summary": {"ok": int(ok), "failed": int(failed), "failed_checks": names.split(),
                              "seconds": int(seconds), "mode": mode, "work": work}}))' \
  "$OK" "$FAILED" "$FAILED_NAMES" "$((SECONDS - START))" "$MODE" "$WORK"
[ "$FAILED" -eq 0 ]

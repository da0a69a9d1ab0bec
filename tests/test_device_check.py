"""tools/device_check.py in its tiny CPU mode: every section runs and prints its JSON line.

The script exists for the CUDA paths (pretraining at 512x512 bf16 f=32 against the original-style
step, DeepSpeed ZeRO-2, augmentation on the GPU, SyncBatchNorm on an NCCL group, torch.compile,
fine-tuning with whole-volume prediction, exact save and resume). Those CUDA paths are only
exercised when someone runs ``python tools/device_check.py`` on a lent GPU. Here the same script,
with the same sections through the same entry points, is checked on CPU at tiny sizes
(``DEVICE_CHECK_TINY=1``, CUDA hidden), so that it cannot rot: it must exit 0 and print an ok JSON
line per section, or, for a section that cannot run on a CPU, its documented CPU-mode outcome
(sync_batchnorm: the one-line refusal; compile: skipped with its reason unless DEVICE_CHECK_COMPILE=1).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SECTIONS = ["environment", "build_data", "pretrain", "finetune_evaluate", "deepspeed_zero2", "augment_device",
            "sync_batchnorm", "save_resume", "compile"]


@pytest.mark.gpu
@pytest.mark.slow
def test_device_check_tiny_cpu_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_CHECK_")}
    env.update(DEVICE_CHECK_TINY="1", DEVICE_CHECK_WORK=str(tmp_path / "work"), CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "device_check.py")], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=420, cwd=REPO, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    checks = {line["check"]: line for line in lines if "check" in line}
    assert list(checks) == SECTIONS, out[-4000:]
    failed = {name: line for name, line in checks.items() if line["ok"] is not True}
    assert not failed, failed
    summary = lines[-1]["summary"]
    assert summary == {**summary, "ok": len(SECTIONS), "failed": 0, "mode": "tiny"}

    assert checks["environment"]["device_type"] == "cpu"
    assert checks["build_data"]["summary"]["volumes"] == 7
    pretrain = checks["pretrain"]
    assert pretrain["img_per_s"] > 0 and pretrain["baseline_img_per_s"] > 0 and pretrain["loop_img_per_s"] > 0
    assert pretrain["bench_precision"] == "bfloat16" and pretrain["loop"]["steps"] == 3
    assert 0.0 <= checks["finetune_evaluate"]["finetune_test_dice"] <= 1.0
    assert checks["finetune_evaluate"]["evaluate_shows_same_dice"] is True
    assert checks["deepspeed_zero2"]["zero_stage"] == 2 and checks["deepspeed_zero2"]["loop"]["steps"] == 2
    assert checks["augment_device"]["probe"]["probe_ok"] is True
    sync = checks["sync_batchnorm"]  # no CPU kernel: the documented CPU outcome is the one-line refusal
    assert sync["outcome"] == "refused_on_cpu" and sync["cli_exit"] != 0
    assert sync["error_line"].startswith("pcl-hpc pretrain: error: model.sync_batchnorm=true needs CUDA")
    assert sync["helper_step"]["outcome"] == "refused_on_cpu"
    resume = checks["save_resume"]
    assert resume["identical"] is True and resume["compare"]["tensors"] > 0 and "resuming from" in resume["resumed"]
    compile_ = checks["compile"]  # skipped on CPU with its reason, or run (DEVICE_CHECK_COMPILE=1)
    assert compile_.get("skipped") or compile_["loop"]["steps"] == 2

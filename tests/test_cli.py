"""Bad input at the command line: one clear line naming the culprit, a non-zero exit, no traceback."""

import subprocess
import sys

from tests.conftest import REPO, cli


def run(*args, cwd=REPO):
    return subprocess.run(cli(*args), capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_clear_line(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("preprocess", "pretrain", "finetune", "evaluate", "demo"):
        assert command in proc.stdout


def test_missing_config_file():
    assert_one_clear_line(run("pretrain", "--config", "configs/missing.yaml"), "configs/missing.yaml")


def test_unknown_key():
    assert_one_clear_line(run("pretrain", "--config", "configs/demo.yaml", "pretrain.epoch=3"),
                          "pretrain.epoch", "valid keys")


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "no_such_data"
    proc = run("preprocess", "--config", "configs/demo.yaml", f"data.raw_dir={missing}", f"data.store={tmp_path / 's.zarr'}")
    assert_one_clear_line(proc, str(missing))


def test_missing_store(tmp_path):
    missing = tmp_path / "absent.zarr"
    proc = run("pretrain", "--config", "configs/demo.yaml", f"data.store={missing}", f"output_dir={tmp_path / 'o'}")
    assert_one_clear_line(proc, str(missing))


def test_commands_are_plain_functions_that_never_import_the_cli():
    code = ("import sys, pcl_hpc.predict, pcl_hpc.export, pcl_hpc.evaluate, pcl_hpc.inference\n"
            "print('pcl_hpc.cli' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"  # the arrows point from the CLI to the commands, never back


def test_model_command_arguments_is_the_predict_parser_a_launcher_reuses():
    import argparse

    from pcl_hpc.cli import model_command_arguments

    parser = argparse.ArgumentParser()
    model_command_arguments(parser, "predict")
    args = parser.parse_args(["--model", "m", "--input", "a.nii.gz", "b", "--output", "o", "--tta", "--batch", "4"])
    assert (args.model, args.input, args.output, args.tta, args.batch) == ("m", ["a.nii.gz", "b"], "o", True, 4)
    assert not hasattr(args, "shard")  # the CLI adds --shard itself; a launcher makes its own shards


def test_each_worker_gets_the_command_line_without_nproc_per_node():
    from pcl_hpc.cli import _without_nproc

    want = ["pretrain", "--config", "c.yaml", "pretrain.lr=0.1"]
    assert _without_nproc(["pretrain", "--nproc-per-node", "2", "--config", "c.yaml", "pretrain.lr=0.1"]) == want
    assert _without_nproc(["pretrain", "--config", "c.yaml", "--nproc-per-node=4", "pretrain.lr=0.1"]) == want

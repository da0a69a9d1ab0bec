"""Bad input at the command line: one clear line naming the culprit, a non-zero exit, no traceback."""

import subprocess

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

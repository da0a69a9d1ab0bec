"""Every bad input through the real CLI: a non-zero exit, one clear line naming the culprit, no traceback.

Each case runs ``python -m pcl_hpc ...`` as a subprocess, in an empty working folder, with
``output_dir`` pointing at a folder that does not exist yet. Every case fails at load (config,
paths, the store's contents, the encoder source), so both must stay untouched: nothing ran. The
cases that need a finished pretraining share one tiny run (:func:`tiny_pretrain`).

What every case checks (:func:`assert_one_clear_line`): exit status 2 (the CLI's status for a
user error, argparse's too), no Python traceback or exception line on stdout or stderr, and the
last non-empty stderr line is the only one starting with ``pcl-hpc`` and names the key or file.
Lines before it (MLflow's INFO log, argparse's usage) are allowed.

Each case prints ``<case> -> <message>``: ``pytest tests/test_bad_input.py -s`` shows the whole
table (for the release note).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, cli

CONFIG = str(REPO / "configs" / "demo.yaml")
TIMEOUT_S = 300
TINY = ["data.patch=32", "model.width=4", "model.projection_dim=32"]
TINY_PRETRAIN = [*TINY, "pretrain.batch_size=4", "pretrain.augment=false", "tracking.register_name=bad-input"]
TINY_FINETUNE = [*TINY, "finetune.batch_size=8", "finetune.augment=false", "finetune.max_steps=1",
                 "finetune.train_volumes=[dk01]"]

# A Python error that escaped: a traceback, its frame lines, or a bare "SomeError: ..." line.
PYTHON_ERROR = re.compile(r"Traceback \(most recent call last\)|^\s*File \".*\", line \d+"
                          r"|^[A-Za-z_][\w.]*(Error|Exception|Warning)\b:", re.MULTILINE)


def _env() -> dict[str, str]:
    """The environment of a user's shell: no tracking URI from the test session leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_REGISTRY_"))}
    env.update(OMP_NUM_THREADS="1", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false", PYTHONUNBUFFERED="1")
    return env


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), capture_output=True, text=True, cwd=cwd, env=_env(), timeout=TIMEOUT_S)


def assert_one_clear_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The failure is one line naming every needle; returns that line."""
    shown = f"exit {proc.returncode}\n--- stdout:\n{proc.stdout[-3000:]}\n--- stderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, shown
    for stream in (proc.stdout, proc.stderr):
        assert not PYTHON_ERROR.search(stream), shown
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("pcl-hpc "), shown
    assert [line for line in lines if line.startswith("pcl-hpc")] == [lines[-1]], shown
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not named in: {lines[-1]}"
    return lines[-1]


def _tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_pretrain(demo_store, tmp_path_factory) -> dict:
    """One finished 2-step pretraining (its own output_dir and sqlite db), shared by the cases that need it."""
    root = tmp_path_factory.mktemp("tiny-pretrain")
    out, db = root / "exp", root / "mlflow.db"
    args = ["pretrain", "--config", CONFIG, f"data.store={demo_store}", f"output_dir={out}",
            f"tracking.uri=sqlite:///{db}", "pretrain.max_steps=2", *TINY_PRETRAIN]
    proc = run_cli(args, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "pretrain" / "checkpoints" / "latest").exists()
    return {"args": args, "out": out, "root": root, "encoder": out / "pretrain" / "encoder.pt"}


class Ctx:
    """What a case's arguments are made of; the store and the tiny pretraining are built only when asked for."""

    def __init__(self, request, tmp_path: Path):
        self._request = request
        self.inputs = tmp_path / "inputs"  # files a case writes for itself (a broken config, ...)
        self.inputs.mkdir()
        self.out = tmp_path / "out"  # output_dir: must not appear when the run fails at load
        self.db = tmp_path / "mlflow.db"

    @property
    def store(self) -> str:
        return self._request.getfixturevalue("demo_store")

    @property
    def unlabeled(self) -> str:
        from pcl_hpc.data.store import read_manifest

        ids = [v["id"] for v in read_manifest(self.store)["volumes"] if not v["labeled"]]
        assert ids, "the demo store has no unlabeled volume"
        return ids[0]

    @property
    def tiny(self) -> dict:
        return self._request.getfixturevalue("tiny_pretrain")

    def write(self, name: str, content: str | bytes) -> str:
        path = self.inputs / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return str(path)

    def train(self, command: str, *overrides: str) -> list[str]:
        """``<command> --config demo.yaml`` on the demo store, into ``out``, plus ``overrides``."""
        return [command, "--config", CONFIG, f"data.store={self.store}", f"output_dir={self.out}", *overrides]


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Ctx], list[str]]
    needles: Callable[[Ctx], list[str]]
    xfail: str = ""  # a known traceback: the source to fix (strict: the marker goes once it is fixed)


CASES = [
    # --- the config file and its values: fail while the config loads
    Case("engine.strategy=ddpp", lambda c: c.train("pretrain", "engine.strategy=ddpp"),
         lambda c: ["engine.strategy", "'ddpp'", "ddp, deepspeed"]),
    Case("pretrain.batch_size=abc", lambda c: c.train("pretrain", "pretrain.batch_size=abc"),
         lambda c: ["pretrain.batch_size", "'abc'", "integer"]),
    Case("data.patch=-3", lambda c: c.train("pretrain", "data.patch=-3"), lambda c: ["data.patch=-3", ">= 1"]),
    Case("unknown key", lambda c: c.train("pretrain", "pretrain.epoch=3"), lambda c: ["pretrain.epoch", "valid keys"]),
    Case("override without =", lambda c: c.train("pretrain", "pretrain.epochs"), lambda c: ["pretrain.epochs"]),
    Case("--config missing", lambda c: ["pretrain", "--config", "nope.yaml"], lambda c: ["nope.yaml"]),
    Case("--config not YAML", lambda c: ["pretrain", "--config", c.write("broken.yaml", "data: [1, 2\n  bad: : :\n")],
         lambda c: [str(c.inputs / "broken.yaml"), "not valid YAML"]),
    Case("--config not UTF-8", lambda c: ["pretrain", "--config", c.write("latin1.yaml", b"seed: 0\n# caf\xe9\n")],
         lambda c: [str(c.inputs / "latin1.yaml")]),
    Case("--workers abc (argparse)", lambda c: ["preprocess", "--config", CONFIG, "--workers", "abc"],
         lambda c: ["--workers", "'abc'"]),
    Case("demo with a bad value", lambda c: ["demo", "--config", CONFIG, "--out", str(c.out), "engine.strategy=ddpp"],
         lambda c: ["engine.strategy"]),
    # --- data: the store and its volumes
    Case("pretrain data.store missing", lambda c: c.train("pretrain", f"data.store={c.inputs / 'absent.zarr'}"),
         lambda c: [str(c.inputs / "absent.zarr"), "preprocess"]),
    Case("finetune data.store missing", lambda c: c.train("finetune", f"data.store={c.inputs / 'absent.zarr'}"),
         lambda c: [str(c.inputs / "absent.zarr"), "preprocess"]),
    Case("preprocess data.raw_dir missing",
         lambda c: ["preprocess", "--config", CONFIG, f"data.raw_dir={c.inputs / 'no_raw'}",
                    f"data.store={c.out / 's.zarr'}"],
         lambda c: [str(c.inputs / "no_raw"), "data.raw_dir"]),
    Case("preprocess data.store is a file",
         lambda c: ["preprocess", "--config", CONFIG, f"data.raw_dir={Path(c.store).parent / 'raw'}",
                    f"data.store={c.write('s.zarr', 'x')}"],
         lambda c: [str(c.inputs / "s.zarr"), "data.store"]),
    Case("finetune.num_classes=1 on a 3-class store", lambda c: c.train("finetune", "finetune.num_classes=1"),
         lambda c: ["finetune.num_classes=1", "3 foreground classes", "finetune.num_classes=3"]),
    Case("train volume not in the store", lambda c: c.train("finetune", "finetune.train_volumes=[nosuch]"),
         lambda c: ["'nosuch'", c.store]),
    Case("val volume without a label", lambda c: c.train("finetune", f"finetune.val_volumes=[{c.unlabeled}]"),
         lambda c: [f"'{c.unlabeled}'", "no label", "finetune.val_volumes"]),
    Case("test volume without a label",
         lambda c: c.train("finetune", f"finetune.test_volumes=[{c.unlabeled}]", f"tracking.uri=sqlite:///{c.db}",
                           *TINY_FINETUNE),
         lambda c: [f"'{c.unlabeled}'", "no label", "finetune.test_volumes"]),
    # --- the encoder a fine-tune starts from
    Case("finetune.encoder=missing/encoder.pt", lambda c: c.train("finetune", "finetune.encoder=missing/encoder.pt"),
         lambda c: ["missing/encoder.pt"]),
    Case("finetune.encoder=models:/nope@candidate",
         lambda c: c.train("finetune", "finetune.encoder=models:/nope@candidate", f"tracking.uri=sqlite:///{c.db}"),
         lambda c: ["models:/nope@candidate", "'nope'"]),
    Case("finetune.encoder of another model.width",
         lambda c: c.train("finetune", f"finetune.encoder={c.tiny['encoder']}", f"tracking.uri=sqlite:///{c.db}",
                           *TINY_FINETUNE, "model.width=8"),  # the encoder was pretrained with width 4
         lambda c: ["finetune.encoder", "model.width"]),
    # --- one step of the sweep's plan
    Case("sweep --step that is not a step", lambda c: [*c.train("sweep"), "--step", "pretrain-nosuch"],
         lambda c: ["--step pretrain-nosuch", "register, cells, report"]),
    Case("sweep --shard without --step cells", lambda c: [*c.train("sweep"), "--step", "report", "--shard", "0/2"],
         lambda c: ["--shard 0/2", "--step cells"]),
    # --- evaluate
    Case("evaluate --results missing.json", lambda c: ["evaluate", "--results", "missing.json"],
         lambda c: ["missing.json", "not found"]),
    Case("evaluate --results not JSON", lambda c: ["evaluate", "--results", c.write("results.json", "not json {")],
         lambda c: [str(c.inputs / "results.json"), "not valid JSON"]),
    Case("evaluate --results not a results file", lambda c: ["evaluate", "--results", c.write("r.json", "[1, 2]")],
         lambda c: [str(c.inputs / "r.json"), "missing init"]),
    Case("evaluate --model missing.pt", lambda c: c.train("evaluate", "--model", "missing.pt"),
         lambda c: ["missing.pt", "--model"]),
    Case("evaluate --model not a model file", lambda c: c.train("evaluate", "--model", c.write("model.pt", "garbage")),
         lambda c: [str(c.inputs / "model.pt")]),
]


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [])
    for case in CASES
])
def test_bad_input_is_one_clear_line(case: Case, request, tmp_path):
    ctx = Ctx(request, tmp_path)
    args = case.args(ctx)
    work = tmp_path / "cwd"
    work.mkdir()
    proc = run_cli(args, cwd=work)
    print(f"\n{case.id} -> {assert_one_clear_line(proc, *case.needles(ctx))}")
    assert not ctx.out.exists(), f"failed at load, yet wrote {sorted(_tree(ctx.out))}"
    assert not list(work.iterdir()), f"wrote into the working folder: {sorted(_tree(work))}"


def test_resume_with_another_schedule_length_keeps_the_checkpoint(tiny_pretrain):
    """The finished 2-step pretraining, started again with max_steps=4: refused, its folder untouched."""
    out = tiny_pretrain["out"]
    before = _tree(out)
    assert any(name.startswith("pretrain/checkpoints/step_") for name in before)
    args = [a if a != "pretrain.max_steps=2" else "pretrain.max_steps=4" for a in tiny_pretrain["args"]]
    assert args != tiny_pretrain["args"]
    proc = run_cli(args, cwd=tiny_pretrain["root"])
    line = assert_one_clear_line(proc, "pretrain.schedule_steps", "pretrain.schedule_steps=2", "--no-resume")
    print(f"\nresume with pretrain.max_steps 2 -> 4 -> {line}")
    assert _tree(out) == before, "the refused resume changed the experiment folder (checkpoint, metrics, encoder)"
    assert (out / "pretrain" / "checkpoints" / "latest").exists()


def test_bad_value_under_two_processes_is_said_once(tiny_pretrain, tmp_path):
    """Both ranks fail alike (the resume's checks, after the process group is up; a store that is not there):
    the user reads one line and exit 2, no traceback from the launcher."""
    out = tiny_pretrain["out"]
    before = _tree(out)
    args = [a if a != "pretrain.max_steps=2" else "pretrain.max_steps=4" for a in tiny_pretrain["args"]]
    args = [args[0], "--nproc-per-node", "2", *args[1:]]
    proc = run_cli(args, cwd=tiny_pretrain["root"])
    line = assert_one_clear_line(proc, "world_size=1", "world_size=2", "--no-resume")
    print(f"\n2 processes, resume of a 1-process run -> {line}")
    assert _tree(out) == before
    missing = tmp_path / "missing.zarr"
    proc = run_cli(["pretrain", "--nproc-per-node=2", "--config", CONFIG, f"data.store={missing}",
                    f"output_dir={tmp_path / 'out'}", *TINY_PRETRAIN], cwd=tmp_path)
    assert_one_clear_line(proc, str(missing))

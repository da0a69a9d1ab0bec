"""The label-efficiency protocol in one command: ``pcl-hpc sweep --config ...``.

Cells are encoder x mode x M x fold x seed:

* **encoders**: ``random``; the methods of ``sweep.pretrain`` (pcl, gcl, simclr), each pretrained
  once by the sweep under ``<output_dir>/pretrain/<method>`` and registered as
  ``<tracking.register_name>-<method>``; ``supervised``, the positive control (below); or any path to
  an ``encoder.pt`` / ``models:/`` URI in ``sweep.encoders``.
* **modes** (``sweep.modes``): ``full`` fine-tunes encoder and decoder, ``frozen`` only the decoder
  (``finetune.mode`` of the cell). A cell's name carries its mode unless it is ``full``
  (``pcl_M1_f0_s0``, ``pcl_frozen_M1_f0_s0``); results, tables and pairs are per mode. Frozen cells may
  take their own seeds (``sweep.frozen_seeds``, e.g. fewer when the full mode needs more pairs).
* **splits** (:func:`protocol_split`): the manifest's patient-level fold is the test set; the
  validation patients (``sweep.val_patients``) come from outside it, drawn by (seed, fold); the M
  labeled patients are drawn by (seed, fold) from the rest, nested (a larger M keeps a smaller M's
  patients). Every encoder of a (M, fold, seed) sees the same split, so methods pair cell by cell.
* **a cell** is a fine-tuning (the harness's ``Finetune`` stage) in ``<output_dir>/sweep/cells/<cell>/``
  whose split is written beside it (``split.json``: volume ids and their hash). It is a function of
  (config, split, seed, encoder version): a finished cell is not rerun (the harness's
  ``complete.json``), an interrupted one resumes from its checkpoint.
* **the positive control** (``supervised`` in ``sweep.encoders``): per (fold, seed), never per M or
  mode, the encoder of a model fine-tuned from random init with the labels of every labeled volume
  outside the test fold (:func:`supervised_split`; model selection on the cells' validation patients
  of that (fold, seed), which it also trains on). It is trained once under
  ``<output_dir>/sweep/supervised/f<fold>_s<seed>/`` (``split.json``, ``encoder.pt``) and is the
  encoder of that fold's ``supervised`` cells. It never sees a test-fold volume (asserted).

Outputs in ``<output_dir>/sweep/``: ``results.csv`` (one row per test volume x cell: Dice and HD95 in mm
per class), ``summary.md`` (mean ± std over folds x seeds, paired differences against random init),
``label_efficiency.png`` and ``paired_differences.png`` (each method against random init, per mode, with
its 95% CI). MLflow: a parent run ``sweep`` with a nested child run per cell.

The plan (:func:`sweep_plan`, see ``pcl_hpc/plan.py``): ``pretrain-<method>`` per method, ``register``
(the parent tracking run, each encoder in the registry), ``supervised`` (the positive control's
encoders, array tasks ``I/K``; only with ``supervised`` in ``sweep.encoders``; it waits for no
pretraining), ``cells`` (array tasks ``I/K``), ``report``; each task is
``pcl-hpc sweep --step NAME [--shard I/K]`` (:func:`run_step`). ``pcl-hpc sweep`` runs it
here (:func:`sweep`), ``launchers/slurm.py sweep`` as chained jobs. A task runs its cells
``sweep.workers`` at a time, one process each.

As in the PCL paper, pretraining uses the store's volumes without their labels (test folds included;
``pretrain.exclude_volumes`` holds volumes out).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pcl_hpc.atomic import write_text
from pcl_hpc.config import Config
from pcl_hpc.data.store import read_manifest, split_hash
from pcl_hpc.engine.harness import stage_folder
from pcl_hpc.errors import UserError
from pcl_hpc.plan import Step, Task, command, run_local

METHODS = ("pcl", "gcl", "simclr")
MODES = ("full", "frozen")  # finetune.mode of a cell
SUPERVISED = "supervised"  # the positive control's encoder kind (see supervised_split)
SPLIT_FILE = "split.json"
ENCODER_FILE = "encoder.pt"  # the file name pretraining gives an encoder (the supervised encoders get it too)
STATE_FILE = "sweep.json"  # the parent tracking run's id, so a rerun continues it


@dataclasses.dataclass(frozen=True)
class Cell:
    encoder: str  # the method's name in the tables: random, pcl, ..., or a given encoder's name
    source: str  # what fine-tuning loads: "" (random), a path, or a models:/ URI
    labeled: int
    fold: int
    seed: int
    mode: str = "full"  # finetune.mode: full | frozen

    @property
    def name(self) -> str:
        mode = "" if self.mode == "full" else f"_{self.mode}"  # full cells keep their names of before modes
        return f"{self.encoder}{mode}_M{self.labeled}_f{self.fold}_s{self.seed}"


def folder(cfg: Config) -> Path:
    return stage_folder(cfg, "sweep")


def protocol_split(manifest: dict, fold: int, m: int, seed: int, val_patients: int) -> dict[str, list[str]]:
    """{"train", "val", "test"} volume ids of one cell; see the module docstring."""
    k = int(manifest["settings"].get("folds", 5))
    if not 0 <= fold < k:
        raise UserError(f"sweep.folds: fold {fold} is not in 0..{k - 1} (the store was written with data.folds={k})")
    labeled = [v for v in manifest["volumes"] if v["labeled"]]
    pool = sorted({v["patient"] for v in labeled if v["fold"] != fold})
    rng = np.random.default_rng([seed, fold])
    order = [pool[j] for j in rng.permutation(len(pool))]
    val, rest = order[:val_patients], order[val_patients:]
    if not 0 < m <= len(rest):
        raise UserError(f"sweep.labeled: M={m} labeled patients cannot be drawn for fold {fold}: {len(pool)} patients "
                        f"are outside it and sweep.val_patients={val_patients} of them validate; use M <= {len(rest)}")
    pick = lambda patients: [v["id"] for v in labeled if v["fold"] != fold and v["patient"] in set(patients)]  # noqa: E731
    return {"train": pick(rest[:m]), "val": pick(val), "test": [v["id"] for v in labeled if v["fold"] == fold]}


def method_config(cfg: Config, method: str) -> Config:
    """The pretraining config of one method of ``sweep.pretrain``."""
    run = copy.deepcopy(cfg)
    run.loss.method, run.pretrain.name = method, method
    run.tracking.register_name, run.tracking.run_name = f"{cfg.tracking.register_name}-{method}", f"pretrain-{method}"
    return run


def encoders(cfg: Config) -> list[tuple[str, str]]:
    """(name, source) of every encoder of the sweep, in table order."""
    unknown = [m for m in cfg.sweep.pretrain if m not in METHODS]
    if unknown:
        raise UserError(f"sweep.pretrain: {unknown} are not methods; choose from {', '.join(METHODS)}")
    from pcl_hpc.train.pretrain import folder as pretrain_folder

    out = [(m, str(pretrain_folder(method_config(cfg, m)) / "encoder.pt")) for m in cfg.sweep.pretrain]
    for source in cfg.sweep.encoders:
        name = "random" if source == "random" else source.removeprefix("models:/").replace("/", "-").replace("@", "-")
        if source not in ("random", SUPERVISED) and not source.startswith("models:/"):
            name = Path(source).parent.name or Path(source).stem
            if name == SUPERVISED:
                raise UserError(f"sweep.encoders: {source} would be named {SUPERVISED}, the positive control's name; "
                                f"move it to a folder of another name")
        out.append((name, "" if source == "random" else source))  # supervised: its source is per fold (plan_cells)
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UserError(f"sweep: two encoders share the name {sorted({n for n in names if names.count(n) > 1})}; "
                        f"list each encoder once")
    return out


def plan_cells(cfg: Config, manifest: dict | None) -> list[Cell]:
    """The cells, in table order (``manifest=None``: before the store exists, its folds from ``data.folds``)."""
    s = cfg.sweep
    if any(m < 1 for m in s.labeled) or not s.labeled or not s.seeds or s.frozen_seeds == []:
        raise UserError(f"sweep.labeled={s.labeled}, sweep.seeds={s.seeds} and sweep.frozen_seeds={s.frozen_seeds}: give "
                        f"at least one M >= 1 and one seed (frozen_seeds: null takes sweep.seeds)")
    if s.trainer == "nnunet" and cfg.model.arch != "nnunet":
        raise UserError("sweep.trainer=nnunet fine-tunes nnU-Net's own network: set model.arch=nnunet and model.plans "
                        "(the encoders must be pretrained on the plan's network)")
    if s.trainer == "nnunet" and SUPERVISED in s.encoders:
        raise UserError("sweep.encoders: supervised is not supported with sweep.trainer=nnunet (its encoder is trained "
                        "by pcl-hpc's fine-tuning, which does not build model.arch=nnunet); drop it")
    k = int(manifest["settings"].get("folds", 5)) if manifest is not None else cfg.data.folds
    folds, chosen = (s.folds if s.folds is not None else list(range(k))), modes(cfg)
    return [Cell(name, _cell_source(cfg, name, source, fold, seed), m, fold, seed, mode)
            for name, source in encoders(cfg) for mode in chosen
            for m in sorted(set(s.labeled)) for fold in folds for seed in seeds(cfg, mode)]


def seeds(cfg: Config, mode: str) -> list[int]:
    """The seeds of a mode's cells: ``sweep.frozen_seeds`` for frozen cells when given, else ``sweep.seeds``."""
    s = cfg.sweep
    return list(s.frozen_seeds) if mode == "frozen" and s.frozen_seeds is not None else list(s.seeds)


def modes(cfg: Config) -> list[str]:
    """``sweep.modes``, checked: full | frozen, at least one; frozen not with nnU-Net as the trainer."""
    s = cfg.sweep
    chosen = list(dict.fromkeys(m.strip().lower() for m in s.modes))
    if not chosen or any(m not in MODES for m in chosen):
        raise UserError(f"sweep.modes={s.modes}: choose one or more of {', '.join(MODES)}, e.g. [full, frozen]")
    if s.trainer == "nnunet" and "frozen" in chosen:
        raise UserError("sweep.modes: frozen is not supported with sweep.trainer=nnunet (nnU-Net's trainer fine-tunes "
                        "the whole network); use sweep.modes=[full]")
    if cfg.finetune.mode != "full" and cfg.finetune.mode not in chosen:
        raise UserError(f"finetune.mode={cfg.finetune.mode} is not in sweep.modes={s.modes}: a sweep's cells take their "
                        f"mode from sweep.modes; set sweep.modes=[{cfg.finetune.mode}] (or [full, frozen])")
    return chosen


def _cell_source(cfg: Config, name: str, source: str, fold: int, seed: int) -> str:
    """What a cell fine-tunes from: the encoder's source, or (supervised) its fold's and seed's encoder."""
    return str(supervised_folder(cfg, fold, seed) / ENCODER_FILE) if name == SUPERVISED else source


def cell_config(cfg: Config, cell: Cell, split: dict[str, list[str]]) -> Config:
    run = copy.deepcopy(cfg)
    run.seed = cell.seed
    f = run.finetune
    f.train_volumes, f.val_volumes, f.test_volumes, f.encoder = split["train"], split["val"], split["test"], cell.source
    f.mode = cell.mode
    run.tracking.run_name = cell.name
    return run


def cell_stage(cfg: Config, cell: Cell, split: dict, parent_run_id: str | None = None):
    """The harness stage of one cell: a fine-tuning in ``<sweep>/cells/<cell>`` tagged as a child of the sweep."""
    from pcl_hpc.train.finetune import Finetune

    tags = {"cell": cell.name, "labeled": cell.labeled, "fold": cell.fold, "seed": cell.seed, "split_hash": split_hash(split)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # a nested run under the sweep's
    run_cfg = cell_config(cfg, cell, split)
    return Finetune(run_cfg, run_cfg.finetune, folder(cfg) / "cells" / cell.name, tags=tags, register=False)


def cell_folder(cfg: Config, cell: Cell) -> Path:
    return folder(cfg) / "cells" / cell.name


def cell_result(cfg: Config, cell: Cell, split: dict) -> dict | None:
    """A finished cell's result (per-volume Dice and HD95), None while it is not finished."""
    if cfg.sweep.trainer == "nnunet":
        from pcl_hpc.nnunet.cell import cell_identity, finished

        return finished(cell_folder(cfg, cell), cell_identity(cfg, split, cell.source, cell.seed))
    from pcl_hpc.engine.harness import is_complete

    stage = cell_stage(cfg, cell, split)
    return stage.completed() if is_complete(stage) else None  # the same run's result (a changed encoder: none)


def is_cell_complete(cfg: Config, cell: Cell, manifest: dict) -> bool:
    """Whether the cell has finished (its encoder must exist to say: a missing one means not yet)."""
    if cell.source and not cell.source.startswith("models:/") and not Path(cell.source).is_file():
        return False
    split = protocol_split(manifest, cell.fold, cell.labeled, cell.seed, cfg.sweep.val_patients)
    return cell_result(cfg, cell, split) is not None


def run_cell(cfg: Config, cell: Cell, split: dict, parent_run_id: str | None) -> dict:
    """One cell, in this process (a worker): fine-tune, or return the result of a finished one."""
    from pcl_hpc.engine.harness import run

    write_text(cell_folder(cfg, cell) / SPLIT_FILE, json.dumps({**split, "hash": split_hash(split)}, indent=1) + "\n")
    if cfg.sweep.trainer == "nnunet":
        from pcl_hpc.nnunet.cell import protocol_cell

        return protocol_cell(cfg, cell_folder(cfg, cell), split, cell.source, cell.seed)
    return run(cell_stage(cfg, cell, split, parent_run_id))


# ---------------------------------------------------------------- the positive control: supervised encoders


def supervised_folder(cfg: Config, fold: int, seed: int) -> Path:
    return folder(cfg) / SUPERVISED / f"f{fold}_s{seed}"


def supervised_split(manifest: dict, fold: int, seed: int, val_patients: int) -> dict[str, list[str]]:
    """{"train", "val"} of the positive control of (fold, seed): it trains on every labeled volume outside
    the test fold and selects its model on the validation patients of that fold's cells (also trained on)."""
    train = [v["id"] for v in manifest["volumes"] if v["labeled"] and v["fold"] != fold]
    val = protocol_split(manifest, fold, 1, seed, val_patients)["val"]
    test_fold = {v["id"] for v in manifest["volumes"] if v["fold"] == fold}
    assert not test_fold & {*train, *val}, f"the supervised encoder of fold {fold} would see its test fold"
    return {"train": train, "val": val}


def supervised_pairs(cfg: Config, manifest: dict | None) -> list[tuple[int, int]]:
    """The (fold, seed) of every supervised encoder the cells need, in order (none without it in sweep.encoders)."""
    return list(dict.fromkeys((c.fold, c.seed) for c in plan_cells(cfg, manifest) if c.encoder == SUPERVISED))


def supervised_stage(cfg: Config, fold: int, seed: int, split: dict, parent_run_id: str | None = None):
    """The harness stage of one supervised encoder: a full fine-tuning from random init, scored on its
    validation volumes (results.json: a check that it learned, not a result: it trained on them)."""
    from pcl_hpc.train.finetune import Finetune

    run = copy.deepcopy(cfg)
    run.seed = seed
    f = run.finetune
    f.train_volumes, f.val_volumes, f.test_volumes = split["train"], split["val"], split["val"]
    f.encoder, f.mode = "", "full"  # from random init, encoder and decoder trained
    f.epochs = cfg.sweep.supervised_epochs or f.epochs
    run.tracking.run_name = f"{SUPERVISED}_f{fold}_s{seed}"
    tags = {"supervised_encoder": f"f{fold}_s{seed}", "fold": fold, "seed": seed, "split_hash": split_hash(split)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return Finetune(run, f, supervised_folder(cfg, fold, seed), tags=tags, register=False)


def is_supervised_complete(cfg: Config, manifest: dict, fold: int, seed: int) -> bool:
    from pcl_hpc.engine.harness import is_complete

    split = supervised_split(manifest, fold, seed, cfg.sweep.val_patients)
    done = is_complete(supervised_stage(cfg, fold, seed, split))
    return done and (supervised_folder(cfg, fold, seed) / ENCODER_FILE).is_file()


def run_supervised(cfg: Config, fold: int, seed: int, split: dict, parent_run_id: str | None) -> Path:
    """One supervised encoder, in this process (a worker): fine-tune (or find it finished), then its encoder.pt."""
    from pcl_hpc.engine.harness import run

    out = supervised_folder(cfg, fold, seed)
    write_text(out / SPLIT_FILE, json.dumps({**split, "test_fold": fold, "hash": split_hash(split)}, indent=1) + "\n")
    run(supervised_stage(cfg, fold, seed, split, parent_run_id))
    return _write_encoder(out / "model.pt", out / ENCODER_FILE)


def _write_encoder(model_file: Path, path: Path) -> Path:
    """The encoder part of a fine-tuned model.pt as encoder.pt; not rewritten when it holds the same weights."""
    import torch

    from pcl_hpc.atomic import save_torch

    model = torch.load(model_file, map_location="cpu", weights_only=True)
    state = {k.removeprefix("encoder."): v for k, v in model.items() if k.startswith("encoder.")}
    if path.is_file():
        old = torch.load(path, map_location="cpu", weights_only=True)
        if old.keys() == state.keys() and all(torch.equal(old[k], state[k]) for k in state):
            return path
    return save_torch(state, path)


def _worker_count(cfg: Config, pending: int) -> int:
    """Cells side by side: ``sweep.workers``, else one per visible GPU, else half the cores this process may use."""
    import torch

    if cfg.sweep.workers:
        return max(1, min(cfg.sweep.workers, pending))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.cuda.device_count() or cores // 2, pending))


def _run_pending(cfg: Config, calls: list[tuple], what: str = "cell(s)") -> None:
    """Each call ``(function, *args)`` (a cell, a supervised encoder) in a worker, ``sweep.workers`` at a time
    (GPU i for worker i on a GPU node)."""
    workers = _worker_count(cfg, len(calls))
    print(f"sweep: {len(calls)} {what} to run, {workers} at a time", flush=True)
    if workers == 1:
        for function, *args in calls:
            function(*args)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for i in range(workers):
        slots.put(i)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(workers, slots)) as pool:
        for future in [pool.submit(*call) for call in calls]:
            future.result()  # a failed cell fails the sweep; finished cells stay finished


def _init_worker(workers: int, slots) -> None:
    """A cell worker: local rank ``i`` of ``workers`` (its share of the cores, GPU i on a GPU node)."""
    from pcl_hpc import dist

    dist.publish(local_rank=slots.get(), local_world_size=workers)


def result_rows(cell: Cell, result: dict, class_names: list[str]) -> list[dict]:
    """results.csv rows of one cell: one per test volume."""
    rows = []
    for vid, dice in result["per_volume"].items():
        hd = (result.get("hd95_mm_per_volume") or {}).get(vid) or [None] * len(dice)
        present = [h for h in hd if h is not None]
        row = {"cell": cell.name, "encoder": cell.encoder, "mode": cell.mode, "labeled": cell.labeled, "fold": cell.fold,
               "seed": cell.seed, "volume": vid, "dice_mean": float(np.mean(dice)),
               "hd95_mm_mean": float(np.mean(present)) if present else None}
        row.update({f"dice_{c}": d for c, d in zip(class_names, dice)})
        row.update({f"hd95_mm_{c}": h for c, h in zip(class_names, hd)})
        rows.append(row)
    return rows


def shard_cells(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """The cells of array task ``i`` of ``k`` (every k-th, so each task gets a mix of short and long cells)."""
    if shard is None:
        return cells
    i, k = shard
    return cells[i::k]


def _state(cfg: Config) -> dict:
    path = folder(cfg) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _parent_run(cfg: Config, cells: list[Cell]):
    """The sweep's parent tracking run (created once, its id kept in sweep.json): (tracker, run id)."""
    from pcl_hpc.config import flatten
    from pcl_hpc.tracking import Tracker

    state = _state(cfg)
    tracker = Tracker(cfg, enabled=True, folder=folder(cfg))
    parent = tracker.start(cfg.tracking.run_name or "sweep", {k: v for k, v in flatten(cfg).items() if k.startswith("sweep.")},
                           run_id=state.get("run_id"), tags={"stage": "sweep", "cells": len(cells)})
    state.update(run_id=parent or state.get("run_id"), cells=[c.name for c in cells])
    write_text(folder(cfg) / STATE_FILE, json.dumps(state) + "\n")
    return tracker, parent or state.get("run_id")


# ---------------------------------------------------------------- the plan: steps and what each runs


STEPS = ("pretrain-<method>", "register", "supervised", "cells", "report")
ARRAYS = ("supervised", "cells")  # the steps that are job arrays (--shard I/K)


def _encoder_files(cfg: Config) -> dict[str, Path]:
    from pcl_hpc.train.pretrain import ENCODER_FILE
    from pcl_hpc.train.pretrain import folder as pretrain_folder

    return {m: pretrain_folder(method_config(cfg, m)) / ENCODER_FILE for m in cfg.sweep.pretrain}


def _registered(cfg: Config) -> bool:
    """The register step is done: the parent run exists and each method's current encoder was registered."""
    from pcl_hpc.data.readers import file_sha256

    state, files = _state(cfg), _encoder_files(cfg)
    current = {m: file_sha256(p) for m, p in files.items() if p.is_file()}
    return bool(state.get("run_id")) and len(current) == len(files) and state.get("encoders") == current


def sweep_plan(cfg: Config, config: str, upstream: list[str] | None = None) -> list[Step]:
    """The sweep's steps: pretrain-<method> (a training stage each), register, supervised (with it in
    sweep.encoders; waits only for ``upstream``), cells (an array of ``slurm.cells_per_task`` cells per
    task, at least one per GPU of a node; supervised encoders are packed the same way), report.
    ``config``: the resolved config every task reads; ``upstream``: steps before these (their outputs
    are not there yet, so the store is not read: the folds come from ``data.folds``)."""
    from pcl_hpc.engine.harness import is_complete
    from pcl_hpc.train.pretrain import Pretrain

    upstream = list(upstream or [])
    step = lambda name, *flags: command("sweep", "--step", name, *flags, config=config)  # noqa: E731
    steps = []
    for method, path in _encoder_files(cfg).items():
        run = method_config(cfg, method)
        stage = Pretrain(run, run.pretrain, path.parent)
        steps.append(Step(f"pretrain-{method}", [Task(step(f"pretrain-{method}"), folder=str(path.parent.absolute()),
                                                      done=lambda stage=stage: is_complete(stage))], upstream, "stage"))
    before = upstream + [s.name for s in steps]
    steps.append(Step("register", [Task(step("register"), done=lambda: _registered(cfg))], before))
    manifest = read_manifest(cfg.data.store) if not upstream else None
    cells, pairs = plan_cells(cfg, manifest), supervised_pairs(cfg, manifest)
    if pairs:
        names = {p: f"f{p[0]}_s{p[1]}" for p in pairs}  # the folders under sweep/supervised/
        steps.append(_array_step(cfg, "supervised", pairs, names, folder(cfg) / SUPERVISED, upstream, step,
                                 lambda p: is_supervised_complete(cfg, manifest, *p)))
    after = ["register"] + (["supervised"] if pairs else [])
    steps.append(_array_step(cfg, "cells", cells, {c: c.name for c in cells}, folder(cfg) / "cells", after, step,
                             lambda c: is_cell_complete(cfg, c, manifest)))
    steps.append(Step("report", [Task(step("report"), done=lambda: (folder(cfg) / "summary.md").is_file())], ["cells"]))
    return steps


def _array_step(cfg: Config, name: str, items: list, names: dict, where: Path, after: list[str], step, done) -> Step:
    """An array step over ``items`` (cells, or supervised (fold, seed)): ``slurm.cells_per_task`` per task, at
    least one per GPU of a node (or per worker); a task is done when ``done(item)`` holds for each of its items."""
    per_task = max(cfg.slurm.cells_per_task, cfg.slurm.gpus_per_node or cfg.sweep.workers or 1)
    k = max(1, math.ceil(len(items) / per_task))  # a task fills its node's GPUs (or its workers)
    shards = [shard_cells(items, (i, k)) for i in range(k)]
    tasks = [Task(step(name, "--shard", f"{i}/{k}"), shard=f"{i}/{k}", cells=[names[x] for x in mine],
                  folder=str(where.absolute()), done=lambda mine=mine: all(map(done, mine)))
             for i, mine in enumerate(shards)]
    return Step(name, tasks, after, "cells", together=True)


def run_step(cfg: Config, name: str, shards: list[tuple[int, int]] | None = None) -> None:
    """One step of the plan in this process (``pcl-hpc sweep --step NAME [--shard I/K[,J/K...]]``): what both
    runners run. The cells of several shards (the local runner's way to run an array) share one pool."""
    if name.startswith("pretrain-") and name.removeprefix("pretrain-") in cfg.sweep.pretrain:
        from pcl_hpc.train.pretrain import pretrain

        pretrain(method_config(cfg, name.removeprefix("pretrain-")))
        return
    supervised = SUPERVISED in cfg.sweep.encoders
    if name not in STEPS[1:] or (name == "supervised" and not supervised):
        methods = ", ".join(f"pretrain-{m}" for m in cfg.sweep.pretrain)
        raise UserError(f"sweep --step {name}: not a step of this sweep; choose one of: {methods + ', ' if methods else ''}"
                        f"register, {'supervised, ' if supervised else ''}cells, report")
    if shards and name not in ARRAYS:
        raise UserError(f"sweep --step {name} --shard: only the {' and '.join(ARRAYS)} steps are arrays; drop --shard")
    manifest = read_manifest(cfg.data.store)
    cells = plan_cells(cfg, manifest)
    splits = {c: protocol_split(manifest, c.fold, c.labeled, c.seed, cfg.sweep.val_patients) for c in cells}
    if name == "register":
        _register(cfg, cells)
    elif name == "supervised":
        _run_supervised(cfg, manifest, shards)
    elif name == "cells":
        _run_cells(cfg, cells, splits, shards)
    else:
        unfinished = [c.name for c in cells if not is_cell_complete(cfg, c, manifest)]
        if unfinished:
            raise UserError(f"sweep: {len(unfinished)} of {len(cells)} cells are not finished ({', '.join(unfinished[:5])}"
                            f"{', ...' if len(unfinished) > 5 else ''}); run `pcl-hpc sweep` with the same config to finish them")
        tracker, _ = _parent_run(cfg, cells)
        print(write_report(cfg, cells, splits, manifest, tracker), flush=True)


def _register(cfg: Config, cells: list[Cell]) -> None:
    """The sweep's parent run, and each pretrained encoder in the registry (recorded in sweep.json when all are)."""
    from pcl_hpc.data.readers import file_sha256

    tracker, parent = _parent_run(cfg, cells)
    registered = register_encoders(cfg, parent)
    tracker.end()
    if registered:
        state = _state(cfg)
        state["encoders"] = {m: file_sha256(p) for m, p in _encoder_files(cfg).items()}
        write_text(folder(cfg) / STATE_FILE, json.dumps(state) + "\n")
    print(f"sweep: {len(cells)} cells: {', '.join(c.name for c in cells)}", flush=True)


def _mine(items: list, shards: list[tuple[int, int]] | None) -> list:
    """The items of these array tasks (all without shards), in order."""
    mine = {x for shard in shards for x in shard_cells(items, shard)} if shards else set(items)
    return [x for x in items if x in mine]


def _run_supervised(cfg: Config, manifest: dict, shards: list[tuple[int, int]] | None) -> None:
    """The supervised encoders of these array tasks that are not finished yet (``--step supervised``)."""
    todo = [p for p in _mine(supervised_pairs(cfg, manifest), shards) if not is_supervised_complete(cfg, manifest, *p)]
    start, parent = time.time(), _state(cfg).get("run_id")
    splits = {p: supervised_split(manifest, *p, cfg.sweep.val_patients) for p in todo}
    if todo:
        _run_pending(cfg, [(run_supervised, cfg, *p, splits[p], parent) for p in todo], "supervised encoder(s)")
    tasks = ",".join(f"{i}/{k}" for i, k in shards) if shards else "all"
    rate = _rate(len(todo), start, "encoders")
    print(f"sweep: {len(todo)} supervised encoder(s) of task {tasks} trained now{rate}", flush=True)


def _run_cells(cfg: Config, cells: list[Cell], splits: dict, shards: list[tuple[int, int]] | None) -> None:
    missing = [c.source for c in cells if c.encoder in (*cfg.sweep.pretrain, SUPERVISED) and not Path(c.source).is_file()]
    if missing:
        raise UserError(f"sweep: the encoders {sorted(set(missing))} do not exist yet; train them first "
                        f"(`pcl-hpc sweep` does, or the steps pretrain-<method> and supervised)")
    todo = [c for c in _mine(cells, shards) if cell_result(cfg, c, splits[c]) is None]
    start = time.time()
    if todo:
        parent = _state(cfg).get("run_id")
        _run_pending(cfg, [(run_cell, cfg, c, splits[c], parent) for c in todo])
    tasks = ",".join(f"{i}/{k}" for i, k in shards) if shards else "all"
    print(f"sweep: {len(todo)} cell(s) of task {tasks} run now{_rate(len(todo), start)}", flush=True)


def _rate(count: int, start: float, unit: str = "cells") -> str:
    minutes = (time.time() - start) / 60
    return f" in {minutes:.1f} min ({count / minutes * 60:.0f} {unit}/h)" if count else ""


def resolved_config(cfg: Config) -> str:
    """The resolved config, written where the plan's tasks read it (DINOv2's habit: beside the outputs)."""
    from pcl_hpc.config import save_config

    path = (folder(cfg) / "config.yaml").absolute()
    save_config(cfg, path)
    return str(path)


def sweep(cfg: Config) -> str:
    """The local runner: run what is left of the plan here (pretrainings with ``sweep.pretrain_processes``
    processes), then return summary.md."""
    manifest = read_manifest(cfg.data.store)
    cells = plan_cells(cfg, manifest)
    todo = [c for c in cells if not is_cell_complete(cfg, c, manifest)]
    start = time.time()
    ran = run_local(sweep_plan(cfg, resolved_config(cfg)), stage_processes=cfg.sweep.pretrain_processes)
    text = (folder(cfg) / "summary.md").read_text()
    print(f"\n{text}\nsweep done: {len(cells)} cells, {len(todo)} run now{_rate(len(todo), start)}; "
          f"{len(ran)} step(s) run; outputs in {folder(cfg)}", flush=True)
    return text


def write_report(cfg: Config, cells: list[Cell], splits: dict, manifest: dict, tracker) -> str:
    """results.csv, summary.md, label_efficiency.png and paired_differences.png from the finished cells; logged to
    the parent run."""
    from pcl_hpc.summary import plot_label_efficiency, plot_paired_differences, summarize, write_results_csv

    out = folder(cfg)
    names = (manifest.get("class_names") or [])[1:] or [f"class{i}" for i in range(1, cfg.finetune.num_classes + 1)]
    rows = [row for c in cells for row in result_rows(c, cell_result(cfg, c, splits[c]), names)]
    write_results_csv(rows, out / "results.csv", names)
    text = summarize(rows, names)
    write_text(out / "summary.md", text)
    plot_label_efficiency(rows, out / "label_efficiency.png")
    paired = plot_paired_differences(rows, out / "paired_differences.png")
    if tracker is not None:
        for name in ("results.csv", "summary.md", "label_efficiency.png", *([paired.name] if paired else [])):
            tracker.log_artifact(out / name)
        if cfg.sweep.trainer != "nnunet":  # nnU-Net's models stay in its results folders (cells/<cell>/nnunet_results)
            register_best(cfg, cells, splits, tracker.run_id)
        tracker.end()
    return text


def register_encoders(cfg: Config, run_id: str | None) -> bool:
    """Each pretrained method's encoder in the registry as ``<register_name>-<method>@<alias>``: its
    pretraining registers it; when the registry was unreachable then (or the alias moved since),
    the weights of ``encoder.pt`` are registered now. True when every method's encoder is registered."""
    import torch

    from pcl_hpc.tracking import load_encoder_state, register_encoder
    from pcl_hpc.train.pretrain import ENCODER_FILE
    from pcl_hpc.train.pretrain import folder as pretrain_folder

    complete = True
    for method in cfg.sweep.pretrain:
        run = method_config(cfg, method)
        path = pretrain_folder(run) / ENCODER_FILE
        if not path.is_file():
            print(f"sweep: {method} is not pretrained yet ({path}); nothing to register", flush=True)
            complete = False
            continue
        state, uri = torch.load(path, weights_only=True), f"models:/{run.tracking.register_name}@{cfg.tracking.alias}"
        try:
            registered = load_encoder_state(uri)
            same = registered.keys() == state.keys() and all(torch.equal(registered[k], state[k]) for k in state)
        except Exception:  # noqa: BLE001 - not registered, or unreachable: register_encoder decides (and warns)
            same = False
        if same:
            print(f"sweep: {method}: {uri} is {path}", flush=True)
            continue
        version = register_encoder(state, run.model, run.tracking.register_name, cfg.tracking.alias,
                                   tags={"method": method, "registered_by": "sweep --step register"}, run_id=run_id)
        print(f"sweep: {method}: registered {path} as {uri} (version {version})", flush=True)
        complete = complete and bool(version)
    return complete


def register_best(cfg: Config, cells: list[Cell], splits: dict, run_id: str | None) -> None:
    """Register each method's best fine-tuned model per mode (by validation Dice, never by test Dice) as
    ``<tracking.register_name>-<method>-seg`` (mode full) or ``...-<method>-<mode>-seg``, with its test Dice
    and the mean of the method in that mode as tags; once."""
    from pcl_hpc.tracking import register_segmentation_model

    path = folder(cfg) / STATE_FILE
    state = json.loads(path.read_text())
    done = state.setdefault("registered", {})
    for method, mode in dict.fromkeys((c.encoder, c.mode) for c in cells):
        results = {c: cell_stage(cfg, c, splits[c]).completed() for c in cells if (c.encoder, c.mode) == (method, mode)}
        best = max(results, key=lambda c: (results[c]["best_val_dice"], -cells.index(c)))
        key = method if mode == "full" else f"{method}-{mode}"  # full: the names of before modes
        if done.get(key, {}).get("cell") == best.name:
            continue
        name = f"{cfg.tracking.register_name}-{key}-seg"
        version = register_segmentation_model(folder(cfg) / "cells" / best.name, name, cfg.tracking.alias, tags={
            "cell": best.name, "test_dice": results[best]["mean"], "best_val_dice": results[best]["best_val_dice"],
            "method_mean_test_dice": float(np.mean([r["mean"] for r in results.values()])), "labeled": best.labeled,
            "fold": best.fold, "seed": best.seed, "mode": mode, "split_hash": split_hash(splits[best])}, run_id=run_id)
        if version:
            done[key] = {"cell": best.name, "name": name, "version": version}
            print(f"sweep: registered {best.name} as models:/{name}@{cfg.tracking.alias} (version {version})", flush=True)
    write_text(path, json.dumps(state) + "\n")

"""The label-efficiency protocol in one command: ``pcl-hpc sweep --config ...``.

Cells are encoder x M x fold x seed:

* **encoders**: ``random``; the methods of ``sweep.pretrain`` (pcl, gcl, simclr), each pretrained
  once by the sweep under ``<output_dir>/pretrain/<method>`` and registered as
  ``<tracking.register_name>-<method>``; or any path to an ``encoder.pt`` / ``models:/`` URI in
  ``sweep.encoders``.
* **splits** (:func:`protocol_split`): the manifest's patient-level fold is the test set; the
  validation patients (``sweep.val_patients``) come from outside it, drawn by (seed, fold); the M
  labeled patients are drawn by (seed, fold) from the rest, nested (a larger M keeps a smaller M's
  patients). Every encoder of a (M, fold, seed) sees the same split, so methods pair cell by cell.
* **a cell** is a fine-tuning (the harness's ``Finetune`` stage) in ``<output_dir>/sweep/cells/<cell>/``
  whose split is written beside it (``split.json``: volume ids and their hash). It is a function of
  (config, split, seed, encoder version): a finished cell is not rerun (the harness's
  ``complete.json``), an interrupted one resumes from its checkpoint.

Outputs in ``<output_dir>/sweep/``: ``results.csv`` (one row per test volume x cell: Dice and HD95 in mm
per class), ``summary.md`` (mean ± std over folds x seeds, paired differences against random init)
and ``label_efficiency.png``. MLflow: a parent run ``sweep`` with a nested child run per cell.

As in the PCL paper, pretraining uses the store's volumes without their labels (test folds included;
``pretrain.exclude_volumes`` holds volumes out). Cells run ``sweep.workers`` at a time, one process each.
"""

from __future__ import annotations

import copy
import dataclasses
import json
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

METHODS = ("pcl", "gcl", "simclr")
SPLIT_FILE = "split.json"
STATE_FILE = "sweep.json"  # the parent tracking run's id, so a rerun continues it


@dataclasses.dataclass(frozen=True)
class Cell:
    encoder: str  # the method's name in the tables: random, pcl, ..., or a given encoder's name
    source: str  # what fine-tuning loads: "" (random), a path, or a models:/ URI
    labeled: int
    fold: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.encoder}_M{self.labeled}_f{self.fold}_s{self.seed}"


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


def pretrain_method(cfg: Config, processes: int) -> None:
    """One method's pretraining: in this process, or with ``processes`` ranks through torchrun (one node)."""
    from pcl_hpc.train.pretrain import folder as pretrain_folder, pretrain

    if processes == 1:
        pretrain(cfg)
        return
    import subprocess
    import sys

    from pcl_hpc.config import save_config

    config = pretrain_folder(cfg).with_suffix(".launch.yaml")  # beside the method's folder
    save_config(cfg, config)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "pcl_hpc", "pretrain", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    if subprocess.run(cmd, env=env).returncode != 0:
        raise UserError(f"sweep: the {processes}-process pretraining of {cfg.loss.method} failed (see its output above); "
                        f"run the same command again to resume it")


def encoders(cfg: Config) -> list[tuple[str, str]]:
    """(name, source) of every encoder of the sweep, in table order."""
    unknown = [m for m in cfg.sweep.pretrain if m not in METHODS]
    if unknown:
        raise UserError(f"sweep.pretrain: {unknown} are not methods; choose from {', '.join(METHODS)}")
    from pcl_hpc.train.pretrain import folder as pretrain_folder

    out = [(m, str(pretrain_folder(method_config(cfg, m)) / "encoder.pt")) for m in cfg.sweep.pretrain]
    for source in cfg.sweep.encoders:
        name = "random" if source == "random" else source.removeprefix("models:/").replace("/", "-").replace("@", "-")
        if source != "random" and not source.startswith("models:/"):
            name = Path(source).parent.name or Path(source).stem
        out.append((name, "" if source == "random" else source))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UserError(f"sweep: two encoders share the name {sorted({n for n in names if names.count(n) > 1})}; "
                        f"list each encoder once")
    return out


def plan(cfg: Config, manifest: dict | None) -> list[Cell]:
    """The cells, in table order (``manifest=None``: before the store exists, its folds from ``data.folds``)."""
    s = cfg.sweep
    if any(m < 1 for m in s.labeled) or not s.labeled or not s.seeds:
        raise UserError(f"sweep.labeled={s.labeled} and sweep.seeds={s.seeds}: give at least one M >= 1 and one seed")
    k = int(manifest["settings"].get("folds", 5)) if manifest is not None else cfg.data.folds
    folds = s.folds if s.folds is not None else list(range(k))
    return [Cell(name, source, m, fold, seed) for name, source in encoders(cfg)
            for m in sorted(set(s.labeled)) for fold in folds for seed in s.seeds]


def cell_config(cfg: Config, cell: Cell, split: dict[str, list[str]]) -> Config:
    run = copy.deepcopy(cfg)
    run.seed = cell.seed
    f = run.finetune
    f.train_volumes, f.val_volumes, f.test_volumes, f.encoder = split["train"], split["val"], split["test"], cell.source
    run.tracking.run_name = cell.name
    return run


def cell_stage(cfg: Config, cell: Cell, split: dict, parent_run_id: str | None = None):
    """The harness stage of one cell: a fine-tuning in ``<sweep>/cells/<cell>`` tagged as a child of the sweep."""
    from pcl_hpc.train.finetune import Finetune

    tags = {"cell": cell.name, "labeled": cell.labeled, "fold": cell.fold, "seed": cell.seed, "split_hash": split_hash(split)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # a nested run under the sweep's
    run_cfg = cell_config(cfg, cell, split)
    return Finetune(run_cfg, run_cfg.finetune, folder(cfg) / "cells" / cell.name, tags=tags)


def is_cell_complete(cfg: Config, cell: Cell, manifest: dict) -> bool:
    """Whether the cell has finished (its encoder must exist to say: a missing one means not yet)."""
    from pcl_hpc.engine.harness import is_complete

    if cell.source and not cell.source.startswith("models:/") and not Path(cell.source).is_file():
        return False
    split = protocol_split(manifest, cell.fold, cell.labeled, cell.seed, cfg.sweep.val_patients)
    return is_complete(cell_stage(cfg, cell, split))


def run_cell(cfg: Config, cell: Cell, split: dict, parent_run_id: str | None) -> dict:
    """One cell, in this process (a worker): fine-tune, or return the result of a finished one."""
    from pcl_hpc.engine.harness import run

    stage = cell_stage(cfg, cell, split, parent_run_id)
    write_text(stage.folder / SPLIT_FILE, json.dumps({**split, "hash": split_hash(split)}, indent=1) + "\n")
    return run(stage)


def _worker_count(cfg: Config, pending: int) -> int:
    import torch

    if cfg.sweep.workers:
        return max(1, min(cfg.sweep.workers, pending))
    gpus = torch.cuda.device_count()
    return max(1, min(gpus or (os.cpu_count() or 1) // 2, pending))


def _run_pending(cfg: Config, todo: list[tuple[Cell, dict]], parent: str | None) -> None:
    """The cells not finished yet, ``sweep.workers`` at a time (GPU i for worker i on a GPU node)."""
    workers = _worker_count(cfg, len(todo))
    print(f"sweep: {len(todo)} cell(s) to run, {workers} at a time", flush=True)
    if workers == 1:
        for cell, split in todo:
            run_cell(cfg, cell, split, parent)
        return
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(workers,)) as pool:
        for future in [pool.submit(run_cell, cfg, cell, split, parent) for cell, split in todo]:
            future.result()  # a failed cell fails the sweep; finished cells stay finished


def _init_worker(workers: int) -> None:
    """A cell worker: its share of the cores (``dist.set_threads`` reads LOCAL_WORLD_SIZE), a GPU of its own."""
    os.environ["LOCAL_WORLD_SIZE"] = str(workers)
    import torch

    if torch.cuda.is_available():  # one GPU per worker process, round robin
        ident = multiprocessing_identity() % torch.cuda.device_count()
        os.environ["LOCAL_RANK"] = str(ident)
        torch.cuda.set_device(ident)


def multiprocessing_identity() -> int:
    import multiprocessing

    ident = multiprocessing.current_process()._identity  # (n,) for pool workers, 1-based
    return (ident[0] - 1) if ident else 0


def result_rows(cell: Cell, result: dict, class_names: list[str]) -> list[dict]:
    """results.csv rows of one cell: one per test volume."""
    rows = []
    for vid, dice in result["per_volume"].items():
        hd = (result.get("hd95_mm_per_volume") or {}).get(vid) or [None] * len(dice)
        present = [h for h in hd if h is not None]
        row = {"cell": cell.name, "encoder": cell.encoder, "labeled": cell.labeled, "fold": cell.fold,
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


def _parent_run(cfg: Config, cells: list[Cell], start: bool):
    """The sweep's parent tracking run (created once, its id kept in sweep.json): (tracker or None, run id)."""
    from pcl_hpc.config import flatten
    from pcl_hpc.tracking import Tracker

    path = folder(cfg) / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    if not start:
        return None, state.get("run_id")
    tracker = Tracker(cfg, enabled=True, folder=folder(cfg))
    parent = tracker.start(cfg.tracking.run_name or "sweep", {k: v for k, v in flatten(cfg).items() if k.startswith("sweep.")},
                           run_id=state.get("run_id"), tags={"stage": "sweep", "cells": len(cells)})
    state.update(run_id=parent or state.get("run_id"), cells=[c.name for c in cells])
    write_text(path, json.dumps(state) + "\n")
    return tracker, parent or state.get("run_id")


def sweep(cfg: Config, shard: tuple[int, int] | None = None, report: bool = True, run_cells: bool = True) -> str:
    """Pretrain the sweep's methods, run the cells not finished yet, write and return summary.md.

    ``shard=(i, k)``: only array task i's cells, no pretraining (the methods' jobs ran before) and no
    report (a dependent job writes it with ``run_cells=False``). Cells run ``sweep.workers`` at a time."""
    from pcl_hpc.engine.harness import is_complete

    out, manifest = folder(cfg), read_manifest(cfg.data.store)
    cells = plan(cfg, manifest)
    splits = {c: protocol_split(manifest, c.fold, c.labeled, c.seed, cfg.sweep.val_patients) for c in cells}
    if shard is None and run_cells:
        for method in cfg.sweep.pretrain:  # each once; a finished one is not rerun
            pretrain_method(method_config(cfg, method), cfg.sweep.pretrain_processes)
    missing = [str(Path(c.source)) for c in cells if c.encoder in cfg.sweep.pretrain and not Path(c.source).is_file()]
    if run_cells and missing:
        raise UserError(f"sweep: the encoders {sorted(set(missing))} do not exist yet; pretrain them first "
                        f"(`pcl-hpc sweep` without --shard does, or the pipeline's pretrain jobs)")
    tracker, parent = _parent_run(cfg, cells, start=shard is None)
    if shard is None and not run_cells and not report:  # --plan (the pipeline's register step)
        register_encoders(cfg, parent)
        print(f"sweep: {len(cells)} cells: {', '.join(c.name for c in cells)}", flush=True)
        return ""
    todo = [c for c in shard_cells(cells, shard) if not is_complete(cell_stage(cfg, c, splits[c]))] if run_cells else []
    start = time.time()
    if todo:
        _run_pending(cfg, [(c, splits[c]) for c in todo], parent)
    minutes = (time.time() - start) / 60
    rate = f" in {minutes:.1f} min ({len(todo) / minutes * 60:.0f} cells/h)" if todo else ""
    if not report:
        print(f"sweep: {len(todo)} cell(s) of task {shard} run now{rate}", flush=True)
        return ""
    unfinished = [c.name for c in cells if not is_complete(cell_stage(cfg, c, splits[c]))]
    if unfinished:
        raise UserError(f"sweep: {len(unfinished)} of {len(cells)} cells are not finished ({', '.join(unfinished[:5])}"
                        f"{', ...' if len(unfinished) > 5 else ''}); run `pcl-hpc sweep` with the same config to finish them")
    text = write_report(cfg, cells, splits, manifest, tracker)
    print(f"\n{text}\nsweep done: {len(cells)} cells, {len(todo)} run now{rate}; outputs in {out}", flush=True)
    return text


def write_report(cfg: Config, cells: list[Cell], splits: dict, manifest: dict, tracker) -> str:
    """results.csv, summary.md and label_efficiency.png from the finished cells; logged to the parent run."""
    from pcl_hpc.summary import plot_label_efficiency, summarize, write_results_csv

    out = folder(cfg)
    names = (manifest.get("class_names") or [])[1:] or [f"class{i}" for i in range(1, cfg.finetune.num_classes + 1)]
    rows = [row for c in cells for row in result_rows(c, cell_stage(cfg, c, splits[c]).completed(), names)]
    write_results_csv(rows, out / "results.csv", names)
    text = summarize(rows, names)
    write_text(out / "summary.md", text)
    plot_label_efficiency(rows, out / "label_efficiency.png")
    if tracker is not None:
        for name in ("results.csv", "summary.md", "label_efficiency.png"):
            tracker.log_artifact(out / name)
        register_best(cfg, cells, splits, tracker.run_id)
        tracker.end()
    return text


def register_encoders(cfg: Config, run_id: str | None) -> None:
    """Each pretrained method's encoder in the registry as ``<register_name>-<method>@<alias>``: its
    pretraining registers it; when the registry was unreachable then (or the alias moved since),
    the weights of ``encoder.pt`` are registered now."""
    import torch

    from pcl_hpc.tracking import load_encoder_state, register_encoder
    from pcl_hpc.train.pretrain import ENCODER_FILE, folder as pretrain_folder

    for method in cfg.sweep.pretrain:
        run = method_config(cfg, method)
        path = pretrain_folder(run) / ENCODER_FILE
        if not path.is_file():
            print(f"sweep: {method} is not pretrained yet ({path}); nothing to register", flush=True)
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
                                   tags={"method": method, "registered_by": "sweep --plan"}, run_id=run_id)
        print(f"sweep: {method}: registered {path} as {uri} (version {version})", flush=True)


def register_best(cfg: Config, cells: list[Cell], splits: dict, run_id: str | None) -> None:
    """Register each method's best fine-tuned model (by validation Dice, never by test Dice) as
    ``<tracking.register_name>-<method>-seg``, with its test Dice and the method's mean as tags; once."""
    from pcl_hpc.tracking import register_segmentation_model

    path = folder(cfg) / STATE_FILE
    state = json.loads(path.read_text())
    done = state.setdefault("registered", {})
    for method in dict.fromkeys(c.encoder for c in cells):
        results = {c: cell_stage(cfg, c, splits[c]).completed() for c in cells if c.encoder == method}
        best = max(results, key=lambda c: (results[c]["best_val_dice"], -cells.index(c)))
        if done.get(method, {}).get("cell") == best.name:
            continue
        name = f"{cfg.tracking.register_name}-{method}-seg"
        version = register_segmentation_model(folder(cfg) / "cells" / best.name, name, cfg.tracking.alias, tags={
            "cell": best.name, "test_dice": results[best]["mean"], "best_val_dice": results[best]["best_val_dice"],
            "method_mean_test_dice": float(np.mean([r["mean"] for r in results.values()])), "labeled": best.labeled,
            "fold": best.fold, "seed": best.seed, "split_hash": split_hash(splits[best])}, run_id=run_id)
        if version:
            done[method] = {"cell": best.name, "name": name, "version": version}
            print(f"sweep: registered {best.name} as models:/{name}@{cfg.tracking.alias} (version {version})", flush=True)
    write_text(path, json.dumps(state) + "\n")

"""The plans a runner can be given: the sweep, the pipeline (preprocess, then the sweep) and predict over shards.

* ``pipeline``: ``preprocess`` (an array of ``pcl-hpc preprocess --shard I/K`` over ``slurm.array_tasks``
  tasks), ``merge`` (a plain ``preprocess``: the manifest, the same store as one process makes), then
  the sweep's steps (:func:`pcl_hpc.sweep.sweep_plan`). A store whose sources (path, size, mtime) and
  data settings did not change since its last merge is not preprocessed again.
* ``sweep``: the sweep's steps alone.
* ``predict``: ``slurm.array_tasks`` tasks of ``pcl-hpc predict --shard I/K``.

The config is resolved once into ``<output_dir>/sweep/config.yaml`` (:func:`pcl_hpc.sweep.resolved_config`);
every task reads that file, so no task carries overrides of its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pcl_hpc.config import Config, to_dict
from pcl_hpc.errors import UserError
from pcl_hpc.plan import Step, Task, command

PREPROCESS_DONE = Path("slurm") / "preprocess.json"


def preprocess_key(cfg: Config) -> str:
    """Sources (path, size, mtime) and data settings: equal keys mean the merged store is current."""
    raw = Path(cfg.data.raw_dir)
    files = sorted((str(p.relative_to(raw)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in raw.rglob("*") if p.is_file()) if raw.is_dir() else []
    what = {"data": to_dict(cfg)["data"], "files": files}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def preprocess_current(cfg: Config) -> bool:
    from pcl_hpc.data.store import read_manifest

    path = Path(cfg.output_dir) / PREPROCESS_DONE
    try:
        read_manifest(cfg.data.store)
        return json.loads(path.read_text()).get("key") == preprocess_key(cfg)
    except (OSError, ValueError, UserError):
        return False


def preprocess_steps(cfg: Config, config: str) -> list[Step]:
    """preprocess (array) -> merge; both done when the merged store is current."""
    current = lambda: preprocess_current(cfg)  # noqa: E731
    k = cfg.slurm.array_tasks
    shards = [Task(command("preprocess", "--shard", f"{i}/{k}", config=config), shard=f"{i}/{k}", done=current)
              for i in range(k)]
    marker = {"path": str(Path(cfg.output_dir).absolute() / PREPROCESS_DONE), "key": preprocess_key(cfg)}
    merge = Task(command("preprocess", config=config), then=marker, done=current)
    return [Step("preprocess", shards), Step("merge", [merge], ["preprocess"])]


def plan_for(name: str, cfg: Config) -> list[Step]:
    """The steps of ``sweep`` or ``pipeline`` for ``cfg`` (its resolved config written for the tasks)."""
    from pcl_hpc.sweep import resolved_config, sweep_plan

    config = resolved_config(cfg)
    if name == "sweep":
        return sweep_plan(cfg, config)
    before = preprocess_steps(cfg, config)
    if not preprocess_current(cfg):
        from pcl_hpc.data.preprocess import prepare_shards

        prepare_shards(cfg.data)  # here, before the array: no two tasks create the store at once
        return before + sweep_plan(cfg, config, upstream=[s.name for s in before])
    return before + sweep_plan(cfg, config)


def predict_steps(argv: list[str], shards: int) -> list[Step]:
    """``predict`` over ``shards`` array tasks (each skips the masks it already wrote)."""
    return [Step("predict", [Task([*argv, "--shard", f"{i}/{shards}"], shard=f"{i}/{shards}") for i in range(shards)],
                 kind="predict")]

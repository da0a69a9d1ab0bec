"""`launchers/slurm.py status <folder> [--resubmit]`: the jobs and cells of a submission, and a way back.

One row per job or array task (the latest submission of each step and shard in the ledger): its
state (SLURM's: scontrol, then sacct), restarts, last step and loss, log and, for a task that did
not complete, its error line. Sweep tasks get a row per cell. Counts per state close each array.

``--resubmit`` submits again every task that did not complete (FAILED, CANCELLED, TIMEOUT, ...),
and the steps that waited for it and never ran, chained as before; completed ones are kept.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from submitit.core.utils import JobPaths, pickle_load

from pcl_hpc.config import SlurmConfig
from pcl_hpc.errors import UserError
from pcl_hpc.launch.chain import read_ledger, submit_steps
from pcl_hpc.launch.cluster import ACTIVE_STATES, task_states
from pcl_hpc.plan import Step, Task

USER_ERROR = re.compile(r"^pcl-hpc \S+: error: |^launchers/slurm.py: error: ")  # a command's one line
FAILED_FILE = re.compile(r"^\s*(predict: )?FAILED ")  # preprocess / predict: a file that failed
RAISED = re.compile(r"^\w+(\.\w+)*(Error|Stopped|Failed|Exception): ")  # an exception's last line


def latest_tasks(ledger: list[dict]) -> list[tuple[dict, dict]]:
    """(step record, task) for the latest submission of each (step, shard), in the ledger's order."""
    latest: dict[tuple[str, str], tuple[dict, dict]] = {}
    for record in ledger:
        for task in record["tasks"]:
            latest.pop((record["step"], task.get("shard", "")), None)  # keep the newest, at its place
            latest[(record["step"], task.get("shard", ""))] = (record, task)
    return list(latest.values())


def _state(record: dict, task: dict, cache: dict) -> dict[str, str]:
    """{state, restarts, reason} of one task."""
    job_id = task["job_id"]
    if record["cluster"] == "slurm":
        array = job_id.split("_")[0]
        if array not in cache:
            cache[array] = task_states(array)
        info = cache[array].get(job_id.partition("_")[2], {})
        if info.get("state"):
            return info
    outcome = _outcome(record, task)  # submitit's result file: local runs, or a job SLURM forgot
    state = {"success": "COMPLETED", "error": "FAILED"}.get(outcome[0] if outcome else "", "UNKNOWN")
    return {"state": state, "restarts": "0"}


def _outcome(record: dict, task: dict):
    path = JobPaths(Path(record["logs"]), job_id=task["job_id"], task_id=0).result_pickle
    try:
        return pickle_load(path) if path.is_file() else None
    except Exception:  # noqa: BLE001 - half written
        return None


def _log(record: dict, task: dict, ext: str) -> Path:
    return Path(record["logs"]) / f"{task['job_id']}_0_log.{ext}"


def error_line(record: dict, task: dict, info: dict) -> str:
    """Why a task did not complete: its own error line (the command's `error:` on stderr, a FAILED file on
    stdout, a JobStopped or exception line), else its trace's last line, else SLURM's reason."""
    logs = {ext: _log(record, task, ext) for ext in ("err", "out")}
    text = {ext: p.read_text(errors="replace").splitlines() if p.is_file() else [] for ext, p in logs.items()}
    for ext, pattern in (("err", USER_ERROR), ("out", USER_ERROR), ("out", FAILED_FILE), ("err", RAISED),
                         ("out", RAISED)):
        lines = [line.strip() for line in text[ext] if pattern.search(line)]
        if lines:
            return lines[0][:300]
    outcome = _outcome(record, task)
    if outcome and outcome[0] == "error":
        lines = [line.strip() for line in str(outcome[1]).splitlines() if line.strip()]
        if lines:
            return lines[-1][:300]
    reason = info.get("reason", "")
    if reason == "DependencyNeverSatisfied":
        return "not run: a step it waits for did not complete"
    return reason if reason not in ("", "None") else ""


def progress(folder: Path) -> str:
    """'done', 'step N loss X' from a stage folder's metrics.jsonl, or ''."""
    if (folder / "complete.json").is_file():
        return "done"
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return ""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        last = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return ""
    loss = last.get("loss")
    return f"step {last.get('step', '?')}" + (f" loss {loss:.4f}" if isinstance(loss, (int, float)) else "")


def status(folder: Path, resubmit: bool = False) -> int:
    ledger = read_ledger(folder)
    rows, cache, counts = [], {}, {}
    failed: list[tuple[dict, dict]] = []
    for record, task in latest_tasks(ledger):
        info = _state(record, task, cache)
        state = info.get("state", "UNKNOWN")
        counts.setdefault(record["step"], Counter())[state] += 1
        done = state == "COMPLETED"
        if not done and state not in ACTIVE_STATES:
            failed.append((record, task))
        where = Path(task["folder"]) if task.get("folder") else None
        rows.append([record["step"], task["job_id"], state, info.get("restarts", "0"),
                     progress(where) if where and not task.get("cells") else "",
                     str(_log(record, task, "out")), "" if done or state in ACTIVE_STATES else error_line(record, task, info)])
        for cell in task.get("cells", []):
            rows.append(["", f"  {cell}", "", "", progress(where / cell) if where else "", "", ""])
    print(_table(["step", "job", "state", "restarts", "progress", "log", "error"], rows))
    for step, counter in counts.items():
        if sum(counter.values()) > 1:
            print(f"{step}: " + ", ".join(f"{n} {s}" for s, n in sorted(counter.items())))
    if failed and not resubmit:
        print(f"{len(failed)} task(s) did not complete; submit them again (and what waits for them) with: "
              f"python launchers/slurm.py status {folder} --resubmit")
    if resubmit:
        return resubmit_failed(folder, ledger, failed)
    return 1 if failed else 0


def resubmit_failed(folder: Path, ledger: list[dict], failed: list[tuple[dict, dict]]) -> int:
    """The tasks that did not complete, grouped by step, chained as in the ledger; the steps after them too."""
    if not failed:
        print("nothing to resubmit: every task completed or is still queued")
        return 0
    latest = latest_tasks(ledger)
    again = {(r["step"], t.get("shard", "")) for r, t in failed}
    steps: list[Step] = []
    first = next(r for r, _ in failed)
    for step_name in dict.fromkeys(r["step"] for r, _ in latest):
        mine = [(r, t) for r, t in latest if r["step"] == step_name]
        record = mine[-1][0]
        tasks = [_task(t) for r, t in mine if (step_name, t.get("shard", "")) in again]
        if tasks:
            after = [s.name for s in steps if s.name in _step_deps(ledger, step_name)]
            steps.append(Step(step_name, tasks, after, record.get("kind", "single")))
    print(f"resubmitting {sum(len(s.tasks) for s in steps)} task(s) of {', '.join(s.name for s in steps)}:", flush=True)
    submit_steps(first["cluster"], steps, folder, SlurmConfig(**first["slurm"]),
                 f"python launchers/slurm.py status {folder} --resubmit")
    return 0


def _task(record: dict) -> Task:
    if "argv" not in record:
        raise UserError("this ledger was written by an older pcl-hpc (its tasks carry no command): submit the "
                        "sweep, pipeline or predict again instead of --resubmit")
    return Task.from_record(record)


def _step_deps(ledger: list[dict], step: str) -> set[str]:
    """The steps a step waited for, by name (from the job ids its records depended on)."""
    by_id = {r["job_id"]: r["step"] for r in ledger}
    return {by_id[d] for r in ledger if r["step"] == step for d in r.get("after", []) if d in by_id}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]])

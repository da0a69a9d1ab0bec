"""Run a test function in W real processes joined by a gloo process group on 127.0.0.1.

Usage::

    def worker(rank, world_size, a, b):   # module level, so a spawned child can import it
        ...                               # torch.distributed is initialised here
        return {"loss": loss.detach()}    # anything picklable

    results = run_distributed(worker, 2, a, b)   # [rank 0's return, rank 1's return]

Each child pickles its return value into bytes before putting it on the queue, so tensors travel
as plain copies (no shared-memory handles that die with the child). If any rank raises, the
parent raises RuntimeError with that rank's traceback; if ranks stall, it raises after `timeout`.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_lib
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    # The machine is shared: one intra-op thread per rank keeps W ranks from oversubscribing it.
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
        )
        try:
            payload = ("ok", pickle.dumps(fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report every failure to the parent, never hang it
        payload = ("error", traceback.format_exc())
    results.put((rank, *payload))


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return the results by rank.

    ``fn`` and ``args`` must be picklable (define ``fn`` at module level).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")  # fork after torch has started threads is unsafe
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    outputs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        # Drain the queue before joining: a child blocks on exit until its queued data is read.
        while len(outputs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"run_distributed: timed out after {timeout:.0f}s; "
                    f"ranks that answered: {sorted(outputs) + sorted(errors)}"
                )
            try:
                rank, status, data = results.get(timeout=min(remaining, 1.0))
            except queue_lib.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and not errors:
                    # A rank died without reporting (e.g. killed): the others would wait forever.
                    raise RuntimeError(
                        f"run_distributed: rank(s) {dead} exited with codes "
                        f"{[procs[r].exitcode for r in dead]} without a result"
                    ) from None
                if errors:
                    # One rank failed; the rest may be stuck in a collective, so stop waiting.
                    break
                continue
            if status == "ok":
                outputs[rank] = pickle.loads(data)
            else:
                errors[rank] = data
    finally:
        for proc in procs:
            proc.join(timeout=5 if not errors else 0.5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)

    if errors:
        details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RuntimeError(f"run_distributed: {len(errors)} rank(s) failed\n{details}")
    return [outputs[rank] for rank in range(world_size)]

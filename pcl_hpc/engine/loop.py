"""The plumbing under the training loops: resumable batches, NaN guard, preemption signals.

* :func:`resumable_batches` yields micro-batches forever, starting at a saved position mid-epoch.
* :class:`StepGuard` agrees across ranks (one tiny all-reduce per micro-batch) on two things: did
  any rank get a non-finite loss (the step is skipped; K in a row abort), and did any rank receive
  SIGTERM/SIGUSR1 (every rank saves at the same step boundary, then exits with REQUEUE_EXIT_CODE).
"""

from __future__ import annotations

import math
import signal
from typing import Iterator

import torch
import torch.distributed as torch_dist

from pcl_hpc.errors import UserError

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved a checkpoint after a preemption signal; start me again"
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised after the checkpoint was saved on a preemption signal; exits the process with REQUEUE_EXIT_CODE."""

    def __init__(self, message: str):
        super().__init__(REQUEUE_EXIT_CODE)
        self.message = message
        print(f"{message} (exit status {REQUEUE_EXIT_CODE}: requeue)", flush=True)


class TrainingDiverged(UserError):
    pass


def resumable_batches(loader, sampler, batch_size: int, start_micro: int) -> Iterator[tuple[int, dict]]:
    """(epoch, batch) from micro-batch ``start_micro`` on (counted from the run's start), epoch after epoch."""
    sampler.set_epoch(0)
    per_epoch = len(loader)  # micro-batches in a whole epoch
    if per_epoch == 0:
        raise UserError(f"{len(sampler)} samples per rank is fewer than the batch size {batch_size}")
    epoch, skip = divmod(start_micro, per_epoch)
    while True:
        sampler.set_epoch(epoch, skip * batch_size)
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


class StepGuard:
    """Non-finite losses and preemption signals, agreed by every rank at the same micro-batch."""

    def __init__(self, max_bad_steps: int = 5, device: torch.device | None = None, install_signals: bool = True):
        self.max_bad = max(1, int(max_bad_steps))
        self.device = device or torch.device("cpu")
        self.signalled: str | None = None  # set by the handler on this rank
        self.stop = False  # agreed by every rank
        self.skipped_total = 0
        self.bad_in_a_row = 0
        self._bad_this_step = False
        self._previous = {}
        if install_signals:
            for sig in PREEMPT_SIGNALS:
                try:
                    self._previous[sig] = signal.signal(sig, self._on_signal)
                except ValueError:  # not the main thread: the launcher handles signals itself
                    pass

    def _on_signal(self, signum, frame) -> None:  # only sets a flag: no I/O, no collectives here
        self.signalled = signal.Signals(signum).name

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def finite(self, loss: torch.Tensor) -> bool:
        """True when every rank's loss is finite (then backward); also picks up signals on any rank."""
        local_bad = not math.isfinite(float(loss.detach()))
        flags = torch.tensor([float(local_bad), float(self.signalled is not None)], device=self.device)
        if torch_dist.is_initialized():
            torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX)
        bad, self.stop = bool(flags[0] > 0), self.stop or bool(flags[1] > 0)
        self._bad_this_step = self._bad_this_step or bad
        return not bad and not self._bad_this_step

    def end_step(self, step: int) -> bool:
        """At the optimizer-step boundary: True to apply the step, False to skip it (raises after K in a row)."""
        bad, self._bad_this_step = self._bad_this_step, False
        if not bad:
            self.bad_in_a_row = 0
            return True
        self.skipped_total += 1
        self.bad_in_a_row += 1
        print(f"step {step}: non-finite loss, step skipped ({self.bad_in_a_row} in a row, {self.skipped_total} in all)",
              flush=True)
        if self.bad_in_a_row >= self.max_bad:
            raise TrainingDiverged(
                f"{self.bad_in_a_row} steps in a row had a non-finite loss (last at step {step}); the run diverged. "
                f"Lower pretrain.lr, raise pretrain.warmup_steps, set engine.grad_clip, or use engine.precision=fp32; "
                f"then restart from the last checkpoint (it is kept) or with --no-resume")
        return False

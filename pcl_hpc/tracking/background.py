"""The Tracker's background worker: a bounded queue and one daemon thread that makes the MLflow calls.

The training loop only hands items to :class:`Worker` (:meth:`Worker.put` never blocks: it says
False when the queue is full); the worker thread takes them in order and passes them, a contiguous
run of data items at a time, to the owner's ``handle``. Commands (:meth:`Worker.call`, the final
command of :meth:`Worker.close`) run on the worker thread too, after everything queued before them.

:meth:`Worker.close` waits a bounded time for the queue to drain; what is still queued after it,
and what the worker was handling when the time ran out, is handed to the owner's ``spill`` (on the
caller's thread), so nothing is lost when the tracking server hangs. A worker that was stuck in a
call when it was closed ends once that call returns. A later :meth:`put` or :meth:`call` starts a
new worker thread (a "generation"), which first waits for the previous one to end: at most one
thread handles items at any time.

The only objects shared between the caller and the worker thread are the queue (a deque under a
condition variable) and plain attributes (flags, the list of items in flight).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__package__)


class Command:
    """A callable to run on the worker thread; ``done`` is set once it ran (``result`` / ``error``)."""

    __slots__ = ("fn", "final", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any], final: bool = False):
        self.fn = fn
        self.final = final  # the worker thread ends after it
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _Generation:
    """One worker thread and its queue."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.inflight: list = []  # the data items the thread is handling now
        self.commands = 0  # commands queued (a take stops lingering for them)
        self.closed = False  # no more puts
        self.stopped = False  # the thread ends at its next take
        self.thread: threading.Thread | None = None

    def put(self, item, timeout: float = 0.0) -> bool:
        with self.cond:
            if self.closed:
                return False
            if len(self.items) >= self.maxsize:
                if timeout <= 0 or not self.cond.wait_for(lambda: len(self.items) < self.maxsize or self.closed, timeout):
                    return False
                if self.closed:
                    return False
            self.items.append(item)
            if isinstance(item, Command):
                self.commands += 1
            if len(self.items) == 1 or self.commands or len(self.items) >= self.maxsize:
                self.cond.notify_all()  # the worker waits on an empty queue, or lingers until one of these
            return True

    def take(self, limit: int, linger_s: float) -> list | None:
        """The next command alone, or up to ``limit`` contiguous data items; None once stopped.

        With data at the head, waits up to ``linger_s`` for more (fewer, larger requests and fewer
        wake-ups of the worker thread), unless a command is queued or the queue is full."""
        with self.cond:
            self.inflight = []
            while not self.items and not self.stopped:
                self.cond.wait()
            if linger_s > 0 and not self.stopped and not isinstance(self.items[0], Command):
                self.cond.wait_for(lambda: self.stopped or self.commands or len(self.items) >= self.maxsize, linger_s)
            if self.stopped:
                return None
            items = [self.items.popleft()]
            if isinstance(items[0], Command):
                self.commands -= 1
            else:
                while self.items and len(items) < limit and not isinstance(self.items[0], Command):
                    items.append(self.items.popleft())
                self.inflight = items
            self.cond.notify_all()  # room for a waiting put
            return items

    def abandon(self) -> list:
        """Stop taking: the data items still queued or in flight (in order); queued commands are dropped."""
        with self.cond:
            left = list(self.inflight) + [i for i in self.items if not isinstance(i, Command)]
            self.items.clear()
            self.commands = 0
            self.closed = self.stopped = True
            self.cond.notify_all()
            return left


class Worker:
    """A bounded queue served by one daemon thread (see the module docs).

    ``handle(items)``: called on the worker thread with a list of data items in queue order; it
    should not raise (if it does, the items are spilled). ``spill(item)``: writes an item that will
    not be handled somewhere safe; called on the closing thread (and for items ``handle`` raised on).
    """

    batch = 256  # data items handed to ``handle`` at once at most
    linger_s = 0.05  # after the first queued item, wait this long for more before handling them

    def __init__(self, handle: Callable[[list], None], spill: Callable[[Any], None], maxsize: int,
                 name: str = "pcl-tracking"):
        self._handle = handle
        self._spill = spill
        self.maxsize = max(1, int(maxsize))
        self.name = name
        self._gen: _Generation | None = None
        self._last_thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """A worker thread is taking items (started, not closed)."""
        return self._gen is not None

    @property
    def thread(self) -> threading.Thread | None:
        """The newest worker thread (alive or not), or None before the first start."""
        return self._last_thread

    def start(self) -> None:
        if self._gen is None:
            self._start()

    def _start(self) -> _Generation:
        gen = _Generation(self.maxsize)
        previous = self._last_thread
        gen.thread = threading.Thread(target=self._run, args=(gen, previous), name=self.name, daemon=True)
        self._gen, self._last_thread = gen, gen.thread
        gen.thread.start()
        return gen

    def put(self, item) -> bool:
        """Queue a data item; False (at once) when the queue is full."""
        gen = self._gen or self._start()
        return gen.put(item)

    def call(self, fn: Callable[[], Any], timeout: float) -> Command:
        """Run ``fn`` on the worker thread after everything queued; wait up to ``timeout`` seconds for it.
        The returned command's ``done`` says whether it ran in time."""
        gen = self._gen or self._start()
        deadline = time.monotonic() + max(0.0, timeout)
        command = Command(fn)
        if gen.put(command, timeout=max(0.0, timeout)):
            command.done.wait(max(0.0, deadline - time.monotonic()))
        return command

    def close(self, fn: Callable[[], Any] | None, timeout: float) -> tuple[bool, int]:
        """Run ``fn`` (if any) on the worker thread after everything queued, and end the thread; wait
        up to ``timeout`` seconds. Returns ``(done, spilled)``: whether it all ran in time, and how
        many data items were handed to ``spill`` instead (still queued, or in flight, at the bound)."""
        gen = self._gen
        if gen is None:
            if fn is None:
                return True, 0
            gen = self._start()
        self._gen = None  # later puts start a new generation
        deadline = time.monotonic() + max(0.0, timeout)
        command = Command(fn or (lambda: None), final=True)
        if gen.put(command, timeout=max(0.0, timeout)):
            with gen.cond:
                gen.closed = True
            if command.done.wait(max(0.0, deadline - time.monotonic())):
                return True, 0
        left = gen.abandon()
        for item in left:
            self._spill_safely(item)
        log.info("tracking: the tracking worker did not finish within %.1f s; %d queued item(s) spilled",
                 timeout, len(left))
        return False, len(left)

    def _spill_safely(self, item) -> None:
        try:
            self._spill(item)
        except Exception:  # noqa: BLE001 - the worker must never die, nor the closing thread
            log.exception("tracking: could not keep a queued item")

    def _run(self, gen: _Generation, previous: threading.Thread | None) -> None:
        if previous is not None and previous is not threading.current_thread():
            previous.join()  # one thread handles items at a time: wait for a closed, stuck one
        while True:
            items = gen.take(self.batch, self.linger_s)
            if items is None:
                return
            head = items[0]
            if isinstance(head, Command):
                try:
                    head.result = head.fn()
                except BaseException as err:  # noqa: BLE001
                    head.error = err
                    log.exception("tracking: a command on the tracking worker failed")
                finally:
                    head.done.set()
                if head.final:
                    with gen.cond:
                        gen.closed = gen.stopped = True
                        gen.inflight = []
                    return
                continue
            try:
                self._handle(items)
            except BaseException:  # noqa: BLE001
                log.exception("tracking: the tracking worker failed on %d item(s); they go to the fallback file", len(items))
                for item in items:
                    self._spill_safely(item)

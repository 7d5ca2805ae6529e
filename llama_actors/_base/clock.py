"""Time for the runtime: one clock and one scheduler thread, both replaceable in tests.

Everything time-dependent (readiness cadence, stall deadlines, health polls, lease
TTLs, restart backoff, idle shutdown, stop deadlines) asks a :class:`Timers` for the
time and for wake-ups, so a test can hand the runtime :class:`ManualTimers` and move
time by hand. The real :class:`Scheduler` is one thread and one heap for the whole
runtime, not a timer thread per lease or per instance.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "ManualTimers", "Scheduler", "TimerHandle", "Timers"]

log = logging.getLogger("llama_actors.runtime")

Clock = Callable[[], float]


class TimerHandle:
    """A pending wake-up; :meth:`cancel` makes it a no-op."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers(Protocol):
    """A clock (seconds, monotonic) and a way to be called back at a time on it.

    Callbacks run on the scheduler's own thread: they must only tell actors.
    """

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle: ...


class Scheduler:
    """The real :class:`Timers`: ``time.monotonic`` and one daemon thread with a heap."""

    def __init__(self, name: str = "llama-actors-scheduler") -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(when, callback)
        with self._cond:
            if self._closed:
                handle.cancel()
                return handle
            heapq.heappush(self._heap, (when, next(self._seq), handle))
            if self._heap[0][2] is handle:
                self._cond.notify()
        return handle

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return self.call_at(self.now() + max(0.0, delay), callback)

    def close(self, timeout: float = 5.0) -> None:
        """Drop every pending wake-up and join the thread."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def pending(self) -> int:
        """How many wake-ups are waiting (cancelled ones included until they are due)."""
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                if self._closed:
                    return
                _, _, handle = heapq.heappop(self._heap)
            if handle.cancelled:
                continue
            try:
                handle.callback()
            except Exception:
                log.exception("a scheduled callback raised")


class ManualTimers:
    """:class:`Timers` whose time moves only when a test calls :meth:`advance`.

    Due callbacks run in the caller's thread, in time order, inside ``advance``.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(when, callback)
        with self._lock:
            heapq.heappush(self._heap, (when, next(self._seq), handle))
        return handle

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return self.call_at(self._now + max(0.0, delay), callback)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and run what fell due, in order."""
        target = self._now + max(0.0, seconds)
        while True:
            with self._lock:
                if not self._heap or self._heap[0][0] > target:
                    break
                when, _, handle = heapq.heappop(self._heap)
            self._now = max(self._now, when)
            if not handle.cancelled:
                handle.callback()
        self._now = target

    def pending(self) -> int:
        with self._lock:
            return sum(1 for _, _, h in self._heap if not h.cancelled)

"""Outcomes reported by callers (CONTRACT §10): a service that sees its request fail
or time out says so, and enough failures within a window move the instance's health
at once, without waiting for the next probe. Pure; the clock is passed in.
"""

from __future__ import annotations

from collections import deque

from llama_actors._kernel.types import Health

__all__ = ["OutcomeWindow"]


class OutcomeWindow:
    """Counts the failures callers reported within the last ``window_s`` seconds.

    ``degraded_after`` failures in the window make the callers' verdict ``degraded``,
    ``unavailable_after`` make it ``unavailable`` (None: never). A reported success
    clears the count: the instance served a caller, so earlier failures are history.
    A failure leaves the count when it is older than the window.
    """

    def __init__(
        self, window_s: float, degraded_after: int | None, unavailable_after: int | None
    ) -> None:
        self.window_s = window_s
        self.degraded_after = degraded_after
        self.unavailable_after = unavailable_after
        self._failures: deque[tuple[float, str]] = deque()
        self.reported_ok = 0
        self.reported_failed = 0
        #: How the last failures stopped counting, for the reason of the recovery.
        self.cleared = ""

    def record(self, ok: bool, detail: str, now: float) -> None:
        """One caller's outcome at ``now``."""
        if ok:
            self.reported_ok += 1
            if self._failures:
                self.cleared = "a caller reported a success"
            self._failures.clear()
        else:
            self.reported_failed += 1
            self._failures.append((now, detail))
        self._prune(now)

    def clear(self) -> None:
        """Forget every failure (a new process serves the instance now)."""
        self._failures.clear()

    def verdict(self, now: float) -> tuple[Health, str] | None:
        """What the callers' reports say at ``now``: a health and why, or None when
        they say nothing against the instance."""
        self._prune(now)
        n = len(self._failures)
        if n == 0:
            return None
        last = self._failures[-1][1]
        window = f"{n} failure{'s' if n != 1 else ''} reported by callers within {self.window_s:g}s"
        if self.unavailable_after is not None and n >= self.unavailable_after:
            return "unavailable", f"{window}; last: {last}"
        if self.degraded_after is not None and n >= self.degraded_after:
            return "degraded", f"{window}; last: {last}"
        return None

    def next_expiry(self) -> float | None:
        """When the oldest counted failure leaves the window (None: nothing counted)."""
        return self._failures[0][0] + self.window_s if self._failures else None

    def _prune(self, now: float) -> None:
        while self._failures and self._failures[0][0] + self.window_s <= now:
            self._failures.popleft()
            self.cleared = f"the failures reported by callers left the {self.window_s:g}s window"

"""How an instance is supervised: restart backoff and intensity, health thresholds,
idle shutdown and draining. Policies are not part of an instance's identity: the
first resolve of an identity decides them.
"""

from __future__ import annotations

import math
import random
from collections import deque

import msgspec

from llama_actors._base.units import InSeconds, InSecondsOrNone, seconds
from llama_actors._exceptions import BootSpecError

__all__ = ["InstancePolicy", "RestartDecision", "RestartPolicy", "RestartTracker"]


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """OTP-style restart intensity plus exponential backoff with jitter.

    At most ``max_restarts`` restarts within ``window_s`` seconds; the next crash past
    that fails the instance for good. Attempt ``n`` (1-based) waits
    ``min(backoff_max_ms, backoff_initial_ms * multiplier ** (n - 1))``, then scaled by
    a random factor in ``[1 - jitter, 1 + jitter]`` so restarts of many instances do
    not align. The attempt count resets once no restart happened for ``window_s``.
    """

    max_restarts: int = 5
    window_s: float = 60.0
    backoff_initial_ms: int = 500
    backoff_max_ms: int = 30_000
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        _check(self.max_restarts >= 0, "restart.max_restarts", self.max_restarts, ">= 0")
        _check(self.window_s > 0, "restart.window_s", self.window_s, "> 0")
        _check(
            self.backoff_initial_ms >= 0,
            "restart.backoff_initial_ms",
            self.backoff_initial_ms,
            ">= 0",
        )
        _check(
            self.backoff_max_ms >= self.backoff_initial_ms,
            "restart.backoff_max_ms",
            self.backoff_max_ms,
            ">= backoff_initial_ms",
        )
        _check(self.multiplier >= 1.0, "restart.multiplier", self.multiplier, ">= 1")
        _check(0.0 <= self.jitter < 1.0, "restart.jitter", self.jitter, "in [0, 1)")

    def base_delay_ms(self, attempt: int) -> float:
        """The delay before attempt ``attempt`` (1-based), without jitter."""
        exponent = max(attempt - 1, 0)
        initial, cap = self.backoff_initial_ms, self.backoff_max_ms
        if initial == 0 or self.multiplier == 1.0 or exponent == 0:
            return float(min(initial, cap))
        # Past this exponent the delay is capped anyway; stopping there avoids overflow.
        if exponent >= math.log(cap / initial) / math.log(self.multiplier):
            return float(cap)
        return float(min(cap, initial * self.multiplier**exponent))


class InstancePolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Everything about supervising one instance that is not part of its boot spec.

    - ``idle_shutdown_ms``: None keeps an instance running when its last lease ends
      (the default); a number stops it that long after its last lease ended.
    - ``ready_ceiling_ms``: the hard ceiling on one readiness wait, however much load
      progress the server shows (the spec's ``ready_timeout_ms`` is the stall deadline).
    - ``probe_timeout_ms``: the timeout of one readiness or health probe.
    - ``slow_probe_ms``: a health answer slower than this is ``degraded``.
    - ``unavailable_after``: consecutive failed health probes before ``unavailable``.
    - ``wedged_restart_ms``: a live process unavailable this long is killed and
      restarted (None: never).
    - ``drain_timeout_ms``: how long a stop waits for lease holders to release.
    - ``log_max_bytes`` and ``log_backups``: the server's own output goes to
      ``STATE_DIR/logs/INSTANCE.log``, rotated at ``log_max_bytes`` with
      ``log_backups`` older files kept, so a chatty server cannot fill the disk.
    - ``inference_probe_interval_ms``: how often the instance is probed with real work
      (a one-token completion) once ready; None (the default) for never. A failed or
      timed-out inference probe counts like a failed health probe; after one, the next
      comes a health interval later until one passes. ``/slots`` is read first (the
      decode loop answers it: no answer is a failure); while every slot is busy with
      callers' work the probe is not sent, and one that timed out behind them is not
      judged.
    - ``inference_probe_timeout_ms``: how long an inference probe may take.
    - ``load_interval_ms``: how often ``/metrics`` (and, while a request is processing,
      ``/slots``) are read (None: never); a server that offers neither is not asked again.
      Each reading costs the runtime about as much CPU as a health probe, hence every
      two seconds rather than every one.
    - ``report_window_ms``, ``report_degraded_after``, ``report_unavailable_after``:
      that many failures reported by callers (``Runtime.report``) within the window
      make the instance ``degraded``, then ``unavailable``, at once (None: never); a
      reported success clears them.
    """

    restart: RestartPolicy = msgspec.field(default_factory=RestartPolicy)
    idle_shutdown_ms: int | None = None
    ready_ceiling_ms: int = 600_000
    probe_timeout_ms: int = 1_000
    slow_probe_ms: int = 500
    unavailable_after: int = 3
    wedged_restart_ms: int | None = 10_000
    drain_timeout_ms: int = 5_000
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    inference_probe_interval_ms: int | None = None
    inference_probe_timeout_ms: int = 10_000
    load_interval_ms: int | None = 2_000
    report_window_ms: int = 30_000
    report_degraded_after: int | None = 2
    report_unavailable_after: int | None = 5

    # The same durations in seconds, the library's inner unit (see _base.units).
    idle_shutdown_s = InSecondsOrNone("idle_shutdown_ms")
    ready_ceiling_s = InSeconds("ready_ceiling_ms")
    probe_timeout_s = InSeconds("probe_timeout_ms")
    slow_probe_s = InSeconds("slow_probe_ms")
    wedged_restart_s = InSecondsOrNone("wedged_restart_ms")
    drain_timeout_s = InSeconds("drain_timeout_ms")
    inference_probe_interval_s = InSecondsOrNone("inference_probe_interval_ms")
    inference_probe_timeout_s = InSeconds("inference_probe_timeout_ms")
    load_interval_s = InSecondsOrNone("load_interval_ms")
    report_window_s = InSeconds("report_window_ms")

    def __post_init__(self) -> None:
        if self.idle_shutdown_ms is not None:
            _check(self.idle_shutdown_ms >= 0, "idle_shutdown_ms", self.idle_shutdown_ms, ">= 0")
        _check(self.ready_ceiling_ms > 0, "ready_ceiling_ms", self.ready_ceiling_ms, "> 0")
        _check(self.probe_timeout_ms > 0, "probe_timeout_ms", self.probe_timeout_ms, "> 0")
        _check(self.slow_probe_ms > 0, "slow_probe_ms", self.slow_probe_ms, "> 0")
        _check(self.unavailable_after >= 1, "unavailable_after", self.unavailable_after, ">= 1")
        if self.wedged_restart_ms is not None:
            _check(self.wedged_restart_ms >= 0, "wedged_restart_ms", self.wedged_restart_ms, ">= 0")
        _check(self.drain_timeout_ms >= 0, "drain_timeout_ms", self.drain_timeout_ms, ">= 0")
        _check(self.log_max_bytes >= 1024, "log_max_bytes", self.log_max_bytes, ">= 1024")
        _check(self.log_backups >= 1, "log_backups", self.log_backups, ">= 1")
        for name in ("inference_probe_interval_ms", "load_interval_ms"):
            value = getattr(self, name)
            if value is not None:
                _check(value > 0, name, value, "> 0 (or None for never)")
        _check(
            self.inference_probe_timeout_ms > 0,
            "inference_probe_timeout_ms",
            self.inference_probe_timeout_ms,
            "> 0",
        )
        _check(self.report_window_ms > 0, "report_window_ms", self.report_window_ms, "> 0")
        degraded, unavailable = self.report_degraded_after, self.report_unavailable_after
        for name, value in (
            ("report_degraded_after", degraded),
            ("report_unavailable_after", unavailable),
        ):
            if value is not None:
                _check(value >= 1, name, value, ">= 1 (or None for never)")
        if degraded is not None and unavailable is not None:
            _check(
                unavailable >= degraded,
                "report_unavailable_after",
                unavailable,
                f">= report_degraded_after ({degraded})",
            )


def _check(ok: bool, field: str, value: object, rule: str) -> None:
    if not ok:
        raise BootSpecError(field, value, f"must be {rule}")


class RestartDecision(msgspec.Struct, frozen=True, kw_only=True):
    """What the supervisor does about one crash: restart after ``delay_s``, or give up."""

    restart: bool
    attempt: int
    delay_s: float
    reason: str


class RestartTracker:
    """Decides restarts for one instance from its crash times (pure; clock passed in)."""

    def __init__(self, policy: RestartPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._restarts: deque[float] = deque()
        self._last: float | None = None
        self.total = 0

    @property
    def attempt(self) -> int:
        """How many restarts are inside the current window."""
        return len(self._restarts)

    def decide(self, now: float) -> RestartDecision:
        """Record a crash at ``now`` and say whether and when to restart."""
        window = self.policy.window_s
        while self._restarts and now - self._restarts[0] > window:
            self._restarts.popleft()
        if self._last is not None and now - self._last > window:
            self._restarts.clear()
        if len(self._restarts) >= self.policy.max_restarts:
            return RestartDecision(
                restart=False,
                attempt=len(self._restarts) + 1,
                delay_s=0.0,
                reason=(
                    f"restart intensity exceeded: {len(self._restarts)} restarts within "
                    f"{window:g}s (max_restarts={self.policy.max_restarts})"
                ),
            )
        self._restarts.append(now)
        self._last = now
        self.total += 1
        attempt = len(self._restarts)
        base = self.policy.base_delay_ms(attempt)
        factor = 1.0 + self._rng.uniform(-self.policy.jitter, self.policy.jitter)
        delay = seconds(max(0.0, base * factor))
        return RestartDecision(
            restart=True,
            attempt=attempt,
            delay_s=delay,
            reason=f"restart {attempt} of at most {self.policy.max_restarts} in {window:g}s",
        )

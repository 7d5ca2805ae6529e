"""The invariants a chaos run checks, fed by every runtime signal as it is sent.

:class:`InvariantRecorder` subscribes to every signal in
:data:`llama_actors.signals.ALL_SIGNALS` and checks each one against what it has seen
before, on the sending actor's thread, under one lock (so per-thread order and
causal order between actors are both kept). :meth:`InvariantRecorder.check_time` is
called continuously by a watcher for what no signal announces (a lease that outlives
its TTL or its instance), and :meth:`InvariantRecorder.final_check` once the runtime
is closed.

The legal lifecycle of one instance, as signals::

    new --starting(attempt 0)--> starting --ready--> ready
    ready | starting(after a first ready) --restarting(attempt n)--> restarting
    restarting --starting(attempt n)--> starting
    any of the above --failed--> failed      (terminal)
    any of the above --stopped--> stopped    (terminal, never after failed)

``health_changed`` carries ``old`` equal to the last signalled ``new`` (``unknown``
at first), never repeats a state, reports ``healthy`` or ``degraded`` only while the
instance is ready, and is ``unavailable`` (or still ``unknown``) before a restart, a
failure or a stop. ``instance_draining`` names exactly the live leases.

A lease is ``granted -> renewed* -> released | expired``, exactly once each end; it
never ends later than its ``expires_at`` (plus a tolerance), nor later than its
instance's end (plus the tolerance), and never expires early.

A lease is granted only on an instance that is ready at that moment: not before its
first ready, not while it restarts (from a crash until the restarted server is ready
again), not while it drains, not after it stopped. The grant and the instance's
transitions are sent from different actor threads, so the order in which their signals
arrive is not the order in which they happened; a grant is flagged only when it
certainly fell outside "ready" (see :meth:`InvariantRecorder._unready_at`). One
exception is counted rather than flagged: a grant after the instance failed and before
the broker heard of it (``late_grants``); that lease must end with the instance.

The library logs an error with a traceback (ERROR or above with exception info, on
``llama_actors`` or below) only when it swallowed an exception so as to keep going:
each one is a violation.

A restart that finds its old (auto) port taken comes up on a new port: it neither
becomes ready on a port another program holds nor fails for a bind failure.

Restarts keep the :class:`~llama_actors.RestartPolicy`: attempts 1..max_restarts,
delays within the jittered backoff, never more than ``max_restarts`` in a window,
and "restart intensity exceeded" only once ``max_restarts`` happened in the window.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from llama_actors import Lease, RestartPolicy, RuntimeSnapshot
from llama_actors.signals import ALL_SIGNALS

__all__ = ["InstanceTrack", "InvariantRecorder", "LeaseTrack"]

TERMINAL = ("failed", "stopped")
LEASE_END_REASONS = frozenset({"released", "drained", "instance stopped", "instance failed"})
# Restart times are taken when the signal arrives, a little after the tracker decided;
# a window this much shorter than the policy's cannot be fooled by that skew.
WINDOW_SLACK_S = 0.25
# Floating point in ``now + ttl / 1000`` and ``base * factor / 1000``.
EPSILON = 1e-6


@dataclass
class Unready:
    """A stretch of the recorder's clock during which an instance was certainly not
    ready; ``until`` is None while it lasts."""

    since: float
    until: float | None = None
    why: str = "was starting"


@dataclass
class InstanceTrack:
    """What the signals said about one instance."""

    instance_id: str
    phase: str = "new"  # new, starting, ready, restarting, failed, stopped
    health: str = "unknown"
    draining: bool = False
    ever_ready: bool = False
    terminal_at: float | None = None
    restarts: list[float] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    live: set[str] = field(default_factory=set)
    # When the instance was certainly not ready: from its creation, or from the arrival
    # of instance_restarting (the backend set its board row to "starting" before sending
    # it), until the next instance_starting has been handled (the backend publishes
    # "ready" only after that send returned).
    unready: list[Unready] = field(
        default_factory=lambda: [Unready(-math.inf, why="was starting for the first time")]
    )


@dataclass
class LeaseTrack:
    """What the signals said about one lease."""

    lease_ref: str
    instance_id: str
    granted_at: float  # recorder clock (time.monotonic, as the runtime's)
    expires_at: float
    ttl_ms: int
    end: str | None = None  # "expired", or the release reason
    ended_at: float | None = None
    late_grant: bool = False  # granted after its instance had already failed
    flagged: bool = False


@dataclass
class _PortHold:
    port: int
    since: float
    until: float | None = None


class _ErrorLog(logging.Handler):
    """Hands each record at ERROR or above that carries a traceback to ``found``."""

    def __init__(self, found: Callable[[logging.LogRecord], None]) -> None:
        super().__init__(logging.ERROR)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None and record.exc_info[0] is not None:
            self.found(record)


class InvariantRecorder:
    """Records every signal and checks it against the invariants (see the module).

    ``state_of(instance_id)``, if given, reads the instance's state from the runtime's
    status board (``runtime.snapshot(iid).state``, None once it is gone): it sharpens the
    grant check for a grant whose signal arrives before the instance_ready it followed.
    """

    def __init__(
        self,
        restart: RestartPolicy,
        *,
        lease_tolerance_s: float,
        state_of: Callable[[str], str | None] | None = None,
    ) -> None:
        self.restart = restart
        self.tolerance = lease_tolerance_s
        self.state_of = state_of
        self._lock = threading.Lock()
        self._receivers: list[tuple[Any, Any]] = []
        self.instances: dict[str, InstanceTrack] = {}
        self.leases: dict[str, LeaseTrack] = {}
        self.counts: Counter[str] = Counter()
        self.release_reasons: Counter[str] = Counter()
        self.failure_kinds: Counter[str] = Counter()
        self.violations: list[str] = []
        self.lost: Counter[str] = Counter()
        self.processes: dict[int, psutil.Process | None] = {}
        self.max_lease_lateness_s = 0.0
        self.max_restarts_in_window = 0
        self.late_grants = 0
        self.port_moves = 0
        self.logged_errors: list[str] = []
        self._holds: list[_PortHold] = []
        self._error_log = _ErrorLog(self._logged)
        self._saved_level: int | None = None

    # -- subscription ---------------------------------------------------------------

    def __enter__(self) -> InvariantRecorder:
        for name, signal in ALL_SIGNALS.items():

            def receive(sender: str, _name: str = name, **payload: Any) -> None:
                self._receive(_name, sender, payload)

            signal.connect(receive, weak=False)
            self._receivers.append((signal, receive))
        logger = logging.getLogger("llama_actors")
        if logger.getEffectiveLevel() > logging.ERROR:  # e.g. --log CRITICAL: still see them
            self._saved_level = logger.level
            logger.setLevel(logging.ERROR)
        logger.addHandler(self._error_log)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self._receivers.clear()
        logger = logging.getLogger("llama_actors")
        logger.removeHandler(self._error_log)
        if self._saved_level is not None:
            logger.setLevel(self._saved_level)
            self._saved_level = None

    def _logged(self, record: logging.LogRecord) -> None:
        """The library swallowed an exception and logged it (any thread)."""
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: show it as given
            message = str(record.msg)
        exc = record.exc_info[1] if record.exc_info is not None else None
        line = f"{record.name}: {message}: {type(exc).__name__}: {exc}"
        text = line
        if record.exc_info is not None:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        with self._lock:
            self.logged_errors.append(text)
            self.violations.append(f"the library logged an error with a traceback: {line}")

    def violate(self, text: str) -> None:
        with self._lock:
            self.violations.append(text)

    def _bad(self, text: str) -> None:  # lock held
        self.violations.append(text)

    # -- what the driver tells us ---------------------------------------------------

    def hold_port(self, port: int) -> _PortHold:
        """Another program holds ``port`` from now on: no instance may be ready on it."""
        hold = _PortHold(port, time.monotonic())
        with self._lock:
            self._holds.append(hold)
        return hold

    def free_port(self, hold: _PortHold) -> None:
        with self._lock:
            hold.until = time.monotonic()

    def lease_state(self, lease_ref: str) -> LeaseTrack | None:
        with self._lock:
            return self.leases.get(lease_ref)

    def phase(self, instance_id: str) -> str | None:
        with self._lock:
            track = self.instances.get(instance_id)
            return track.phase if track else None

    # -- per signal -----------------------------------------------------------------

    def _receive(self, name: str, iid: str, payload: dict[str, Any]) -> None:
        now = time.monotonic()
        proc: psutil.Process | None = None
        if name == "instance_starting" and isinstance(payload.get("pid"), int):
            try:  # remembered with its start time, so a reused pid is never mistaken
                proc = psutil.Process(payload["pid"])
            except psutil.Error:
                proc = None
        with self._lock:
            self.counts[name] += 1
            track = self.instances.get(iid)
            if track is None:
                track = self.instances[iid] = InstanceTrack(iid)
            try:
                getattr(self, f"_on_{name}")(track, now, payload)
            except Exception as exc:  # a checker bug must show, not vanish on an actor thread
                self._bad(f"{iid}: checking {name} raised {type(exc).__name__}: {exc}")
            if proc is not None:
                self.processes[proc.pid] = proc

    def _not_terminal(self, track: InstanceTrack, what: str) -> bool:
        if track.phase in TERMINAL:
            self._bad(f"{track.instance_id}: {what} after the instance was {track.phase}")
            return False
        return True

    def _on_instance_starting(self, t: InstanceTrack, now: float, p: dict[str, Any]) -> None:
        attempt, pid = p.get("attempt"), p.get("pid")
        if not self._not_terminal(t, "instance_starting"):
            return
        if t.phase == "new":
            if attempt != 0:
                self._bad(f"{t.instance_id}: first start has attempt {attempt}, not 0")
        elif t.phase == "restarting":
            if attempt != len(t.restarts):
                self._bad(
                    f"{t.instance_id}: restart start has attempt {attempt}, "
                    f"but {len(t.restarts)} restarts were announced"
                )
        else:
            self._bad(f"{t.instance_id}: instance_starting while {t.phase}")
        if pid in t.pids:
            self._bad(f"{t.instance_id}: pid {pid} started twice")
        if isinstance(pid, int):
            t.pids.append(pid)
        t.phase = "starting"
        if t.unready and t.unready[-1].until is None:
            # The backend publishes "ready" only once this send returns: after now.
            t.unready[-1].until = time.monotonic()

    def _on_instance_ready(self, t: InstanceTrack, now: float, p: dict[str, Any]) -> None:
        if not self._not_terminal(t, "instance_ready"):
            return
        if t.phase != "starting":
            self._bad(f"{t.instance_id}: instance_ready while {t.phase}")
        if t.pids and p.get("pid") != t.pids[-1]:
            self._bad(f"{t.instance_id}: ready with pid {p.get('pid')}, started {t.pids[-1]}")
        port = p.get("port")
        for hold in self._holds:
            if hold.port == port and hold.until is None:
                self._bad(
                    f"{t.instance_id}: ready on port {port}, which another program holds "
                    "(readiness answered by somebody else's socket)"
                )
        if isinstance(port, int):
            if t.ports and t.ports[-1] != port:
                self.port_moves += 1
            t.ports.append(port)
        t.phase = "ready"
        t.ever_ready = True

    def _on_health_changed(self, t: InstanceTrack, now: float, p: dict[str, Any]) -> None:
        old, new = p.get("old"), p.get("new")
        self._not_terminal(t, f"health_changed {old} -> {new}")
        if old != t.health:
            self._bad(f"{t.instance_id}: health_changed old={old}, last signalled {t.health}")
        if old == new:
            self._bad(f"{t.instance_id}: health_changed {old} -> {new} is no change")
        if new in ("healthy", "degraded") and t.phase != "ready":
            self._bad(f"{t.instance_id}: health {new} while {t.phase}")
        t.health = str(new)

    def _on_instance_restarting(self, t: InstanceTrack, now: float, p: dict[str, Any]) -> None:
        attempt, delay = p.get("attempt"), p.get("delay_s")
        if not self._not_terminal(t, "instance_restarting"):
            return
        if t.phase not in ("ready", "starting") or not t.ever_ready:
            self._bad(f"{t.instance_id}: instance_restarting while {t.phase}")
        if t.health != "unavailable":
            self._bad(f"{t.instance_id}: restarting while health is {t.health}, not unavailable")
        policy = self.restart
        if not isinstance(attempt, int) or not 1 <= attempt <= policy.max_restarts:
            self._bad(
                f"{t.instance_id}: restart attempt {attempt} outside 1..{policy.max_restarts}"
            )
        elif isinstance(delay, float | int):
            base = policy.base_delay_ms(attempt) / 1000
            low, high = base * (1 - policy.jitter), base * (1 + policy.jitter)
            if not low - EPSILON <= delay <= high + EPSILON:
                self._bad(
                    f"{t.instance_id}: restart {attempt} delay {delay:.4f}s outside the "
                    f"backoff [{low:.4f}, {high:.4f}]"
                )
        t.restarts.append(now)
        in_window = self._restarts_within(t, now, policy.window_s - WINDOW_SLACK_S)
        self.max_restarts_in_window = max(self.max_restarts_in_window, in_window)
        if in_window > policy.max_restarts:
            self._bad(
                f"{t.instance_id}: {in_window} restarts within {policy.window_s:g}s "
                f"(max_restarts={policy.max_restarts})"
            )
        t.phase = "restarting"
        t.unready.append(Unready(now, why="was restarting"))  # the board said so before

    @staticmethod
    def _restarts_within(t: InstanceTrack, now: float, window: float) -> int:
        return sum(1 for at in t.restarts if now - at <= window)

    def _on_instance_draining(self, t: InstanceTrack, now: float, p: dict[str, Any]) -> None:
        self._not_terminal(t, "instance_draining")
        if t.draining:
            self._bad(f"{t.instance_id}: instance_draining twice")
        refs = set(p.get("lease_refs") or ())
        if refs != t.live:
            self._bad(
                f"{t.instance_id}: draining names {sorted(refs)}, live leases are {sorted(t.live)}"
            )
        t.draining = True

    def _end_instance(self, t: InstanceTrack, now: float, how: str) -> None:
        if t.health not in ("unknown", "unavailable"):
            self._bad(f"{t.instance_id}: {how} while health is {t.health}")
        t.phase = how
        t.terminal_at = now
        if t.unready and t.unready[-1].until is None:
            t.unready[-1].until = now

    def _on_instance_failed(self, t: InstanceTrack, now: float, p: dict[str, Any]) -> None:
        if not self._not_terminal(t, "instance_failed"):
            return
        reason = str(p.get("reason"))
        if "restart intensity exceeded" in reason:
            self.failure_kinds["restart intensity exceeded"] += 1
            window = self.restart.window_s + WINDOW_SLACK_S
            if self._restarts_within(t, now, window) < self.restart.max_restarts:
                self._bad(
                    f"{t.instance_id}: gave up for intensity after "
                    f"{self._restarts_within(t, now, window)} restarts in the window "
                    f"(max_restarts={self.restart.max_restarts})"
                )
        else:
            exit_ = p.get("exit")
            kind = getattr(exit_, "failure", None)
            if kind is None and "already in use" in reason:
                kind = "port held by another program"
            kind = kind or ("never ready" if not t.ever_ready else "other")
            if kind == "bind_failure" and t.ever_ready:
                self._bad(
                    f"{t.instance_id}: failed for good because another program took its port "
                    "as it restarted; an auto port should move to a new one"
                )
            self.failure_kinds[str(kind)] += 1
        self._end_instance(t, now, "failed")

    def _on_instance_stopped(self, t: InstanceTrack, now: float, p: dict[str, Any]) -> None:
        if not self._not_terminal(t, "instance_stopped"):
            return
        self._end_instance(t, now, "stopped")

    def _on_lease_granted(self, t: InstanceTrack, now: float, p: dict[str, Any]) -> None:
        lease: Lease = p["lease"]
        ref = lease.lease_ref
        if ref in self.leases:
            self._bad(f"{ref}: granted twice")
            return
        if t.draining:  # both sent by the broker, in the order it did them
            self._bad(f"{ref}: granted on {t.instance_id} while it drains")
        if t.phase == "stopped":
            self._bad(f"{ref}: granted on {t.instance_id} after it stopped")
        elif (why := self._unready_at(t, lease.granted_at)) is not None:
            self._bad(f"{ref}: granted on {t.instance_id} while it {why}")
        if abs(lease.expires_at - (lease.granted_at + lease.ttl_ms / 1000)) > EPSILON:
            self._bad(f"{ref}: expires_at is not granted_at + ttl")
        track = LeaseTrack(ref, t.instance_id, now, lease.expires_at, lease.ttl_ms)
        if t.phase == "failed":
            # The broker had not heard of the failure yet; the lease must end with it.
            track.late_grant = True
            self.late_grants += 1
        self.leases[ref] = track
        t.live.add(ref)

    def _unready_at(self, t: InstanceTrack, granted_at: float) -> str | None:
        """Why the instance was certainly not ready at ``granted_at`` (the broker's
        clock: time.monotonic, as the recorder's), or None when it was or may have been.

        The grant (on the broker's thread) and the transitions (on the backend's) race
        to this recorder, so the phase the signals reached is not the phase at the
        grant. Certain are: an instance that ended without ever being ready; the
        windows in ``unready``; and a grant on an instance whose instance_ready has not
        arrived and that is still not ready on the status board now (the backend cannot
        leave "ready" again before that send returns, so the board has not been ready
        since the window began).
        """
        if t.phase in TERMINAL and not t.ever_ready:
            return "was never ready"
        for window in t.unready:
            if window.since <= granted_at and (window.until is None or granted_at <= window.until):
                return window.why
        if t.phase not in ("new", "starting", "restarting") or self.state_of is None:
            return None
        if granted_at < t.unready[-1].since:
            return None  # granted before the crash was announced: it may have been ready
        board = self.state_of(t.instance_id)
        if board == "ready":
            return None  # its instance_ready is on the way
        return f"{t.unready[-1].why} (the status board says {board or 'gone'}, not ready)"

    def _live_lease(self, p: dict[str, Any], what: str) -> LeaseTrack | None:
        lease: Lease = p["lease"]
        track = self.leases.get(lease.lease_ref)
        if track is None:
            self._bad(f"{lease.lease_ref}: {what} but it was never granted")
            return None
        if track.end is not None:
            self._bad(f"{lease.lease_ref}: {what} after it ended ({track.end})")
            return None
        return track

    def _on_lease_renewed(self, t: InstanceTrack, now: float, p: dict[str, Any]) -> None:
        if (track := self._live_lease(p, "lease_renewed")) is None:
            return
        if now > track.expires_at + self.tolerance:
            self._bad(f"{track.lease_ref}: renewed {now - track.expires_at:.3f}s after expiry")
        track.expires_at = p["lease"].expires_at

    def _end_lease(self, track: LeaseTrack, now: float, end: str) -> None:
        lateness = now - track.expires_at
        self.max_lease_lateness_s = max(self.max_lease_lateness_s, lateness)
        if lateness > self.tolerance:
            self._bad(f"{track.lease_ref}: ended ({end}) {lateness:.3f}s after it expired")
        instance = self.instances.get(track.instance_id)
        if instance is not None and instance.terminal_at is not None:
            after = now - max(instance.terminal_at, track.granted_at)
            if after > self.tolerance:
                self._bad(
                    f"{track.lease_ref}: ended {after:.3f}s after {track.instance_id} "
                    f"{instance.phase}"
                )
        track.end, track.ended_at = end, now
        if instance is not None:
            instance.live.discard(track.lease_ref)

    def _on_lease_released(self, t: InstanceTrack, now: float, p: dict[str, Any]) -> None:
        if (track := self._live_lease(p, "lease_released")) is None:
            return
        reason = str(p.get("reason"))
        self.release_reasons[reason] += 1
        if reason not in LEASE_END_REASONS:
            self._bad(f"{track.lease_ref}: released for an unknown reason {reason!r}")
        if reason in ("instance stopped", "instance failed") and t.phase not in TERMINAL:
            self._bad(f"{track.lease_ref}: released for {reason!r} while {t.phase}")
        if reason == "drained" and not t.draining:
            self._bad(f"{track.lease_ref}: released as drained, but no drain was announced")
        self._end_lease(track, now, reason)

    def _on_lease_expired(self, t: InstanceTrack, now: float, p: dict[str, Any]) -> None:
        if (track := self._live_lease(p, "lease_expired")) is None:
            return
        if now < track.expires_at - EPSILON:
            self._bad(f"{track.lease_ref}: expired {track.expires_at - now:.3f}s early")
        self._end_lease(track, now, "expired")

    # -- continuously -----------------------------------------------------------------

    def check_time(self, now: float) -> None:
        """What no signal announces: live leases past their TTL or their instance."""
        with self._lock:
            for track in self.leases.values():
                if track.end is not None or track.flagged:
                    continue
                if now > track.expires_at + self.tolerance:
                    track.flagged = True
                    self._bad(
                        f"{track.lease_ref}: still live {now - track.expires_at:.3f}s "
                        "after it expired"
                    )
                    continue
                instance = self.instances.get(track.instance_id)
                if instance is not None and instance.terminal_at is not None:
                    after = now - max(instance.terminal_at, track.granted_at)
                    if after > self.tolerance:
                        track.flagged = True
                        self._bad(
                            f"{track.lease_ref}: still live {after:.3f}s after "
                            f"{track.instance_id} {instance.phase}"
                        )

    # -- at the end -------------------------------------------------------------------

    def final_check(self, snapshots: list[RuntimeSnapshot]) -> None:
        """Once the runtime is closed: every instance ended once, every lease once, and
        the runtime's own read model agrees with what was signalled."""
        with self._lock:
            for t in self.instances.values():
                if t.phase not in TERMINAL:
                    self.lost["instances that never signalled failed or stopped"] += 1
                    self._bad(f"{t.instance_id}: no terminal signal after close (last {t.phase})")
            for track in self.leases.values():
                if track.end is None:
                    self.lost["leases that never ended"] += 1
                    self._bad(f"{track.lease_ref}: never ended")
            for snap in snapshots:
                inst = self.instances.get(snap.instance_id)
                if inst is None:
                    self._bad(f"{snap.instance_id}: in the runtime but never signalled")
                    continue
                if snap.state != inst.phase:
                    self._bad(f"{snap.instance_id}: snapshot {snap.state}, signals {inst.phase}")
                if snap.health != inst.health:
                    self._bad(
                        f"{snap.instance_id}: snapshot health {snap.health}, signals {inst.health}"
                    )
                if snap.lease_count != 0:
                    self._bad(f"{snap.instance_id}: {snap.lease_count} leases after close")
                if snap.restart_count != len(inst.restarts):
                    self._bad(
                        f"{snap.instance_id}: restart_count {snap.restart_count}, "
                        f"{len(inst.restarts)} restarts signalled"
                    )
                if snap.pid is not None:
                    self._bad(f"{snap.instance_id}: snapshot still has pid {snap.pid}")

    def leftover_processes(self) -> list[psutil.Process]:
        """Servers that the runtime started and that still run."""
        with self._lock:
            procs = [p for p in self.processes.values() if p is not None]
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        return alive

"""A seeded, randomised fault-injection run against a Runtime of fake llama-servers.

Each of ``instances`` slots is a thread with its own ``random.Random`` (drawn from the
seed) and its own fake-server folder, so its own identity. A slot resolves an
endpoint, then keeps taking steps: more leases, renewals, releases, leases left to
expire, a stop now and then, and faults:

``sigkill``           SIGKILL the server
``sigstop``           SIGSTOP it, SIGCONT a while later
``slow_load``         the next load takes seconds (a first start, or a kill's restart)
``degraded``          ``/health`` says degraded, no slot or 500 for a while
``hang``              the server accepts and never answers, for a while
``crash_after``       the server crashes after N more requests, for a while
``port_taken``        kill the server and bind its port before the restart can
``port_stolen``       kill the server and bind its port just after the restart was
                      spawned on it, before the new server binds it (the restart must
                      move to a new port, not fail)
``fixed_port_taken``  resolve a fixed-port spec whose port another socket holds

Signals only ever go to servers this runtime started (the pid from its snapshot,
checked to be our child running the fake), through psutil, which refuses a pid that
has been reused. Meanwhile a watcher samples ``instances()``, ``snapshot()`` and
``statistics()`` and times each answer, and the :class:`InvariantRecorder` checks
every signal. At the end everything is undone, the runtime is closed, and the
summary says what was injected, what happened and what was lost.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil

from llama_actors import (
    InstanceNotFoundError,
    InstancePolicy,
    LeaseExpiredError,
    LeaseNotFoundError,
    LlamaActorsError,
    PortInUseError,
    RestartPolicy,
    Runtime,
    RuntimeClosedError,
    WaitTimeoutError,
)
from llama_actors.signals import instance_starting
from llama_actors.testing.fake import fake_boot_spec
from llama_actors.testing.fake_server import write_control

from .invariants import InvariantRecorder

__all__ = ["FAULTS", "POLICY", "ChaosConfig", "Summary", "run_chaos"]

FAULTS = (
    "sigkill",
    "sigstop",
    "slow_load",
    "degraded",
    "hang",
    "crash_after",
    "port_taken",
    "port_stolen",
    "fixed_port_taken",
)

RESTART = RestartPolicy(
    max_restarts=4, window_s=8.0, backoff_initial_ms=100, backoff_max_ms=800, jitter=0.2
)
POLICY = InstancePolicy(
    restart=RESTART,
    probe_timeout_ms=400,
    slow_probe_ms=350,
    unavailable_after=2,
    wedged_restart_ms=1_500,
    drain_timeout_ms=1_000,
)
IDLE_POLICY = msgspec.structs.replace(POLICY, idle_shutdown_ms=400)
SPEC_FIELDS: dict[str, Any] = {
    "health_interval_ms": 150,
    "readiness_interval_ms": 50,
    "stop_timeout_ms": 1_000,
    "ready_timeout_ms": 3_000,
}
CONTROL_KEYS = ("health", "hang", "crash_after", "load_seconds")
# How a slot spends its steps (faults are one of FAULTS, chosen uniformly).
ACTIONS = {
    "idle": 4.0,
    "lease_more": 2.0,
    "renew": 1.5,
    "release": 2.0,
    "abandon": 1.0,
    "stop_instance": 0.25,
    "fault": 1.6,
}


@dataclass(frozen=True)
class ChaosConfig:
    """One run: ``instances`` slots for ``duration_s`` seconds, decided by ``seed``.

    ``lease_tolerance_s`` is how late a lease may end after its TTL or its instance (the
    broker's wake-up and mailbox); ``snapshot_bound_s`` the slowest answer allowed from
    ``snapshot``/``instances``/``statistics``; ``stop_drain_s`` the longest drain a
    ``stop_instance`` asks for (drawn from 0 up to it); ``close_bound_s`` how long
    ``Runtime.close()`` may take once the chaos has ended.
    """

    seed: int = 0
    duration_s: float = 60.0
    instances: int = 6
    lease_tolerance_s: float = 0.75
    snapshot_bound_s: float = 0.5
    resolve_timeout_s: float = 60.0
    sample_interval_s: float = 0.02
    workdir: str | None = None
    verbose: bool = False
    faults: tuple[str, ...] = FAULTS
    stop_drain_s: float = 0.8
    close_bound_s: float = 20.0


@dataclass
class Summary:
    """What a run did and found; ``ok`` when nothing was lost and no invariant broke."""

    config: ChaosConfig
    elapsed_s: float = 0.0
    close_s: float = 0.0
    runtime_instances: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    resolve_errors: Counter[str] = field(default_factory=Counter)
    transitions: Counter[str] = field(default_factory=Counter)
    release_reasons: Counter[str] = field(default_factory=Counter)
    failure_kinds: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    max_restarts_in_window: int = 0
    max_lease_lateness_s: float = 0.0
    late_grants: int = 0
    port_moves: int = 0
    snapshot_samples: int = 0
    snapshot_max_s: float = 0.0
    snapshot_p99_s: float = 0.0
    servers_spawned: int = 0
    left_behind: list[str] = field(default_factory=list)
    logged_errors: list[str] = field(default_factory=list)
    lost: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    @property
    def lost_total(self) -> int:
        return sum(self.lost.values())

    @property
    def ok(self) -> bool:
        return self.lost_total == 0 and not self.violations

    def render(self, limit: int = 30) -> str:
        def counts(counter: Counter[str]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"

        c = self.config
        lines = [
            f"chaos: seed {c.seed}, {self.elapsed_s:.1f}s of chaos with {c.instances} slots, "
            f"{self.runtime_instances} runtime instances (close took {self.close_s:.2f}s)",
            f"faults injected ({sum(self.faults.values())}): {counts(self.faults)}",
            f"operations: {counts(self.operations)}",
            f"resolve errors (expected under faults): {counts(self.resolve_errors)}",
            f"transitions ({sum(self.transitions.values())}): {counts(self.transitions)}",
            f"restarts: {self.restarts} (at most {self.max_restarts_in_window} in one "
            f"{RESTART.window_s:g}s window, limit {RESTART.max_restarts}); "
            f"failures: {counts(self.failure_kinds)}",
            f"leases: granted {self.transitions['lease_granted']}, renewed "
            f"{self.transitions['lease_renewed']}, released {self.transitions['lease_released']}"
            f" ({counts(self.release_reasons)}), expired {self.transitions['lease_expired']}; "
            f"latest end {self.max_lease_lateness_s * 1000:.0f} ms after expiry (tolerance "
            f"{c.lease_tolerance_s * 1000:.0f} ms); granted as the instance failed: "
            f"{self.late_grants}",
            f"snapshot: {self.snapshot_samples} samples, max {self.snapshot_max_s * 1000:.1f} ms,"
            f" p99 {self.snapshot_p99_s * 1000:.1f} ms (bound {c.snapshot_bound_s * 1000:.0f} ms)",
            f"ports: {self.port_moves} restarts came up on a new port (their old one was taken)",
            f"processes: {self.servers_spawned} servers spawned, "
            f"{len(self.left_behind)} left behind",
            f"errors the library logged with a traceback (swallowed exceptions): "
            f"{len(self.logged_errors)}" + _first_traceback(self.logged_errors),
            f"lost: {self.lost_total}" + (f" ({counts(self.lost)})" if self.lost else ""),
            f"invariant violations: {len(self.violations)}",
        ]
        groups: dict[str, list[str]] = {}  # the same finding on many instances: one line
        for text in self.violations:
            subject, _, rest = text.partition(": ")
            if rest and " " not in subject:  # "fake-model-1a2b3c: what happened"
                groups.setdefault(rest, []).append(subject)
            else:
                groups.setdefault(text, [])
        for shown, (text, subjects) in enumerate(groups.items()):
            if shown == limit:
                lines.append(f"  ... and {len(groups) - limit} more kinds")
                break
            if not subjects:
                lines.append(f"  - {text}")
            elif len(subjects) == 1:
                lines.append(f"  - {subjects[0]}: {text}")
            else:
                lines.append(f"  - {len(subjects)}x (e.g. {subjects[0]}): {text}")
        lines.append(f"result: {'OK' if self.ok else 'FAILED'} (reproduce with --seed {c.seed})")
        return "\n".join(lines)


def _first_traceback(logged: list[str]) -> str:
    """The first logged error in full, indented under its summary line."""
    if not logged:
        return ""
    return "; the first:" + "".join(f"\n    {line}" for line in logged[0].splitlines())


class Tally:
    """A Counter that slot threads and actor threads may add to at the same time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def __getitem__(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    def counter(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)


# -- servers we may signal --------------------------------------------------------------


def own_server(pid: int | None) -> psutil.Process | None:
    """The fake server ``pid`` if this process started it, else None."""
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.ppid() != os.getpid():
            return None
        if not any("fake_server" in part for part in proc.cmdline()):
            return None
    except psutil.Error:
        return None
    return proc


def hold_port(port: int, patience_s: float = 1.0) -> socket.socket | None:
    """Bind and listen on 127.0.0.1:``port`` as soon as it is free (a killed server's
    socket closes when it dies); None if it stays taken for ``patience_s``."""
    deadline = time.monotonic() + patience_s
    done = threading.Event()
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(8)
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                return None
            done.wait(0.002)
            continue
        return sock


# -- one slot -------------------------------------------------------------------------


@dataclass
class _Hold:
    lease_ref: str
    expires_at: float
    ttl_ms: int
    keep: bool


class Slot:
    """One identity's worth of chaos, driven by its own seeded random generator."""

    def __init__(self, engine: Engine, index: int, seed: int) -> None:
        self.engine = engine
        self.index = index
        self.rng = random.Random(seed)  # noqa: S311 - a reproducible schedule
        self.folder = engine.root / f"slot-{index}"
        self.control = self.folder / "control.json"
        behaviour = {"ignore_sigterm": "1"} if self.rng.random() < 0.25 else {}
        self.policy = IDLE_POLICY if self.rng.random() < 0.25 else POLICY
        fields = dict(SPEC_FIELDS)
        if self.rng.random() < 0.5:
            fields["api_key"] = f"sk-chaos-{index}-{seed:x}"
        self.spec = fake_boot_spec(self.folder, behaviour=behaviour, **fields)
        self.fixed_fields = {**fields, "alias": f"fixed-{index}"}
        self.behaviour = behaviour
        self.iid: str | None = None
        self.holds: dict[str, _Hold] = {}
        self.owner = f"slot-{index}"

    # -- the loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.step()
                stop.wait(self.rng.uniform(0.05, 0.35))
        except RuntimeClosedError:
            pass
        except Exception as exc:
            self.engine.recorder.violate(
                f"{self.owner}: the driver raised {type(exc).__name__}: {exc}\n"
                + traceback.format_exc()
            )
        finally:
            self.finish()

    def step(self) -> None:
        if not self.instance_alive():
            self.acquire()
            return
        self.keep_alive()
        action = self.rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        if action == "fault":
            kinds = self.engine.config.faults
            kind, first = self.rng.choice(kinds), self.rng.random() < 0.5
            if first and (fresh := [k for k in kinds if self.engine.faults[k] == 0]):
                kind = fresh[0]  # every kind early, so a short run covers them all
            getattr(self, f"fault_{kind}")()
        elif action != "idle":
            getattr(self, f"do_{action}")()

    def finish(self) -> None:
        """Clear the control file (the engine undoes pending faults itself)."""
        with contextlib.suppress(OSError):
            write_control(self.control, **dict.fromkeys(CONTROL_KEYS))

    def later(self, label: str, delay: float, action: Callable[[], object]) -> None:
        """Undo a fault after ``delay`` seconds, on the engine's undo thread (a slot
        may be blocked in a resolve meanwhile, waiting for exactly that undo)."""
        self.engine.undoer.add(self, label, delay, action)

    def active(self, label: str) -> bool:
        return self.engine.undoer.active(self, label)

    def note(self, text: str) -> None:
        if self.engine.config.verbose:
            print(f"{time.monotonic() - self.engine.started:8.3f} {self.owner}: {text}", flush=True)

    # -- the instance and its leases ----------------------------------------------------

    def instance_alive(self) -> bool:
        if self.iid is None:
            return False
        state: str
        try:
            state = self.engine.runtime.snapshot(self.iid).state
        except InstanceNotFoundError:
            state = "gone"
        if state in ("failed", "stopped", "stopping", "gone"):
            self.iid = None
            self.holds.clear()
            return False
        return True

    def acquire(self) -> None:
        """Resolve this slot's spec (a new instance if the last one ended)."""
        write_control(self.control, **{k: None for k in CONTROL_KEYS if not self.active(k)})
        if not self.active("load_seconds") and self.rng.random() < 0.15:
            self.slow_load(self.rng.uniform(0.5, 2.0))
        if self.lease():
            self.engine.operations.add("instances acquired")

    def lease(self) -> bool:
        ttl = self.rng.randint(600, 3_000)
        keep = self.rng.random() < 0.75
        engine = self.engine
        engine.operations.add("resolves")
        try:
            resolution = engine.runtime.resolve_endpoint(
                self.spec,
                "chaos",
                owner_ref=self.owner,
                ttl_ms=ttl,
                policy=self.policy,
                timeout=engine.config.resolve_timeout_s,
            )
        except WaitTimeoutError as exc:
            engine.recorder.violate(f"{self.owner}: resolve did not answer: {exc}")
            engine.lost.add("resolves that never answered")
            return False
        except RuntimeClosedError:
            raise
        except LlamaActorsError as exc:
            engine.resolve_errors.add(type(exc).__name__)
            self.note(f"resolve failed: {type(exc).__name__}")
            return False
        lease = resolution.lease
        engine.client_leases.add(lease.lease_ref)
        track = engine.recorder.lease_state(lease.lease_ref)
        if track is None:
            engine.recorder.violate(f"{lease.lease_ref}: resolved before lease_granted was sent")
        self.iid = resolution.instance.instance_id
        self.holds[lease.lease_ref] = _Hold(lease.lease_ref, lease.expires_at, ttl, keep)
        return True

    def keep_alive(self) -> None:
        now = time.monotonic()
        for hold in list(self.holds.values()):
            if not hold.keep:
                if now > hold.expires_at:
                    del self.holds[hold.lease_ref]
                continue
            if hold.expires_at - now < hold.ttl_ms / 2000:
                self.renew(hold, None)

    def renew(self, hold: _Hold, ttl_ms: int | None) -> None:
        engine = self.engine
        try:
            lease = engine.runtime.renew(hold.lease_ref, ttl_ms)
        except (LeaseExpiredError, LeaseNotFoundError) as exc:
            del self.holds[hold.lease_ref]
            engine.operations.add(f"renewals refused ({type(exc).__name__})")
            track = engine.recorder.lease_state(hold.lease_ref)
            if track is None or track.end is None:
                engine.recorder.violate(
                    f"{hold.lease_ref}: renew raised {type(exc).__name__}, but no lease_expired "
                    "or lease_released was signalled (a lease ended silently)"
                )
            return
        engine.operations.add("renewals")
        hold.expires_at, hold.ttl_ms = lease.expires_at, lease.ttl_ms
        track = engine.recorder.lease_state(hold.lease_ref)
        if track is None or abs(track.expires_at - lease.expires_at) > 1e-9:
            engine.recorder.violate(f"{hold.lease_ref}: renewed without its lease_renewed signal")

    def pick_hold(self) -> _Hold | None:
        if not self.holds:
            return None
        return self.holds[self.rng.choice(sorted(self.holds))]

    def do_lease_more(self) -> None:
        self.lease()

    def do_renew(self) -> None:
        if (hold := self.pick_hold()) is not None:
            self.renew(hold, self.rng.randint(600, 3_000))

    def do_release(self) -> None:
        if (hold := self.pick_hold()) is None:
            return
        del self.holds[hold.lease_ref]
        released = self.engine.runtime.release(hold.lease_ref)
        self.engine.operations.add(f"releases ({'live' if released else 'already ended'})")
        track = self.engine.recorder.lease_state(hold.lease_ref)
        if track is None or track.end is None:
            self.engine.recorder.violate(
                f"{hold.lease_ref}: release returned {released}, but no end was signalled"
            )

    def do_abandon(self) -> None:
        if (hold := self.pick_hold()) is not None and hold.keep:
            hold.keep = False
            self.engine.operations.add("leases left to expire")

    def do_stop_instance(self) -> None:
        if self.iid is None:
            return
        drain = self.rng.uniform(0.0, self.engine.config.stop_drain_s)
        self.engine.operations.add("stop_instance")
        self.note(f"stop_instance drain {drain:.2f}s")
        try:
            self.engine.runtime.stop_instance(self.iid, drain_timeout=drain)
        except InstanceNotFoundError:
            pass  # pruned from the finished instances meanwhile
        except WaitTimeoutError as exc:
            self.engine.recorder.violate(f"{self.owner}: stop_instance did not answer: {exc}")
            self.engine.lost.add("stops that never answered")
        self.iid = None
        self.holds.clear()

    # -- faults -----------------------------------------------------------------------

    def server(self) -> tuple[psutil.Process, int | None] | None:
        if self.iid is None:
            return None
        try:
            snap = self.engine.runtime.snapshot(self.iid)
        except InstanceNotFoundError:
            return None
        proc = own_server(snap.pid)
        return None if proc is None else (proc, snap.port)

    def injected(self, kind: str, detail: str = "") -> None:
        self.engine.faults.add(kind)
        self.note(f"fault {kind} {detail}")

    def fault_sigkill(self) -> None:
        if (found := self.server()) is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            found[0].kill()
            self.injected("sigkill", f"pid {found[0].pid}")

    def fault_sigstop(self) -> None:
        if self.active("sigstop") or (found := self.server()) is None:
            return
        proc = found[0]
        try:
            proc.suspend()
        except psutil.NoSuchProcess:
            return
        pause = self.rng.uniform(0.2, 3.0)
        self.injected("sigstop", f"pid {proc.pid} for {pause:.2f}s")

        def resume() -> None:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()

        self.later("sigstop", pause, resume)

    def slow_load(self, seconds: float) -> None:
        write_control(self.control, load_seconds=round(seconds, 3))
        self.injected("slow_load", f"{seconds:.2f}s")
        self.later(
            "load_seconds",
            seconds + self.rng.uniform(1.0, 4.0),
            lambda: write_control(self.control, load_seconds=None),
        )

    def fault_slow_load(self) -> None:
        if self.active("load_seconds") or (found := self.server()) is None:
            return
        self.slow_load(self.rng.uniform(0.5, 2.5))
        with contextlib.suppress(psutil.NoSuchProcess):
            found[0].kill()  # the restart loads slowly

    def phase(self, key: str, value: Any, low: float, high: float) -> None:
        if self.active(key) or self.iid is None:
            return
        write_control(self.control, **{key: value})
        length = self.rng.uniform(low, high)
        self.later(key, length, lambda: write_control(self.control, **{key: None}))
        self.injected("degraded" if key == "health" else key, f"{key}={value} for {length:.2f}s")

    def fault_degraded(self) -> None:
        self.phase("health", self.rng.choice(["degraded", "no_slot", "error500"]), 0.5, 3.0)

    def fault_hang(self) -> None:
        self.phase("hang", True, 0.5, 4.0)

    def fault_crash_after(self) -> None:
        self.phase("crash_after", self.rng.randint(1, 8), 0.5, 3.0)

    def fault_port_taken(self) -> None:
        if self.active("port") or (found := self.server()) is None:
            return
        proc, port = found
        if port is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
        sock = hold_port(port)
        if sock is None:
            self.engine.operations.add("ports not taken in time")
            return
        recorder = self.engine.recorder
        hold = recorder.hold_port(port)
        self.injected("port_taken", f"port {port} of pid {proc.pid}")

        def free() -> None:
            recorder.free_port(hold)
            sock.close()

        self.later("port", self.rng.uniform(1.0, 4.0), free)

    def fault_port_stolen(self) -> None:
        if self.active("port") or (found := self.server()) is None or self.iid is None:
            return
        proc, port = found
        if port is None:
            return
        self.engine.steal_on_restart(self, self.iid, port, self.rng.uniform(1.0, 4.0))
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()

    def fault_fixed_port_taken(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(8)
            port = int(sock.getsockname()[1])
            hold = self.engine.recorder.hold_port(port)
            self.injected("fixed_port_taken", f"port {port}")
            spec = fake_boot_spec(
                self.folder, behaviour=self.behaviour, port=port, **self.fixed_fields
            )
            try:
                resolution = self.engine.runtime.resolve_endpoint(
                    spec, "chaos", owner_ref=self.owner, ttl_ms=1_000, timeout=30
                )
            except PortInUseError as exc:
                if str(port) not in str(exc):
                    self.engine.recorder.violate(f"PortInUseError does not name port {port}: {exc}")
                self.engine.operations.add("fixed ports refused")
            except RuntimeClosedError:
                raise
            except LlamaActorsError as exc:
                self.engine.recorder.violate(
                    f"a fixed port held by another program gave {type(exc).__name__}: {exc}"
                )
            else:
                self.engine.recorder.violate(
                    f"resolved {resolution.instance.instance_id} on port {port}, which another "
                    "program holds"
                )
                self.engine.runtime.release(resolution.lease.lease_ref)
            finally:
                self.engine.recorder.free_port(hold)
        finally:
            sock.close()


# -- the run ------------------------------------------------------------------------------


class Undoer:
    """Runs each fault's undo when it is due (SIGCONT, free a port, clear a phase), on
    its own thread; :meth:`finish` runs whatever is still pending at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[tuple[float, int, Slot, str, Callable[[], object]]] = []
        self._seq = 0
        self._closed = False
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="chaos-undo", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, slot: Slot, label: str, delay: float, action: Callable[[], object]) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(
                self._pending, (time.monotonic() + delay, self._seq, slot, label, action)
            )
            self._cond.notify_all()

    def active(self, slot: Slot, label: str) -> bool:
        with self._cond:
            return any(p[2] is slot and p[3] == label for p in self._pending)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (
                    not self._pending or self._pending[0][0] > time.monotonic()
                ):
                    wait = self._pending[0][0] - time.monotonic() if self._pending else None
                    self._cond.wait(wait)
                if self._closed:
                    return
                item = heapq.heappop(self._pending)
            self._do(item)

    def _do(self, item: tuple[float, int, Slot, str, Callable[[], object]]) -> None:
        try:
            item[4]()
        except Exception as exc:
            self.errors.append(f"undo {item[3]} of {item[2].owner}: {type(exc).__name__}: {exc}")

    def finish(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = sorted(self._pending), []
            self._cond.notify_all()
        self._thread.join(10)
        for item in pending:
            self._do(item)


class Engine:
    """Owns the runtime, the recorder, the watcher and the slots of one run."""

    def __init__(self, config: ChaosConfig, root: Path) -> None:
        self.config = config
        self.root = root
        self.recorder = InvariantRecorder(RESTART, lease_tolerance_s=config.lease_tolerance_s)
        self.faults = Tally()
        self.operations = Tally()
        self.resolve_errors = Tally()
        self.lost = Tally()
        self.client_leases: set[str] = set()
        self.latencies: list[float] = []
        self.undoer = Undoer()
        self.started = time.monotonic()
        self.runtime: Runtime
        self._steals: dict[str, tuple[Slot, int, float]] = {}
        self._steals_lock = threading.Lock()

    def steal_on_restart(self, slot: Slot, instance_id: str, port: int, hold_s: float) -> None:
        """Bind ``port`` the moment ``instance_id``'s next restart has been spawned (its
        free-port check passed) and before that server can bind it itself."""
        with self._steals_lock:
            self._steals[instance_id] = (slot, port, hold_s)

    def _on_starting(self, sender: str, **payload: Any) -> None:
        """An instance_starting receiver: runs on the backend actor's thread."""
        instance_id = sender
        if not payload.get("attempt"):
            return
        with self._steals_lock:
            found = self._steals.pop(instance_id, None)
        if found is None:
            return
        slot, port, hold_s = found
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(8)
        except OSError:  # the new server was quicker
            sock.close()
            self.operations.add("ports not stolen in time")
            return
        hold = self.recorder.hold_port(port)
        slot.injected("port_stolen", f"port {port} of {instance_id}")

        def free() -> None:
            self.recorder.free_port(hold)
            sock.close()

        slot.later("port", hold_s, free)

    def _board_state(self, instance_id: str) -> str | None:
        """The instance's state on the runtime's status board now (None once pruned)."""
        try:
            return self.runtime.snapshot(instance_id).state
        except InstanceNotFoundError:
            return None

    def watch(self, stop: threading.Event) -> None:
        """Time the runtime's read model and check the clock-driven invariants."""
        try:
            self._watch(stop)
        except Exception as exc:  # a dead watcher would stop checking without a word
            self.recorder.violate(f"the watcher raised {type(exc).__name__}: {exc}")

    def _watch(self, stop: threading.Event) -> None:
        runtime, bound = self.runtime, self.config.snapshot_bound_s
        turn = 0
        while not stop.wait(self.config.sample_interval_s):
            turn += 1
            began = time.monotonic()
            snaps = runtime.instances()
            if snaps:
                with contextlib.suppress(InstanceNotFoundError):  # pruned meanwhile
                    runtime.snapshot(snaps[turn % len(snaps)].instance_id)
            runtime.statistics()
            took = time.monotonic() - began
            self.latencies.append(took)
            if took > bound:
                self.recorder.violate(
                    f"snapshot/instances/statistics took {took * 1000:.0f} ms "
                    f"(bound {bound * 1000:.0f} ms)"
                )
            self.recorder.check_time(time.monotonic())

    def run(self) -> Summary:
        config = self.config
        master = random.Random(config.seed)  # noqa: S311 - a reproducible schedule
        slot_seeds = [master.randrange(2**32) for _ in range(config.instances)]
        summary = Summary(config)
        stop_slots, stop_watch = threading.Event(), threading.Event()
        with self.recorder:
            instance_starting.connect(self._on_starting, weak=False)
            self.runtime = Runtime(
                state_dir=self.root / "state",
                policy=POLICY,
                rng=random.Random(master.randrange(2**32)),  # noqa: S311 - jitter
            )
            self.recorder.state_of = self._board_state
            watcher = threading.Thread(target=self.watch, args=(stop_watch,), name="chaos-watch")
            threads: list[threading.Thread] = []
            try:
                watcher.start()
                self.undoer.start()
                slots = [Slot(self, i, seed) for i, seed in enumerate(slot_seeds)]
                self.started = time.monotonic()
                for slot in slots:
                    thread = threading.Thread(
                        target=slot.run, args=(stop_slots,), name=f"chaos-{slot.owner}"
                    )
                    thread.start()
                    threads.append(thread)
                stop_slots.wait(config.duration_s)
            finally:
                stop_slots.set()
                for thread in threads:
                    thread.join(config.resolve_timeout_s + 30)
                    if thread.is_alive():
                        self.recorder.violate(f"{thread.name} did not finish")
                self.undoer.finish()
                for error in self.undoer.errors:
                    self.recorder.violate(error)
                summary.elapsed_s = time.monotonic() - self.started
                closing = time.monotonic()
                self.runtime.close(timeout=60)
                summary.close_s = time.monotonic() - closing
                if summary.close_s > config.close_bound_s:
                    self.recorder.violate(
                        f"Runtime.close() took {summary.close_s:.1f}s (bound "
                        f"{config.close_bound_s:g}s): some instance never finished stopping"
                    )
                stop_watch.set()
                watcher.join(30)
                instance_starting.disconnect(self._on_starting)
            snapshots = self.runtime.instances()
            self.recorder.check_time(time.monotonic())
            self.recorder.final_check(snapshots)
        self._count_leftovers(summary)
        self._fill(summary, snapshots)
        return summary

    def _count_leftovers(self, summary: Summary) -> None:
        alive = self.recorder.leftover_processes()
        if alive:  # give a process that is exiting right now a moment (no sleep loop)
            _, alive = psutil.wait_procs(alive, timeout=2.0)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                summary.left_behind.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}")
                proc.kill()  # only servers this runtime started, checked against reuse
        if summary.left_behind:
            self.lost.add("processes left behind", len(summary.left_behind))
            for text in summary.left_behind:
                self.recorder.violate(f"left behind after close: {text}")

    def _fill(self, summary: Summary, snapshots: list[Any]) -> None:
        rec = self.recorder
        for ref in self.client_leases:
            if ref not in rec.leases:
                self.lost.add("resolutions without lease_granted")
        summary.runtime_instances = len(rec.instances)
        summary.faults = self.faults.counter()
        summary.operations = self.operations.counter()
        summary.resolve_errors = self.resolve_errors.counter()
        summary.transitions = rec.counts
        summary.release_reasons = rec.release_reasons
        summary.failure_kinds = rec.failure_kinds
        summary.restarts = rec.counts["instance_restarting"]
        summary.max_restarts_in_window = rec.max_restarts_in_window
        summary.max_lease_lateness_s = max(0.0, rec.max_lease_lateness_s)
        summary.late_grants = rec.late_grants
        summary.port_moves = rec.port_moves
        summary.servers_spawned = len(rec.processes)
        lat = sorted(self.latencies)
        summary.snapshot_samples = len(lat)
        if lat:
            summary.snapshot_max_s = lat[-1]
            summary.snapshot_p99_s = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        summary.logged_errors = list(rec.logged_errors)
        summary.lost = self.lost.counter() + rec.lost
        summary.violations = list(rec.violations)


def run_chaos(config: ChaosConfig) -> Summary:
    """Run one seeded chaos run (see the module docstring) and return its summary."""
    root = Path(tempfile.mkdtemp(prefix="llama-actors-chaos-", dir=config.workdir))
    try:
        return Engine(config, root).run()
    finally:
        shutil.rmtree(root, ignore_errors=True)

"""The runtime's contract as a hypothesis state machine, to run against any setup.

A :class:`ContractTarget` says how to make a :class:`~llama_actors.Runtime`, which
specs to resolve for which consumer, and how to crash a server. :func:`run_contract`
then drives fresh runtimes of it through resolve, renew, release, expiry, crash and
stop, in orders hypothesis chooses and shrinks, against a model of the live leases,
while a recorder checks every signal as it arrives. It fails (``AssertionError``,
with the steps that led there) when:

- a snapshot's ``lease_count`` differs from the model's live leases of that instance,
  or its ``state``, ``health`` or ``restart_count`` from what the signals said;
- a lease is granted on an instance that is certainly not ready: before its first
  ``instance_starting``, while it restarts, drains, or after it stopped or failed;
- a lease does not end exactly once with exactly one signal: ``lease_released``
  (``released``) for a release, ``lease_expired`` once its TTL ran out (never
  before), ``lease_released`` (``drained``, ``instance stopped`` or ``instance
  failed``) when its instance ended;
- ``renew`` of a live lease does not extend it to now + TTL, or renew of an ended
  one does not raise ``LeaseExpiredError`` (it expired) or ``LeaseNotFoundError``
  (released, ended with its instance, never granted); ``release`` is not True once
  and False afterwards;
- the signals of an instance break its lifecycle (ready before starting, anything
  after it stopped or failed, ``health_changed`` whose ``old`` is not the last
  ``new``, a restart while not ``unavailable``, a drain that names other leases);
- a crash is not handled as the target says: restarted (``instance_restarting``,
  and a resolve meanwhile waits and is granted on the same instance once it is
  ready again), or, for a server the runtime does not restart, reported
  ``unavailable`` and then healthy again or ended.

The runtime must use the real clock (grant and expiry times are compared with
``time.monotonic``), must not stop instances on its own (no ``idle_shutdown_ms``,
no wedge restarts) and must restart at least as often as the run crashes (raise
``max_restarts``). Each example makes one runtime and closes it, checking that every
instance ended and every lease ended once.
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, cast

import hypothesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from llama_actors import (
    BootSpec,
    ConsumerManifest,
    InstanceNotFoundError,
    Lease,
    LeaseExpiredError,
    LeaseNotFoundError,
    Resolution,
    Runtime,
    RuntimeSnapshot,
    UsageError,
)
from llama_actors.signals import ALL_SIGNALS

__all__ = [
    "ContractMachine",
    "ContractReport",
    "ContractTarget",
    "contract_machine",
    "kill_server",
    "run_contract",
]

_LONG_TTL_MS = 600_000  # outlives any run: such leases end only when the machine ends them
_ENDED_WITH_INSTANCE = frozenset({"drained", "instance stopped", "instance failed"})
_RELEASE_REASONS = _ENDED_WITH_INSTANCE | {"released"}
_TERMINAL = ("stopped", "failed")
_EPSILON = 1e-6  # float rounding in now + ttl / 1000
_UNKNOWN_REFS = ["", "nope", "lease-0000000000000000"]


def kill_server(runtime: Runtime, snapshot: RuntimeSnapshot) -> None:
    """Crash a spawned server: SIGKILL the process its snapshot names (the default
    crash of a :class:`ContractTarget`)."""
    if snapshot.pid is None:
        raise AssertionError(
            f"instance {snapshot.instance_id} has no pid to kill (state {snapshot.state}); "
            "give the ContractTarget a crash hook that fits its backend"
        )
    os.kill(snapshot.pid, signal.SIGKILL)


@dataclass(frozen=True)
class ContractTarget:
    """What the contract runs against.

    - ``make_runtime``: makes a fresh runtime; the contract closes it.
    - ``specs``: what to resolve, one instance per spec (distinct identities); one
      is enough, each more costs a server start per example.
    - ``consumer``: who resolves them.
    - ``crash(runtime, snapshot)``: make the server of that ready instance die, e.g.
      :func:`kill_server`, or kill an attached server and start it again.
    - ``crash_restarts``: True if the runtime restarts a crashed instance; False if
      it must only report it ``unavailable`` until it is healthy again (or end it).
    - ``name``: names the target in the report and in the failing steps.
    - ``short_ttl_ms``: the TTL of the leases the contract lets expire.
    - ``timeout``: the longest the contract waits for anything it is owed (a
      resolve, a signal, a restart), in seconds.
    """

    make_runtime: Callable[[], Runtime]
    specs: Sequence[BootSpec | Mapping[str, Any]]
    consumer: ConsumerManifest | Mapping[str, Any] | str = "contract"
    crash: Callable[[Runtime, RuntimeSnapshot], None] = kill_server
    crash_restarts: bool = True
    name: str = "runtime"
    short_ttl_ms: int = 300
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.specs:
            raise UsageError("a ContractTarget needs at least one spec to resolve")
        if self.short_ttl_ms <= 0 or not self.timeout > 0:
            raise UsageError(
                f"short_ttl_ms and timeout must be positive (got {self.short_ttl_ms!r}, "
                f"{self.timeout!r})"
            )


@dataclass(frozen=True)
class ContractReport:
    """What a contract run did: examples (runtimes) and steps run, how often each
    action ran, and how long it all took. Hypothesis may run an example or two more
    than ``max_examples``, and turns some actions off in each example."""

    target: str
    examples: int
    steps: int
    actions: dict[str, int]
    seconds: float


# -- the signals, as they arrive ----------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    index: int
    name: str
    instance_id: str
    payload: dict[str, Any]
    at: float  # time.monotonic() on arrival, in arrival order


@dataclass
class _Window:
    """A stretch of time during which an instance was certainly not ready."""

    since: float
    until: float | None
    why: str
    lasting: bool = False  # draining, stopped or failed: never ready again


@dataclass
class _InstanceView:
    phase: str = "new"  # new, starting, ready, restarting, stopped, failed
    health: str = "unknown"
    restarts: int = 0
    draining: bool = False
    live: set[str] = field(default_factory=set)
    unready: list[_Window] = field(
        default_factory=lambda: [_Window(-math.inf, None, "had not started yet")]
    )

    @property
    def state(self) -> str:
        """The state a snapshot should show."""
        return {"new": "starting", "restarting": "starting"}.get(self.phase, self.phase)

    def close_window(self, at: float) -> None:
        """The instance may be ready from ``at`` on (unless it drains or ended)."""
        for window in self.unready:
            if window.until is None and not window.lasting:
                window.until = at


@dataclass
class _LeaseView:
    instance_id: str
    expires_at: float
    renewals: int = 0
    ends: list[tuple[str, str]] = field(default_factory=list)  # (signal, reason)


class _Observer:
    """Records every runtime signal (receivers only append and notify) and checks
    them, in arrival order, in the contract's thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._records: list[_Record] = []
        self._receivers: list[tuple[Any, Any]] = []
        self._seen = 0
        self.instances: dict[str, _InstanceView] = {}
        self.leases: dict[str, _LeaseView] = {}
        self.violations: list[str] = []

    def connect(self) -> None:
        for name, sig in ALL_SIGNALS.items():

            def receive(sender: str, _name: str = name, **payload: Any) -> None:
                with self._cond:
                    at = time.monotonic()  # taken under the lock: arrival order is time order
                    self._records.append(_Record(len(self._records), _name, sender, payload, at))
                    self._cond.notify_all()

            sig.connect(receive, weak=False)
            self._receivers.append((sig, receive))

    def disconnect(self) -> None:
        for sig, receiver in self._receivers:
            sig.disconnect(receiver)
        self._receivers.clear()

    # -- waiting ----------------------------------------------------------------------

    def mark(self) -> int:
        """A position in the record: what arrives from now on is at or after it."""
        with self._cond:
            return len(self._records)

    def since(self, mark: int) -> list[_Record]:
        with self._cond:
            return self._records[mark:]

    def wait_changed(self, mark: int, timeout: float) -> bool:
        """Wait until a signal arrives at or after ``mark``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._records) > mark, timeout)

    def wait_record(
        self, mark: int, match: Callable[[_Record], bool], timeout: float
    ) -> _Record | None:
        """The first record at or after ``mark`` that matches, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for record in self._records[mark:]:
                    if match(record):
                        return record
                mark = len(self._records)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def names_since(self, mark: int, instance_id: str) -> list[str]:
        return [r.name for r in self.since(mark) if r.instance_id == instance_id]

    # -- checking ---------------------------------------------------------------------

    def advance(self) -> None:
        """Check the signals that arrived since the last call, in order."""
        with self._cond:
            new = self._records[self._seen :]
            self._seen = len(self._records)
        for record in new:
            view = self.instances.setdefault(record.instance_id, _InstanceView())
            handler = getattr(self, f"_on_{record.name}", None)
            if handler is not None:  # a signal newer than the contract is not checked
                handler(view, record)

    def _bad(self, text: str) -> None:
        self.violations.append(text)

    def _alive(self, view: _InstanceView, r: _Record) -> bool:
        if view.phase in _TERMINAL:
            self._bad(f"{r.instance_id}: {r.name} after the instance had {view.phase}")
            return False
        return True

    def _on_instance_starting(self, view: _InstanceView, r: _Record) -> None:
        if not self._alive(view, r):
            return
        if view.phase not in ("new", "restarting"):
            self._bad(f"{r.instance_id}: instance_starting while {view.phase}")
        view.phase = "starting"
        # From here on it may become ready at any moment: the grant check stops here.
        view.close_window(r.at)

    def _on_instance_ready(self, view: _InstanceView, r: _Record) -> None:
        if not self._alive(view, r):
            return
        if view.phase != "starting":
            self._bad(f"{r.instance_id}: instance_ready while {view.phase}, not starting")
        view.phase = "ready"

    def _on_health_changed(self, view: _InstanceView, r: _Record) -> None:
        old, new = r.payload.get("old"), r.payload.get("new")
        self._alive(view, r)
        if old != view.health:
            self._bad(
                f"{r.instance_id}: health_changed {old} -> {new}, but the last health "
                f"signalled was {view.health}"
            )
        if old == new:
            self._bad(f"{r.instance_id}: health_changed {old} -> {new} changes nothing")
        if new in ("healthy", "degraded") and view.phase != "ready":
            self._bad(f"{r.instance_id}: health {new} while {view.phase}, not ready")
        view.health = str(new)

    def _on_instance_restarting(self, view: _InstanceView, r: _Record) -> None:
        if not self._alive(view, r):
            return
        if view.phase not in ("ready", "starting"):
            self._bad(f"{r.instance_id}: instance_restarting while {view.phase}")
        if view.health != "unavailable":
            self._bad(
                f"{r.instance_id}: instance_restarting while its health is {view.health}; "
                "a crashed instance is reported unavailable first"
            )
        view.restarts += 1
        view.phase = "restarting"
        view.unready.append(_Window(r.at, None, "was restarting"))

    def _on_instance_draining(self, view: _InstanceView, r: _Record) -> None:
        self._alive(view, r)
        if view.draining:
            self._bad(f"{r.instance_id}: instance_draining twice")
        refs = set(r.payload.get("lease_refs") or ())
        if refs != view.live:
            self._bad(
                f"{r.instance_id}: instance_draining names {sorted(refs)}, but the live "
                f"leases are {sorted(view.live)}"
            )
        view.draining = True
        view.unready.append(_Window(r.at, None, "was draining", lasting=True))

    def _on_instance_stopped(self, view: _InstanceView, r: _Record) -> None:
        self._end_instance(view, r, "stopped")

    def _on_instance_failed(self, view: _InstanceView, r: _Record) -> None:
        self._end_instance(view, r, "failed")

    def _end_instance(self, view: _InstanceView, r: _Record, how: str) -> None:
        if not self._alive(view, r):
            return
        if view.health not in ("unknown", "unavailable"):
            self._bad(f"{r.instance_id}: {r.name} while its health is still {view.health}")
        view.phase = how
        view.unready.append(_Window(r.at, None, f"had {how}", lasting=True))

    def _on_lease_granted(self, view: _InstanceView, r: _Record) -> None:
        lease: Lease = r.payload["lease"]
        ref = lease.lease_ref
        if ref in self.leases:
            self._bad(f"lease {ref}: lease_granted twice")
            return
        if lease.instance_id != r.instance_id:
            self._bad(f"lease {ref}: granted on {lease.instance_id}, signalled by {r.instance_id}")
        # Windows that open later start after this arrival, so after the grant: only
        # those known now can hold it.
        for window in view.unready:
            if window.since <= lease.granted_at and (
                window.until is None or lease.granted_at <= window.until
            ):
                self._bad(
                    f"lease {ref}: granted on {r.instance_id} while it {window.why} "
                    "(a lease is granted only on a ready instance)"
                )
                break
        self.leases[ref] = _LeaseView(r.instance_id, lease.expires_at)
        view.live.add(ref)

    def _lease(self, r: _Record) -> _LeaseView | None:
        ref = r.payload["lease"].lease_ref
        lease = self.leases.get(ref)
        if lease is None:
            self._bad(f"lease {ref}: {r.name} for a lease never granted")
        return lease

    def _on_lease_renewed(self, view: _InstanceView, r: _Record) -> None:
        if (lease := self._lease(r)) is None:
            return
        if lease.ends:
            self._bad(f"lease {r.payload['lease'].lease_ref}: renewed after it ended {lease.ends}")
        lease.renewals += 1
        lease.expires_at = r.payload["lease"].expires_at

    def _on_lease_released(self, view: _InstanceView, r: _Record) -> None:
        reason = str(r.payload.get("reason"))
        ref = r.payload["lease"].lease_ref
        if reason not in _RELEASE_REASONS:
            self._bad(f"lease {ref}: released for an unknown reason {reason!r}")
        if reason == "drained" and not view.draining:
            self._bad(f"lease {ref}: released as drained, but no drain was signalled")
        if reason in ("instance stopped", "instance failed") and view.phase not in _TERMINAL:
            self._bad(f"lease {ref}: released for {reason!r} while {view.phase}")
        self._end_lease(view, r, reason)

    def _on_lease_expired(self, view: _InstanceView, r: _Record) -> None:
        lease = self.leases.get(r.payload["lease"].lease_ref)
        if lease is not None and r.at < lease.expires_at - _EPSILON:
            self._bad(
                f"lease {r.payload['lease'].lease_ref}: expired "
                f"{lease.expires_at - r.at:.3f}s before its expires_at"
            )
        self._end_lease(view, r, "expired")

    def _end_lease(self, view: _InstanceView, r: _Record, reason: str) -> None:
        if (lease := self._lease(r)) is None:
            return
        lease.ends.append((r.name, reason))
        if len(lease.ends) > 1:
            self._bad(f"lease {r.payload['lease'].lease_ref}: ended more than once: {lease.ends}")
        view.live.discard(r.payload["lease"].lease_ref)


# -- the model ----------------------------------------------------------------------------


@dataclass
class _ModelLease:
    instance_id: str
    ttl_ms: int
    expires_at: float
    renewals: int = 0
    end: str | None = None  # "released", "expired", or "ended" (with its instance)


@dataclass
class _ModelInstance:
    spec_index: int
    restarts: int = 0
    ended: str | None = None  # "stopped" or "failed"


@dataclass
class _Tally:
    examples: int = 0
    steps: int = 0
    actions: Counter[str] = field(default_factory=Counter)


def _fail(text: str) -> NoReturn:
    raise AssertionError(f"the runtime broke its contract: {text}")


def _expect(ok: bool, text: str) -> None:
    if not ok:
        _fail(text)


_picks = st.integers(0, 7)
_owners = st.sampled_from([None, "owner-a", "owner-b"])


class ContractMachine(RuleBasedStateMachine):
    """The contract's state machine; make one for a target with
    :func:`contract_machine` (this base has no target)."""

    target: ClassVar[ContractTarget]
    tally: ClassVar[_Tally]
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.observer = _Observer()
        self.observer.connect()
        try:
            self.runtime = self.target.make_runtime()
        except BaseException:
            self.observer.disconnect()
            raise
        self.model_leases: dict[str, _ModelLease] = {}
        self.model_instances: dict[str, _ModelInstance] = {}
        self.current: dict[int, str] = {}  # spec index -> its live instance
        self.tally.examples += 1

    # -- helpers ------------------------------------------------------------------------

    def _did(self, action: str) -> None:
        self.tally.steps += 1
        self.tally.actions[action] += 1

    def _live(self, instance_id: str) -> set[str]:
        return {
            ref
            for ref, lease in self.model_leases.items()
            if lease.instance_id == instance_id and lease.end is None
        }

    def _pick_instance(self, pick: int) -> str:
        live = sorted(self.current.items())
        return live[pick % len(live)][1]

    def _resolve(self, pick: int, owner: str | None, ttl_ms: int) -> Resolution:
        index = pick % len(self.target.specs)
        known = self.current.get(index)
        before = time.monotonic()
        resolution = self.runtime.resolve_endpoint(
            self.target.specs[index],
            self.target.consumer,
            owner_ref=owner,
            ttl_ms=ttl_ms,
            timeout=self.target.timeout,
        )
        after = time.monotonic()
        lease = resolution.lease
        ref, iid = lease.lease_ref, lease.instance_id
        what = f"resolve of spec {index} granted lease {ref} on {iid}"
        _expect(resolution.instance.instance_id == iid, f"{what}, but its snapshot is another's")
        _expect(resolution.endpoint.lease_ref == ref, f"{what}, but its endpoint has another ref")
        _expect(
            resolution.endpoint.endpoint_id == f"{iid}:endpoint",
            f"{what}, but its endpoint_id is {resolution.endpoint.endpoint_id}",
        )
        _expect(
            (lease.owner_ref, lease.ttl_ms) == (owner, ttl_ms),
            f"{what} to {lease.owner_ref} for {lease.ttl_ms} ms, asked: {owner} for {ttl_ms} ms",
        )
        _expect(
            before <= lease.granted_at <= after,
            f"{what} at {lease.granted_at}, outside the call ({before}..{after}) on the real "
            "clock; the contract needs a Runtime on the real clock",
        )
        _expect(
            abs(lease.expires_at - (lease.granted_at + ttl_ms / 1000)) <= _EPSILON,
            f"{what}: expires_at is not granted_at + ttl",
        )
        _expect(ref not in self.model_leases, f"{what}: that ref was granted before")
        _expect(
            resolution.instance.state == "ready",
            f"{what} on an instance that is {resolution.instance.state}",
        )
        if known is not None:
            _expect(iid == known, f"{what}, but {known} serves that spec and is live")
            _expect(resolution.reused, f"{what}: reused is False on a running instance")
        else:
            others = {i for i, m in self.model_instances.items() if m.spec_index != index}
            _expect(iid not in others, f"{what}, which serves another spec: give distinct specs")
            _expect(iid not in self.model_instances, f"{what}, which had ended before")
            _expect(not resolution.reused, f"{what}: a new instance, yet reused is True")
            self.model_instances[iid] = _ModelInstance(index)
            self.current[index] = iid
        self.model_leases[ref] = _ModelLease(iid, ttl_ms, lease.expires_at)
        _expect(
            resolution.instance.lease_count == len(self._live(iid)),
            f"{what}: its snapshot counts {resolution.instance.lease_count} leases, "
            f"{len(self._live(iid))} are live",
        )
        return resolution

    def _renew(self, ref: str, ttl_ms: int | None) -> Lease:
        model = self.model_leases[ref]
        before = time.monotonic()
        lease = self.runtime.renew(ref, ttl_ms)
        after = time.monotonic()
        ttl = model.ttl_ms if ttl_ms is None else ttl_ms
        what = f"renew({ref}, ttl_ms={ttl_ms}) returned a lease"
        _expect(
            (lease.lease_ref, lease.instance_id, lease.ttl_ms) == (ref, model.instance_id, ttl),
            f"{what} {lease.lease_ref} on {lease.instance_id} for {lease.ttl_ms} ms",
        )
        _expect(
            before + ttl / 1000 - _EPSILON <= lease.expires_at <= after + ttl / 1000 + _EPSILON,
            f"{what} expiring at {lease.expires_at}, not now + {ttl} ms "
            f"({before + ttl / 1000}..{after + ttl / 1000})",
        )
        if ttl >= model.ttl_ms:
            _expect(lease.expires_at > model.expires_at, f"{what} that it did not extend")
        model.ttl_ms, model.expires_at = ttl, lease.expires_at
        model.renewals += 1
        return lease

    def _renew_fails(self, ref: str) -> None:
        end = self.model_leases[ref].end if ref in self.model_leases else None
        expected = LeaseExpiredError if end == "expired" else LeaseNotFoundError
        how = {"released": "was released", "expired": "expired", "ended": "ended with its instance"}
        what = f"renew({ref!r}) of a lease that {how.get(end or '', 'was never granted')}"
        try:
            got = self.runtime.renew(ref)
        except (LeaseExpiredError, LeaseNotFoundError) as exc:
            _expect(
                type(exc) is expected,
                f"{what} raised {type(exc).__name__}, not {expected.__name__}",
            )
            _expect(exc.lease_ref == ref, f"{what} raised an error about {exc.lease_ref}")
        else:
            _fail(f"{what} returned {got}; it must raise {expected.__name__}")

    def _release_is_idempotent(self, ref: str) -> None:
        again = self.runtime.release(ref)
        _expect(
            again is False,
            f"release({ref!r}) returned {again!r}; a lease that ended, or never was, releases as "
            "False",
        )

    def _await_expiry(self, ref: str) -> None:
        model = self.model_leases[ref]
        wait = self.target.timeout + max(0.0, model.expires_at - time.monotonic())
        found = self.observer.wait_record(
            0,
            lambda r: (
                r.name in ("lease_expired", "lease_released")
                and r.payload["lease"].lease_ref == ref
            ),
            wait,
        )
        if found is None:
            _fail(
                f"lease {ref} (ttl {model.ttl_ms} ms) did not expire: no lease_expired "
                f"within {wait:g}s"
            )
        _expect(found.name == "lease_expired", f"lease {ref} ended with {found.name}, not expiry")
        model.end = "expired"
        self._renew_fails(ref)
        self._release_is_idempotent(ref)

    def _instance_ended(self, instance_id: str, how: str) -> None:
        self.model_instances[instance_id].ended = how
        self.current = {i: iid for i, iid in self.current.items() if iid != instance_id}
        for ref in self._live(instance_id):
            self.model_leases[ref].end = "ended"

    # -- rules ----------------------------------------------------------------------------

    @initialize(target=leases)
    def resolve_the_first_spec(self) -> str:
        self._did("resolve")
        return self._resolve(0, None, _LONG_TTL_MS).lease.lease_ref

    @rule(target=leases, pick=_picks, owner=_owners)
    def resolve(self, pick: int, owner: str | None) -> str:
        self._did("resolve")
        return self._resolve(pick, owner, _LONG_TTL_MS).lease.lease_ref

    @rule(ref=leases, ttl_ms=st.sampled_from([None, _LONG_TTL_MS]))
    def renew(self, ref: str, ttl_ms: int | None) -> None:
        self._did("renew")
        if self.model_leases[ref].end is None:
            self._renew(ref, ttl_ms)
        else:
            self._renew_fails(ref)

    @rule(ref=leases)
    def release(self, ref: str) -> None:
        self._did("release")
        model = self.model_leases[ref]
        live = model.end is None
        got = self.runtime.release(ref)
        _expect(
            got is live,
            f"release({ref}) of a {'live' if live else model.end} lease returned {got!r}",
        )
        if live:
            model.end = "released"
        self._release_is_idempotent(ref)

    @rule(target=leases, pick=_picks)
    def let_a_new_lease_expire(self, pick: int) -> str:
        self._did("expire")
        ref = self._resolve(pick, "short-lived", self.target.short_ttl_ms).lease.lease_ref
        self._await_expiry(ref)
        return ref

    @rule(ref=leases)
    def renew_briefly_and_let_it_expire(self, ref: str) -> None:
        self._did("expire")
        if self.model_leases[ref].end is not None:
            self._renew_fails(ref)
            return
        self._renew(ref, self.target.short_ttl_ms)
        self._await_expiry(ref)

    @rule(ref=st.sampled_from(_UNKNOWN_REFS))
    def use_a_ref_never_granted(self, ref: str) -> None:
        self._did("unknown ref")
        self._renew_fails(ref)
        self._release_is_idempotent(ref)

    @precondition(lambda self: bool(self.current))
    @rule(target=leases, pick=_picks)
    def crash(self, pick: int) -> Any:
        self._did("crash")
        iid = self._pick_instance(pick)
        mark = self.observer.mark()
        self.target.crash(self.runtime, self.runtime.snapshot(iid))
        if self.target.crash_restarts:
            return self._restarted(iid, mark)
        self._noticed_without_restart(iid, mark)
        return multiple()

    def _restarted(self, iid: str, mark: int) -> str:
        record = self.observer.wait_record(
            mark,
            lambda r: (
                r.instance_id == iid
                and r.name in ("instance_restarting", "instance_failed", "instance_stopped")
            ),
            self.target.timeout,
        )
        if record is None:
            _fail(
                f"{iid} crashed but was neither restarted nor ended within "
                f"{self.target.timeout:g}s; its signals since: "
                f"{self.observer.names_since(mark, iid)}"
            )
        _expect(
            record.name == "instance_restarting",
            f"{iid} crashed and sent {record.name} ({record.payload.get('reason')}), but the "
            "target says crashes restart (if max_restarts ran out, raise it for the contract)",
        )
        self.model_instances[iid].restarts += 1
        # Resolved while it restarts: the caller waits, and is granted on the same
        # instance once it is ready again.
        index = self.model_instances[iid].spec_index
        return self._resolve(index, "during-restart", _LONG_TTL_MS).lease.lease_ref

    def _noticed_without_restart(self, iid: str, mark: int) -> None:
        def after(wanted: str) -> Callable[[_Record], bool]:
            return lambda r: (
                r.instance_id == iid
                and (
                    r.name in ("instance_restarting", "instance_failed", "instance_stopped")
                    or (r.name == "health_changed" and r.payload.get("new") == wanted)
                )
            )

        noticed = self.observer.wait_record(mark, after("unavailable"), self.target.timeout)
        if noticed is not None and noticed.name == "health_changed":
            noticed = self.observer.wait_record(
                noticed.index + 1, after("healthy"), self.target.timeout
            )
        if noticed is None:
            _fail(
                f"{iid} crashed, and within {self.target.timeout:g}s it was not reported "
                "unavailable and then healthy again (nor ended); its signals since: "
                f"{self.observer.names_since(mark, iid)}"
            )
        _expect(
            noticed.name != "instance_restarting",
            f"{iid} was restarted after its crash, but the target says the runtime never "
            "restarts it (crash_restarts=False)",
        )
        if noticed.name != "health_changed":
            self._instance_ended(iid, noticed.name.removeprefix("instance_"))

    @precondition(lambda self: bool(self.current))
    @rule(pick=_picks, drain=st.sampled_from([0.0, 0.1]))
    def stop(self, pick: int, drain: float) -> None:
        self._did("stop")
        iid = self._pick_instance(pick)
        held = self._live(iid)
        mark = self.observer.mark()
        snapshot = self.runtime.stop_instance(
            iid, drain_timeout=drain, timeout=self.target.timeout + drain
        )
        _expect(
            (snapshot.state, snapshot.lease_count) == ("stopped", 0),
            f"stop_instance({iid}) returned a snapshot {snapshot.state} with "
            f"{snapshot.lease_count} leases, not stopped with none",
        )
        self._instance_ended(iid, "stopped")
        drains = [
            set(r.payload.get("lease_refs") or ())
            for r in self.observer.since(mark)
            if r.name == "instance_draining" and r.instance_id == iid
        ]
        _expect(
            drains == ([held] if held else []),
            f"stop_instance({iid}) holding {sorted(held)} signalled drains {drains}",
        )
        again = self.runtime.stop_instance(iid, timeout=self.target.timeout)
        _expect(again.state == "stopped", f"a second stop_instance({iid}) says {again.state}")

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def the_runtime_agrees_with_the_model_and_its_signals(self) -> None:
        self._agree()

    def _agree(self) -> None:
        """Wait until the snapshots, the signals and the model agree (a signal may
        follow the snapshot change it announces); fail if they do not in time."""
        deadline = time.monotonic() + self.target.timeout
        while True:
            mark = self.observer.mark()
            self.observer.advance()
            if self.observer.violations:
                _fail("its signals broke the rules:\n- " + "\n- ".join(self.observer.violations))
            problems = self._disagreements()
            if not problems:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.observer.wait_changed(mark, remaining):
                _fail(
                    f"after {self.target.timeout:g}s, the snapshots, the signals and the "
                    "model still disagree:\n- " + "\n- ".join(problems)
                )

    def _disagreements(self) -> list[str]:
        problems = []
        for iid, model in self.model_instances.items():
            try:
                snap = self.runtime.snapshot(iid)
            except InstanceNotFoundError:
                problems.append(f"{iid}: the runtime has no snapshot of it any more")
                continue
            view = self.observer.instances.get(iid, _InstanceView())
            live = self._live(iid)
            expected = model.ended or "ready"
            if snap.lease_count != len(live):
                problems.append(
                    f"{iid}: the snapshot counts {snap.lease_count} leases, the model has "
                    f"{len(live)} live: {sorted(live)}"
                )
            if view.live != live:
                problems.append(
                    f"{iid}: by its signals the live leases are {sorted(view.live)}, by the "
                    f"model {sorted(live)}"
                )
            if snap.state != expected or view.state != expected:
                problems.append(
                    f"{iid}: the snapshot says {snap.state}, its signals {view.state}, "
                    f"the model {expected}"
                )
            if snap.health != view.health:
                problems.append(
                    f"{iid}: the snapshot's health is {snap.health}, its signals say {view.health}"
                )
            if not snap.restart_count == view.restarts == model.restarts:
                problems.append(
                    f"{iid}: restart_count {snap.restart_count}, restarts signalled "
                    f"{view.restarts}, crashes restarted {model.restarts}"
                )
        for ref, model_lease in self.model_leases.items():
            seen = self.observer.leases.get(ref)
            ends = seen.ends if seen is not None else []
            if seen is None:
                problems.append(f"lease {ref}: granted, but no lease_granted signal")
            elif seen.renewals != model_lease.renewals:
                problems.append(
                    f"lease {ref}: renewed {model_lease.renewals} times, "
                    f"{seen.renewals} lease_renewed signals"
                )
            expected_end = {
                None: [],
                "released": [("lease_released", "released")],
                "expired": [("lease_expired", "expired")],
            }.get(model_lease.end)
            if expected_end is None:  # ended with its instance
                if len(ends) != 1 or ends[0][1] not in _ENDED_WITH_INSTANCE:
                    problems.append(
                        f"lease {ref}: its instance ended; its end signals are {ends}, expected "
                        f"one lease_released with a reason in {sorted(_ENDED_WITH_INSTANCE)}"
                    )
            elif ends != expected_end:
                problems.append(
                    f"lease {ref}: {model_lease.end or 'live'}; its end signals are {ends}, "
                    f"expected {expected_end}"
                )
        return problems

    def teardown(self) -> None:
        failing = sys.exc_info()[1] is not None  # a step failed: that is the report
        try:
            self.runtime.close(timeout=self.target.timeout)
            if failing:
                return
            for iid in list(self.current.values()):
                self._instance_ended(iid, "stopped")
            self._agree()
            for snap in self.runtime.instances():
                _expect(
                    snap.instance_id in self.model_instances,
                    f"{snap.instance_id} runs in the runtime, but the contract never resolved it",
                )
                _expect(snap.pid is None, f"{snap.instance_id}: pid {snap.pid} after close")
            for ref in self.model_leases:
                _expect(self.runtime.release(ref) is False, f"release({ref}) after close")
        finally:
            self.observer.disconnect()


def contract_machine(target: ContractTarget) -> type[ContractMachine]:
    """The contract's state machine for ``target``, for hypothesis to run (for
    example as ``contract_machine(target).TestCase``)."""
    name = "Contract_" + re.sub(r"\W+", "_", target.name).strip("_")
    machine = type(name, (ContractMachine,), {"target": target, "tally": _Tally()})
    return cast("type[ContractMachine]", _settings(None, 6, 20)(machine))


def run_contract(
    target: ContractTarget,
    *,
    max_examples: int = 6,
    steps: int = 20,
    settings: hypothesis.settings | None = None,
) -> ContractReport:
    """Run the contract against ``target``: ``max_examples`` runtimes, each driven
    through up to ``steps`` actions. ``settings`` (hypothesis) is the base of the
    run's own. Raises ``AssertionError`` with the failing steps when it is broken."""
    machine = contract_machine(target)
    started = time.monotonic()
    run_state_machine_as_test(machine, settings=_settings(settings, max_examples, steps))
    tally = machine.tally
    return ContractReport(
        target=target.name,
        examples=tally.examples,
        steps=tally.steps,
        actions=dict(sorted(tally.actions.items())),
        seconds=round(time.monotonic() - started, 3),
    )


def _settings(
    parent: hypothesis.settings | None, max_examples: int, steps: int
) -> hypothesis.settings:
    return hypothesis.settings(
        parent,
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,  # steps wait on servers: their time says nothing about the contract
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )

"""The real LeaseBroker actor, driven on a manual clock and checked against a model.

The model is a dict of live leases with their expiry times plus what the broker owes
the supervisor (``Drained``, ``IdleExpired``). Time only moves in ``advance``, which
steps to each time something is due (an expiry, a drain deadline, an idle shutdown),
so every timer message is handled at exactly its time and the outcome is
deterministic. Timer callbacks only *tell* the actor, so each step ends by sending a
request and waiting for its answer: the mailbox is FIFO, so everything told before has
been handled by then.
"""

from __future__ import annotations

import random
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pykka
import pytest
from hypothesis import given, settings
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

import llama_actors
from llama_actors import EndpointDescriptor, InstancePolicy
from llama_actors._exceptions import (
    InstanceNotFoundError,
    LeaseExpiredError,
    LeaseNotFoundError,
    NotReadyError,
)
from llama_actors._runtime.board import StatusBoard
from llama_actors._runtime.broker import LeaseBroker
from llama_actors._runtime.context import Context
from llama_actors._runtime.messages import (
    CancelGrant,
    Drained,
    DrainInstance,
    GrantLease,
    IdleExpired,
    InstanceGone,
    ReleaseLease,
    RenewLease,
    TrackInstance,
)
from llama_actors.lowlevel import LlamaCppBackend, ManualTimers
from llama_actors.signals import (
    instance_draining,
    lease_expired,
    lease_granted,
    lease_released,
    lease_renewed,
)

WAIT_S = 5.0  # every wait on the actor; a healthy broker answers in milliseconds
UNKNOWN_INSTANCE = "inst-not-on-the-board"
STOPPED = "instance stopped"
SPEC = llama_actors.boot_spec({"model": "/m.gguf"})
COMPAT = llama_actors.compatibility({"consumer": "t"})


def endpoint(instance_id: str) -> EndpointDescriptor:
    return LlamaCppBackend().endpoint(
        SPEC, instance_id=instance_id, port=8080, plan=None, compatibility=COMPAT
    )


class _Dump:
    """Ask a :class:`Recorder` for what it has been told so far."""


class Recorder(pykka.ThreadingActor):
    """Stands in for the Supervisor: records every message the broker tells it."""

    use_daemon_thread = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Dump):
            return list(self.seen)
        self.seen.append(message)
        return None


class SignalLog:
    """Every lease signal, in order, as (kind, lease_ref, detail); waitable."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []
        self.draining: list[tuple[str, tuple[str, ...], str]] = []
        self._cond = threading.Condition()
        self._receivers: list[tuple[Any, Callable[..., None]]] = []

    def connect(self) -> None:
        def on(kind: str) -> Callable[..., None]:
            def receive(sender: str, **kw: Any) -> None:
                lease = kw["lease"]
                assert sender == lease.instance_id == kw["instance_id"]
                with self._cond:
                    self.events.append((kind, lease.lease_ref, kw.get("reason", kind)))
                    self._cond.notify_all()

            return receive

        def on_draining(sender: str, **kw: Any) -> None:
            with self._cond:
                self.draining.append((sender, tuple(sorted(kw["lease_refs"])), kw["reason"]))

        for signal, receiver in (
            (lease_granted, on("granted")),
            (lease_renewed, on("renewed")),
            (lease_released, on("released")),
            (lease_expired, on("expired")),
            (instance_draining, on_draining),
        ):
            signal.connect(receiver, weak=False)
            self._receivers.append((signal, receiver))

    def disconnect(self) -> None:
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self._receivers.clear()

    def wait_for(self, predicate: Callable[[list[tuple[str, str, Any]]], bool]) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.events), timeout=WAIT_S)

    def of(self, ref: str) -> list[tuple[str, str, Any]]:
        with self._cond:
            return [e for e in self.events if e[1] == ref]


@dataclass
class ModelLease:
    instance_id: str
    ttl_ms: int
    expires_at: float


class Harness:
    """A LeaseBroker on ManualTimers, a recording supervisor, and the signal log."""

    def __init__(self) -> None:
        self.signals = SignalLog()
        self.tmp = tempfile.TemporaryDirectory(prefix="lease-broker-")
        self.timers = ManualTimers()
        self.board = StatusBoard()
        self.ctx = Context(
            timers=self.timers,
            board=self.board,
            client=httpx.Client(trust_env=False),
            state_dir=Path(self.tmp.name),
            rng=random.Random(0),  # noqa: S311 - not used for security
            policy=InstancePolicy(),
            lease_ttl_ms=1000,
        )
        self.supervisor = Recorder.start()
        self.ctx.supervisor = self.supervisor
        self.broker = LeaseBroker.start(context=self.ctx)
        self.ctx.broker = self.broker
        self.signals.connect()
        self._requests = 0

    def close(self) -> None:
        self.signals.disconnect()
        for ref in (self.broker, self.supervisor):
            if ref.is_alive():
                ref.stop(timeout=WAIT_S)
        self.ctx.client.close()
        self.tmp.cleanup()

    def track(self, instance_id: str, idle_shutdown_ms: int | None) -> None:
        self.board.add(instance_id, f"key-{instance_id}", None)
        # The broker grants only on a ready instance, as the backend would have made it.
        self.board.ready(instance_id, port=8080, pid=None, endpoint=endpoint(instance_id))
        idle_s = None if idle_shutdown_ms is None else idle_shutdown_ms / 1000
        self.broker.tell(TrackInstance(instance_id=instance_id, idle_shutdown_s=idle_s))

    def request_id(self) -> str:
        self._requests += 1
        return f"req-{self._requests}"

    def grant(
        self, instance_id: str, ttl_ms: int, owner_ref: str | None = None, request_id: str = ""
    ) -> Any:
        reply = pykka.ThreadingFuture()
        self.broker.tell(
            GrantLease(
                request_id=request_id or self.request_id(),
                instance_id=instance_id,
                endpoint=endpoint(instance_id),
                compatibility=COMPAT,
                owner_ref=owner_ref,
                ttl_ms=ttl_ms,
                reused=False,
                reply=reply,
            )
        )
        return reply.get(timeout=WAIT_S)

    def renew(self, ref: str, ttl_ms: int | None = None) -> Any:
        reply = pykka.ThreadingFuture()
        self.broker.tell(RenewLease(lease_ref=ref, ttl_ms=ttl_ms, reply=reply))
        return reply.get(timeout=WAIT_S)

    def release(self, ref: str) -> bool:
        reply = pykka.ThreadingFuture()
        self.broker.tell(ReleaseLease(lease_ref=ref, reply=reply))
        return bool(reply.get(timeout=WAIT_S))

    def sync(self) -> None:
        """Wait until the broker has handled everything told to it before now."""
        assert self.release("lease-sync-never-granted") is False

    def told_supervisor(self) -> list[Any]:
        self.sync()
        return list(self.supervisor.ask(_Dump(), timeout=WAIT_S))

    def lease_count(self, instance_id: str) -> int:
        snapshot = self.board.snapshot(instance_id)
        assert snapshot is not None
        return snapshot.lease_count


# None: keep running when the last lease ends (the default); else stop after that long.
idle_policies = st.none() | st.integers(1, 2000)
instance_picks = st.integers(0, 7)
# Often short, so that drains run out while their leases are still live.
drain_timeouts = st.sampled_from([0, 1]) | st.integers(0, 3000)
ttls = st.integers(1, 10_000)  # ms; `advance` moves at most 2.5 s, so some leases live long
unknown_refs = st.one_of(
    st.sampled_from(["", "lease-", "lease-0000000000000000", "nope"]),
    st.text(max_size=12),
)


class LeaseBrokerMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness()
        self.live: dict[str, ModelLease] = {}
        self.ended: dict[str, str] = {}  # ref -> "released" | "expired" | "drained" | STOPPED
        self.renewals: Counter[str] = Counter()
        self.request_of: dict[str, str] = {}  # ref -> the request that granted it
        self.instance_of: dict[str, str] = {}  # ref -> the instance it was granted on
        self.instance_ids: list[str] = []
        self.idle_ms: dict[str, int | None] = {}
        self.closed: set[str] = set()
        self.drain_due: dict[str, float] = {}
        self.idle_due: dict[str, float] = {}
        self.owed: Counter[tuple[str, str]] = Counter()  # (message, instance) to supervisor
        self.drains: list[tuple[str, tuple[str, ...], str]] = []

    def teardown(self) -> None:
        self.h.close()

    # -- the model ----------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.h.timers.now()

    def count(self, instance_id: str) -> int:
        return sum(1 for lease in self.live.values() if lease.instance_id == instance_id)

    def end(self, ref: str, reason: str) -> ModelLease:
        lease = self.live.pop(ref)
        self.ended[ref] = reason
        return lease

    def after_end(self, instance_id: str) -> None:
        """A lease ended by release or expiry: maybe the drain is done, or idle begins."""
        if self.count(instance_id) > 0:
            return
        if instance_id in self.drain_due:
            del self.drain_due[instance_id]
            self.owed["Drained", instance_id] += 1
        elif (idle := self.idle_ms.get(instance_id)) is not None:
            self.idle_due[instance_id] = self.now + idle / 1000

    def next_due(self) -> float | None:
        due = [lease.expires_at for lease in self.live.values()]
        due += [*self.drain_due.values(), *self.idle_due.values()]
        return min(due, default=None)

    def step_to(self, when: float) -> None:
        """Advance the clock to ``when`` (something is due then) and check the outcome."""
        self.h.timers.advance(when - self.now)
        assert self.now == when
        expired = sorted(ref for ref, lease in self.live.items() if lease.expires_at <= when)
        for ref in expired:
            self.after_end(self.end(ref, "expired").instance_id)
        for iid, due in sorted(self.drain_due.items()):
            if due <= when:
                for ref in [r for r, lease in self.live.items() if lease.instance_id == iid]:
                    self.end(ref, "drained")
                del self.drain_due[iid]
                self.owed["Drained", iid] += 1
        for iid, due in sorted(self.idle_due.items()):
            if due <= when:
                del self.idle_due[iid]
                self.owed["IdleExpired", iid] += 1
        # The broker's own wake-up ends expired leases: no other message is needed.
        assert self.h.signals.wait_for(
            lambda events: all(("expired", ref, "expired") in events for ref in expired)
        ), f"leases {expired} were not expired by the broker's wake-up at {when}"
        self.h.sync()

    def advance_to(self, target: float) -> None:
        while (when := self.next_due()) is not None and when <= target:
            self.step_to(when)
        self.h.timers.advance(target - self.now)
        self.h.sync()

    # -- rules --------------------------------------------------------------------------

    @initialize(target=leases, idle_ms=idle_policies, ttl_ms=st.lists(ttls, max_size=3))
    def start_with_an_instance_and_some_leases(self, idle_ms: int | None, ttl_ms: list[int]) -> Any:
        self.start_instance(idle_ms)
        return multiple(*(self.grant(0, ttl, None) for ttl in ttl_ms))

    @rule(idle_ms=idle_policies)
    def start_instance(self, idle_ms: int | None) -> None:
        """What the supervisor does for a ready instance: board row, then track it."""
        instance_id = f"inst-{len(self.instance_ids)}"
        self.h.track(instance_id, idle_ms)
        self.h.sync()
        self.instance_ids.append(instance_id)
        self.idle_ms[instance_id] = idle_ms

    @rule(
        target=leases,
        instance=instance_picks,
        ttl_ms=ttls,
        owner_ref=st.none() | st.sampled_from(["owner-1", "owner-2"]),
    )
    def grant(self, instance: int, ttl_ms: int, owner_ref: str | None) -> Any:
        """Grant on one of the instances (0 is the newest, 1 the one before, ...)."""
        instance_id = self.instance_ids[-1 - instance % len(self.instance_ids)]
        request_id = self.h.request_id()
        if instance_id in self.closed:
            with pytest.raises(NotReadyError):
                self.h.grant(instance_id, ttl_ms, owner_ref, request_id)
            return multiple()
        resolution = self.h.grant(instance_id, ttl_ms, owner_ref, request_id)
        lease = resolution.lease
        ref = lease.lease_ref
        assert ref not in self.live
        assert ref not in self.ended
        assert lease.instance_id == instance_id
        assert lease.owner_ref == owner_ref
        assert lease.ttl_ms == ttl_ms
        assert lease.granted_at == self.now
        assert lease.expires_at == self.now + ttl_ms / 1000
        assert resolution.endpoint.lease_ref == ref
        assert resolution.endpoint.endpoint_id == f"{instance_id}:endpoint"
        assert resolution.compatibility == COMPAT
        self.live[ref] = ModelLease(instance_id, ttl_ms, lease.expires_at)
        self.request_of[ref] = request_id
        self.instance_of[ref] = instance_id
        self.idle_due.pop(instance_id, None)  # a grant cancels a pending idle shutdown
        assert resolution.instance.lease_count == self.count(instance_id)
        return ref

    @rule(ref=unknown_refs, ttl_ms=st.integers(1, 3000))
    def use_what_was_never_granted(self, ref: str, ttl_ms: int) -> None:
        """No grant for an instance not on the board; unknown refs: renew fails, release
        says False."""
        with pytest.raises(InstanceNotFoundError):
            self.h.grant(UNKNOWN_INSTANCE, ttl_ms)
        with pytest.raises(LeaseNotFoundError):
            self.h.renew(ref)
        assert self.h.release(ref) is False

    @rule(ref=leases, ttl_ms=st.none() | ttls)
    def renew(self, ref: str, ttl_ms: int | None) -> None:
        if ref in self.live:
            model = self.live[ref]
            assert model.expires_at > self.now
            lease = self.h.renew(ref, ttl_ms)
            model.ttl_ms = model.ttl_ms if ttl_ms is None else ttl_ms
            model.expires_at = self.now + model.ttl_ms / 1000
            assert lease.lease_ref == ref
            assert lease.ttl_ms == model.ttl_ms
            assert lease.expires_at == model.expires_at
            self.renewals[ref] += 1
        elif self.ended[ref] == "expired":
            with pytest.raises(LeaseExpiredError) as info:
                self.h.renew(ref, ttl_ms)
            assert info.value.lease_ref == ref
        else:
            with pytest.raises(LeaseNotFoundError) as info:
                self.h.renew(ref, ttl_ms)
            assert info.value.lease_ref == ref

    @rule(ref=leases)
    def release(self, ref: str) -> None:
        was_live = ref in self.live
        assert self.h.release(ref) is was_live
        if was_live:
            self.after_end(self.end(ref, "released").instance_id)
        assert self.h.release(ref) is False  # idempotent

    @rule(ref=leases)
    def cancel_the_grant(self, ref: str) -> None:
        """The caller gave up after its grant went through: its lease is released."""
        self.h.broker.tell(CancelGrant(request_id=self.request_of[ref]))
        self.h.sync()
        if ref in self.live:
            self.after_end(self.end(ref, "released").instance_id)

    @rule(dt_ms=st.integers(0, 2500))
    def advance(self, dt_ms: int) -> None:
        self.advance_to(self.now + dt_ms / 1000)

    @precondition(lambda self: self.next_due() is not None)
    @rule()
    def advance_to_the_next_deadline(self) -> None:
        when = self.next_due()
        assert when is not None
        self.advance_to(max(when, self.now))

    @rule(ref=leases, drain_timeout_ms=st.none() | drain_timeouts)
    def stop_instance(self, ref: str, drain_timeout_ms: int | None) -> None:
        """Stop the instance a lease was granted on (so stops often find leases to end):
        drain it (holders get ``drain_timeout_ms`` to let go), or it is gone at once."""
        instance_id = self.instance_of[ref]
        if drain_timeout_ms is None:
            self.instance_gone(instance_id)
        else:
            self.drain(instance_id, drain_timeout_ms)

    def instance_gone(self, instance_id: str) -> None:
        self.h.broker.tell(InstanceGone(instance_id=instance_id, reason=STOPPED))
        self.h.sync()
        self.closed.add(instance_id)
        for ref in [r for r, lease in self.live.items() if lease.instance_id == instance_id]:
            self.end(ref, STOPPED)
        self.drain_due.pop(instance_id, None)
        self.idle_due.pop(instance_id, None)

    def drain(self, instance_id: str, timeout_ms: int) -> None:
        self.h.broker.tell(
            DrainInstance(instance_id=instance_id, timeout_s=timeout_ms / 1000, reason="stop")
        )
        self.h.sync()
        if instance_id in self.drain_due:
            return  # already draining: nothing new happens
        self.closed.add(instance_id)
        self.idle_due.pop(instance_id, None)
        refs = sorted(r for r, lease in self.live.items() if lease.instance_id == instance_id)
        if refs:  # holders are told; with none, nobody is
            self.drains.append((instance_id, tuple(refs), "stop"))
            self.drain_due[instance_id] = self.now + timeout_ms / 1000
        else:
            self.owed["Drained", instance_id] += 1

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def no_lease_is_live_past_its_ttl(self) -> None:
        for ref, lease in self.live.items():
            assert lease.expires_at > self.now, ref

    @invariant()
    def the_board_counts_the_live_leases_of_each_instance(self) -> None:
        for iid in self.idle_ms:
            assert self.h.lease_count(iid) == self.count(iid), iid

    @invariant()
    def each_lease_ends_once_with_its_reason_and_nothing_follows(self) -> None:
        for ref in [*self.live, *self.ended]:
            events = self.h.signals.of(ref)
            kinds = [kind for kind, _, _ in events]
            assert kinds[0] == "granted", events
            assert kinds.count("granted") == 1, events
            assert kinds.count("renewed") == self.renewals[ref], events
            ends = [i for i, kind in enumerate(kinds) if kind in ("released", "expired")]
            if ref in self.live:
                assert ends == [], events
            else:
                assert ends == [len(kinds) - 1], events  # exactly one end, and it is last
                _, _, reason = events[-1]
                assert reason == self.ended[ref], events

    @invariant()
    def the_supervisor_is_told_what_the_model_owes_it(self) -> None:
        told = Counter(
            (type(m).__name__, m.instance_id)
            for m in self.h.told_supervisor()
            if isinstance(m, Drained | IdleExpired)
        )
        assert told == self.owed

    @invariant()
    def each_drain_names_the_leases_it_waits_for(self) -> None:
        assert self.h.signals.draining == self.drains


def test_the_lease_broker_agrees_with_a_model_of_live_leases() -> None:
    run_state_machine_as_test(
        LeaseBrokerMachine,
        settings=settings(
            max_examples=min(settings.default.max_examples, 200), stateful_step_count=50
        ),
    )


# -- the idle policy ---------------------------------------------------------------------


@settings(max_examples=50)
@given(
    idle_ms=st.integers(1, 5000),
    ttl_ms=st.integers(1, 5000),
    ends_by=st.sampled_from(["release", "expiry"]),
    regrant_after_ms=st.none() | st.integers(0, 5000),
)
def test_an_instance_idle_for_idle_shutdown_ms_is_reported_once_and_a_grant_cancels_it(
    idle_ms: int, ttl_ms: int, ends_by: str, regrant_after_ms: int | None
) -> None:
    h = Harness()
    try:
        h.track("idle", idle_shutdown_ms=idle_ms)
        ref = h.grant("idle", ttl_ms).lease.lease_ref
        if ends_by == "release":
            h.timers.advance(ttl_ms / 2000)
            assert h.release(ref) is True
        else:
            h.timers.advance(ttl_ms / 1000)
            h.sync()
            assert ("expired", ref, "expired") in h.signals.events
        over_at = h.timers.now()
        idle_s = idle_ms / 1000

        def idle_expired() -> list[Any]:
            return [m for m in h.told_supervisor() if isinstance(m, IdleExpired)]

        if regrant_after_ms is not None and regrant_after_ms < idle_ms:
            # A grant in between cancels the pending shutdown...
            h.timers.advance(regrant_after_ms / 1000)
            again = h.grant("idle", 10 * idle_ms).lease.lease_ref
            h.timers.advance(over_at + idle_s - h.timers.now())
            assert idle_expired() == []
            # ...and the wait starts over when that lease ends.
            assert h.release(again) is True
            over_at = h.timers.now()
        h.timers.advance(over_at + idle_s - 0.0005 - h.timers.now())
        assert idle_expired() == [], "told before idle_shutdown_ms had passed"
        h.timers.advance(over_at + idle_s - h.timers.now())
        assert idle_expired() == [IdleExpired(instance_id="idle")]
        h.timers.advance(10 * idle_s)
        assert idle_expired() == [IdleExpired(instance_id="idle")], "told more than once"
    finally:
        h.close()

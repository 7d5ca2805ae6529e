"""Memory admission in a Runtime, on the fake server (CONTRACT §11): what starts, what is
evicted and in which order, who waits and what wakes them, and what is refused.

Each spec's estimate is declared here by alias and the fake's resident memory is not
read, so what admission holds is exactly the declared figure (the estimate from a GGUF
header, and the measured figure replacing it, have tests of their own)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from llama_actors import (
    BootSpec,
    Capacity,
    InsufficientMemoryError,
    MemoryNeed,
    Runtime,
    WaitTimeoutError,
)
from llama_actors._llama.backend import LlamaCppBackend
from llama_actors._runtime import backend as backend_actor
from llama_actors.testing.signals import SignalRecorder

from ._helpers import FAST, WAIT, Fake

#: MiB of private RAM per alias.
SIZES = {"a": 300.0, "b": 300.0, "c": 300.0, "big": 2000.0, "half": 500.0}


@pytest.fixture(autouse=True)
def declared_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    def estimate(self: LlamaCppBackend, spec: BootSpec, gpus: object) -> MemoryNeed | None:
        mib = SIZES.get(spec.alias)
        return None if mib is None else MemoryNeed(ram_mib=mib, parts={"declared": mib})

    monkeypatch.setattr(LlamaCppBackend, "estimate_memory", estimate, raising=False)
    monkeypatch.setattr(backend_actor, "_rss_mib", lambda pid: None)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Runtime]:
    """A runtime whose capacity holds three 300 MiB instances."""
    with Runtime(state_dir=tmp_path / "state", policy=FAST, capacity=Capacity(ram_mib=1000)) as rt:
        yield rt


def spec(fake: Fake, alias: str) -> BootSpec:
    return fake.spec(alias=alias)


def test_instances_that_fit_start_side_by_side_and_statistics_show_what_they_hold(
    small: Runtime, fake: Fake
) -> None:
    a = small.resolve_endpoint(spec(fake, "a"), timeout=WAIT)
    b = small.resolve_endpoint(spec(fake, "b"), timeout=WAIT)
    assert {s.state for s in small.instances()} == {"ready"}
    stats = small.statistics().memory
    assert stats.capacity == {"ram": 1000.0}
    assert stats.queued == 0
    assert stats.evictions == 0
    assert stats.used == {"ram": 600.0}
    assert stats.free == {"ram": 400.0}
    snap = small.snapshot(a.instance.instance_id)
    assert snap.memory.estimate == MemoryNeed(ram_mib=300.0, parts={"declared": 300.0})
    assert snap.memory.held == snap.memory.estimate  # nothing measured: the fake reports none
    small.release(a.lease.lease_ref)
    small.release(b.lease.lease_ref)


def test_a_resolve_that_does_not_fit_evicts_the_least_recently_used_idle_instance(
    small: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    first = small.resolve_endpoint(spec(fake, "a"), timeout=WAIT)
    second = small.resolve_endpoint(spec(fake, "b"), timeout=WAIT)
    small.release(first.lease.lease_ref)  # a is idle first: least recently used
    small.release(second.lease.lease_ref)
    third = small.resolve_endpoint(spec(fake, "half"), timeout=WAIT)

    evicted = recorder.wait_for("instance_evicted", timeout=WAIT)
    assert evicted.instance_id == first.instance.instance_id
    assert evicted.payload["for_alias"] == "half"
    assert "no lease held" in evicted.payload["reason"]
    assert small.snapshot(first.instance.instance_id).state == "stopped"
    assert small.snapshot(second.instance.instance_id).state == "ready"
    assert small.statistics().memory.evictions == 1
    small.release(third.lease.lease_ref)


def test_a_leased_instance_is_never_evicted_even_when_it_was_used_least_recently(
    small: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    held = small.resolve_endpoint(spec(fake, "a"), timeout=WAIT)  # keeps its lease
    idle = small.resolve_endpoint(spec(fake, "b"), timeout=WAIT)
    small.release(idle.lease.lease_ref)
    third = small.resolve_endpoint(spec(fake, "half"), timeout=WAIT)

    evicted = [r.instance_id for r in recorder.find("instance_evicted")]
    assert evicted == [idle.instance.instance_id]
    assert small.snapshot(held.instance.instance_id).state == "ready"
    small.release(third.lease.lease_ref)
    small.release(held.lease.lease_ref)


def test_a_resolve_that_cannot_fit_while_leases_are_held_waits_and_a_release_wakes_it(
    small: Runtime, fake: Fake
) -> None:
    a = small.resolve_endpoint(spec(fake, "a"), timeout=WAIT)
    b = small.resolve_endpoint(spec(fake, "b"), timeout=WAIT)
    got: list[object] = []
    done = threading.Event()

    def resolve_half() -> None:
        try:
            got.append(small.resolve_endpoint(spec(fake, "half"), timeout=WAIT))
        except Exception as exc:
            got.append(exc)
        done.set()

    thread = threading.Thread(target=resolve_half)
    thread.start()
    try:
        assert not done.wait(0.5)  # 600 held, 500 needed, nothing evictable
        assert small.statistics().memory.queued == 1
        small.release(a.lease.lease_ref)  # a becomes evictable: the queue moves
        assert done.wait(WAIT)
    finally:
        thread.join(WAIT)
    resolution = got[0]
    assert not isinstance(resolution, Exception), resolution
    assert small.snapshot(a.instance.instance_id).state == "stopped"
    assert small.snapshot(b.instance.instance_id).state == "ready"
    assert small.statistics().memory.queued == 0
    small.release(b.lease.lease_ref)


def test_a_stop_wakes_a_waiting_resolve(small: Runtime, fake: Fake) -> None:
    a = small.resolve_endpoint(spec(fake, "a"), timeout=WAIT)
    b = small.resolve_endpoint(spec(fake, "b"), timeout=WAIT)
    done = threading.Event()
    got: list[object] = []

    def resolve_half() -> None:
        got.append(small.resolve_endpoint(spec(fake, "half"), timeout=WAIT))
        done.set()

    thread = threading.Thread(target=resolve_half)
    thread.start()
    try:
        assert not done.wait(0.3)
        small.stop_instance(a.instance.instance_id, drain_timeout=0)
        assert done.wait(WAIT)
    finally:
        thread.join(WAIT)
    assert small.snapshot(b.instance.instance_id).state == "ready"
    small.release(b.lease.lease_ref)


def test_asked_not_to_wait_a_resolve_fails_at_once_naming_need_free_and_holders(
    small: Runtime, fake: Fake
) -> None:
    a = small.resolve_endpoint(spec(fake, "a"), timeout=WAIT)
    b = small.resolve_endpoint(spec(fake, "b"), timeout=WAIT)
    with pytest.raises(InsufficientMemoryError) as caught:
        small.resolve_endpoint(spec(fake, "half"), timeout=WAIT, wait_for_memory=False)
    error = caught.value
    text = str(error)
    assert "half" in text
    assert "500 MiB RAM" in text
    assert a.instance.instance_id in text
    assert "1 lease" in text
    assert error.waited_s == 0.0
    assert error.need.ram_mib == 500.0
    assert set(error.free) == {"ram"}
    assert {h[0] for h in error.holders} == {a.instance.instance_id, b.instance.instance_id}
    assert small.statistics().memory.queued == 0
    small.release(a.lease.lease_ref)
    small.release(b.lease.lease_ref)


def test_a_spec_larger_than_the_whole_capacity_fails_at_once_even_when_it_would_wait(
    small: Runtime, fake: Fake
) -> None:
    with pytest.raises(InsufficientMemoryError, match="more than this runtime's whole capacity"):
        small.resolve_endpoint(spec(fake, "big"), timeout=WAIT)
    assert small.instances() == []


def test_a_resolve_still_waiting_when_its_timeout_passes_says_it_waited_for_memory(
    small: Runtime, fake: Fake
) -> None:
    a = small.resolve_endpoint(spec(fake, "a"), timeout=WAIT)
    b = small.resolve_endpoint(spec(fake, "b"), timeout=WAIT)
    with pytest.raises(InsufficientMemoryError, match=r"waited 0\.5s for memory") as caught:
        small.resolve_endpoint(spec(fake, "half"), timeout=0.5)
    assert caught.value.waited_s == 0.5
    # Nothing was evicted for it, and the next request is not stuck behind it.
    c = small.resolve_endpoint(spec(fake, "c"), timeout=WAIT)
    assert small.statistics().memory.queued == 0  # it left the queue
    for resolution in (a, b, c):
        assert small.snapshot(resolution.instance.instance_id).state == "ready"
        small.release(resolution.lease.lease_ref)


def test_an_instance_only_ensured_holds_no_lease_and_may_be_evicted(
    small: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    ensured = small.ensure_instance(spec(fake, "a"), timeout=WAIT)
    b = small.resolve_endpoint(spec(fake, "b"), timeout=WAIT)
    half = small.resolve_endpoint(spec(fake, "half"), timeout=WAIT)
    assert [r.instance_id for r in recorder.find("instance_evicted")] == [
        ensured.instance.instance_id
    ]
    small.release(b.lease.lease_ref)
    small.release(half.lease.lease_ref)


def test_without_a_capacity_nothing_is_evicted_and_estimates_are_still_shown(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    leases = [runtime.resolve_endpoint(spec(fake, alias), timeout=WAIT) for alias in "abc"]
    assert runtime.capacity is None
    assert recorder.find("instance_evicted") == []
    for resolution in leases:
        memory = runtime.snapshot(resolution.instance.instance_id).memory
        assert memory.estimate is not None
        assert memory.estimate.ram_mib == 300.0
        runtime.release(resolution.lease.lease_ref)
    assert runtime.statistics().memory.capacity == {}


def test_a_capacity_that_is_not_a_capacity_is_refused_with_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"Capacity\(ram_mib=8000\)"):
        Runtime(state_dir=tmp_path, capacity={"ram_mib": 1000})  # type: ignore[arg-type]


def test_wait_for_memory_must_be_a_bool(small: Runtime, fake: Fake) -> None:
    with pytest.raises(Exception, match="wait_for_memory must be True or False"):
        small.resolve_endpoint(spec(fake, "a"), wait_for_memory="no")  # type: ignore[arg-type]


def test_waiting_requests_are_admitted_in_arrival_order(small: Runtime, fake: Fake) -> None:
    a = small.resolve_endpoint(spec(fake, "a"), timeout=WAIT)
    b = small.resolve_endpoint(spec(fake, "b"), timeout=WAIT)
    c = small.resolve_endpoint(spec(fake, "c"), timeout=WAIT)
    order: list[str] = []
    lock = threading.Lock()

    def resolve(alias: str) -> None:
        resolution = small.resolve_endpoint(spec(fake, alias), timeout=WAIT)
        with lock:
            order.append(alias)
        small.release(resolution.lease.lease_ref)

    first = threading.Thread(target=resolve, args=("half",))
    first.start()
    while small.statistics().memory.queued < 1:
        threading.Event().wait(0.01)
    # A second waiter behind it, told not to wait: it fails at once.
    with pytest.raises(InsufficientMemoryError, match="already waiting for memory"):
        small.resolve_endpoint(spec(fake, "big-later"), timeout=WAIT, wait_for_memory=False)
    for resolution in (a, b, c):
        small.release(resolution.lease.lease_ref)
    first.join(WAIT)
    assert order == ["half"]


def test_a_closing_runtime_fails_the_requests_waiting_for_memory(
    tmp_path: Path, fake: Fake
) -> None:
    rt = Runtime(state_dir=tmp_path / "state", policy=FAST, capacity=Capacity(ram_mib=700))
    try:
        a = rt.resolve_endpoint(spec(fake, "a"), timeout=WAIT)
        b = rt.resolve_endpoint(spec(fake, "b"), timeout=WAIT)
        assert a.lease
        assert b.lease
        got: list[BaseException] = []

        def resolve_half() -> None:
            try:
                rt.resolve_endpoint(spec(fake, "half"), timeout=WAIT)
            except BaseException as exc:
                got.append(exc)

        thread = threading.Thread(target=resolve_half)
        thread.start()
        while rt.statistics().memory.queued < 1:
            threading.Event().wait(0.01)
    finally:
        rt.close()
    thread.join(WAIT)
    assert len(got) == 1
    assert not isinstance(got[0], WaitTimeoutError)
    assert "closing" in str(got[0])


def test_an_instance_starting_for_another_caller_is_never_evicted(
    small: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    held = small.resolve_endpoint(spec(fake, "b"), timeout=WAIT)  # 300 leased
    slow = fake.spec(alias="a", behaviour={"load_seconds": "1.5"})
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(small.resolve_endpoint(slow, timeout=WAIT)))
    thread.start()
    try:
        starting = recorder.wait_for("instance_starting", timeout=WAIT, count=2)  # b, then a
        assert small.snapshot(starting.instance_id).state == "starting"
        # 600 held, 500 needed: only evicting the starting one would make room, and a caller
        # waits on it.
        with pytest.raises(InsufficientMemoryError, match=starting.instance_id):
            small.resolve_endpoint(spec(fake, "half"), timeout=WAIT, wait_for_memory=False)
    finally:
        thread.join(WAIT)
    assert recorder.find("instance_evicted") == []
    resolution = got[0]
    assert small.snapshot(starting.instance_id).state == "ready"
    small.release(resolution.lease.lease_ref)  # type: ignore[attr-defined]
    small.release(held.lease.lease_ref)


def test_two_callers_taking_turns_on_a_capacity_for_one_never_fail_and_never_overcommit(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder
) -> None:
    # Each resolve of one identity may meet the other being evicted, or its own identity
    # going: it waits for room and a fresh instance instead of failing.
    rounds = 5
    errors: list[BaseException] = []
    peak: list[float] = []
    with Runtime(state_dir=tmp_path / "state", policy=FAST, capacity=Capacity(ram_mib=500)) as rt:

        def take_turns(alias: str) -> None:
            try:
                for _ in range(rounds):
                    resolution = rt.resolve_endpoint(spec(fake, alias), timeout=WAIT)
                    peak.append(rt.statistics().memory.used["ram"])
                    rt.release(resolution.lease)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=take_turns, args=(a,)) for a in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(4 * rounds * WAIT)
        assert errors == []
        assert max(peak) <= 500
        assert rt.statistics().memory.queued == 0
    assert len(recorder.find("lease_granted")) == 2 * rounds

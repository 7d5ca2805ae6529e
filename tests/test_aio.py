"""The asyncio face against the fake llama-server: awaitable calls that never block the
loop, timeouts and cancellation that leak no lease, and signals as an async iterator."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_actors import (
    AsyncRuntime,
    InstanceFailedError,
    LeaseNotFoundError,
    Runtime,
    RuntimeClosedError,
    SignalEvent,
    SignalOverflowError,
    SignalStream,
    UsageError,
    WaitTimeoutError,
    signal_stream,
    signals,
)
from llama_actors.testing.signals import SignalRecorder

from ._helpers import FAST, WAIT, Fake, wait_gone


async def next_event(events: SignalStream, name: str, **fields: Any) -> SignalEvent:
    """The next event called ``name`` whose payload has ``fields``; others are skipped."""
    async with asyncio.timeout(WAIT):
        async for event in events:
            if event.name == name and all(event.payload.get(k) == v for k, v in fields.items()):
                return event
    raise AssertionError(f"the stream ended before {name} {fields}")


async def chat(endpoint: Any, text: str = "hello") -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        return await client.post(
            endpoint.base_url + "/chat/completions",
            headers=endpoint.headers,
            json={"messages": [{"role": "user", "content": text}]},
        )


# -- the loop is never blocked -------------------------------------------------------------


def test_the_event_loop_keeps_ticking_while_a_slow_server_loads(
    runtime: Runtime, fake: Fake
) -> None:
    spec = fake.spec({"never_ready": "1"})  # it loads until the test lets it finish

    async def main() -> tuple[bool, float]:
        rt = AsyncRuntime.wrap(runtime)
        loop = asyncio.get_running_loop()
        gaps: list[float] = []
        ticked = asyncio.Event()
        enough = math.inf  # ticks after which `ticked` is set

        async def ticker() -> None:
            last = loop.time()
            while True:
                await asyncio.sleep(0.005)  # a tick: the loop's pulse, waiting for nothing
                now = loop.time()
                gaps.append(now - last)
                last = now
                if len(gaps) >= enough:
                    ticked.set()

        ticking = asyncio.create_task(ticker())
        async with signal_stream("instance_starting") as events:
            resolving = asyncio.create_task(rt.resolve_endpoint(spec, "tests", timeout=WAIT))
            await next_event(events, "instance_starting")  # the server is loading now
        enough = len(gaps) + 20
        async with asyncio.timeout(WAIT):
            await ticked.wait()  # the loop ticks on while the resolve waits ...
        waiting = not resolving.done()
        fake.set(never_ready=False)
        await resolving
        ticking.cancel()
        return waiting, max(gaps)

    waiting, worst_gap = asyncio.run(main())

    assert waiting  # ... for a load that only the test could end
    assert worst_gap < 0.5  # 100 ticks' worth: a loop blocked by the resolve stalls for good


def test_concurrent_async_resolves_of_one_identity_share_one_spawn(
    runtime: Runtime, fake: Fake
) -> None:
    spec = fake.spec({"load_seconds": "0.5"})

    async def main() -> list[Any]:
        rt = AsyncRuntime.wrap(runtime)
        calls = [rt.resolve_endpoint(spec, f"c{i}", timeout=WAIT) for i in range(12)]
        return await asyncio.gather(*calls)

    with SignalRecorder("instance_starting") as recorder:
        results = asyncio.run(main())

    assert len({r.instance.instance_id for r in results}) == 1
    assert [r.reused for r in results].count(False) == 1
    assert len(recorder.records) == 1
    assert runtime.snapshot(results[0].instance.instance_id).lease_count == 12


# -- the calls -------------------------------------------------------------------------------


def test_resolve_renew_release_and_stop_work_when_awaited(runtime: Runtime, fake: Fake) -> None:
    async def main() -> None:
        rt = AsyncRuntime.wrap(runtime)
        # The TTL only has to outlast the chat between the grant and the renew.
        resolution = await rt.resolve_endpoint(fake.spec(), "tests", ttl_ms=5_000)
        iid = resolution.instance.instance_id
        ref = resolution.lease.lease_ref

        answer = await chat(resolution.endpoint)
        renewed = await rt.renew(ref, ttl_ms=60_000)

        assert answer.json()["choices"][0]["message"]["content"] == "You said: hello"
        assert renewed.expires_at > resolution.lease.expires_at + 50
        assert rt.snapshot(iid).lease_count == 1
        assert [s.instance_id for s in rt.instances()] == [iid]
        assert rt.statistics().leases == 1
        assert rt.published_endpoint(iid).lease_ref is None
        assert await rt.release(ref) is True
        assert await rt.release(ref) is False
        with pytest.raises(LeaseNotFoundError, match="released"):
            await rt.renew(ref)
        final = await rt.stop_instance(iid, drain_timeout=0)
        assert final.state == "stopped"
        assert await rt.stop_instance(iid) == final

    asyncio.run(main())


def test_ensure_instance_and_wait_healthy_are_awaitable(runtime: Runtime, fake: Fake) -> None:
    async def main() -> None:
        rt = AsyncRuntime.wrap(runtime)
        ensured = await rt.ensure_instance(fake.spec(), timeout=WAIT)
        snap, iid = ensured.instance, ensured.instance.instance_id
        assert ensured.reused is False
        assert (snap.state, snap.lease_count) == ("ready", 0)
        assert (await rt.wait_healthy(iid, timeout=WAIT)).health == "healthy"

        async with signal_stream("health_changed", instance_id=iid) as events:
            fake.set(health="degraded")
            await next_event(events, "health_changed", new="degraded")
            with pytest.raises(WaitTimeoutError, match=r"not healthy after 0\.2s"):
                await rt.wait_healthy(iid, timeout=0.2)
            fake.set(health="ok")
            healthy = await rt.wait_healthy(iid, timeout=WAIT)  # woken by the signal
            assert healthy.health == "healthy"

        await rt.stop_instance(iid)
        with pytest.raises(InstanceFailedError, match="stopped"):
            await rt.wait_healthy(iid, timeout=WAIT)

    asyncio.run(main())


def test_a_caller_that_times_out_gets_wait_timeout_and_no_lease_leaks(
    runtime: Runtime, fake: Fake
) -> None:
    spec = fake.spec({"never_ready": "1"})  # it loads until the test lets it finish

    async def main() -> Any:
        rt = AsyncRuntime.wrap(runtime)
        with pytest.raises(WaitTimeoutError, match="keeps going for other callers"):
            await rt.resolve_endpoint(spec, "impatient", timeout=0.2)
        fake.set(never_ready=False)
        return await rt.resolve_endpoint(spec, "patient", timeout=WAIT)

    with SignalRecorder("lease_granted") as recorder:
        later = asyncio.run(main())

    assert later.reused is True
    assert runtime.snapshot(later.instance.instance_id).lease_count == 1
    assert len(recorder.records) == 1


def test_cancelling_a_resolve_task_leaks_no_lease(runtime: Runtime, fake: Fake) -> None:
    spec = fake.spec({"never_ready": "1"})  # it loads until the test lets it finish

    async def main() -> Any:
        rt = AsyncRuntime.wrap(runtime)
        async with signal_stream("instance_starting") as events:
            waiting = asyncio.create_task(
                rt.resolve_endpoint(spec, "tests", owner_ref="leaver", timeout=WAIT)
            )
            await next_event(events, "instance_starting")  # the request reached the runtime
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        fake.set(never_ready=False)
        return await rt.resolve_endpoint(spec, "tests", owner_ref="stayer", timeout=WAIT)

    with SignalRecorder("lease_granted") as recorder:
        stayer = asyncio.run(main())

    assert runtime.snapshot(stayer.instance.instance_id).lease_count == 1
    assert [r.payload["lease"].owner_ref for r in recorder.records] == ["stayer"]


def test_a_task_cancelled_after_its_lease_was_granted_releases_it(
    runtime: Runtime, fake: Fake
) -> None:
    spec = fake.spec()

    async def main() -> str:
        rt = AsyncRuntime.wrap(runtime)
        iid = (await rt.ensure_instance(spec, timeout=WAIT)).instance.instance_id
        async with signal_stream("lease_granted", "lease_released", instance_id=iid) as events:
            # The lease is granted, and the task is cancelled before it has taken the
            # answer: the runtime hears of the cancellation and ends the lease.
            waiting = asyncio.create_task(rt.resolve_endpoint(spec, "leaver", timeout=WAIT))
            await next_event(events, "lease_granted")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            released = await next_event(events, "lease_released")
        assert released.payload["reason"] == "released"
        return iid

    iid = asyncio.run(main())

    assert runtime.snapshot(iid).lease_count == 0


def test_closing_the_async_runtime_stops_every_server_and_joins_every_actor_thread(
    tmp_path: Path, fake: Fake
) -> None:
    before = set(threading.enumerate())

    async def main() -> tuple[AsyncRuntime, Any]:
        async with AsyncRuntime(state_dir=tmp_path / "state", policy=FAST) as rt:
            resolution = await rt.resolve_endpoint(fake.spec(), "tests", timeout=WAIT)
        with pytest.raises(RuntimeClosedError):
            await rt.resolve_endpoint(fake.spec(), "tests")
        assert await rt.release(resolution.lease.lease_ref) is False
        return rt, resolution

    rt, resolution = asyncio.run(main())

    assert resolution.instance.pid is not None
    assert wait_gone([resolution.instance.pid], timeout=WAIT) == []
    assert [t.name for t in set(threading.enumerate()) - before if t.is_alive()] == []
    assert "closed" in repr(rt)


def test_a_wrapped_runtime_stays_open_after_async_with_for_its_owner_to_close(
    runtime: Runtime, fake: Fake
) -> None:
    async def main() -> str:
        async with AsyncRuntime.wrap(runtime) as rt:
            assert rt.runtime is runtime
            return (await rt.ensure_instance(fake.spec(), timeout=WAIT)).instance.instance_id

    iid = asyncio.run(main())

    assert runtime.snapshot(iid).state == "ready"
    assert runtime.resolve_endpoint(fake.spec(), "sync caller").reused is True


def test_wrapping_something_that_is_not_a_runtime_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"takes a llama_actors\.Runtime"):
        AsyncRuntime.wrap("runtime")  # type: ignore[arg-type]


# -- the signal stream ---------------------------------------------------------------------


def test_the_signal_stream_yields_ready_health_and_lease_events_in_order_and_disconnects(
    runtime: Runtime, fake: Fake
) -> None:
    connected_before = {name: len(s.receivers) for name, s in signals.ALL_SIGNALS.items()}

    async def main() -> tuple[list[SignalEvent], SignalStream]:
        rt = AsyncRuntime.wrap(runtime)
        seen: list[SignalEvent] = []
        async with signal_stream() as events:
            assert events.connected
            resolution = await rt.resolve_endpoint(fake.spec(), "tests", timeout=WAIT)
            await rt.wait_healthy(resolution.instance.instance_id, timeout=WAIT)
            await rt.release(resolution.lease.lease_ref)
            await rt.stop_instance(resolution.instance.instance_id)
            async with asyncio.timeout(WAIT):
                async for event in events:
                    seen.append(event)
                    if event.name == "instance_stopped":
                        break
        return seen, events

    seen, events = asyncio.run(main())

    names = [e.name for e in seen]
    order = ["instance_starting", "instance_ready", "lease_granted", "lease_released"]
    assert [n for n in names if n in order] == order
    assert names[-1] == "instance_stopped"
    healthy = names.index("health_changed")
    assert names.index("instance_ready") < healthy
    assert seen[healthy].payload["new"] == "healthy"
    assert len({e.instance_id for e in seen}) == 1
    assert all(e.at > 0 for e in seen)
    with pytest.raises(TypeError):
        seen[0].payload["attempt"] = 7  # type: ignore[index]  # read-only
    assert not events.connected
    after = {name: len(s.receivers) for name, s in signals.ALL_SIGNALS.items()}
    assert after == connected_before


def test_a_stream_for_one_instance_sees_only_that_instance(
    runtime: Runtime, tmp_path: Path
) -> None:
    one, two = Fake(tmp_path / "one"), Fake(tmp_path / "two")

    async def main() -> tuple[str, list[SignalEvent]]:
        rt = AsyncRuntime.wrap(runtime)
        iid = (await rt.ensure_instance(one.spec(), timeout=WAIT)).instance.instance_id
        seen: list[SignalEvent] = []
        async with signal_stream(instance_id=iid) as events:
            await rt.resolve_endpoint(two.spec(), "tests", timeout=WAIT)
            mine = await rt.resolve_endpoint(one.spec(), "tests", timeout=WAIT)
            await rt.release(mine.lease.lease_ref)
            async with asyncio.timeout(WAIT):
                async for event in events:
                    seen.append(event)
                    if event.name == "lease_released":
                        break
        return iid, seen

    iid, seen = asyncio.run(main())

    assert [e.name for e in seen] == ["lease_granted", "lease_released"]
    assert {e.instance_id for e in seen} == {iid}


def _send_lease_signals(count: int, instance_id: str) -> None:
    for i in range(count):
        signals.lease_granted.send(instance_id, instance_id=instance_id, at=time.time(), lease=i)


def test_a_full_stream_drops_its_oldest_events_and_counts_them() -> None:
    async def main() -> tuple[list[Any], int]:
        async with signal_stream("lease_granted", instance_id="overflow", maxsize=2) as events:
            # Sent from another thread, like an actor would; each event is on the loop's
            # queue before to_thread() returns.
            await asyncio.to_thread(_send_lease_signals, 5, "overflow")
        return [event.payload["lease"] async for event in events], events.dropped

    kept, dropped = asyncio.run(main())

    assert kept == [3, 4]
    assert dropped == 3


def test_a_full_stream_with_overflow_error_raises_after_the_events_that_fit() -> None:
    async def main() -> tuple[list[Any], SignalOverflowError]:
        kept: list[Any] = []
        async with signal_stream(
            "lease_granted", instance_id="overflow", maxsize=2, overflow="error"
        ) as events:
            await asyncio.to_thread(_send_lease_signals, 5, "overflow")
            kept.append((await anext(events)).payload["lease"])
            kept.append((await anext(events)).payload["lease"])
            with pytest.raises(SignalOverflowError) as caught:
                await anext(events)
        return kept, caught.value

    kept, error = asyncio.run(main())

    assert kept == [0, 1]
    assert error.dropped == 3
    assert "fell 2 events behind" in str(error)


def test_closing_a_stream_ends_a_reader_that_is_waiting() -> None:
    async def main() -> list[SignalEvent]:
        async with signal_stream("lease_granted", instance_id="nobody") as events:
            reading = asyncio.create_task(anext(events, None))
            await asyncio.sleep(0)  # let the reader start waiting
            events.close()
            async with asyncio.timeout(WAIT):
                assert await reading is None
        return [event async for event in events]

    assert asyncio.run(main()) == []


def test_bad_stream_arguments_are_usage_errors_that_say_what_to_use() -> None:
    with pytest.raises(UsageError, match=r"unknown signal names \['instance_readdy'\]"):
        signal_stream("instance_readdy")
    with pytest.raises(UsageError, match="maxsize must be a positive number"):
        signal_stream(maxsize=0)
    with pytest.raises(UsageError, match="overflow must be"):
        signal_stream(overflow="block")  # type: ignore[arg-type]

    async def iterate_unopened() -> None:
        await anext(signal_stream())

    with pytest.raises(UsageError, match="async with signal_stream"):
        asyncio.run(iterate_unopened())

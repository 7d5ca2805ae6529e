"""Time for the runtime: ManualTimers moves only when told; the real Scheduler calls
back on its own thread and stops cleanly."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from llama_actors._base.clock import ManualTimers, Scheduler

WAIT_S = 5.0


# -- ManualTimers -----------------------------------------------------------------------


def test_manual_time_stands_still_until_advanced() -> None:
    timers = ManualTimers(start=50.0)
    ran: list[str] = []
    timers.call_later(1.0, lambda: ran.append("one"))
    assert timers.now() == 50.0
    assert ran == []
    assert timers.pending() == 1
    timers.advance(0.5)
    assert timers.now() == 50.5
    assert ran == []
    timers.advance(0.5)
    assert ran == ["one"]
    assert timers.pending() == 0


def test_due_callbacks_run_in_time_order_with_the_clock_at_their_time() -> None:
    timers = ManualTimers(start=0.0)
    ran: list[tuple[str, float]] = []

    def at(name: str) -> None:
        ran.append((name, timers.now()))

    timers.call_at(3.0, lambda: at("c"))
    timers.call_at(1.0, lambda: at("a"))
    timers.call_later(2.0, lambda: at("b"))
    timers.call_at(10.0, lambda: at("late"))
    timers.advance(5.0)
    assert ran == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert timers.now() == 5.0
    assert timers.pending() == 1


def test_callbacks_due_at_the_same_time_run_in_the_order_they_were_scheduled() -> None:
    timers = ManualTimers(start=0.0)
    ran: list[int] = []
    for i in range(5):
        timers.call_at(1.0, lambda i=i: ran.append(i))
    timers.advance(1.0)
    assert ran == [0, 1, 2, 3, 4]


def test_a_callback_scheduled_by_a_callback_runs_in_the_same_advance_when_due() -> None:
    timers = ManualTimers(start=0.0)
    ran: list[float] = []

    def tick() -> None:
        ran.append(timers.now())
        if len(ran) < 10:
            timers.call_later(1.0, tick)

    timers.call_later(1.0, tick)
    timers.advance(3.5)
    assert ran == [1.0, 2.0, 3.0]
    assert timers.pending() == 1


def test_a_cancelled_manual_timer_never_runs() -> None:
    timers = ManualTimers(start=0.0)
    ran: list[str] = []
    handle = timers.call_later(1.0, lambda: ran.append("cancelled"))
    timers.call_later(2.0, lambda: ran.append("kept"))
    handle.cancel()
    assert timers.pending() == 1
    timers.advance(5.0)
    assert ran == ["kept"]


def test_a_negative_delay_runs_at_the_next_advance() -> None:
    timers = ManualTimers(start=0.0)
    ran: list[float] = []
    timers.call_later(-3.0, lambda: ran.append(timers.now()))
    assert ran == []
    timers.advance(0.0)
    assert ran == [0.0]


# -- Scheduler --------------------------------------------------------------------------


@pytest.fixture
def scheduler() -> Iterator[Scheduler]:
    s = Scheduler(name="test-scheduler")
    yield s
    s.close()


def scheduler_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def hold(scheduler: Scheduler) -> threading.Event:
    """Keep the scheduler's thread in a callback until the returned event is set: timers
    a test adds meanwhile cannot come due before it has added them all, however slowly
    its own thread runs."""
    release = threading.Event()

    def held() -> None:
        release.wait(WAIT_S)

    scheduler.call_later(0.0, held)
    return release


def test_the_scheduler_calls_back_on_its_own_thread(scheduler: Scheduler) -> None:
    fired = threading.Event()
    where: list[str] = []

    def callback() -> None:
        where.append(threading.current_thread().name)
        fired.set()

    scheduler.call_later(0.01, callback)
    assert fired.wait(WAIT_S)
    assert where == ["test-scheduler"]


def test_the_scheduler_runs_callbacks_in_time_order(scheduler: Scheduler) -> None:
    done = threading.Event()
    ran: list[str] = []
    release = hold(scheduler)
    now = scheduler.now()
    scheduler.call_at(now + 0.06, lambda: (ran.append("c"), done.set()))
    scheduler.call_at(now + 0.02, lambda: ran.append("a"))
    scheduler.call_at(now + 0.04, lambda: ran.append("b"))
    release.set()
    assert done.wait(WAIT_S)
    assert ran == ["a", "b", "c"]


def test_an_earlier_timer_added_later_wakes_the_scheduler(scheduler: Scheduler) -> None:
    fired = threading.Event()
    scheduler.call_later(3600, lambda: None)
    scheduler.call_later(0.01, fired.set)
    assert fired.wait(WAIT_S)


def test_a_cancelled_scheduler_timer_never_runs(scheduler: Scheduler) -> None:
    done = threading.Event()
    ran: list[str] = []
    release = hold(scheduler)
    handle = scheduler.call_later(0.01, lambda: ran.append("cancelled"))
    handle.cancel()
    scheduler.call_later(0.05, lambda: (ran.append("kept"), done.set()))
    release.set()
    assert done.wait(WAIT_S)
    assert ran == ["kept"]


@pytest.mark.logs_errors("a scheduled callback raised")
def test_a_callback_that_raises_is_logged_and_the_scheduler_goes_on(
    scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="llama_actors.runtime")
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("boom")

    now = scheduler.now()
    scheduler.call_at(now + 0.01, boom)
    scheduler.call_at(now + 0.02, done.set)
    assert done.wait(WAIT_S)
    records = [r for r in caplog.records if r.name == "llama_actors.runtime"]
    assert [r.getMessage() for r in records] == ["a scheduled callback raised"]
    assert records[0].exc_info is not None
    assert "boom" in str(records[0].exc_info[1])


def test_close_joins_the_thread_and_drops_pending_callbacks() -> None:
    scheduler = Scheduler(name="test-scheduler-close")
    assert len(scheduler_threads("test-scheduler-close")) == 1
    ran: list[str] = []
    scheduler.call_later(3600, lambda: ran.append("far"))
    scheduler.call_later(1800, lambda: ran.append("near"))
    assert scheduler.pending() == 2
    scheduler.close(timeout=WAIT_S)
    assert scheduler_threads("test-scheduler-close") == []
    assert scheduler.pending() == 0
    assert ran == []


def test_a_timer_set_after_close_never_runs() -> None:
    scheduler = Scheduler(name="test-scheduler-closed")
    scheduler.close(timeout=WAIT_S)
    handle = scheduler.call_later(0.0, lambda: None)
    assert handle.cancelled
    assert scheduler.pending() == 0


def test_close_from_a_callback_does_not_deadlock() -> None:
    scheduler = Scheduler(name="test-scheduler-self-close")
    closed = threading.Event()

    def close_me() -> None:
        scheduler.close(timeout=WAIT_S)
        closed.set()

    scheduler.call_later(0.0, close_me)
    assert closed.wait(WAIT_S)
    thread = scheduler_threads("test-scheduler-self-close")
    for t in thread:
        t.join(WAIT_S)
    assert scheduler_threads("test-scheduler-self-close") == []

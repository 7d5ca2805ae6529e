"""Fault injection, the short form: about forty seconds of seeded chaos over several fake
llama-servers (``make chaos`` runs the long form). Nothing may be lost, no invariant
may break, and every kind of fault must really have been injected."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from chaos import FAULTS, ChaosConfig, InvariantRecorder, Summary, run_chaos
from chaos.engine import RESTART
from llama_actors import Lease
from llama_actors.signals import (
    health_changed,
    instance_draining,
    instance_ready,
    instance_restarting,
    instance_starting,
    instance_stopped,
    lease_expired,
    lease_granted,
    lease_released,
)

SEED = 20261125


@pytest.mark.timeout(150)
def test_a_seeded_chaos_run_loses_nothing_and_breaks_no_invariant(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.CRITICAL, logger="llama_actors.transitions")

    config = ChaosConfig(seed=SEED, duration_s=35.0, instances=7, faults=FAULTS, stop_drain_s=0.8)

    summary = run_chaos(config)

    report = summary.render()
    print(report)
    assert summary.violations == [], report
    assert summary.lost_total == 0, report
    assert summary.left_behind == [], report
    missing = [kind for kind in FAULTS if summary.faults[kind] == 0]
    assert missing == [], f"faults never injected: {missing}\n{report}"
    # The run exercised what the invariants are about, so they could have failed.
    for name in ("instance_restarting", "lease_renewed", "lease_expired", "instance_stopped"):
        assert summary.transitions[name] > 0, f"no {name}\n{report}"
    assert summary.release_reasons["released"] > 0, report
    assert summary.snapshot_samples > 100, report


def test_the_recorder_flags_an_illegal_order_a_lease_ending_twice_and_a_late_end() -> None:
    recorder = InvariantRecorder(RESTART, lease_tolerance_s=0.1)
    with recorder:
        instance_ready.send("i-1", instance_id="i-1", pid=1, port=1, endpoint=None, elapsed_s=0.0)
        instance_starting.send("i-2", instance_id="i-2", attempt=0, pid=2)
        instance_ready.send("i-2", instance_id="i-2", pid=2, port=2, endpoint=None, elapsed_s=0.0)
        lease = Lease(
            lease_ref="lease-x",
            instance_id="i-2",
            owner_ref=None,
            ttl_ms=1,
            granted_at=0.0,
            expires_at=0.001,  # long past on the monotonic clock
        )
        lease_granted.send("i-2", instance_id="i-2", lease=lease)
        lease_expired.send("i-2", instance_id="i-2", lease=lease)
        lease_released.send("i-2", instance_id="i-2", lease=lease, reason="released")
        instance_stopped.send("i-2", instance_id="i-2", reason="test", exit=None)
        instance_starting.send("i-2", instance_id="i-2", attempt=1, pid=3)

    text = "\n".join(recorder.violations)
    assert "i-1: instance_ready while new" in text
    assert "lease-x: ended (expired)" in text
    assert "after it expired" in text
    assert "lease-x: lease_released after it ended (expired)" in text
    assert "i-2: instance_stopped while health is" not in text
    assert "i-2: instance_starting after the instance was stopped" in text


def test_the_recorder_flags_restarts_beyond_the_policy_and_backoff_outside_the_jitter() -> None:
    recorder = InvariantRecorder(RESTART, lease_tolerance_s=0.1)
    iid = "i-3"
    with recorder:
        instance_starting.send(iid, instance_id=iid, attempt=0, pid=10)
        instance_ready.send(iid, instance_id=iid, pid=10, port=1, endpoint=None, elapsed_s=0.0)
        health_changed.send(iid, instance_id=iid, old="unknown", new="healthy", reason="ready")
        health_changed.send(iid, instance_id=iid, old="healthy", new="unavailable", reason="x")
        for attempt in range(1, RESTART.max_restarts + 2):
            delay = RESTART.base_delay_ms(attempt) / 1000
            instance_restarting.send(
                iid, instance_id=iid, attempt=attempt, delay_s=delay, reason="crash"
            )
            instance_starting.send(iid, instance_id=iid, attempt=attempt, pid=10 + attempt)
        instance_restarting.send(iid, instance_id=iid, attempt=1, delay_s=99.0, reason="crash")

    text = "\n".join(recorder.violations)
    assert f"restart attempt {RESTART.max_restarts + 1} outside" in text
    assert f"{RESTART.max_restarts + 1} restarts within" in text
    assert "delay 99.0000s outside the backoff" in text
    assert "instance_restarting while starting" not in text  # ever ready: a legal order


def lease_on(iid: str, ref: str, granted_at: float | None = None) -> Lease:
    """A lease as the broker grants it, at ``granted_at`` (now) on the monotonic clock."""
    at = time.monotonic() if granted_at is None else granted_at
    return Lease(
        lease_ref=ref,
        instance_id=iid,
        owner_ref=None,
        ttl_ms=60_000,
        granted_at=at,
        expires_at=at + 60.0,
    )


def start_and_ready(iid: str, pid: int) -> None:
    instance_starting.send(iid, instance_id=iid, attempt=0, pid=pid)
    instance_ready.send(iid, instance_id=iid, pid=pid, port=pid, endpoint=None, elapsed_s=0.0)
    health_changed.send(iid, instance_id=iid, old="unknown", new="healthy", reason="ready")


def crash(iid: str) -> None:
    health_changed.send(iid, instance_id=iid, old="healthy", new="unavailable", reason="exit")
    delay = RESTART.base_delay_ms(1) / 1000
    instance_restarting.send(iid, instance_id=iid, attempt=1, delay_s=delay, reason="exit")


def test_the_recorder_flags_a_grant_on_an_instance_that_is_not_ready_draining_or_restarting() -> (
    None
):
    board = {"i-starting": "starting", "i-crashed": "starting", "i-draining": "ready"}
    recorder = InvariantRecorder(RESTART, lease_tolerance_s=60.0, state_of=board.get)
    with recorder:
        # Granted while its first start is under way: the board does not say ready either.
        instance_starting.send("i-starting", instance_id="i-starting", attempt=0, pid=1)
        lease = lease_on("i-starting", "lease-starting")
        lease_granted.send("i-starting", instance_id="i-starting", lease=lease)
        # Granted in the backoff after a crash.
        start_and_ready("i-crashed", 2)
        crash("i-crashed")
        lease = lease_on("i-crashed", "lease-restarting")
        lease_granted.send("i-crashed", instance_id="i-crashed", lease=lease)
        # Granted after the drain was announced.
        start_and_ready("i-draining", 3)
        held = lease_on("i-draining", "lease-held")
        lease_granted.send("i-draining", instance_id="i-draining", lease=held)
        instance_draining.send(
            "i-draining", instance_id="i-draining", lease_refs=["lease-held"], reason="stop"
        )
        lease = lease_on("i-draining", "lease-draining")
        lease_granted.send("i-draining", instance_id="i-draining", lease=lease)
        # Granted before its first start was even announced, signalled only once it was
        # ready: its signal arrives late, its granted_at tells.
        early = time.monotonic()
        start_and_ready("i-early", 4)
        lease = lease_on("i-early", "lease-early", granted_at=early)
        lease_granted.send("i-early", instance_id="i-early", lease=lease)

    text = "\n".join(recorder.violations)
    assert "lease-starting: granted on i-starting while it was starting for the first time" in text
    assert "lease-restarting: granted on i-crashed while it was restarting" in text
    assert "lease-draining: granted on i-draining while it drains" in text
    assert "lease-early: granted on i-early while it was starting for the first time" in text
    assert "lease-held" not in text
    assert len(recorder.violations) == 4, text


def test_the_recorder_accepts_grants_on_a_ready_instance_whose_signals_arrive_out_of_order() -> (
    None
):
    board: dict[str, str] = {}
    recorder = InvariantRecorder(RESTART, lease_tolerance_s=60.0, state_of=board.get)
    with recorder:
        # The plain case.
        start_and_ready("i-plain", 1)
        board["i-plain"] = "ready"
        lease = lease_on("i-plain", "lease-plain")
        lease_granted.send("i-plain", instance_id="i-plain", lease=lease)
        # The backend published "ready" on the status board and is still sending
        # instance_ready when a resolve that read the board is granted.
        instance_starting.send("i-board", instance_id="i-board", attempt=0, pid=2)
        board["i-board"] = "ready"
        lease = lease_on("i-board", "lease-board")
        lease_granted.send("i-board", instance_id="i-board", lease=lease)
        instance_ready.send(
            "i-board", instance_id="i-board", pid=2, port=2, endpoint=None, elapsed_s=0.0
        )
        # Granted while ready; the server crashed right after, and that news overtook
        # the grant's signal.
        start_and_ready("i-overtaken", 3)
        granted = time.monotonic()
        board["i-overtaken"] = "starting"
        crash("i-overtaken")
        lease = lease_on("i-overtaken", "lease-overtaken", granted_at=granted)
        lease_granted.send("i-overtaken", instance_id="i-overtaken", lease=lease)

    assert recorder.violations == []
    assert set(recorder.leases) == {"lease-plain", "lease-board", "lease-overtaken"}


@pytest.mark.logs_errors("swallowed on purpose")
def test_the_recorder_counts_an_error_the_library_logged_with_a_traceback_on_any_thread() -> None:
    recorder = InvariantRecorder(RESTART, lease_tolerance_s=0.1)

    def actor_swallows_an_error() -> None:
        try:
            raise ZeroDivisionError("division by zero in a handler")
        except ZeroDivisionError:
            logging.getLogger("llama_actors.runtime").exception("swallowed on purpose")

    with recorder:
        thread = threading.Thread(target=actor_swallows_an_error)
        thread.start()
        thread.join(10)
        logging.getLogger("llama_actors.runtime").error("an error without a traceback")
        try:
            raise ValueError("not the library's")
        except ValueError:
            logging.getLogger("somebody.else").exception("another library's error")
    try:  # after the run: not counted
        raise KeyError("late")
    except KeyError:
        logging.getLogger("llama_actors.runtime").exception("swallowed on purpose, too late")

    assert len(recorder.logged_errors) == 1, recorder.logged_errors
    assert "ZeroDivisionError: division by zero in a handler" in recorder.logged_errors[0]
    assert "Traceback (most recent call last)" in recorder.logged_errors[0]
    assert recorder.violations == [
        "the library logged an error with a traceback: llama_actors.runtime: swallowed on "
        "purpose: ZeroDivisionError: division by zero in a handler"
    ]
    summary = Summary(ChaosConfig(), logged_errors=recorder.logged_errors)
    summary.violations = recorder.violations
    assert not summary.ok
    report = summary.render()
    assert "errors the library logged with a traceback (swallowed exceptions): 1" in report
    assert "ZeroDivisionError: division by zero in a handler" in report

"""Fault injection, the short form: about forty seconds of seeded chaos over several fake
llama-servers (``make chaos`` runs the long form). Nothing may be lost, no invariant
may break, and every kind of fault must really have been injected."""

from __future__ import annotations

import logging

import pytest

from chaos import FAULTS, ChaosConfig, InvariantRecorder, run_chaos
from chaos.engine import RESTART
from llama_actors import Lease
from llama_actors.signals import (
    health_changed,
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

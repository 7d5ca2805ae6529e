"""Supervision policies: validation that names the field, and the restart tracker's
backoff and intensity."""

from __future__ import annotations

import random
from typing import Any

import pytest

from llama_actors import BootSpecError, InstancePolicy, RestartPolicy
from llama_actors.lowlevel import RestartTracker


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_restarts": -1}, "restart.max_restarts"),
        ({"window_s": 0}, "restart.window_s"),
        ({"window_s": -5.0}, "restart.window_s"),
        ({"backoff_initial_ms": -1}, "restart.backoff_initial_ms"),
        ({"backoff_initial_ms": 1000, "backoff_max_ms": 999}, "restart.backoff_max_ms"),
        ({"multiplier": 0.5}, "restart.multiplier"),
        ({"jitter": -0.1}, "restart.jitter"),
        ({"jitter": 1.0}, "restart.jitter"),
    ],
)
def test_a_bad_restart_policy_is_rejected_naming_the_field(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(BootSpecError) as info:
        RestartPolicy(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: must be ")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"idle_shutdown_ms": -1}, "idle_shutdown_ms"),
        ({"ready_ceiling_ms": 0}, "ready_ceiling_ms"),
        ({"probe_timeout_ms": 0}, "probe_timeout_ms"),
        ({"slow_probe_ms": -10}, "slow_probe_ms"),
        ({"unavailable_after": 0}, "unavailable_after"),
        ({"wedged_restart_ms": -1}, "wedged_restart_ms"),
        ({"drain_timeout_ms": -1}, "drain_timeout_ms"),
    ],
)
def test_a_bad_instance_policy_is_rejected_naming_the_field(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(BootSpecError) as info:
        InstancePolicy(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)
    value = next(iter(kwargs.values()))
    assert f"(got {value!r})" in str(info.value)


def test_the_default_policies_are_valid_and_keep_idle_instances_running() -> None:
    policy = InstancePolicy()
    assert policy.idle_shutdown_ms is None
    assert policy.restart == RestartPolicy()
    assert policy.unavailable_after == 3


def test_edge_values_are_accepted() -> None:
    InstancePolicy(idle_shutdown_ms=0, wedged_restart_ms=None, drain_timeout_ms=0)
    InstancePolicy(wedged_restart_ms=0, unavailable_after=1)
    RestartPolicy(max_restarts=0, backoff_initial_ms=0, backoff_max_ms=0, multiplier=1.0)
    RestartPolicy(jitter=0.0)
    RestartPolicy(jitter=0.99)


# -- RestartTracker ---------------------------------------------------------------------


def tracker(**kwargs: Any) -> RestartTracker:
    return RestartTracker(RestartPolicy(**kwargs), rng=random.Random(7))  # noqa: S311 - seeded jitter


def test_without_jitter_delays_double_from_half_a_second_up_to_the_cap() -> None:
    restarts = tracker(max_restarts=10, backoff_max_ms=5_000, jitter=0.0)
    decisions = [restarts.decide(float(t)) for t in range(8)]
    assert all(d.restart for d in decisions)
    assert [d.attempt for d in decisions] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [d.delay_s for d in decisions] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    assert restarts.total == 8


def test_a_huge_multiplier_is_capped_at_the_maximum_without_overflowing() -> None:
    restarts = tracker(max_restarts=100, multiplier=1e6, backoff_max_ms=30_000, jitter=0.0)
    delays = [restarts.decide(float(t)).delay_s for t in range(60)]
    assert delays[:3] == [0.5, 30.0, 30.0]
    assert delays[-1] == 30.0


def test_a_restart_reason_says_which_attempt_of_how_many() -> None:
    decision = tracker(max_restarts=5, window_s=60.0, jitter=0.0).decide(0.0)
    assert decision.reason == "restart 1 of at most 5 in 60s"


def test_jitter_stays_within_its_bounds_and_a_seed_repeats_it() -> None:
    a = tracker(max_restarts=20, jitter=0.2)
    b = tracker(max_restarts=20, jitter=0.2)
    delays_a = [a.decide(float(t)).delay_s for t in range(6)]
    delays_b = [b.decide(float(t)).delay_s for t in range(6)]
    assert delays_a == delays_b
    for n, delay in enumerate(delays_a):
        base = 0.5 * 2**n
        assert base * 0.8 <= delay <= base * 1.2
    assert len({d / (0.5 * 2**n) for n, d in enumerate(delays_a)}) > 1  # really jittered


def test_past_the_intensity_the_instance_is_given_up() -> None:
    restarts = tracker(max_restarts=3, window_s=60.0, jitter=0.0)
    assert [restarts.decide(t).restart for t in (0.0, 1.0, 2.0)] == [True, True, True]
    decision = restarts.decide(3.0)
    assert decision.restart is False
    assert decision.attempt == 4
    assert decision.delay_s == 0.0
    assert "restart intensity exceeded" in decision.reason
    assert "3 restarts within 60s" in decision.reason
    assert "max_restarts=3" in decision.reason
    assert restarts.total == 3


def test_zero_max_restarts_gives_up_on_the_first_crash() -> None:
    decision = tracker(max_restarts=0).decide(0.0)
    assert decision.restart is False
    assert "max_restarts=0" in decision.reason


def test_crashes_older_than_the_window_no_longer_count() -> None:
    restarts = tracker(max_restarts=2, window_s=10.0, jitter=0.0)
    assert restarts.decide(0.0).restart
    assert restarts.decide(5.0).restart
    assert restarts.attempt == 2
    # the crash at 0 left the window; one restart is free again, and the backoff
    # continues from the restart still inside it
    decision = restarts.decide(10.5)
    assert decision.restart
    assert decision.attempt == 2
    assert decision.delay_s == 1.0


def test_after_a_quiet_window_the_backoff_starts_over() -> None:
    restarts = tracker(max_restarts=3, window_s=10.0, jitter=0.0)
    for t in (0.0, 1.0, 2.0):
        restarts.decide(t)
    decision = restarts.decide(30.0)
    assert decision.restart
    assert decision.attempt == 1
    assert decision.delay_s == 0.5
    assert restarts.total == 4

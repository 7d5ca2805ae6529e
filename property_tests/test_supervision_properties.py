"""Properties of the supervision decisions: restart backoff and intensity, the readiness
stall deadline, and health thresholds. All of them are pure; time is passed in."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

from hypothesis import assume, example, given
from hypothesis import strategies as st

from llama_actors import RestartPolicy
from llama_actors._kernel.health import HealthTracker, Observation
from llama_actors._kernel.readiness import StallDeadline
from llama_actors.lowlevel import RestartDecision, RestartTracker

# Float rounding in `base * factor / 1000` (not in the policy): one part in 1e9.
SLACK = 1e-9

# -- strategies ---------------------------------------------------------------------------


@st.composite
def restart_policies(draw: st.DrawFn, *, max_restarts: int = 8) -> RestartPolicy:
    initial = draw(st.integers(0, 5_000))
    return RestartPolicy(
        max_restarts=draw(st.integers(0, max_restarts)),
        window_s=draw(st.floats(0.001, 300.0)),
        backoff_initial_ms=initial,
        backoff_max_ms=draw(st.integers(initial, 120_000)),
        multiplier=draw(st.floats(1.0, 1e6)),
        jitter=draw(st.floats(0.0, 0.99)),
    )


@st.composite
def crash_times(draw: st.DrawFn, window_s: float, *, max_size: int = 30) -> list[float]:
    """Non-decreasing crash times; gaps often sit right at the window's edges."""
    gap = st.one_of(
        st.floats(0.0, 3 * window_s),
        st.sampled_from([0.0, window_s / 2, window_s, window_s * (1 + 1e-9), 2 * window_s]),
    )
    gaps = draw(st.lists(gap, min_size=1, max_size=max_size))
    return list(itertools.accumulate(gaps, initial=draw(st.floats(0.0, 1e6))))[1:]


def run(policy: RestartPolicy, times: list[float], seed: int = 0) -> list[RestartDecision]:
    tracker = RestartTracker(policy, random.Random(seed))  # noqa: S311 - jitter
    return [tracker.decide(t) for t in times]


policy_and_times = restart_policies().flatmap(
    lambda p: st.tuples(st.just(p), crash_times(p.window_s))
)


# -- restart backoff ---------------------------------------------------------------------

# Past attempt ~64 a big multiplier overflows a float: the policy must still answer.
HUGE_GROWTH = RestartPolicy(max_restarts=100, backoff_initial_ms=1, multiplier=1e5)
NO_DELAY = RestartPolicy(max_restarts=100, backoff_initial_ms=0, multiplier=1e5)


@example((HUGE_GROWTH, [0.0] * 70), 0)
@given(policy_and_times, st.integers(0, 2**32))
def test_every_restart_delay_is_its_base_delay_within_the_jitter(
    case: tuple[RestartPolicy, list[float]], seed: int
) -> None:
    policy, times = case
    for decision in run(policy, times, seed):
        if not decision.restart:
            assert decision.delay_s == 0.0
            continue
        base = policy.base_delay_ms(decision.attempt)
        low = base * (1 - policy.jitter) / 1000
        high = base * (1 + policy.jitter) / 1000
        assert low * (1 - SLACK) <= decision.delay_s <= high * (1 + SLACK)
        assert decision.delay_s <= policy.backoff_max_ms * (1 + policy.jitter) / 1000 * (1 + SLACK)
        assert decision.delay_s >= 0.0


def documented_base_delay_ms(policy: RestartPolicy, attempt: int) -> Fraction:
    """``min(backoff_max_ms, backoff_initial_ms * multiplier ** (n - 1))``, exactly."""
    exponent = min(max(attempt - 1, 0), 64)
    grown = Fraction(policy.backoff_initial_ms) * Fraction(policy.multiplier) ** exponent
    return min(Fraction(policy.backoff_max_ms), grown)


@example(HUGE_GROWTH, 70)
@example(NO_DELAY, 70)
@given(restart_policies(), st.integers(1, 200))
def test_the_base_delay_follows_the_documented_formula(policy: RestartPolicy, attempt: int) -> None:
    expected = documented_base_delay_ms(policy, attempt)
    got = policy.base_delay_ms(attempt)
    assert abs(Fraction(got) - expected) <= expected * Fraction(SLACK), (got, float(expected))


@example(HUGE_GROWTH, 70)
@example(NO_DELAY, 70)
@given(restart_policies(), st.integers(1, 200))
def test_base_delays_never_decrease_with_the_attempt_number(
    policy: RestartPolicy, attempts: int
) -> None:
    delays = [policy.base_delay_ms(n) for n in range(1, attempts + 2)]
    assert delays[0] == min(policy.backoff_initial_ms, policy.backoff_max_ms)
    for earlier, later in itertools.pairwise(delays):
        assert earlier <= later <= policy.backoff_max_ms


# -- restart intensity -------------------------------------------------------------------


@given(policy_and_times)
def test_never_more_than_max_restarts_are_granted_within_any_window(
    case: tuple[RestartPolicy, list[float]],
) -> None:
    policy, times = case
    granted = [t for t, d in zip(times, run(policy, times), strict=True) if d.restart]
    for i, start in enumerate(granted):
        inside = [t for t in granted[i:] if t - start <= policy.window_s]
        assert len(inside) <= policy.max_restarts


@given(policy_and_times)
def test_a_crash_is_refused_only_when_the_window_is_full(
    case: tuple[RestartPolicy, list[float]],
) -> None:
    """A reference model of the sliding window: restart iff fewer than max_restarts
    restarts were granted within window_s before this crash; attempt counts them."""
    policy, times = case
    granted: list[float] = []
    for now, decision in zip(times, run(policy, times), strict=True):
        recent = [t for t in granted if now - t <= policy.window_s]
        assert decision.restart == (len(recent) < policy.max_restarts), (now, granted)
        assert decision.attempt == len(recent) + 1
        if decision.restart:
            granted.append(now)
        else:
            assert "intensity" in decision.reason


@given(policy_and_times, st.floats(0.0, 1e4), st.integers(0, 2**32))
def test_after_a_quiet_period_longer_than_the_window_restarts_begin_again_at_attempt_one(
    case: tuple[RestartPolicy, list[float]], extra: float, seed: int
) -> None:
    policy, times = case
    tracker = RestartTracker(policy, random.Random(seed))  # noqa: S311 - jitter
    for t in times:
        tracker.decide(t)
    later = times[-1] + policy.window_s * (1 + 1e-6) + extra
    assume(later - times[-1] > policy.window_s)  # not lost to rounding
    decision = tracker.decide(later)
    assert decision.attempt == 1
    assert decision.restart == (policy.max_restarts >= 1)
    assert tracker.attempt == (1 if policy.max_restarts >= 1 else 0)


@given(policy_and_times, st.integers(0, 2**32))
def test_decisions_with_the_same_seed_are_the_same(
    case: tuple[RestartPolicy, list[float]], seed: int
) -> None:
    policy, times = case
    assert run(policy, times, seed) == run(policy, times, seed)


@given(policy_and_times, st.integers(0, 2**32))
def test_the_total_counts_every_granted_restart(
    case: tuple[RestartPolicy, list[float]], seed: int
) -> None:
    policy, times = case
    tracker = RestartTracker(policy, random.Random(seed))  # noqa: S311 - jitter
    decisions = [tracker.decide(t) for t in times]
    assert tracker.total == sum(d.restart for d in decisions)


# -- readiness stall deadline ------------------------------------------------------------

stall_cases = st.tuples(
    st.floats(0.0, 1e6),  # start
    st.floats(0.0, 600.0),  # stall_s
    st.floats(0.0, 3600.0),  # ceiling_s
    st.lists(st.floats(-10.0, 4000.0), max_size=20),  # progress offsets (any order)
    st.floats(-10.0, 5000.0),  # query offset
)


@given(stall_cases)
def test_the_wait_never_expires_before_the_stall_deadline_after_the_last_progress(
    case: tuple[float, float, float, list[float], float],
) -> None:
    start, stall_s, ceiling_s, progress, query = case
    deadline = StallDeadline(start, stall_s, ceiling_s)
    for offset in progress:
        deadline.progress(start + offset)
    last = max([start, *(start + p for p in progress)])
    assert deadline.last_progress == last
    now = start + query
    if now < last + stall_s and now < start + ceiling_s:
        assert deadline.expired(now) is None
    if now >= last + stall_s:
        assert deadline.expired(now) is not None
    assert (deadline.expired(now) is None) == (now < deadline.deadline)


@given(stall_cases, st.floats(0.0, 1e4))
def test_the_wait_always_expires_at_the_ceiling(
    case: tuple[float, float, float, list[float], float], beyond: float
) -> None:
    start, stall_s, ceiling_s, progress, _ = case
    deadline = StallDeadline(start, stall_s, ceiling_s)
    for offset in progress:
        deadline.progress(start + offset)
    for now in (start + ceiling_s, start + ceiling_s + beyond):
        reason = deadline.expired(now)
        assert reason is not None
        assert "ceiling" in reason
    assert deadline.deadline <= start + ceiling_s


# -- health thresholds -------------------------------------------------------------------

verdicts = st.sampled_from(["healthy", "degraded", "failure"])
healths = st.sampled_from(["unknown", "healthy", "degraded", "unavailable"])


@given(st.integers(1, 6), healths, st.lists(verdicts, max_size=40))
def test_health_is_unavailable_only_after_that_many_failures_in_a_row(
    unavailable_after: int, initial: str, seen: list[str]
) -> None:
    tracker = HealthTracker(unavailable_after, initial=initial)  # type: ignore[arg-type]
    run_of_failures = 0
    for verdict in seen:
        tracker.observe(Observation(verdict, f"probe said {verdict}"))  # type: ignore[arg-type]
        run_of_failures = run_of_failures + 1 if verdict == "failure" else 0
        assert tracker.failures == run_of_failures
        assert (tracker.state == "unavailable") == (run_of_failures >= unavailable_after)
        if verdict != "failure":
            assert tracker.state == verdict
        elif run_of_failures < unavailable_after:
            assert tracker.state == "degraded"


@given(
    st.integers(1, 6),
    healths,
    st.lists(
        st.one_of(verdicts.map(lambda v: ("observe", v)), healths.map(lambda h: ("force", h))),
        max_size=40,
    ),
)
def test_each_health_transition_is_reported_exactly_once(
    unavailable_after: int, initial: str, steps: list[tuple[str, str]]
) -> None:
    tracker = HealthTracker(unavailable_after, initial=initial)  # type: ignore[arg-type]
    reported = [initial]
    for kind, value in steps:
        before = tracker.state
        if kind == "observe":
            transition = tracker.observe(Observation(value, "x"))  # type: ignore[arg-type]
        else:
            transition = tracker.force(value, "forced")  # type: ignore[arg-type]
            assert tracker.state == value
            assert tracker.failures == 0
        if tracker.state == before:
            assert transition is None
        else:
            assert transition is not None
            assert (transition.old, transition.new) == (before, tracker.state)
            assert transition.reason
            reported.append(transition.new)
    # The reported transitions chain up to the final state with no repeats in a row.
    assert reported[-1] == tracker.state
    assert all(a != b for a, b in itertools.pairwise(reported))


@given(
    st.integers(1, 6),
    st.lists(st.just("failure"), max_size=10),
    st.sampled_from(["healthy", "degraded"]),
)
def test_a_success_resets_the_failure_count(
    unavailable_after: int, failures: list[str], success: str
) -> None:
    tracker = HealthTracker(unavailable_after)
    for verdict in failures:
        tracker.observe(Observation(verdict, "down"))  # type: ignore[arg-type]
    tracker.observe(Observation(success, "up"))  # type: ignore[arg-type]
    assert tracker.failures == 0
    assert tracker.state == success
    # It takes a full run of failures again to become unavailable.
    for n in range(1, unavailable_after + 1):
        transition = tracker.observe(Observation("failure", "down"))
        if n < unavailable_after:
            assert tracker.state == "degraded"
        else:
            assert tracker.state == "unavailable"
            assert transition is not None
            assert transition.new == "unavailable"

"""The benchmarks' statistics: paired ratios, the order-statistic interval of a quantile
and the three-way verdict (benchmarks/_harness.py). Pure functions on made-up numbers;
nothing here is timed."""

# ruff: noqa: S311 - seeded generators make reproducible test data, not secrets

from __future__ import annotations

import random
import statistics

import pytest

from benchmarks._harness import (
    Target,
    markdown,
    paired_ratios,
    quantile_interval,
    row,
    verdict,
    verdict_text,
)


@pytest.mark.parametrize(
    ("interval", "op", "bound", "expected"),
    [
        ((0.5, 0.9), "<=", 1.0, "met"),
        ((0.5, 1.0), "<=", 1.0, "met"),  # the bound itself is on the target's side
        ((1.1, 1.4), "<=", 1.0, "missed"),
        ((0.9, 1.1), "<=", 1.0, "inconclusive"),
        ((12_000, 15_000), ">=", 10_000, "met"),
        ((5_000, 9_000), ">=", 10_000, "missed"),
        ((9_000, 11_000), ">=", 10_000, "inconclusive"),
        ((None, 0.5), "<=", 1.0, "met"),
        ((0.5, None), "<=", 1.0, "inconclusive"),
        ((2.0, None), "<=", 1.0, "missed"),
        ((None, None), "<=", 1.0, "inconclusive"),
        ((None, None), ">=", 1.0, "inconclusive"),
    ],
)
def test_a_verdict_needs_the_whole_interval_on_one_side(
    interval: tuple[float | None, float | None], op: str, bound: float, expected: str
) -> None:
    assert verdict(interval, op, bound) == expected


def test_a_verdict_rejects_an_unknown_operator() -> None:
    with pytest.raises(ValueError, match="op"):
        verdict((1.0, 2.0), "<", 3.0)


def test_the_verdict_text_counts_the_rounds_when_inconclusive() -> None:
    assert verdict_text("met", 10) == "met"
    assert verdict_text("missed", 10) == "missed"
    assert verdict_text("inconclusive", 10) == "inconclusive, 10 rounds"
    assert verdict_text("inconclusive", 1) == "inconclusive, 1 round"
    assert verdict_text(None, 0) == "—"


def test_the_median_interval_is_a_pair_of_order_statistics() -> None:
    values = [float(v) for v in range(1, 11)]
    assert quantile_interval(values) == (2.0, 9.0)  # n = 10: ranks 2 and 9 (97.9 %)
    assert quantile_interval(values[:6]) == (1.0, 6.0)  # n = 6: the range (96.9 %)
    assert quantile_interval([float(v) for v in range(1, 16)]) == (4.0, 12.0)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5])
def test_five_rounds_or_fewer_leave_the_median_unbounded(n: int) -> None:
    values = [float(v) for v in range(n)]
    assert quantile_interval(values) == (None, None)
    assert verdict(quantile_interval(values), "<=", 1e9) == "inconclusive"


def test_a_p99_needs_hundreds_of_rounds_for_an_upper_end() -> None:
    values = [float(v) for v in range(40)]
    low, high = quantile_interval(values, 0.99)
    assert low == 37.0  # rank 38 of 40
    assert high is None  # so "p99 < bound" can only be missed or inconclusive
    assert quantile_interval([float(v) for v in range(367)], 0.99)[1] is None
    assert quantile_interval([float(v) for v in range(368)], 0.99)[1] == 367.0


def test_a_p90_needs_36_rounds_for_an_upper_end_and_then_it_is_the_largest_sample() -> None:
    assert quantile_interval([float(v) for v in range(35)], 0.9)[1] is None
    assert quantile_interval([float(v) for v in range(36)], 0.9)[1] == 35.0
    assert quantile_interval([float(v) for v in range(40)], 0.9) == (31.0, 39.0)  # x(32), x(40)
    assert quantile_interval([float(v) for v in range(54)], 0.9)[1] == 52.0  # no longer the max


def test_a_p90_target_is_met_only_when_every_round_of_36_or_more_is_within_it() -> None:
    target = Target("p90", "<=", 100.0)
    within = [float(v) for v in range(60, 100)]  # 40 rounds, all within
    judged = row("b", "m", "ms", within, target=target)
    assert (judged.statistic, judged.verdict, judged.interval) == ("p90", "met", (91.0, 99.0))
    assert row("b", "m", "ms", [*within[:-1], 101.0], target=target).verdict == "inconclusive"
    assert row("b", "m", "ms", within[:35], target=target).verdict == "inconclusive"
    assert row("b", "m", "ms", [200.0 + v for v in within], target=target).verdict == "missed"
    assert "p90 " in markdown({}, [judged])


@pytest.mark.parametrize("n", [6, 7, 10, 15, 20, 40, 101])
def test_the_interval_contains_the_sample_median(n: int) -> None:
    rng = random.Random(n)
    for _ in range(50):
        values = [rng.lognormvariate(0, 1) for _ in range(n)]
        low, high = quantile_interval(values)
        assert low is not None
        assert high is not None
        assert low <= statistics.median(values) <= high


def test_the_interval_is_deterministic_and_ignores_the_order_of_rounds() -> None:
    rng = random.Random(7)
    values = [rng.gauss(100, 10) for _ in range(20)]
    shuffled = values[:]
    random.Random(8).shuffle(shuffled)
    assert quantile_interval(values) == quantile_interval(values) == quantile_interval(shuffled)


def test_the_median_interval_covers_the_true_median_at_least_95_percent() -> None:
    """Exact coverage for n = 10 is 1 - 2 * 11/1024 = 97.9 %; seeded, so always the same."""
    rng = random.Random(2026)
    trials = 2_000
    covered = 0
    for _ in range(trials):
        low, high = quantile_interval([rng.random() for _ in range(10)])
        assert low is not None
        assert high is not None
        covered += low <= 0.5 <= high
    assert covered / trials >= 0.96


def test_ratios_are_paired_round_by_round() -> None:
    assert paired_ratios([2.0, 6.0, 3.0], [1.0, 3.0, 3.0]) == [2.0, 2.0, 1.0]
    assert paired_ratios([2.0, 4.0], 2) == [1.0, 2.0]
    assert paired_ratios([2.0, 4.0], [0.0, 2.0]) == [2.0]  # no ratio for a zero baseline
    with pytest.raises(ValueError, match="baseline rounds"):
        paired_ratios([1.0, 2.0], [1.0])


def test_a_ratio_row_is_the_median_of_paired_ratios_not_a_ratio_of_medians() -> None:
    baseline = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    measured = [11.0, 22.0, 33.0, 44.0, 55.0, 66.0]  # 10 % slower in every round
    r = row("b", "m", "ms", measured, baseline=("raw", baseline), target=Target("ratio", "<=", 1.2))
    assert r.ratio == pytest.approx(1.1)
    assert r.ratio_interval == pytest.approx((1.1, 1.1))
    assert r.verdict == "met"
    assert r.rounds == 6
    # The unpaired medians overlap widely; the pairing is what makes this conclusive.
    assert r.interval == (11.0, 66.0)


def test_a_ratio_row_misses_and_is_inconclusive_on_the_interval() -> None:
    baseline = [100.0] * 10
    slower = [120.0, 125.0, 118.0, 130.0, 121.0, 119.0, 127.0, 122.0, 124.0, 126.0]
    mixed = [90.0, 95.0, 98.0, 103.0, 105.0, 110.0, 97.0, 101.0, 108.0, 94.0]
    target = Target("ratio", "<=", 1.05)
    assert row("b", "m", "ms", slower, baseline=("raw", baseline), target=target).verdict == (
        "missed"
    )
    assert row("b", "m", "ms", mixed, baseline=("raw", baseline), target=target).verdict == (
        "inconclusive"
    )


def test_an_absolute_target_is_judged_on_the_interval_of_its_statistic() -> None:
    fast = [0.1, 0.12, 0.11, 0.13, 0.1, 0.09, 0.14, 0.1, 0.12, 0.11]
    assert row("b", "m", "ms", fast, target=Target("p50", "<=", 1.0)).verdict == "met"
    rates = [5_000.0, 5_400.0, 5_200.0, 5_300.0, 5_100.0, 5_600.0]
    assert row("b", "m", "/s", rates, target=Target("p50", ">=", 10_000)).verdict == "missed"
    few = row("b", "m", "ms", [0.1, 0.1], target=Target("p50", "<=", 1.0))
    assert few.verdict == "inconclusive"
    assert few.rounds == 2
    p99 = row("b", "m", "ms", [float(v) for v in range(40)], target=Target("p99", "<=", 50.0))
    assert p99.statistic == "p99"
    assert p99.verdict == "inconclusive"  # 40 rounds give p99 no upper end


def test_rounds_other_than_samples_carry_the_statistics() -> None:
    calls = [1.0] * 5 + [100.0] * 5  # every call, for the spread
    per_batch = [1.0, 1.1, 0.9, 1.0, 1.2, 1.0]  # one figure a round
    r = row("b", "m", "ms", calls, rounds=per_batch, target=Target("p50", "<=", 2.0))
    assert r.stats is not None
    assert r.stats.n == 10
    assert r.rounds == 6
    assert r.value == pytest.approx(1.0)
    assert r.verdict == "met"


def test_the_json_and_the_table_carry_ratio_interval_rounds_and_verdict() -> None:
    r = row(
        "bench",
        "metric",
        "ms",
        [1.0, 2.0, 3.0],
        baseline=("floor", [1.0, 1.0, 1.0]),
        target=Target("ratio", "<=", 1.05, "≤ 1.05 x floor"),
    )
    data = r.to_json()
    assert data["ratio"] == 2.0
    assert data["ratio_interval"] == [None, None]
    assert data["rounds"] == 3
    assert data["verdict"] == "inconclusive"
    assert data["verdict_text"] == "inconclusive, 3 rounds"
    table = markdown({"date": "today"}, [r])
    assert "| verdict |" in table
    assert "| ≤ 1.05 x floor | inconclusive, 3 rounds |" in table

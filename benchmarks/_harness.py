"""The shared harness: run arms alternately, summarise samples, compare with a baseline,
judge targets (met, missed or inconclusive, never asserted) and render the results.

Arms of one comparison run in the same process and the same rounds, their order rotated
each round (ABC, BCA, CAB, ...), so drift in machine load touches every arm alike. A
round is the unit of the statistics: a comparison is the median of the per-round ratios
measured_i / baseline_i, and every median (and p90, p99) carries an exact distribution-free
95 % interval from order statistics (see :func:`quantile_interval`).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIDENCE",
    "Context",
    "Interval",
    "Row",
    "Stats",
    "Target",
    "alternate",
    "machine_info",
    "markdown",
    "paired_ratios",
    "quantile_interval",
    "row",
    "skipped",
    "verdict",
    "verdict_text",
]


def log(message: str) -> None:
    """Progress for the person running the benchmarks (stderr, never in the results)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics ---------------------------------------------------------------------------

#: The coverage of every interval in the results.
CONFIDENCE = 0.95

#: A closed interval; ``None`` at an end means unbounded on that side (too few rounds
#: for an order statistic to bound it at :data:`CONFIDENCE`).
Interval = tuple[float | None, float | None]


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted samples (numpy's default method)."""
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ranks(n: int, q: float, confidence: float) -> tuple[int | None, int | None]:
    """1-based ranks ``(l, u)`` of the order statistics that bound the ``q`` quantile
    with at least ``confidence`` coverage, each tail at most ``(1 - confidence) / 2``.

    With ``B`` ~ Binomial(n, q) the count of samples below the true quantile,
    ``x_(l) > Q`` has probability P(B <= l-1) and ``x_(u) < Q`` has P(B >= u). The sums
    are exact (integers over a common denominator), so no rounding moves a rank.
    """
    p = Fraction(q).limit_denominator(1_000_000)
    tail = (1 - Fraction(confidence).limit_denominator(1_000_000)) / 2
    a, b = p.numerator, p.denominator
    # P(B <= k) = cdf[k] / b**n
    cdf: list[int] = []
    total = 0
    for k in range(n + 1):
        total += math.comb(n, k) * a**k * (b - a) ** (n - k)
        cdf.append(total)
    scale = b**n
    limit = tail * scale  # compare cdf[k] <= tail * b**n exactly
    low = None
    for rank in range(1, n + 1):
        if cdf[rank - 1] > limit:
            break
        low = rank
    high = None
    for rank in range(n, 0, -1):
        if scale - cdf[rank - 1] > limit:
            break
        high = rank
    return low, high


def quantile_interval(
    values: Sequence[float], q: float = 0.5, confidence: float = CONFIDENCE
) -> Interval:
    """The exact distribution-free interval for the ``q`` quantile of ``values``: a pair
    of order statistics chosen from the binomial distribution, so its coverage is at
    least ``confidence`` for any continuous distribution, with no resampling (the same
    values always give the same interval). An end is ``None`` when even the extreme
    sample is not far enough out: for the median that is n <= 5 rounds at 95 %, for
    p90 the upper end needs n >= 36 (and is then the largest sample), for p99
    n >= 368."""
    if not values:
        return (None, None)
    ordered = sorted(values)
    low, high = _ranks(len(ordered), q, confidence)
    return (
        None if low is None else ordered[low - 1],
        None if high is None else ordered[high - 1],
    )


def paired_ratios(measured: Sequence[float], baseline: Sequence[float] | float) -> list[float]:
    """Round i's measured_i / baseline_i (a constant baseline divides every round).
    Paired by round, so load that drifts between rounds cancels out of each ratio; a
    round whose baseline is 0 has no ratio and is left out."""
    if isinstance(baseline, int | float):
        base = [float(baseline)] * len(measured)
    else:
        base = list(baseline)
        if len(base) != len(measured):
            raise ValueError(f"{len(measured)} measured rounds but {len(base)} baseline rounds")
    return [m / b for m, b in zip(measured, base, strict=True) if b != 0]


def verdict(interval: Interval, op: str, bound: float) -> str:
    """``met`` when the whole interval is on the target's side of ``bound``, ``missed``
    when the whole interval is on the other side, else ``inconclusive``.

    ``op`` is ``<=`` (the statistic should be at most ``bound``) or ``>=``. An unbounded
    end (too few rounds) can never be wholly on one side, so few rounds are inconclusive.
    """
    if op not in ("<=", ">="):
        raise ValueError(f"op must be <= or >=, not {op!r}")
    low, high = interval
    if op == "<=":
        if high is not None and high <= bound:
            return "met"
        if low is not None and low > bound:
            return "missed"
    else:
        if low is not None and low >= bound:
            return "met"
        if high is not None and high < bound:
            return "missed"
    return "inconclusive"


def verdict_text(value: str | None, rounds: int) -> str:
    """The verdict as printed: ``met``, ``missed`` or ``inconclusive, N rounds``."""
    if value is None:
        return "—"
    if value == "inconclusive":
        return f"inconclusive, {rounds} round{'' if rounds == 1 else 's'}"
    return value


@dataclass(frozen=True)
class Stats:
    """The summary of one metric's samples."""

    n: int
    median: float
    p25: float
    p75: float
    p90: float
    p99: float
    min: float
    max: float
    mean: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        ordered = sorted(samples)
        return cls(
            n=len(ordered),
            median=statistics.median(ordered),
            p25=_quantile(ordered, 0.25),
            p75=_quantile(ordered, 0.75),
            p90=_quantile(ordered, 0.9),
            p99=_quantile(ordered, 0.99),
            min=ordered[0],
            max=ordered[-1],
            mean=statistics.fmean(ordered),
        )

    def get(self, which: str) -> float:
        return {"p50": self.median, "median": self.median, "p90": self.p90, "p99": self.p99}[which]


#: The quantile each target statistic is.
QUANTILES = {"p50": 0.5, "median": 0.5, "ratio": 0.5, "p90": 0.9, "p99": 0.99}


@dataclass(frozen=True)
class Target:
    """A goal for one statistic (``p50``, ``p90``, ``p99`` or ``ratio``, the median
    paired ratio): ``op`` is ``<=`` or ``>=``."""

    on: str
    op: str
    bound: float
    text: str = ""

    def describe(self) -> str:
        return self.text or f"{self.on} {self.op} {_num(self.bound)}"


@dataclass
class Row:
    """One line of the results table.

    ``samples`` are every sample (the spread); ``round_values`` are the per-round
    figures the median, the intervals and the verdict come from, when they differ from
    the samples (several samples a round). ``interval`` bounds the statistic the target
    is on (the median without a target); ``ratio`` is the median of the per-round
    ratios to the baseline, ``ratio_interval`` its interval.
    """

    benchmark: str
    metric: str
    unit: str
    stats: Stats | None
    rounds: int = 0
    statistic: str = "p50"
    estimate: float | None = None
    interval: Interval | None = None
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    ratio_interval: Interval | None = None
    ratios: list[float] = field(default_factory=list)
    target: Target | None = None
    verdict: str | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)
    round_values: list[float] | None = None

    @property
    def value(self) -> float | None:
        """The row's figure: the median over rounds."""
        per_round = self.round_values if self.round_values is not None else self.samples
        return statistics.median(per_round) if per_round else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["value"] = self.value
        data["target"] = None if self.target is None else self.target.describe()
        data["verdict_text"] = verdict_text(self.verdict, self.rounds)
        data["confidence"] = CONFIDENCE
        for key in ("interval", "ratio_interval"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data


def row(
    benchmark: str,
    metric: str,
    unit: str,
    samples: Sequence[float],
    *,
    rounds: Sequence[float] | None = None,
    baseline: tuple[str, Sequence[float] | float] | None = None,
    target: Target | None = None,
    note: str = "",
) -> Row:
    """A row over ``samples``, one per round unless ``rounds`` gives the per-round
    figures (for several samples a round, e.g. the median of a batch).

    A baseline is another arm's per-round figures from the same rounds (paired with
    these round by round) or one number; the ratio is the median of the per-round
    ratios, with its interval. The verdict on ``target`` comes from the interval of the
    statistic it names (:func:`verdict`).
    """
    per_round = list(samples if rounds is None else rounds)
    stats = Stats.of(samples) if samples else None
    statistic = target.on if target is not None and target.on != "ratio" else "p50"
    q = QUANTILES[statistic]
    estimate = _quantile(sorted(per_round), q) if per_round else None
    interval = quantile_interval(per_round, q) if per_round else None
    base_name = base_value = ratio = ratio_interval = None
    ratios: list[float] = []
    if baseline is not None:
        base_name, base = baseline
        if isinstance(base, int | float):
            base_value = float(base)
        elif base:
            base_value = statistics.median(base)
        if per_round and (isinstance(base, int | float) or base):
            ratios = paired_ratios(per_round, base)
        if ratios:
            ratio = statistics.median(ratios)
            ratio_interval = quantile_interval(ratios)
    judged = ratio_interval if target is not None and target.on == "ratio" else interval
    result = None
    if target is not None and judged is not None:
        result = verdict(judged, target.op, target.bound)
    return Row(
        benchmark=benchmark,
        metric=metric,
        unit=unit,
        stats=stats,
        rounds=len(ratios) if target is not None and target.on == "ratio" else len(per_round),
        statistic=statistic,
        estimate=estimate,
        interval=interval,
        baseline=base_name,
        baseline_value=base_value,
        ratio=ratio,
        ratio_interval=ratio_interval,
        ratios=[round(r, 6) for r in ratios],
        target=target,
        verdict=result,
        note=note,
        samples=[round(s, 6) for s in samples],
        round_values=None if rounds is None else [round(s, 6) for s in per_round],
    )


def skipped(benchmark: str, metric: str, why: str, target: Target | None = None) -> Row:
    """A row that could not be measured in this run, saying why."""
    return Row(benchmark, metric, "", None, target=target, note=f"skipped: {why}")


# -- running --------------------------------------------------------------------------------

Sample = float | Mapping[str, float]


def alternate(
    arms: Mapping[str, Callable[[], Sample]],
    repeat: int,
    *,
    warmup: int = 1,
    pause: float = 0.0,
) -> dict[str, dict[str, list[float]]]:
    """Run every arm ``warmup + repeat`` times in rounds, rotating the order each round.

    An arm returns one number or a mapping of named numbers (several metrics of one
    run). Warm-up rounds are discarded. ``pause`` seconds pass before each run, so the
    teardown of the previous arm's server (the kernel freeing its memory) does not land
    in the next arm's timing. Returns ``{arm: {metric: samples}}``; a plain number is
    filed under the metric ``""``.
    """
    names = list(arms)
    out: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for index in range(warmup + repeat):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            if pause:
                time.sleep(pause)
            result = arms[name]()
            if index < warmup:
                continue
            values = result if isinstance(result, Mapping) else {"": result}
            for metric, value in values.items():
                out[name].setdefault(metric, []).append(float(value))
        log(f"  round {index + 1}/{warmup + repeat}{' (warm-up)' if index < warmup else ''}")
    return out


@dataclass
class Context:
    """What every benchmark gets: the run's options and where to put its files."""

    quick: bool
    real: bool
    repeat: int | None
    work: Path
    binary: str | None = None
    model: str | None = None

    def reps(self, full: int, quick: int = 1) -> int:
        """``--repeat`` if given, else ``full`` (``quick`` with ``--quick``)."""
        if self.repeat is not None:
            return self.repeat
        return quick if self.quick else full

    def real_paths(self) -> tuple[str, str]:
        """The real llama-server and model of this run."""
        if self.binary is None or self.model is None:
            raise RuntimeError("this benchmark needs the real server: run without --no-real")
        return self.binary, self.model

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path


# -- the machine ----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=False,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def server_version(binary: str | None) -> str | None:
    """The first line llama-server prints for ``--version`` (it prints to stderr)."""
    if binary is None:
        return None
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        return f"unknown ({exc})"
    text = (out.stderr or out.stdout).strip().splitlines()
    return next((line for line in text if line.startswith("version")), text[0] if text else None)


def machine_info() -> dict[str, Any]:
    import psutil

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git_commit(),
    }


# -- rendering ------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    if value is None:
        return "—"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _interval(interval: Interval | None, number: Callable[[float], str]) -> str:
    """`` [low, high]`` with ``-∞``/``+∞`` for an unbounded end; nothing when both are."""
    if interval is None or interval == (None, None):
        return ""
    low, high = interval
    left = "-∞" if low is None else number(low)
    right = "+∞" if high is None else number(high)
    return f" [{left}, {right}]"


def _ratio(value: float) -> str:
    return f"{value:.3f}"


def _value(r: Row) -> str:
    if r.stats is None or r.value is None:
        return r.note or "—"
    unit = f" {r.unit}" if r.unit else ""
    if r.statistic in ("p90", "p99") and r.estimate is not None:
        head = f"{r.statistic} {_num(r.estimate)}{unit}{_interval(r.interval, _num)}"
        return f"{head} (p50 {_num(r.value)})"
    return f"{_num(r.value)}{unit}{_interval(r.interval, _num)}"


def _spread(r: Row) -> str:
    s = r.stats
    if s is None:
        return "—"
    if s.n == 1:
        return "n=1"
    text = f"IQR {_num(s.p25)}..{_num(s.p75)}, range {_num(s.min)}..{_num(s.max)}, n={s.n}"
    if r.round_values is not None:
        count = len(r.round_values)
        text += f" in {count} round{'' if count == 1 else 's'}"
    return text


def markdown(meta: Mapping[str, Any], rows: Sequence[Row]) -> str:
    """The results as a Markdown document: the run's facts, then one table."""
    lines = ["# llama_actors benchmarks", ""]
    for key in (
        "date",
        "machine",
        "llama_server",
        "model",
        "mode",
        "git_commit",
        "load_average",
        "duration_s",
    ):
        if meta.get(key) is not None:
            lines.append(f"- **{key}**: {meta[key]}")
    percent = f"{CONFIDENCE:.0%}".replace("%", " %")
    lines += [
        "",
        f"Values are medians over rounds with their {percent} interval in brackets; a ratio "
        "is the median of the per-round ratios to the baseline. A verdict is met or missed "
        "only when the whole interval is on one side of the target (benchmarks/README.md).",
        "",
        f"| benchmark | metric | value [{percent} CI] | spread | baseline "
        f"| ratio [{percent} CI] | target | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = "—"
        if r.baseline is not None:
            base = f"{r.baseline}: {_num(r.baseline_value)} {r.unit}".strip()
        ratio = "—" if r.ratio is None else _ratio(r.ratio) + _interval(r.ratio_interval, _ratio)
        target = "—" if r.target is None else r.target.describe()
        metric = r.metric + (f" ({r.note})" if r.note and r.stats is not None else "")
        cells = [
            r.benchmark,
            metric,
            _value(r),
            _spread(r),
            base,
            ratio,
            target,
            verdict_text(r.verdict, r.rounds),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"

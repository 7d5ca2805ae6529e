"""The shared harness: run arms alternately, summarise samples, compare with a baseline,
check targets (reported as met or missed, never asserted) and render the results.

Every figure is a median over repeated runs. Arms of one comparison run in the same
process and the same rounds, their order rotated each round (ABC, BCA, CAB, ...), so
drift in machine load touches every arm alike.
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
from pathlib import Path
from typing import Any

__all__ = [
    "Context",
    "Row",
    "Stats",
    "Target",
    "alternate",
    "machine_info",
    "markdown",
    "row",
    "skipped",
]


def log(message: str) -> None:
    """Progress for the person running the benchmarks (stderr, never in the results)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics ---------------------------------------------------------------------------


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted samples (numpy's default method)."""
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Stats:
    """The summary of one metric's samples."""

    n: int
    median: float
    p25: float
    p75: float
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
            p99=_quantile(ordered, 0.99),
            min=ordered[0],
            max=ordered[-1],
            mean=statistics.fmean(ordered),
        )

    def get(self, which: str) -> float:
        return {"p50": self.median, "median": self.median, "p99": self.p99}[which]


@dataclass(frozen=True)
class Target:
    """A goal for one statistic (``p50``, ``p99`` or ``ratio``): ``op`` is ``<=`` or ``>=``."""

    on: str
    op: str
    bound: float
    text: str = ""

    def check(self, stats: Stats | None, ratio: float | None) -> bool | None:
        value = ratio if self.on == "ratio" else (stats.get(self.on) if stats else None)
        if value is None:
            return None
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def describe(self) -> str:
        return self.text or f"{self.on} {self.op} {_num(self.bound)}"


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    metric: str
    unit: str
    stats: Stats | None
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    target: Target | None = None
    met: bool | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)

    @property
    def value(self) -> float | None:
        return None if self.stats is None else self.stats.median

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["value"] = self.value
        data["target"] = None if self.target is None else self.target.describe()
        return data


def row(
    benchmark: str,
    metric: str,
    unit: str,
    samples: Sequence[float],
    *,
    baseline: tuple[str, Sequence[float] | float] | None = None,
    target: Target | None = None,
    note: str = "",
) -> Row:
    """A row whose value is the median of ``samples``; with a baseline (samples of
    another arm, or one number), the ratio is value / baseline median."""
    stats = Stats.of(samples) if samples else None
    base_name = base_value = ratio = None
    if baseline is not None:
        base_name, base = baseline
        if isinstance(base, int | float):
            base_value = float(base)
        elif base:
            base_value = Stats.of(base).median
        if stats is not None and base_value:
            ratio = stats.median / base_value
    met = None if target is None else target.check(stats, ratio)
    return Row(
        benchmark=benchmark,
        metric=metric,
        unit=unit,
        stats=stats,
        baseline=base_name,
        baseline_value=base_value,
        ratio=ratio,
        target=target,
        met=met,
        note=note,
        samples=[round(s, 6) for s in samples],
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


def _met(value: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "—"}[value]


def _value(r: Row) -> str:
    if r.stats is None:
        return r.note or "—"
    text = f"{_num(r.stats.median)} {r.unit}".strip()
    if r.target is not None and r.target.on == "p99":
        text += f" (p99 {_num(r.stats.p99)})"
    return text


def _spread(r: Row) -> str:
    s = r.stats
    if s is None:
        return "—"
    if s.n == 1:
        return "n=1"
    return f"IQR {_num(s.p25)}..{_num(s.p75)}, range {_num(s.min)}..{_num(s.max)}, n={s.n}"


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
    lines += [
        "",
        "| benchmark | metric | value | spread | baseline | ratio | target | met? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = "—"
        if r.baseline is not None:
            base = f"{r.baseline}: {_num(r.baseline_value)} {r.unit}".strip()
        ratio = "—" if r.ratio is None else f"{r.ratio:.3f}"
        target = "—" if r.target is None else r.target.describe()
        metric = r.metric + (f" ({r.note})" if r.note and r.stats is not None else "")
        cells = [r.benchmark, metric, _value(r), _spread(r), base, ratio, target, _met(r.met)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"

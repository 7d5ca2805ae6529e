"""Scale: one runtime supervising many fake servers at a 1 s health interval.

The fake servers are started in batches of 10 (each is a Python process, so on a small
machine their start-up is the slow part) through ``Runtime.actor_face().ensure_instance``,
with a generous stall deadline. Once all are healthy and a settling pause has passed:

- CPU of the runtime's own process over a window, from ``resource.getrusage(RUSAGE_SELF)``
  (user + system, every thread of this process; the servers are child processes and
  are not counted), as a percentage of one core, next to the same runtime with no
  instance over equal windows;
- resident memory (RSS) added per instance, from psutil, against the runtime's RSS
  before the first spawn;
- threads added per instance (``threading.active_count()``).

Health probes answered during the window are counted (``probe_completed``) to show the
pollers kept their cadence, and the CPU per probe follows from the two. The fake answers
``/health`` in several small writes, which makes a client's read cost more than against
llama-server; the per-probe figure is an upper bound for real servers. Closing the
runtime must leave no server behind: every server pid is checked afterwards.
"""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
from typing import Any

import psutil

from benchmarks import _servers
from benchmarks._answers import Answers
from benchmarks._harness import Context, Row, Target, log, row
from llama_actors import Runtime, signals

NAME = "scale"
BATCH = 10


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_percent(window: float) -> float:
    before, started = _cpu_seconds(), time.monotonic()
    time.sleep(window)
    return (_cpu_seconds() - before) / (time.monotonic() - started) * 100


def run(ctx: Context) -> list[Row]:
    count = 5 if ctx.quick else 100
    # Six windows: the fewest whose median has a 95 % interval (benchmarks/README.md).
    window = 1.0 if ctx.quick else 5.0
    windows = ctx.reps(6, 1)
    folder = ctx.folder(NAME)
    me = psutil.Process()
    probes = 0
    lock = threading.Lock()

    def on_probe(_sender: str, **_: Any) -> None:
        nonlocal probes
        with lock:
            probes += 1

    pids: list[int] = []
    with Runtime(state_dir=folder / "state") as runtime:
        idle_cpu = [_cpu_percent(window) for _ in range(windows)]
        rss_before, threads_before = me.memory_info().rss, threading.active_count()
        log(f"{NAME}: starting {count} fake servers in batches of {BATCH}")
        began = time.monotonic()
        with Answers(runtime) as answers:
            for first in range(0, count, BATCH):
                requests = []
                for index in range(first, min(first + BATCH, count)):
                    spec = _servers.server_spec(
                        "fake",
                        folder / f"fake-{index:03d}",
                        health_interval_ms=1_000,
                        ready_timeout_ms=120_000,
                    )
                    requests.append(answers.face.ensure_instance(spec))
                for request in requests:
                    answers.get(request, timeout=300)
        started_s = time.monotonic() - began
        deadline = time.monotonic() + 60
        while runtime.statistics().health.get("healthy", 0) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not all {count} instances healthy: {runtime.statistics()}")
            time.sleep(0.2)
        time.sleep(1.0 if ctx.quick else 3.0)  # settle: first probes done, allocations made
        rss_after, threads_after = me.memory_info().rss, threading.active_count()
        pids = [s.pid for s in runtime.instances() if s.pid is not None]
        log(f"{NAME}: {count} healthy after {started_s:.1f}s; measuring {windows}x{window:g}s")
        signals.probe_completed.connect(on_probe, weak=False)
        try:
            with lock:
                probes = 0
            measured = time.monotonic()
            busy_cpu = [_cpu_percent(window) for _ in range(windows)]
            with lock:
                probe_rate = probes / (time.monotonic() - measured)
        finally:
            signals.probe_completed.disconnect(on_probe)
    left = [pid for pid in pids if _alive(pid)]
    for pid in left:  # ours: started by this runtime; should never happen
        os.kill(pid, signal.SIGKILL)
    note = f"{len(left)} servers outlived close()" if left else ""
    return [
        row(
            NAME,
            f"runtime CPU, {count} instances at 1 s health interval",
            "% of a core",
            busy_cpu,
            target=Target("p50", "<=", 10.0, "< 10 % of one core"),
            note=note,
        ),
        row(NAME, "runtime CPU, no instance (idle floor)", "% of a core", idle_cpu),
        row(
            NAME,
            "runtime memory per instance (RSS delta / instances)",
            "MiB",
            [(rss_after - rss_before) / count / 2**20],
        ),
        row(
            NAME,
            "runtime threads per instance",
            "threads",
            [(threads_after - threads_before) / count],
        ),
        row(NAME, f"health probes answered per second ({count} instances)", "/s", [probe_rate]),
        row(
            NAME,
            "runtime CPU per health probe (CPU / probes)",
            "ms",
            [cpu / 100 * 1000 / probe_rate for cpu in busy_cpu] if probe_rate else [],
        ),
        row(NAME, f"time to start {count} fake servers, {BATCH} at a time", "s", [started_s]),
    ]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

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

That runtime has the default policy, so besides ``/health`` it reads every instance's
``/metrics`` every two seconds (``load_interval_ms = 2000``; ``/slots`` too while a
request is processing, which never happens here). What those load
readings cost is measured next, with and without them in alternated windows. A
policy is fixed when an instance is first resolved, so each window opens a Runtime of
its own with the window's policy and attaches it (``{"backend": "attach"}``: the same
pollers, no process to supervise) to the same number of fake servers, started by hand
once for all windows after the first runtime closed; it waits until all are healthy,
settles, measures one window and closes:

- **load readings**: ``load_interval_ms = 1000`` (``/health`` and the load readings,
  each every second; twice the default rate, so the cost of one reading shows);
- **no load readings**: ``load_interval_ms = None`` (``/health`` only).

The windows alternate, the order rotated each round, after a warm-up round. Each
window counts the health probes answered (per second) and, at its end, the instances
whose last load reading is at most two seconds old (all of them with load readings,
none without). The CPU per load reading is each round's difference between the arms
over the readings per second (one per instance per second).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks import _servers
from benchmarks._answers import Answers
from benchmarks._harness import Context, Row, Target, alternate, log, row
from llama_actors import InstancePolicy, Runtime, signals

NAME = "scale"
BATCH = 10
LOAD_ARMS = {
    "load readings": InstancePolicy(load_interval_ms=1000),  # twice the default rate
    "no load readings": InstancePolicy(load_interval_ms=None),
}


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
            f"runtime CPU, {count} instances at 1 s health interval (load readings every 2 s)",
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
            "runtime CPU per health probe (CPU / probes, load readings included)",
            "ms",
            [cpu / 100 * 1000 / probe_rate for cpu in busy_cpu] if probe_rate else [],
        ),
        row(NAME, f"time to start {count} fake servers, {BATCH} at a time", "s", [started_s]),
        *_load_readings(ctx, folder, count, window, windows),
    ]


def _load_readings(
    ctx: Context, folder: Path, count: int, window: float, windows: int
) -> list[Row]:
    """Runtime CPU with and without load readings, in alternated windows, each by a
    Runtime of its own attached to the same ``count`` fake servers (module docstring)."""
    log(f"{NAME}: load readings on/off: starting {count} fake servers by hand")
    servers: list[subprocess.Popen[bytes]] = []
    try:
        urls = _start_by_hand(folder, count, servers)
        runs = 0

        def measure(arm: str) -> dict[str, float]:
            nonlocal runs
            runs += 1
            probes = _Counter()
            with Runtime(state_dir=folder / f"attach-{runs:03d}", policy=LOAD_ARMS[arm]) as rt:
                with Answers(rt) as answers:
                    requests = [
                        answers.face.ensure_instance(
                            {"backend": "attach", "url": url, "health_interval_ms": 1_000}
                        )
                        for url in urls
                    ]
                    for request in requests:
                        answers.get(request, timeout=120)
                _wait_healthy(rt, count)
                time.sleep(1.0 if ctx.quick else 3.0)  # settle, as above
                signals.probe_completed.connect(probes, weak=False)
                try:
                    began = time.monotonic()
                    cpu = _cpu_percent(window)
                    rate = probes.count / (time.monotonic() - began)
                finally:
                    signals.probe_completed.disconnect(probes)
                now = time.monotonic()
                fresh = sum(
                    1
                    for snap in rt.instances()
                    if snap.load is not None and now - snap.load.read_at <= 2.0
                )
            return {"cpu": cpu, "probes": rate, "fresh": fresh}

        arms = {arm: (lambda arm=arm: measure(arm)) for arm in LOAD_ARMS}
        log(f"{NAME}: alternating {' / '.join(arms)}, {windows}x{window:g}s each")
        out = alternate(arms, windows, warmup=0 if ctx.quick else 1)
    finally:
        _servers.stop_processes(servers)
    on, off = out["load readings"], out["no load readings"]
    per_reading = [  # CPU ms per load reading: (on - off) over count readings a second
        (a - b) / 100 * 1000 / count for a, b in zip(on["cpu"], off["cpu"], strict=True)
    ]
    low, high = int(min(on["fresh"])), int(max(on["fresh"]))
    fresh_on = f"fresh load readings at each window's end: {low}..{high} of {count}"
    stale_off = int(max(off["fresh"]))
    attached = f"{count} attached instances, 1 s health interval"
    return [
        row(
            NAME,
            f"runtime CPU, {attached}, load readings every 1 s",
            "% of a core",
            on["cpu"],
            baseline=("no load readings", off["cpu"]),
            target=Target("p50", "<=", 10.0, "< 10 % of one core"),
            note=fresh_on,
        ),
        row(
            NAME,
            f"runtime CPU, {attached}, no load readings (load_interval_ms=None)",
            "% of a core",
            off["cpu"],
            note=f"{stale_off} instances had a load reading" if stale_off else "",
        ),
        row(NAME, "health probes per second, load readings every 1 s", "/s", on["probes"]),
        row(NAME, "health probes per second, no load readings", "/s", off["probes"]),
        row(
            NAME,
            "runtime CPU per idle load reading (/metrics): CPU difference / readings",
            "ms",
            per_reading,
        ),
    ]


class _Counter:
    """Counts the health probes completed (``probe_completed`` with ``kind="health"``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    def __call__(self, _sender: str, **payload: Any) -> None:
        if payload.get("kind") == "health":
            with self.lock:
                self.count += 1


def _start_by_hand(folder: Path, count: int, servers: list[subprocess.Popen[bytes]]) -> list[str]:
    """Start ``count`` fake servers by hand, ``BATCH`` at a time; their root URLs."""
    urls: list[str] = []
    for first in range(0, count, BATCH):
        batch = []
        for index in range(first, min(first + BATCH, count)):
            spec = _servers.server_spec("fake", folder / f"hand-{index:03d}")
            port = _servers.free_port()
            servers.append(_servers.raw_start(spec, port))
            batch.append((servers[-1], port))
        for process, port in batch:
            _servers.poll_until_ok(port, 120, gap=0.01, process=process)
            urls.append(f"http://127.0.0.1:{port}")
    return urls


def _wait_healthy(runtime: Runtime, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while runtime.statistics().health.get("healthy", 0) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not all {count} instances healthy: {runtime.statistics()}")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

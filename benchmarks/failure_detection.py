"""Failure detection: how soon the runtime tells its subscribers that a server is gone.

- SIGKILL of the server process to ``health_changed(new="unavailable")``: the exit is
  seen by the process seam at once, not by the next health poll. The floor, alternated
  with it: SIGKILL of a hand-started server until its exit shows on a pidfd (the
  kernel's teardown of the process; a few ms for the fake, more for the real server,
  which unmaps its model). Then the time until the restarted server is ready again
  (backoff 0).
- SIGSTOP (a hung server: its socket still accepts, nothing answers) to ``degraded``
  (first failed probe) and ``unavailable`` (``unavailable_after`` failed probes in a
  row). The HealthPoller probes every ``I = health_interval_ms``, each probe bounded by
  ``T = probe_timeout_ms``, the next one ``max(0, I - elapsed)`` after a probe ends.
  A stop lands uniformly within an interval, so the model is
  ``degraded`` in ``[T, I + T]`` (mean ``I/2 + T``) and ``unavailable`` in
  ``[T + (N-1)·max(I, T), I + T + (N-1)·max(I, T)]``; the baseline column shows the
  model's mean and the target its upper end.

Times are from just before ``os.kill`` to ``time.monotonic()`` in the signal's receiver.
Only pids of servers this runtime started are signalled.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Any

from benchmarks import _servers
from benchmarks._harness import Context, Row, Target, log, row
from llama_actors import BootSpec, InstancePolicy, RestartPolicy, Runtime, signals

NAME = "failure_detection"
INTERVAL_MS = 250
TIMEOUT_MS = 250
UNAVAILABLE_AFTER = 3

POLICY = InstancePolicy(
    restart=RestartPolicy(backoff_initial_ms=0, max_restarts=10_000, window_s=1.0),
    probe_timeout_ms=TIMEOUT_MS,
    slow_probe_ms=TIMEOUT_MS,
    unavailable_after=UNAVAILABLE_AFTER,
    wedged_restart_ms=None,  # a stopped server is only observed, never killed here
)


class Health:
    """The time of each ``health_changed`` of one instance, by new state."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: list[tuple[str, float]] = []

    def __call__(self, sender: str, *, new: str, **_: Any) -> None:
        now = time.monotonic()
        with self.cond:
            self.seen.append((new, now))
            self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.seen)

    def wait(self, state: str, since: int, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for new, at in self.seen[since:]:
                    if new == state:
                        return at
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no health_changed to {state} within {timeout:g}s")
                self.cond.wait(left)


def run(ctx: Context) -> list[Row]:
    kind = "real" if ctx.real else "fake"
    folder = ctx.folder(NAME)
    spec = _servers.server_spec(kind, folder / "fake", health_interval_ms=INTERVAL_MS)
    repeat = ctx.reps(15, 1)
    floor_ms: list[float] = []
    kill_ms: list[float] = []
    restart_ms: list[float] = []
    degraded_ms: list[float] = []
    unavailable_ms: list[float] = []
    phase = random.Random(6)  # noqa: S311 - where in a poll interval each stop lands
    with Runtime(state_dir=folder / "state", policy=POLICY) as runtime:
        resolution = runtime.resolve_endpoint(spec, "bench-failure", ttl_ms=3_600_000)
        iid = resolution.instance.instance_id
        health = Health()
        signals.health_changed.connect(health, sender=iid, weak=False)
        ready_again = threading.Event()

        def on_ready(_sender: str, **_: Any) -> None:
            ready_again.set()

        signals.instance_ready.connect(on_ready, sender=iid, weak=False)
        try:
            log(f"{NAME}: {repeat} SIGKILLs and SIGSTOPs of the {kind} server")
            for _ in range(repeat):
                floor_ms.append(_raw_kill(spec) * 1000)  # alternated with the runtime's
                runtime.wait_healthy(iid, timeout=60)
                pid = _pid(runtime, iid)
                mark = health.mark()
                ready_again.clear()
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                kill_ms.append((health.wait("unavailable", mark) - killed) * 1000)
                if not ready_again.wait(60):
                    raise TimeoutError("the killed server was not restarted within 60 s")
                restart_ms.append((time.monotonic() - killed) * 1000)

                runtime.wait_healthy(iid, timeout=60)
                time.sleep(phase.uniform(0, INTERVAL_MS / 1000))  # a random phase of a poll
                pid = _pid(runtime, iid)
                mark = health.mark()
                stopped = time.monotonic()
                os.kill(pid, signal.SIGSTOP)
                try:
                    degraded_ms.append((health.wait("degraded", mark) - stopped) * 1000)
                    unavailable_ms.append((health.wait("unavailable", mark) - stopped) * 1000)
                finally:
                    os.kill(pid, signal.SIGCONT)
        finally:
            signals.health_changed.disconnect(health, sender=iid)
            signals.instance_ready.disconnect(on_ready, sender=iid)

    i, t, n = INTERVAL_MS, TIMEOUT_MS, UNAVAILABLE_AFTER
    step = (n - 1) * max(i, t)
    config = f"I={i} ms, T={t} ms, N={n}"
    return [
        row(NAME, f"raw: SIGKILL → exit seen on a pidfd ({kind})", "ms", floor_ms),
        row(
            NAME,
            f"SIGKILL → unavailable ({kind})",
            "ms",
            kill_ms,
            baseline=("raw exit seen", floor_ms),
            target=Target("p50", "<=", 10.0, "p50 < 10 ms"),
        ),
        row(NAME, f"SIGKILL → ready again (restart, backoff 0) ({kind})", "ms", restart_ms),
        row(
            NAME,
            f"SIGSTOP → degraded ({kind}; {config})",
            "ms",
            degraded_ms,
            baseline=("model mean I/2+T", i / 2 + t),
            target=Target("p50", "<=", i + t, f"p50 ≤ I+T = {i + t} ms"),
        ),
        row(
            NAME,
            f"SIGSTOP → unavailable ({kind}; {config})",
            "ms",
            unavailable_ms,
            baseline=("model mean I/2+T+(N-1)·max(I,T)", i / 2 + t + step),
            target=Target(
                "p50", "<=", i + t + step, f"p50 ≤ I+T+(N-1)·max(I,T) = {i + t + step} ms"
            ),
        ),
    ]


def _pid(runtime: Runtime, iid: str) -> int:
    pid = runtime.snapshot(iid).pid
    if pid is None:
        raise RuntimeError(f"instance {iid} has no server process")
    return pid


def _raw_kill(spec: BootSpec) -> float:
    """The floor: SIGKILL of a hand-started server until its exit shows on a pidfd."""
    port = _servers.free_port()
    process = _servers.raw_start(spec, port)
    try:
        _servers.poll_until_ok(port, 120, gap=0.005, process=process)
        return _servers.kill_and_time(process)
    finally:
        _servers.stop_process(process)

"""Warm resolve and leases, on one healthy fake server (no spawn is timed).

- Latency of one ``Runtime.resolve_endpoint`` on the ready instance (the spec passed as
  the same ``BootSpec`` every time) and of one ``Runtime.release``, against the floor
  of any synchronous call into an actor: one bare pykka ``ask`` round trip to an actor
  that does nothing. The three arms run in alternating batches.
- Throughput of lease grant plus release: resolve + release pairs one after another
  through the synchronous facade, and the same pairs pipelined through
  ``Runtime.proxy()`` (every resolve sent, then every release, answers on futures),
  which shows what the actors can do when no caller waits between calls.
"""

from __future__ import annotations

import time
from typing import Any

import pykka

from benchmarks import _servers
from benchmarks._harness import Context, Row, Target, alternate, log, row
from llama_actors import Runtime

NAME = "warm_resolve"


class Echo(pykka.ThreadingActor):
    use_daemon_thread = True

    def on_receive(self, message: Any) -> Any:
        return message


def run(ctx: Context) -> list[Row]:
    folder = ctx.folder(NAME)
    spec = _servers.server_spec("fake", folder / "fake")
    batch = 50 if ctx.quick else 200
    pairs = 200 if ctx.quick else 2_000
    resolve_ms: list[float] = []
    release_ms: list[float] = []
    ask_ms: list[float] = []
    echo = Echo.start()
    try:
        with Runtime(state_dir=folder / "state") as runtime:
            held = runtime.resolve_endpoint(spec, "bench-warm", timeout=60)  # spawn, untimed
            runtime.wait_healthy(held.instance.instance_id, timeout=30)

            def resolves() -> float:
                for _ in range(batch):
                    started = time.perf_counter()
                    resolution = runtime.resolve_endpoint(spec, "bench-warm")
                    between = time.perf_counter()
                    runtime.release(resolution.lease.lease_ref)
                    ended = time.perf_counter()
                    resolve_ms.append((between - started) * 1000)
                    release_ms.append((ended - between) * 1000)
                return 0.0

            def asks() -> float:
                for _ in range(batch):
                    started = time.perf_counter()
                    echo.ask("ping")
                    ask_ms.append((time.perf_counter() - started) * 1000)
                return 0.0

            def sync_pairs() -> float:
                started = time.perf_counter()
                for _ in range(pairs):
                    runtime.release(runtime.resolve_endpoint(spec, "bench-warm").lease.lease_ref)
                return pairs / (time.perf_counter() - started)

            proxy = runtime.proxy()

            def pipelined_pairs() -> float:
                started = time.perf_counter()
                answers = []
                for _ in range(pairs):
                    answer: pykka.ThreadingFuture[Any] = pykka.ThreadingFuture()
                    proxy.resolve_endpoint(spec, "bench-warm", reply_to=answer)
                    answers.append(answer)
                released = []
                for answer in answers:
                    done: pykka.ThreadingFuture[Any] = pykka.ThreadingFuture()
                    proxy.release(answer.get(timeout=60).lease.lease_ref, reply_to=done)
                    released.append(done)
                for done in released:
                    done.get(timeout=60)
                return pairs / (time.perf_counter() - started)

            log(f"{NAME}: batches of {batch} calls, {pairs} pairs per throughput run")
            repeat = ctx.reps(10, 1)
            warmup = 0 if ctx.quick else 1
            alternate({"resolve": resolves, "ask": asks}, repeat, warmup=warmup)
            # The warm-up batch filled the lists too: keep the measured batches only.
            del resolve_ms[: batch * warmup], release_ms[: batch * warmup]
            del ask_ms[: batch * warmup]
            rates = alternate(
                {"sync": sync_pairs, "pipelined": pipelined_pairs}, repeat, warmup=warmup
            )
            runtime.release(held.lease.lease_ref)
    finally:
        echo.stop()
    return [
        row(
            NAME,
            "resolve_endpoint on a ready instance",
            "ms",
            resolve_ms,
            baseline=("bare pykka ask", ask_ms),
            target=Target("p50", "<=", 1.0, "p50 < 1 ms"),
        ),
        row(NAME, "release", "ms", release_ms, baseline=("bare pykka ask", ask_ms)),
        row(NAME, "bare pykka ask round trip (floor)", "ms", ask_ms),
        row(
            NAME,
            "resolve + release pairs, sync facade",
            "pairs/s",
            rates["sync"][""],
            target=Target("p50", ">=", 10_000, "≥ 10,000 /s"),
        ),
        row(
            NAME,
            "resolve + release pairs, pipelined via proxy()",
            "pairs/s",
            rates["pipelined"][""],
            target=Target("p50", ">=", 10_000, "≥ 10,000 /s"),
        ),
    ]

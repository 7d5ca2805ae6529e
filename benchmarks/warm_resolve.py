"""Warm resolve and leases, on one healthy fake server (no spawn is timed).

- Latency of one ``Runtime.resolve_endpoint`` on the ready instance, two ways: with a
  pre-validated spec (the ``BootSpec`` from ``llama_actors.boot_spec``, passed the same
  every time: the runtime need not validate it again) and with a plain mapping (a new
  dict each call, which the runtime normalises and validates each time); and of one
  ``Runtime.release``. The floor is any synchronous call into an actor: one bare pykka
  ``ask`` round trip to an actor that does nothing. The three arms run in alternating
  batches; a batch is a round, its figure the median of its calls.
- Throughput of lease grant plus release: resolve + release pairs one after another
  through the synchronous facade, and the same pairs pipelined through
  ``Runtime.actor_face()`` (every resolve sent, then every release, the answers told
  to one actor), which shows what the actors can do when no caller waits between calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from statistics import median
from typing import Any

import pykka

from benchmarks import _servers
from benchmarks._answers import Answers
from benchmarks._harness import Context, Row, Target, alternate, log, row
from llama_actors import Runtime, boot_spec

NAME = "warm_resolve"


class Echo(pykka.ThreadingActor):
    use_daemon_thread = True

    def on_receive(self, message: Any) -> Any:
        return message


def run(ctx: Context) -> list[Row]:
    folder = ctx.folder(NAME)
    spec = boot_spec(_servers.server_spec("fake", folder / "fake").to_mapping())
    mapping = spec.to_mapping()
    batch = 50 if ctx.quick else 200
    pairs = 200 if ctx.quick else 2_000
    calls: dict[str, list[float]] = {"spec": [], "mapping": [], "release": [], "ask": []}
    echo = Echo.start()
    try:
        with Runtime(state_dir=folder / "state") as runtime:
            held = runtime.resolve_endpoint(spec, "bench-warm", timeout=60)  # spawn, untimed
            runtime.wait_healthy(held.instance.instance_id, timeout=30)

            def resolves(name: str, make: Callable[[], Any]) -> Callable[[], dict[str, float]]:
                def arm() -> dict[str, float]:
                    resolve_ms, release_ms = [], []
                    for _ in range(batch):
                        given = make()
                        started = time.perf_counter()
                        resolution = runtime.resolve_endpoint(given, "bench-warm")
                        between = time.perf_counter()
                        runtime.release(resolution.lease.lease_ref)
                        ended = time.perf_counter()
                        resolve_ms.append((between - started) * 1000)
                        release_ms.append((ended - between) * 1000)
                    calls[name] += resolve_ms
                    if name == "spec":
                        calls["release"] += release_ms
                    return {"resolve": median(resolve_ms), "release": median(release_ms)}

                return arm

            def asks() -> float:
                ask_ms = []
                for _ in range(batch):
                    started = time.perf_counter()
                    echo.ask("ping")
                    ask_ms.append((time.perf_counter() - started) * 1000)
                calls["ask"] += ask_ms
                return median(ask_ms)

            def sync_pairs() -> float:
                started = time.perf_counter()
                for _ in range(pairs):
                    runtime.release(runtime.resolve_endpoint(spec, "bench-warm").lease.lease_ref)
                return pairs / (time.perf_counter() - started)

            def pipelined_pairs() -> float:
                with Answers(runtime) as answers:
                    face = answers.face
                    started = time.perf_counter()
                    sent = [face.resolve_endpoint(spec, "bench-warm") for _ in range(pairs)]
                    releases = [face.release(answers.get(r).lease.lease_ref) for r in sent]
                    for request in releases:
                        answers.get(request)
                    return pairs / (time.perf_counter() - started)

            log(f"{NAME}: batches of {batch} calls, {pairs} pairs per throughput run")
            repeat = ctx.reps(10, 1)
            warmup = 0 if ctx.quick else 1
            batches = alternate(
                {
                    "spec": resolves("spec", lambda: spec),
                    "mapping": resolves("mapping", lambda: dict(mapping)),
                    "ask": asks,
                },
                repeat,
                warmup=warmup,
            )
            # The warm-up batches filled the lists too: keep the measured batches only.
            for kept in calls.values():
                del kept[: batch * warmup]
            rates = alternate(
                {"sync": sync_pairs, "pipelined": pipelined_pairs}, repeat, warmup=warmup
            )
            runtime.release(held.lease.lease_ref)
    finally:
        echo.stop()
    floor = ("bare pykka ask", batches["ask"][""])
    validated = batches["spec"]
    plain = batches["mapping"]
    return [
        row(
            NAME,
            "resolve_endpoint on a ready instance, pre-validated BootSpec",
            "ms",
            calls["spec"],
            rounds=validated["resolve"],
            baseline=floor,
            target=Target("p50", "<=", 1.0, "p50 < 1 ms"),
        ),
        row(
            NAME,
            "resolve_endpoint on a ready instance, plain mapping (validated each call)",
            "ms",
            calls["mapping"],
            rounds=plain["resolve"],
            baseline=("pre-validated BootSpec", validated["resolve"]),
            target=Target("p50", "<=", 1.0, "p50 < 1 ms"),
        ),
        row(NAME, "release", "ms", calls["release"], rounds=validated["release"], baseline=floor),
        row(NAME, "bare pykka ask round trip (floor)", "ms", calls["ask"], rounds=floor[1]),
        row(
            NAME,
            "resolve + release pairs, sync facade",
            "pairs/s",
            rates["sync"][""],
            target=Target("p50", ">=", 10_000, "≥ 10,000 /s"),
        ),
        row(
            NAME,
            "resolve + release pairs, pipelined via actor_face()",
            "pairs/s",
            rates["pipelined"][""],
            target=Target("p50", ">=", 10_000, "≥ 10,000 /s"),
        ),
    ]

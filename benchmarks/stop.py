"""Stop: how long stopping a started, idle server takes.

Three arms, alternated round by round (the start before each stop is not timed):

- ``raw``: SIGTERM to a server started by hand, until it is reaped: the floor.
- ``runtime idle``: ``Runtime.stop_instance`` with no lease held, until it returns
  (the server has exited and the instance is ``stopped``).
- ``runtime drain``: the same with one lease held; its holder releases the lease as
  soon as ``instance_draining`` tells it to (on a thread of its own: a receiver must
  not call back into the runtime), and the stop goes on from there.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from benchmarks import _servers
from benchmarks._harness import Context, Row, alternate, log, row
from llama_actors import Runtime, signals

NAME = "stop"


def run(ctx: Context) -> list[Row]:
    kind = "real" if ctx.real else "fake"
    folder = ctx.folder(NAME)
    spec = _servers.server_spec(kind, folder / "fake")
    runtime = Runtime(state_dir=folder / "state")
    told: queue.Queue[str | None] = queue.Queue()

    def on_draining(_sender: str, *, lease_refs: list[str], **_: Any) -> None:
        for ref in lease_refs:
            told.put(ref)

    def holder() -> None:  # the lease holder: releases what it is asked to give back
        while (ref := told.get()) is not None:
            runtime.release(ref)

    signals.instance_draining.connect(on_draining, weak=False)
    releaser = threading.Thread(target=holder, name="bench-lease-holder", daemon=True)
    releaser.start()

    def raw() -> float:
        port = _servers.free_port()
        process = _servers.raw_start(spec, port)
        _servers.poll_until_ok(port, 120, gap=0.005, process=process)
        return _servers.stop_process(process) * 1000

    def idle() -> float:
        resolution = runtime.resolve_endpoint(spec, "bench-stop", timeout=120)
        runtime.release(resolution.lease.lease_ref)
        started = time.monotonic()
        runtime.stop_instance(resolution.instance.instance_id, drain_timeout=30)
        return (time.monotonic() - started) * 1000

    def drain() -> float:
        resolution = runtime.resolve_endpoint(spec, "bench-stop", timeout=120)
        started = time.monotonic()
        final = runtime.stop_instance(resolution.instance.instance_id, drain_timeout=30)
        elapsed = (time.monotonic() - started) * 1000
        if final.state != "stopped":
            raise RuntimeError(f"the drained instance ended {final.state}")
        return elapsed

    log(f"{NAME}: raw / runtime idle / runtime drain on the {kind} server")
    try:
        out = alternate(
            {"raw": raw, "idle": idle, "drain": drain},
            ctx.reps(10, 1),
            warmup=0 if ctx.quick else 1,
            pause=0.5,
        )
    finally:
        signals.instance_draining.disconnect(on_draining)
        told.put(None)
        releaser.join(10)
        runtime.close()
    floor = out["raw"][""]
    return [
        row(NAME, f"raw: SIGTERM → reaped ({kind})", "ms", floor),
        row(
            NAME,
            f"runtime: stop_instance, idle ({kind})",
            "ms",
            out["idle"][""],
            baseline=("raw SIGTERM", floor),
        ),
        row(
            NAME,
            f"runtime: stop_instance, 1 lease drained ({kind})",
            "ms",
            out["drain"][""],
            baseline=("raw SIGTERM", floor),
        ),
    ]

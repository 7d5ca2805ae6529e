"""Publish lag: from the server's first successful ``/health`` to the endpoint being
published (the ``instance_ready`` signal).

"First successful /health" is seen independently of the runtime: a poller in a process
of its own (no shared GIL) opens a fresh connection to ``/health`` every 0.5 ms from
before the spawn and notes ``time.monotonic()`` of the first 200. CLOCK_MONOTONIC is
one clock for every process, so that time compares directly with the monotonic time a
receiver of ``instance_ready`` notes on the sending actor's thread. The spec names a
fixed port so the poller knows where to look before the server says so; the runtime's
path is the same as with ``port = "auto"``: its first probe runs when the
``listening on`` line arrives (llama-server prints it once the model is loaded).

The poller costs CPU of its own (on a 2-core machine it competes with the server and
the runtime), and it can see the 200 up to 0.5 ms late, so a lag near zero can come
out slightly negative.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from benchmarks import _servers
from benchmarks._harness import Context, Row, Target, log, row
from llama_actors import Runtime, signals

NAME = "publish_lag"


def measure(ctx: Context, kind: str, repeat: int) -> list[Row]:
    folder = ctx.folder(f"{NAME}-{kind}")
    published: dict[str, float] = {}
    lock = threading.Lock()

    def on_ready(sender: str, **_: Any) -> None:
        now = time.monotonic()
        with lock:
            published[sender] = now

    signals.instance_ready.connect(on_ready, weak=False)
    lags: list[float] = []
    returned: list[float] = []
    try:
        with Runtime(state_dir=folder / "state") as runtime:
            for index in range(repeat + 1):  # the first run warms caches, not counted
                port = _servers.free_port()
                spec = _servers.server_spec(kind, folder / "fake", port=port)
                poller = _servers.start_poller(port)
                resolution = runtime.resolve_endpoint(spec, "bench-publish-lag", timeout=120)
                done = time.monotonic()
                first_ok = _servers.poller_result(poller)
                iid = resolution.instance.instance_id
                runtime.release(resolution.lease.lease_ref)
                runtime.stop_instance(iid, drain_timeout=0)
                if index == 0:
                    continue
                with lock:
                    signal_at = published[iid]
                lags.append((signal_at - first_ok) * 1000)
                returned.append((done - first_ok) * 1000)
    finally:
        signals.instance_ready.disconnect(on_ready)
    return [
        row(
            NAME,
            f"first /health 200 → instance_ready, p50 ({kind})",
            "ms",
            lags,
            target=Target("p50", "<=", 10.0, "p50 < 10 ms"),
        ),
        row(
            NAME,
            f"first /health 200 → instance_ready, p99 ({kind})",
            "ms",
            lags,
            target=Target("p99", "<=", 50.0, "p99 < 50 ms"),
        ),
        row(NAME, f"first /health 200 → resolve_endpoint returned ({kind})", "ms", returned),
    ]


def run(ctx: Context) -> list[Row]:
    kinds = ["fake", "real"] if ctx.real else ["fake"]
    rows: list[Row] = []
    for kind in kinds:
        repeat = ctx.reps(40 if kind == "fake" else 15, 2)
        log(f"{NAME}: {repeat} spawns of the {kind} server")
        rows += measure(ctx, kind, repeat)
    return rows

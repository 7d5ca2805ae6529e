"""Cold start: from spawn to a usable endpoint.

Four arms, alternated round by round, each after half a second of quiet:

- ``raw``: the server started by hand on a known port and ``/health`` polled as tightly
  as is sane (a fresh connection every 0.5 ms): the physical floor.
- ``raw_line``: the server started by hand with ``--port 0``, its output read until the
  ``listening on`` line, then ``/health`` asked: a floor that does not poll (on a small
  machine the tight polling competes with the model load for CPU).
- ``runtime``: ``Runtime.resolve_endpoint`` with the default ``port = "auto"``: spawn,
  learn the port from the ``listening on`` line, probe, publish, lease.
- ``router``: llama.cpp's own router (``llama-server --models-dir``), already running;
  the first request naming the model makes it spawn a child and load it.

Each arm then sends one chat completion of one token, so "spawn to first answer"
compares all three on the same footing (the router has no separate "ready").

Before the rounds, the very first run is timed on its own: ``runtime`` with the
process-wide probe cache (and the rendered plans) emptied by
:func:`llama_actors.lowlevel.clear_probe_cache`, so it runs the binary's ``--version``
and ``--help`` as the first resolve of a fresh process does.
The rounds after it find the probe cached. It is one run, reported on its own line
against the median of the warm rounds, never mixed into them.
"""

from __future__ import annotations

import statistics
import time

import httpx

from benchmarks import _servers
from benchmarks._harness import Context, Row, Target, alternate, log, row, skipped
from llama_actors import Runtime
from llama_actors.lowlevel import clear_probe_cache

NAME = "cold_start"
#: Seconds of quiet before each run: the previous server's teardown is not timed.
PAUSE = 0.5


def run(ctx: Context) -> list[Row]:
    kind = "real" if ctx.real else "fake"
    folder = ctx.folder(NAME)
    spec = _servers.server_spec(kind, folder / "fake")

    def raw() -> dict[str, float]:
        port = _servers.free_port()
        started = time.monotonic()
        process = _servers.raw_start(spec, port)
        try:
            ready = _servers.poll_until_ok(port, 120, process=process)
            _servers.chat(client, f"http://127.0.0.1:{port}/v1")
            answered = time.monotonic()
        finally:
            _servers.stop_process(process)
        return {"ready": (ready - started) * 1000, "answer": (answered - started) * 1000}

    def raw_line() -> dict[str, float]:
        started = time.monotonic()
        process, port = _servers.raw_start_logged(spec)
        try:
            ready = _servers.poll_until_ok(port, 120, process=process)
            _servers.chat(client, f"http://127.0.0.1:{port}/v1")
            answered = time.monotonic()
        finally:
            _servers.stop_process(process)
        return {"ready": (ready - started) * 1000, "answer": (answered - started) * 1000}

    def through_runtime() -> dict[str, float]:
        started = time.monotonic()
        resolution = runtime.resolve_endpoint(spec, "bench-cold-start", timeout=120)
        ready = time.monotonic()
        endpoint = resolution.endpoint
        _servers.chat(client, endpoint.base_url, headers=dict(endpoint.headers))
        answered = time.monotonic()
        runtime.release(resolution.lease.lease_ref)
        runtime.stop_instance(resolution.instance.instance_id, drain_timeout=0)
        return {"ready": (ready - started) * 1000, "answer": (answered - started) * 1000}

    arms = {"raw": raw, "raw_line": raw_line, "runtime": through_runtime}
    router: _servers.Router | None = None
    if kind == "real":
        binary, model = ctx.real_paths()
        router = _servers.Router(
            binary, model, folder / "router", "--ctx-size", "512", "--threads", "2"
        )
        model_router = router

        def through_router() -> dict[str, float]:
            model_router.start()  # not timed: a router is a long-lived process
            try:
                started = time.monotonic()
                _servers.chat(client, model_router.base_url, model=model_router.model)
                answered = time.monotonic()
            finally:
                model_router.stop()
            return {"answer": (answered - started) * 1000}

        arms["router"] = through_router

    log(f"{NAME}: {' / '.join(arms)} on the {kind} server")
    client = httpx.Client(trust_env=False, timeout=120)
    runtime = Runtime(state_dir=folder / "state")
    try:
        # The spec's rendering (the fake's) probed the binary already: forget it, so the
        # first resolve probes again, as the first one of a fresh process would.
        clear_probe_cache()
        time.sleep(PAUSE)
        first = through_runtime()
        log(f"{NAME}: first run (cold probe cache) ready in {first['ready']:.0f} ms")
        out = alternate(arms, ctx.reps(10, 1), warmup=0 if ctx.quick else 1, pause=PAUSE)
    finally:
        runtime.close()
        client.close()
        if router is not None:
            router.stop()

    raw_ready = out["raw"]["ready"]
    rows = [
        row(NAME, f"raw: spawn → /health 200 ({kind})", "ms", raw_ready),
        row(
            NAME,
            f"runtime: spawn → published endpoint ({kind})",
            "ms",
            out["runtime"]["ready"],
            baseline=("raw floor", raw_ready),
            target=Target("ratio", "<=", 1.05, "≤ 1.05 x raw floor"),
        ),
        row(
            NAME,
            f"runtime: very first run, cold probe cache (--version, --help) → published "
            f"endpoint ({kind})",
            "ms",
            [first["ready"]],
            baseline=("rounds, probe cached (median)", statistics.median(out["runtime"]["ready"])),
        ),
        row(
            NAME,
            f"raw, no polling: spawn → `listening on` → /health 200 ({kind})",
            "ms",
            out["raw_line"]["ready"],
            baseline=("raw floor", raw_ready),
        ),
        row(
            NAME,
            f"runtime: spawn → published endpoint, vs raw without polling ({kind})",
            "ms",
            out["runtime"]["ready"],
            baseline=("raw, no polling", out["raw_line"]["ready"]),
        ),
        row(NAME, f"raw: spawn → first answer ({kind})", "ms", out["raw"]["answer"]),
    ]
    through = ("router", out["router"]["answer"]) if "router" in out else None
    rows.append(
        row(
            NAME,
            f"runtime: spawn → first answer ({kind})",
            "ms",
            out["runtime"]["answer"],
            baseline=through or ("raw", out["raw"]["answer"]),
            target=Target("ratio", "<=", 1.0, "≤ 1.00 x router") if through else None,
        )
    )
    if through is not None:
        rows.append(row(NAME, "router: first request → answer (loads the model)", "ms", through[1]))
    else:
        rows.append(
            skipped(
                NAME,
                "router: first request → answer (loads the model)",
                "needs the real server (the fake has no router mode)",
                Target("ratio", "<=", 1.0, "runtime ≤ 1.00 x router"),
            )
        )
    return rows

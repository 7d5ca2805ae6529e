"""Probe cost: what inference probes every second cost the callers' generation.

One server, started by hand (the real llama-server with the benchmark's model and
settings; the fake with ``--no-real``), serves both arms; each run of an arm opens a
Runtime with the arm's policy, attaches it to that server (``{"backend": "attach"}``:
the same health probes, load readings and inference probes as a spawned instance, with
no process to supervise), leases the endpoint and streams one generation through it:

- **probes**: ``inference_probe_interval_ms = 1000`` (a ``/slots`` read, then a
  one-token ``/completions``, every second), everything else at its default;
- **none**: the default policy (no inference probes).

Both arms keep the default ``/health`` probes and load readings, so the difference is
the inference probes alone. An inference cycle that finds the callers' tokens advancing
in ``/slots`` passes without sending a completion (the callers' work stands in for it);
the table says how many cycles sent one. The arms alternate in rounds, their order
rotated, after a warm-up round. A run is one streamed chat, the same in every run:
the same prompt, greedy, 160 tokens (120 with ``--quick``; the fake makes a token every
20 ms) with ``ignore_eos`` and no prompt cache, so on an idle machine it streams for
about four seconds and the probes, due one second after the runtime attached and every
second after that, land during it. Tokens per second: the chunks carrying text after
the first, over the time from the first to the last, as the client sees them. The
inference probes that completed between the first and the last chunk are counted (from
``probe_completed`` with ``kind="inference"``), so the table shows they did run while
the callers' tokens were generated, and how long they took there.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import httpx

from benchmarks import _servers
from benchmarks._harness import Context, Row, Target, alternate, log, row
from llama_actors import InstancePolicy, Runtime, signals

NAME = "probe_cost"
#: The reason of an inference cycle that saw callers' tokens advance and sent nothing.
STOOD_IN = "callers' requests advanced"
TOKENS = 160
PROBE_MS = 1_000
QUICK_TOKENS = 120
FAKE_TOKEN_SECONDS = 0.02
ARMS = {
    "probes": InstancePolicy(inference_probe_interval_ms=PROBE_MS),
    "none": InstancePolicy(),
}


class Probes:
    """The inference probes completed (``probe_completed`` with ``kind="inference"``):
    when, how long each took, and its verdict."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[float, float, str]] = []

    def __call__(self, _sender: str, **payload: Any) -> None:
        if payload.get("kind") != "inference":
            return
        now = time.monotonic()
        with self.lock:
            verdict = str(payload["verdict"])
            if str(payload.get("reason", "")).startswith(STOOD_IN):
                verdict += ", stood in"
            self.seen.append((now, float(payload["latency_s"]), verdict))

    def between(self, first: float, last: float) -> list[tuple[float, float, str]]:
        with self.lock:
            return [s for s in self.seen if first <= s[0] <= last]


def run(ctx: Context) -> list[Row]:
    kind = "real" if ctx.real else "fake"
    folder = ctx.folder(NAME)
    fields: dict[str, Any] = {}
    if not ctx.real:
        fields["behaviour"] = {"token_seconds": str(FAKE_TOKEN_SECONDS)}
    spec = _servers.server_spec(kind, folder / "fake", **fields)
    tokens = QUICK_TOKENS if ctx.quick else TOKENS
    port = _servers.free_port()
    server = _servers.raw_start(spec, port, log=folder / "server.log")
    client = httpx.Client(trust_env=False, timeout=300)
    probes = Probes()
    signals.probe_completed.connect(probes, weak=False)
    runs = 0
    in_window: dict[str, list[tuple[float, float, str]]] = {name: [] for name in ARMS}
    try:
        _servers.poll_until_ok(port, 120, gap=0.01, process=server)
        attach = {
            "backend": "attach",
            "url": f"http://127.0.0.1:{port}",
            "alias": spec.alias,  # what the probes' completions name as their model
        }

        def generate(arm: str) -> dict[str, float]:
            nonlocal runs
            runs += 1
            state = folder / f"state-{runs:03d}"
            with Runtime(state_dir=state, policy=ARMS[arm]) as runtime:
                got = runtime.resolve_endpoint(attach, timeout=60)
                endpoint = got.endpoint
                times = _servers.stream_chat(
                    client, endpoint.base_url, dict(endpoint.headers), tokens
                )
                runtime.release(got.lease.lease_ref)
            seen = probes.between(times[0], times[-1])
            in_window[arm].extend(seen)
            figures = {
                "tps": (len(times) - 1) / (times[-1] - times[0]),
                "seconds": times[-1] - times[0],
                "probes": float(len(seen)),
            }
            if seen:
                figures["latency"] = statistics.median(latency * 1000 for _, latency, _ in seen)
            return figures

        arms = {name: (lambda name=name: generate(name)) for name in ARMS}
        log(f"{NAME}: {' / '.join(arms)} streams of {tokens} tokens ({kind})")
        out = alternate(arms, ctx.reps(20, 1), warmup=0 if ctx.quick else 1)
    finally:
        signals.probe_completed.disconnect(probes)
        client.close()
        _servers.stop_process(server)
    probing, none = out["probes"], out["none"]
    latencies = [latency * 1000 for _, latency, _ in in_window["probes"]]
    failed = sum(1 for *_, verdict in in_window["probes"] if verdict.startswith("failure"))
    stood_in = sum(1 for *_, verdict in in_window["probes"] if verdict.endswith("stood in"))
    sent = len(in_window["probes"]) - stood_in
    stray = len(in_window["none"])
    return [
        row(
            NAME,
            f"generation tokens/s, inference probes every {PROBE_MS / 1000:g} s ({kind})",
            "tok/s",
            probing["tps"],
            baseline=("no inference probes", none["tps"]),
            target=Target("ratio", ">=", 0.97, "≥ 0.97 x no probes"),
        ),
        row(NAME, f"generation tokens/s, no inference probes ({kind})", "tok/s", none["tps"]),
        row(
            NAME,
            "inference probes completed during the measured generation, probing arm",
            "probes",
            probing["probes"],
            note=(
                f"{sent} sent a completion, {stood_in} passed on the callers' progress in "
                "/slots" + (f"; {stray} in the no-probe arm" if stray else "")
            ),
        ),
        row(
            NAME,
            "length of the measured generation (first to last token), probing arm",
            "s",
            probing["seconds"],
            baseline=("no inference probes", none["seconds"]),
        ),
        row(
            NAME,
            "inference probe latency during the generation (a round: its probes' median)",
            "ms",
            latencies,
            rounds=probing.get("latency", []),
            note=f"{failed} of {len(latencies)} failed" if failed else "",
        ),
    ]

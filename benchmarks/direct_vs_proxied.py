"""Direct versus proxied: a streamed chat through the endpoint the runtime published
(straight to the server) against the same request through llama.cpp's router, which
proxies it to its child server. Same model, same settings (512 context, 2 threads),
same prompt, greedy, 64 tokens (16 with ``--quick``) with ``ignore_eos`` and no prompt
cache, so both do the same work. Requests alternate between the two; both servers stay loaded.

Time to first token: from sending the request to the first SSE chunk carrying text.
Tokens per second: chunks carrying text after the first, over the time from the first
to the last (llama-server sends one token per chunk), as the client sees them.
"""

from __future__ import annotations

import time

import httpx

from benchmarks import _servers
from benchmarks._harness import Context, Row, alternate, log, row, skipped
from llama_actors import Runtime

NAME = "direct_vs_proxied"
TOKENS = 64


def stream(
    client: httpx.Client, base_url: str, headers: dict[str, str], model: str | None, tokens: int
) -> dict[str, float]:
    started = time.monotonic()
    times = _servers.stream_chat(client, base_url, headers, tokens, model)
    return {
        "ttft": (times[0] - started) * 1000,
        "tps": (len(times) - 1) / (times[-1] - times[0]),
    }


def run(ctx: Context) -> list[Row]:
    kind = "real" if ctx.real else "fake"
    folder = ctx.folder(NAME)
    spec = _servers.server_spec(kind, folder / "fake")
    tokens = 16 if ctx.quick else TOKENS
    client = httpx.Client(trust_env=False, timeout=120)
    router: _servers.Router | None = None
    try:
        with Runtime(state_dir=folder / "state") as runtime:
            resolution = runtime.resolve_endpoint(spec, "bench-direct", timeout=120)
            endpoint = resolution.endpoint
            headers = dict(endpoint.headers)
            arms = {"direct": lambda: stream(client, endpoint.base_url, headers, None, tokens)}
            if kind == "real":
                binary, model = ctx.real_paths()
                router = _servers.Router(
                    binary, model, folder / "router", "--ctx-size", "512", "--threads", "2"
                )
                router.start()
                loaded = router
                _servers.chat(client, loaded.base_url, model=loaded.model)  # loads the model
                arms["router"] = lambda: stream(client, loaded.base_url, {}, loaded.model, tokens)
            log(f"{NAME}: {' / '.join(arms)} streams of {tokens} tokens ({kind})")
            out = alternate(arms, ctx.reps(20, 1), warmup=0 if ctx.quick else 2)
            runtime.release(resolution.lease.lease_ref)
    finally:
        client.close()
        if router is not None:
            router.stop()
    direct = out["direct"]
    rows = []
    if "router" in out:
        via = out["router"]
        rows += [
            row(
                NAME,
                "time to first token, direct",
                "ms",
                direct["ttft"],
                baseline=("via router", via["ttft"]),
            ),
            row(NAME, "time to first token, via router", "ms", via["ttft"]),
            row(
                NAME,
                "streamed tokens per second, direct",
                "tok/s",
                direct["tps"],
                baseline=("via router", via["tps"]),
            ),
            row(NAME, "streamed tokens per second, via router", "tok/s", via["tps"]),
        ]
    else:
        why = "needs the real server (the fake has no router mode)"
        rows += [
            row(NAME, f"time to first token, direct ({kind})", "ms", direct["ttft"]),
            skipped(NAME, "time to first token, via router", why),
            row(NAME, f"streamed tokens per second, direct ({kind})", "tok/s", direct["tps"]),
            skipped(NAME, "streamed tokens per second, via router", why),
        ]
    return rows

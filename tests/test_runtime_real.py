"""The runtime on the real llama-server and the gemma 3 270M model: resolve a leased
endpoint, chat through it (JSON and SSE), survive a SIGKILL of the server through the
restart policy, and leave nothing behind when closed."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

import llama_actors
from llama_actors._kernel.probe_client import ProbeClient, ProbeResponse
from llama_actors.signals import ALL_SIGNALS

pytestmark = pytest.mark.real_server

KEY = "sk-test-runtime-real-4b1d"
QUESTION = [{"role": "user", "content": "Name one colour."}]
#: A short backoff so the restart after a SIGKILL comes at once.
FAST_RESTART = llama_actors.InstancePolicy(
    restart=llama_actors.RestartPolicy(backoff_initial_ms=50)
)


class Signals:
    """Every llama_actors signal sent while a test runs, in order. Receivers run on the
    actors' threads, so everything here is guarded by one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[tuple[str, dict[str, Any]]] = []
        self._expected: list[tuple[str, dict[str, Any], threading.Event]] = []

    def receiver(self, name: str) -> Any:
        def receive(_sender: object, **payload: Any) -> None:
            with self._lock:
                self._seen.append((name, payload))
                for want, match, event in self._expected:
                    if want == name and _matches(payload, match):
                        event.set()

        return receive

    def expect(self, name: str, **match: Any) -> threading.Event:
        """An event set by the next ``name`` signal whose payload has ``match``
        (signals sent before this call do not count)."""
        event = threading.Event()
        with self._lock:
            self._expected.append((name, match, event))
        return event

    def mark(self) -> int:
        with self._lock:
            return len(self._seen)

    def since(self, mark: int, instance_id: str) -> list[tuple[str, dict[str, Any]]]:
        """The signals of one instance sent after ``mark``, in order."""
        with self._lock:
            return [(n, p) for n, p in self._seen[mark:] if p.get("instance_id") == instance_id]

    def names(self, instance_id: str, mark: int = 0) -> list[str]:
        return [name for name, _ in self.since(mark, instance_id)]


def _matches(payload: dict[str, Any], match: dict[str, Any]) -> bool:
    return all(payload.get(key) == value for key, value in match.items())


@pytest.fixture
def signals() -> Iterator[Signals]:
    recorder = Signals()
    receivers = {name: recorder.receiver(name) for name in ALL_SIGNALS}
    for name, receive in receivers.items():
        ALL_SIGNALS[name].connect(receive, weak=False)
    yield recorder
    for name, receive in receivers.items():
        ALL_SIGNALS[name].disconnect(receive)


@pytest.fixture
def spec(real_binary: str, gemma_model: str) -> dict[str, Any]:
    return {
        "model": gemma_model,
        "binary_path": real_binary,
        "api_key": KEY,
        "ctx_size": 512,
        "threads": 2,
        "parallel": 1,
        "health_interval_ms": 200,
    }


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # trust_env=False: loopback only, never through a proxy from the environment.
    with httpx.Client(trust_env=False, timeout=60) as http:
        yield http


def chat(client: httpx.Client, endpoint: llama_actors.EndpointDescriptor) -> dict[str, Any]:
    reply = client.post(
        endpoint.base_url + "/chat/completions",
        headers=endpoint.headers,
        json={"messages": QUESTION, "max_tokens": 8},
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def stream_chat(
    client: httpx.Client, endpoint: llama_actors.EndpointDescriptor
) -> tuple[list[str], str]:
    """POST a streamed chat; returns every SSE data line and the text it carried.

    llama-server sometimes closes a kept-alive connection right after an SSE answer
    (about 1 in 8 here), and the next request on it fails with "Server disconnected";
    so this request asks for its connection to be closed rather than pooled.
    """
    with client.stream(
        "POST",
        endpoint.base_url + "/chat/completions",
        headers={**endpoint.headers, "Connection": "close"},
        json={"messages": QUESTION, "max_tokens": 8, "stream": True},
    ) as reply:
        assert reply.status_code == 200, reply.read().decode()
        assert reply.headers["content-type"].startswith("text/event-stream")
        data = [line for line in reply.iter_lines() if line.startswith("data: ")]
    text = ""
    for line in data[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
    return data, text


def key_file_of(pid: int) -> Path:
    """The --api-key-file a running server was given, read from its command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert KEY.encode() not in b"\0".join(argv)
    assert b"--api-key-file" in argv, argv
    return Path(os.fsdecode(argv[argv.index(b"--api-key-file") + 1]))


def assert_gone(pids: list[int], state_dir: Path, key_files: list[Path]) -> None:
    """After close: no server pid, no ledger entry, no key file is left."""
    for pid in pids:
        assert not psutil.pid_exists(pid), f"server pid {pid} outlived Runtime.close()"
    assert llama_actors.lowlevel.Ledger(state_dir).entries() == []
    for path in key_files:
        assert not path.exists(), f"{path} outlived its server"


def test_a_resolved_endpoint_chats_as_json_and_sse_and_refuses_callers_without_its_key(
    tmp_path: Path, spec: dict[str, Any], signals: Signals, client: httpx.Client
) -> None:
    threads_before = set(threading.enumerate())
    with llama_actors.Runtime(state_dir=tmp_path / "state") as runtime:
        resolution = runtime.resolve_endpoint(spec, "tests", owner_ref="test-chat")
        endpoint, lease = resolution.endpoint, resolution.lease
        iid = resolution.instance.instance_id
        assert resolution.reused is False
        assert endpoint.lease_ref == lease.lease_ref
        assert lease.owner_ref == "test-chat"
        assert endpoint.headers == {"Authorization": f"Bearer {KEY}"}
        assert KEY not in repr(resolution)
        port = endpoint.metadata["port"]
        assert endpoint.base_url == f"http://127.0.0.1:{port}/v1"
        assert endpoint.health_ref == f"http://127.0.0.1:{port}/health"

        snapshot = runtime.wait_healthy(iid, timeout=30)
        assert (snapshot.state, snapshot.health) == ("ready", "healthy")
        assert snapshot.pid is not None
        assert (snapshot.port, snapshot.lease_count, snapshot.restart_count) == (port, 1, 0)

        # The key reaches the server through a private file, never its argv.
        key_file = key_file_of(snapshot.pid)
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert KEY.encode() not in Path(f"/proc/{snapshot.pid}/environ").read_bytes()

        body = chat(client, endpoint)
        assert body["model"] == endpoint.model_identity
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] >= 1

        data, text = stream_chat(client, endpoint)
        assert data[-1] == "data: [DONE]"
        assert len(data) >= 2
        assert text

        url = endpoint.base_url + "/chat/completions"
        request = {"messages": QUESTION, "max_tokens": 8}
        assert client.post(url, json=request).status_code == 401
        wrong = {"Authorization": "Bearer sk-wrong"}
        assert client.post(url, json=request, headers=wrong).status_code == 401

        released = signals.expect("lease_released", instance_id=iid, reason="released")
        assert runtime.release(lease.lease_ref) is True
        assert released.wait(10)
        assert runtime.release(lease.lease_ref) is False
        assert runtime.snapshot(iid).lease_count == 0
        stopped = signals.expect("instance_stopped", instance_id=iid)

    assert stopped.wait(0)  # Runtime.close() returns after the instance stopped
    assert_gone([snapshot.pid], tmp_path / "state", [key_file])
    assert [s.state for s in runtime.instances()] == ["stopped"]
    assert signals.names(iid)[:4] == [
        "instance_starting",
        "instance_ready",
        "health_changed",
        "lease_granted",
    ]
    left = [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert left == [], f"threads outlived Runtime.close(): {left}"


def test_a_sigkilled_server_is_restarted_under_the_same_instance_and_the_lease_survives(
    tmp_path: Path, spec: dict[str, Any], signals: Signals, client: httpx.Client
) -> None:
    with llama_actors.Runtime(state_dir=tmp_path / "state", policy=FAST_RESTART) as runtime:
        resolution = runtime.resolve_endpoint(spec, "tests", ttl_ms=120_000)
        iid, lease = resolution.instance.instance_id, resolution.lease
        first = runtime.wait_healthy(iid, timeout=30)
        assert first.pid is not None
        first_key_file = key_file_of(first.pid)

        mark = signals.mark()
        unavailable = signals.expect("health_changed", instance_id=iid, new="unavailable")
        restarting = signals.expect("instance_restarting", instance_id=iid)
        ready = signals.expect("instance_ready", instance_id=iid)
        healthy = signals.expect("health_changed", instance_id=iid, new="healthy")
        # Only the pid this runtime started, and only after checking it is our server.
        assert psutil.Process(first.pid).cmdline()[0] == spec["binary_path"]
        os.kill(first.pid, signal.SIGKILL)

        assert unavailable.wait(10), signals.names(iid, mark)
        assert restarting.wait(10), signals.names(iid, mark)
        assert ready.wait(60), signals.names(iid, mark)
        assert healthy.wait(10), signals.names(iid, mark)

        after = signals.since(mark, iid)
        names = [name for name, _ in after]
        down = next(
            i
            for i, (n, p) in enumerate(after)
            if n == "health_changed" and p["new"] == "unavailable"
        )
        assert names.index("instance_restarting") > down
        assert names.index("instance_starting") > names.index("instance_restarting")
        assert names.index("instance_ready") > names.index("instance_starting")
        assert "instance_failed" not in names
        assert "instance_stopped" not in names
        assert "lease_released" not in names
        assert "lease_expired" not in names
        restart = after[names.index("instance_restarting")][1]
        assert restart["attempt"] == 1
        assert "SIGKILL" in restart["reason"]
        assert after[names.index("instance_starting")][1]["attempt"] == 1

        second = runtime.wait_healthy(iid, timeout=30)
        assert second.instance_id == iid
        assert (second.state, second.health, second.restart_count) == ("ready", "healthy", 1)
        assert second.pid is not None
        assert second.pid != first.pid
        assert second.lease_count == 1
        assert [s.instance_id for s in runtime.instances()] == [iid]
        second_key_file = key_file_of(second.pid)

        # The lease outlived the crash: it renews, and its endpoint still answers (the
        # restart kept the port the lease holder knows).
        renewed = runtime.renew(lease.lease_ref)
        assert renewed.lease_ref == lease.lease_ref
        assert renewed.instance_id == iid
        assert renewed.expires_at > lease.expires_at
        assert runtime.published_endpoint(iid).base_url == resolution.endpoint.base_url
        assert chat(client, resolution.endpoint)["usage"]["completion_tokens"] >= 1

        assert runtime.release(lease.lease_ref) is True

    assert_gone([first.pid, second.pid], tmp_path / "state", [first_key_file, second_key_file])
    assert signals.names(iid)[-1] == "instance_stopped"


def test_an_endpoint_under_an_api_prefix_chats_and_its_health_probe_passes_with_the_key(
    tmp_path: Path, spec: dict[str, Any], signals: Signals, client: httpx.Client
) -> None:
    with llama_actors.Runtime(state_dir=tmp_path / "state") as runtime:
        resolution = runtime.resolve_endpoint({**spec, "api_prefix": "/llm/"}, "tests")
        endpoint, iid = resolution.endpoint, resolution.instance.instance_id
        port = endpoint.metadata["port"]
        assert endpoint.metadata["api_prefix"] == "/llm"
        assert endpoint.base_url == f"http://127.0.0.1:{port}/llm/v1"
        assert endpoint.health_ref == f"http://127.0.0.1:{port}/llm/health"

        # Watch the runtime's own probes (its shared client is private; tests only):
        # the health poller must reach /llm/health with the key and get 200 ok.
        probed = threading.Event()
        probes: list[tuple[int, str | None]] = []

        class Recording(ProbeClient):
            """The runtime's probe client, noting each health probe of this endpoint."""

            def get(self, url: str, *, headers: Mapping[str, str], timeout: float) -> ProbeResponse:
                response = super().get(url, headers=headers, timeout=timeout)
                if url == endpoint.health_ref:
                    probes.append((response.status_code, headers.get("Authorization")))
                    if response.status_code == 200:
                        probed.set()
                return response

        runtime._ctx.client = Recording()  # read by every probe from now on

        body = chat(client, endpoint)
        assert body["choices"][0]["message"]["role"] == "assistant"
        data, text = stream_chat(client, endpoint)
        assert data[-1] == "data: [DONE]"
        assert text
        no_key = client.post(
            endpoint.base_url + "/chat/completions", json={"messages": QUESTION, "max_tokens": 8}
        )
        assert no_key.status_code == 401

        assert probed.wait(10), f"no health probe answered 200 under the prefix: {probes}"
        assert all(p == (200, f"Bearer {KEY}") for p in probes), probes
        health = client.get(endpoint.health_ref, headers=endpoint.headers)
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        snapshot = runtime.wait_healthy(iid, timeout=30)
        assert snapshot.health == "healthy"
        changes = [p for n, p in signals.since(0, iid) if n == "health_changed"]
        assert all(p["new"] != "unavailable" for p in changes), changes
        assert snapshot.pid is not None
        assert KEY.encode() not in Path(f"/proc/{snapshot.pid}/cmdline").read_bytes()
        key_file = key_file_of(snapshot.pid)
        assert runtime.release(resolution.lease.lease_ref) is True

    assert_gone([snapshot.pid], tmp_path / "state", [key_file])


def test_an_embeddings_consumer_gets_vectors_and_a_chat_consumer_of_its_spec_a_chat_endpoint(
    tmp_path: Path, spec: dict[str, Any], client: httpx.Client
) -> None:
    embedder = llama_actors.ConsumerManifest(
        consumer="embedder", accepted_protocols=("openai_embeddings",)
    )
    embedding_spec = {**spec, "embeddings": True, "pooling": "mean"}
    with llama_actors.Runtime(state_dir=tmp_path / "state") as runtime:
        embedding = runtime.resolve_endpoint(embedding_spec, embedder, owner_ref="embedder")
        talker = runtime.resolve_endpoint(embedding_spec, "talker", owner_ref="talker")
        endpoint = embedding.endpoint

        assert endpoint.protocol == "openai_embeddings"
        assert talker.endpoint.protocol == "openai_chat_completions"
        assert talker.reused is True
        assert talker.instance.instance_id == embedding.instance.instance_id
        assert talker.endpoint.base_url == endpoint.base_url
        assert runtime.snapshot(embedding.instance.instance_id).lease_count == 2

        url = endpoint.base_url + "/embeddings"
        reply = client.post(url, headers=endpoint.headers, json={"input": ["red", "blue"]})
        assert reply.status_code == 200, reply.text
        vectors = [item["embedding"] for item in reply.json()["data"]]
        assert len(vectors) == 2
        assert len(vectors[0]) == len(vectors[1]) > 0
        assert vectors[0] != vectors[1]
        assert client.post(url, json={"input": "red"}).status_code == 401
        assert chat(client, talker.endpoint)["usage"]["completion_tokens"] >= 1

        # The contract's lease options on the same server: by id, not renewable, metadata.
        iid = embedding.instance.instance_id
        ensured = runtime.ensure_instance(embedding_spec)
        assert (ensured.reused, ensured.instance.instance_id) == (True, iid)
        once = runtime.lease_instance(
            iid, embedder, owner_ref="batch", renewable=False, metadata={"job": "nightly"}
        )
        assert (once.lease.renewable, once.lease.metadata) == (False, {"job": "nightly"})
        assert once.endpoint.protocol == "openai_embeddings"
        with pytest.raises(llama_actors.LeaseNotRenewableError):
            runtime.renew(once.lease.lease_ref)
        assert runtime.release(once.lease.lease_ref) is True

"""The attach backend on a real llama-server that the test runs itself, as someone
else would: attach, chat, kill that server (unavailable is signalled), start it again
on the same port (healthy again), and no lease is lost."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import llama_actors
from llama_actors.lowlevel import ServerProcess, render_command
from llama_actors.testing.signals import SignalRecorder

from ._helpers import wait_gone

pytestmark = pytest.mark.real_server

KEY = "sk-attach-real-77c1"
#: Loading gemma 270M takes 1 to 3 s here; a busy machine may take far longer.
LOAD_S = 60.0


def start_server(binary: str, model: str, port: int | str, folder: Path) -> ServerProcess:
    spec = llama_actors.boot_spec(
        {"binary_path": binary, "model": model, "port": port, "api_key": KEY, "ctx_size": 512}
    )
    process = ServerProcess.start(render_command(spec), log_path=folder / "server.log")
    process.wait_port(LOAD_S)
    return process


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.stop(timeout=10)


def test_an_attached_real_server_is_leased_survives_its_restart_and_keeps_its_lease(
    real_binary: str, gemma_model: str, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    first = start_server(real_binary, gemma_model, "auto", tmp_path)
    servers.append(first)
    port = first.port
    assert port is not None
    url = f"http://127.0.0.1:{port}"
    spec = {"backend": "attach", "url": url, "api_key": KEY, "health_interval_ms": 200}
    policy = llama_actors.InstancePolicy(unavailable_after=2, probe_timeout_ms=2_000)

    with (
        SignalRecorder() as recorder,
        llama_actors.Runtime(state_dir=tmp_path / "state", policy=policy) as runtime,
    ):
        got = runtime.resolve_endpoint(spec, ttl_ms=600_000, timeout=LOAD_S)
        iid = got.instance.instance_id
        endpoint = got.endpoint
        with httpx.Client(trust_env=False, timeout=60) as client:
            answer = client.post(
                endpoint.base_url + "/chat/completions",
                headers=endpoint.headers,
                json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8},
            )
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"]
        assert (got.instance.pid, endpoint.management_mode) == (None, "externally_managed")

        os.kill(first.pid, signal.SIGKILL)
        assert wait_gone([first.pid], timeout=30) == []
        recorder.wait_for("health_changed", iid, new="unavailable", timeout=30)

        servers.append(start_server(real_binary, gemma_model, port, tmp_path))
        # back through "degraded" while it answers 503 Loading model, then healthy
        recorder.wait_for("health_changed", iid, new="healthy", count=2, timeout=LOAD_S)

        assert runtime.renew(got.lease.lease_ref).lease_ref == got.lease.lease_ref
        snap = runtime.snapshot(iid)
        assert (snap.state, snap.health, snap.lease_count, snap.restart_count) == (
            "ready",
            "healthy",
            1,
            0,
        )
        assert recorder.find("instance_restarting") == []
        assert recorder.find("lease_released") == []
        assert recorder.find("lease_expired") == []
        runtime.stop_instance(iid, drain_timeout=0)
    assert servers[-1].running  # stopping an attached instance signals no process

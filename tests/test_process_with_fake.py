"""The process seam driving the fake llama-server through every behaviour the runtime
must survive: what a caller of ``ServerProcess`` sees in each case."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from llama_actors import PortInUseError, ServerExitedError, WaitTimeoutError
from llama_actors.testing.fake import FakeLlama, start_fake
from llama_actors.testing.fake_server import CRASH_EXIT_CODE

from ._helpers import wait_gone

StartFake = Callable[..., FakeLlama]
CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


def test_port_auto_becomes_port_zero_and_the_bound_port_is_read_from_the_log(
    fake_llama: StartFake,
) -> None:
    fake = fake_llama()
    assert fake.process.plan.port_mode == "bind_zero"
    assert fake.received_argv()[fake.received_argv().index("--port") + 1] == "0"
    assert fake.port > 0
    assert httpx.get(fake.urls.health_url, timeout=5).json() == {"status": "ok"}


def test_a_build_without_port_zero_gets_a_port_reserved_by_the_library(
    fake_llama: StartFake,
) -> None:
    fake = fake_llama(behaviour={"build": "4000"})
    assert fake.process.plan.port_mode == "reserve"
    argv = fake.received_argv()
    assert int(argv[argv.index("--port") + 1]) == fake.port
    assert httpx.get(fake.urls.health_url, timeout=5).status_code == 200


def test_an_explicit_free_port_is_used_as_given(fake_llama: StartFake) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake = fake_llama(port=port)
    assert fake.port == port
    assert httpx.get(fake.urls.health_url, timeout=5).status_code == 200


def test_an_explicit_port_held_by_another_program_fails_naming_the_port(
    tmp_path: Path,
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is already in use"):
            start_fake(tmp_path, port=port)


def test_the_api_key_reaches_the_server_through_a_private_file_only(
    fake_llama: StartFake,
) -> None:
    fake = fake_llama(api_key="sk-fake-secret")
    argv = fake.received_argv()
    assert "sk-fake-secret" not in " ".join(argv)
    key_file = Path(argv[argv.index("--api-key-file") + 1])
    assert key_file.parent == Path(fake.process.private_dir or "")
    chat = fake.urls.base_url + "/chat/completions"
    assert httpx.post(chat, json=CHAT, timeout=5).status_code == 401
    assert httpx.post(chat, json=CHAT, headers=fake.spec.headers, timeout=5).status_code == 200
    fake.stop()
    assert not key_file.exists()


def test_a_server_that_exits_before_ready_fails_the_port_wait_with_its_code_and_text(
    tmp_path: Path,
) -> None:
    fake = start_fake(
        tmp_path,
        behaviour={"exit_before_ready": "7", "exit_stderr": "fatal: no GPU here"},
        wait_ready=False,
    )
    with pytest.raises(ServerExitedError) as caught:
        fake.process.wait_port(timeout=10)
    ended = caught.value.exit
    assert (ended.status, ended.code, ended.requested) == ("exit_code", 7, False)
    assert "fatal: no GPU here" in ended.tail


def test_a_model_that_cannot_load_is_a_non_retryable_failure(tmp_path: Path) -> None:
    fake = start_fake(tmp_path, behaviour={"invalid_model": "1"}, wait_ready=False)
    ended = fake.process.wait(timeout=10)
    assert ended.failure == "model_invalid"
    assert not ended.retryable


def test_a_slow_load_shows_progress_lines_before_the_port_is_known(
    fake_llama: StartFake,
) -> None:
    fake = fake_llama(behaviour={"load_seconds": "0.6"})
    assert fake.port > 0
    lines = fake.process.tail(200)
    listening = next(i for i, line in enumerate(lines) if "listening on" in line)
    assert len([line for line in lines[:listening] if "load" in line]) >= 2


def test_a_server_that_never_becomes_ready_times_out_the_wait_but_keeps_running(
    tmp_path: Path,
) -> None:
    fake = start_fake(tmp_path, behaviour={"never_ready": "1"}, wait_ready=False)
    try:
        with pytest.raises(WaitTimeoutError, match="reported no listening port"):
            fake.process.wait_port(timeout=0.3)
        assert fake.process.running
    finally:
        fake.stop(timeout=2)


def test_a_crash_after_some_requests_is_reported_as_an_unrequested_exit(
    fake_llama: StartFake,
) -> None:
    fake = fake_llama(behaviour={"crash_after": "1"})
    httpx.get(fake.urls.health_url, timeout=5)
    ended = fake.process.wait(timeout=10)
    assert (ended.status, ended.code, ended.requested) == ("exit_code", CRASH_EXIT_CODE, False)


def test_a_hung_server_is_still_stopped_cleanly(fake_llama: StartFake) -> None:
    fake = fake_llama(behaviour={"hang": "1"})
    with pytest.raises(httpx.TimeoutException):
        httpx.get(fake.urls.health_url, timeout=0.3)
    ended = fake.process.stop(timeout=5)
    assert ended.requested
    assert not fake.process.running


def test_behaviour_flipped_while_running_shows_in_the_next_answer(fake_llama: StartFake) -> None:
    fake = fake_llama()
    assert httpx.get(fake.urls.health_url, timeout=5).json() == {"status": "ok"}
    fake.set(health="degraded")
    assert httpx.get(fake.urls.health_url, timeout=5).json() == {"status": "degraded"}
    fake.set(health="no_slot")
    assert httpx.get(fake.urls.health_url, timeout=5).status_code == 503


def test_a_server_ignoring_sigterm_is_sigkilled_after_the_timeout_with_its_grandchild(
    fake_llama: StartFake,
) -> None:
    fake = fake_llama(behaviour={"ignore_sigterm": "1", "grandchild": "1"})
    grandchild = next(
        int(line.rsplit(" ", 1)[1]) for line in fake.process.tail(50) if "grandchild pid" in line
    )
    ended = fake.process.stop(timeout=0.3)
    assert (ended.status, ended.signal, ended.requested) == ("signal", "SIGKILL", True)
    assert wait_gone([fake.process.pid, grandchild], timeout=5) == []


def test_a_clean_stop_of_a_loaded_server_is_exit_code_zero(fake_llama: StartFake) -> None:
    fake = fake_llama()
    ended = fake.process.stop()
    assert (ended.status, ended.code, ended.requested, ended.failure) == (
        "success",
        0,
        True,
        None,
    )
    assert any("cleaning up before exit" in line for line in ended.tail)

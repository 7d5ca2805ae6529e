"""Readiness (CONTRACT §4): one probe (a TCP connect, then /health) and the stall
deadline that load progress extends up to a hard ceiling."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import httpx
import pytest

from llama_actors._kernel.readiness import ReadyProbe, StallDeadline, probe_ready

HEADERS = {"Authorization": "Bearer sk-test"}

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port on 127.0.0.1 where something listens (nothing ever answers HTTP on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound once, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(client: httpx.Client, port: int) -> ReadyProbe:
    root = f"http://127.0.0.1:{port}"
    return probe_ready(
        client,
        "127.0.0.1",
        port,
        f"{root}/health",
        f"{root}/v1/models",
        HEADERS,
        timeout_s=0.5,
    )


class Answer:
    """A handler giving one fixed answer and recording the requests it saw."""

    def __init__(self, status: int, json: object = None) -> None:
        self.status = status
        self.json = json
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return httpx.Response(self.status, json=self.json)


# -- probe_ready ------------------------------------------------------------------------


def test_nothing_listening_is_refused_without_asking_http(mock_client, closed_port) -> None:
    handler = Answer(200, json={"status": "ok"})
    result = probe(mock_client(handler), closed_port)
    assert result.result == "refused"
    assert f"127.0.0.1:{closed_port}" in result.detail
    assert "refused" in result.detail.lower()
    assert handler.seen == []


def test_a_listening_server_answering_ok_is_ready(mock_client, listening_port) -> None:
    handler = Answer(200, json={"status": "ok"})
    result = probe(mock_client(handler), listening_port)
    assert result == ReadyProbe("ready", "/health 200 ok")


def test_the_probe_sends_the_published_headers_to_the_health_url(
    mock_client, listening_port
) -> None:
    handler = Answer(200, json={"status": "ok"})
    probe(mock_client(handler), listening_port)
    seen = handler.seen
    assert [str(r.url) for r in seen] == [f"http://127.0.0.1:{listening_port}/health"]
    assert seen[0].headers["Authorization"] == "Bearer sk-test"


def test_a_server_loading_its_model_is_loading(mock_client, listening_port) -> None:
    body = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    result = probe(mock_client(Answer(503, json=body)), listening_port)
    assert result.result == "loading"
    assert "Loading model" in result.detail


def test_an_older_server_saying_loading_model_in_its_status_is_loading(
    mock_client, listening_port
) -> None:
    # llama-server builds of early 2024 answered 503 {"status": "loading model"}
    result = probe(mock_client(Answer(503, json={"status": "loading model"})), listening_port)
    assert result.result == "loading"


def test_an_older_server_without_health_is_ready_when_models_answers(
    mock_client, listening_port
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/health":
            return httpx.Response(404, text="Not Found")
        return httpx.Response(200, json={"object": "list", "data": []})

    result = probe(mock_client(handler), listening_port)
    assert result.result == "ready"
    assert "/models" in result.detail
    assert [r.url.path for r in seen] == ["/health", "/v1/models"]
    assert all(r.headers["Authorization"] == "Bearer sk-test" for r in seen)


def test_a_404_on_both_urls_is_not_ready_and_says_so(mock_client, listening_port) -> None:
    result = probe(mock_client(Answer(404)), listening_port)
    assert result.result == "not_ready"
    assert "/health 404" in result.detail
    assert "/models 404" in result.detail


def test_a_refused_key_is_not_ready_with_the_status_in_the_detail(
    mock_client, listening_port
) -> None:
    body = {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}
    result = probe(mock_client(Answer(401, json=body)), listening_port)
    assert result.result == "not_ready"
    assert "401" in result.detail
    assert "Invalid API Key" in result.detail


def test_an_ok_status_code_with_another_status_is_not_ready(mock_client, listening_port) -> None:
    result = probe(mock_client(Answer(200, json={"status": "starting"})), listening_port)
    assert result.result == "not_ready"
    assert "starting" in result.detail


def test_an_http_timeout_after_the_connect_is_not_ready(mock_client, listening_port) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    result = probe(mock_client(handler), listening_port)
    assert result.result == "not_ready"
    assert "500 ms" in result.detail


# -- StallDeadline ----------------------------------------------------------------------


def test_without_progress_the_wait_ends_after_the_stall_time() -> None:
    deadline = StallDeadline(now=100.0, stall_s=5.0, ceiling_s=60.0)
    assert deadline.deadline == 105.0
    assert deadline.expired(104.9) is None
    why = deadline.expired(105.0)
    assert why is not None
    assert "no load progress for 5s" in why
    assert "5.0s since spawn" in why


def test_load_progress_extends_the_deadline() -> None:
    deadline = StallDeadline(now=100.0, stall_s=5.0, ceiling_s=60.0)
    deadline.progress(104.0)
    assert deadline.deadline == 109.0
    assert deadline.expired(106.0) is None
    why = deadline.expired(109.0)
    assert why is not None
    assert "no load progress" in why
    assert "9.0s since spawn" in why


def test_progress_reported_late_never_moves_the_deadline_back() -> None:
    deadline = StallDeadline(now=100.0, stall_s=5.0, ceiling_s=60.0)
    deadline.progress(104.0)
    deadline.progress(101.0)
    assert deadline.deadline == 109.0


def test_the_hard_ceiling_wins_over_steady_progress() -> None:
    deadline = StallDeadline(now=100.0, stall_s=5.0, ceiling_s=12.0)
    for t in (103.0, 106.0, 109.0, 111.0):
        deadline.progress(t)
        assert deadline.expired(t) is None
    assert deadline.deadline == 112.0
    why = deadline.expired(112.0)
    assert why is not None
    assert "hard ceiling of 12s" in why
    assert "no load progress" not in why

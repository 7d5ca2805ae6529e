"""The probes' own HTTP client: httpx's answers and exceptions, over http.client."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from llama_actors._kernel.health import probe_health
from llama_actors._kernel.probe_client import ProbeClient

Handler = Callable[[socket.socket], None]


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], str]]:
    """Serve one loopback socket whose every connection ``handler`` answers; gives its URL.
    At the end each listener is shut down, which wakes its blocked ``accept``."""
    listeners: list[socket.socket] = []

    def start(handler: Handler) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def loop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    handler(conn)

        threading.Thread(target=loop, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener in listeners:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()


def answer(status: str, body: bytes) -> Handler:
    def handle(conn: socket.socket) -> None:
        request = conn.recv(65536)
        seen.append(request)
        conn.sendall(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    seen: list[bytes] = []
    handle.seen = seen  # type: ignore[attr-defined]
    return handle


def test_a_get_gives_status_and_json_and_sends_the_headers_and_connection_close(
    serve: Callable[[Handler], str],
) -> None:
    handler = answer("200 OK", b'{"status": "ok"}')
    url = serve(handler)
    response = ProbeClient().get(
        url + "/v1/health?x=1", headers={"Authorization": "Bearer k"}, timeout=2
    )
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    request = handler.seen[0].decode()  # type: ignore[attr-defined]
    assert request.startswith("GET /v1/health?x=1 HTTP/1.1\r\n")
    assert "Authorization: Bearer k\r\n" in request
    assert "Connection: close\r\n" in request


def test_a_body_that_is_not_json_raises_value_error_like_httpx(
    serve: Callable[[Handler], str],
) -> None:
    response = ProbeClient().get(serve(answer("200 OK", b"<html>")) + "/", headers={}, timeout=2)
    assert response.text == "<html>"
    with pytest.raises(ValueError):  # noqa: PT011 - the same contract as httpx's json()
        response.json()


def test_a_server_that_never_answers_is_a_read_timeout(
    serve: Callable[[Handler], str],
) -> None:
    release = threading.Event()
    url = serve(lambda conn: release.wait(5))
    try:
        with pytest.raises(httpx.TimeoutException, match=r"within 0\.2s"):
            ProbeClient().get(url + "/health", headers={}, timeout=0.2)
    finally:
        release.set()


def test_a_connection_closed_without_an_answer_is_a_remote_protocol_error(
    serve: Callable[[Handler], str],
) -> None:
    url = serve(lambda conn: conn.recv(65536))
    with pytest.raises(httpx.RemoteProtocolError, match="closed the connection"):
        ProbeClient().get(url + "/health", headers={}, timeout=2)


def test_nothing_listening_is_a_connect_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(httpx.ConnectError, match="refused"):
            ProbeClient().get(f"http://127.0.0.1:{port}/health", headers={}, timeout=2)


def test_only_plain_http_is_probed() -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        ProbeClient().get("https://127.0.0.1:1/health", headers={}, timeout=1)


def test_probe_health_classifies_the_probe_clients_answers_as_it_does_httpx_ones(
    serve: Callable[[Handler], str],
) -> None:
    client = ProbeClient()
    ok = serve(answer("200 OK", b'{"status": "ok"}'))
    busy = serve(answer("503 Service Unavailable", b'{"error": {"message": "no slot available"}}'))
    observe = lambda url: probe_health(  # noqa: E731
        client, url + "/health", url + "/v1/models", {}, timeout_s=2, slow_s=1
    )
    assert observe(ok).verdict == "healthy"
    assert observe(busy).verdict == "degraded"

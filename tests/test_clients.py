"""The clients of llama_actors.clients: a service that talks to its endpoint through them
moves the instance's health by what it sees, without calling report itself.

Each test runs a real Runtime on the fake server and sends its requests through the
library's client with an ``httpx.MockTransport`` as the inner transport, so the answers
are the test's to choose; the instance's health is what the test watches."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import httpx
import msgspec
import openai
import pytest

from llama_actors import (
    AsyncRuntime,
    LlamaActorsError,
    OpenAIUnavailableError,
    Resolution,
    Runtime,
    SignalEvent,
    SignalStream,
    UsageError,
    signal_stream,
)
from llama_actors.clients import (
    DEFAULT_TIMEOUT,
    AsyncReportingTransport,
    ReportingTransport,
    async_httpx_client,
    async_openai_client,
    httpx_client,
    openai_client,
)
from llama_actors.testing.signals import Record, SignalRecorder

from ._helpers import FAST, WAIT, Fake

#: Two failures make the instance degraded, three unavailable; nothing restarts it.
REPORTS = msgspec.structs.replace(
    FAST, report_degraded_after=2, report_unavailable_after=3, wedged_restart_ms=None
)
KEY = "sk-clients-test"
QUESTION = {"messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
def leased(runtime: Runtime, fake: Fake) -> Resolution:
    """A lease on a fake server that has the REPORTS policy and an API key."""
    return runtime.resolve_endpoint(fake.spec(api_key=KEY), "tests", policy=REPORTS)


@pytest.fixture
def health(leased: Resolution) -> Iterator[SignalRecorder]:
    """The health changes after the lease was granted (the first one, to healthy, is past)."""
    with SignalRecorder("health_changed") as recorder:
        yield recorder


def became(health: SignalRecorder, resolution: Resolution, new: str) -> Record:
    """Wait until the leased instance's health became ``new``; that change."""
    return health.wait_for("health_changed", resolution.instance.instance_id, new=new, timeout=WAIT)


def failure(status: int, message: str = "boom") -> httpx.Response:
    """An error answer shaped as llama-server (and OpenAI) shape theirs."""
    body = {"error": {"code": status, "message": message, "type": "server_error"}}
    return httpx.Response(status, json=body)


def completion(text: str = "fine") -> httpx.Response:
    """A chat completion answer, as the OpenAI SDK expects one."""
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [choice],
    }
    return httpx.Response(200, json=body)


class Server:
    """A MockTransport handler: answers what ``answer`` makes of each request (raising
    what it raises) and keeps every request it was sent."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response]) -> None:
        self.answer = answer
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return self.answer(request)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def answering(response: Callable[[], httpx.Response]) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _request: response()


def raising(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def answer(_request: httpx.Request) -> httpx.Response:
        raise exc

    return answer


EVENTS = [b'data: {"n": %d}\n\n' % n for n in range(5)]


class BreakingStream(httpx.SyncByteStream):
    """A body that sends its first event, then the connection breaks."""

    def __iter__(self) -> Iterator[bytes]:
        yield EVENTS[0]
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


class AsyncBreakingStream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield EVENTS[0]
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


def events(stream: httpx.SyncByteStream | httpx.AsyncByteStream | None = None) -> httpx.Response:
    """A streamed 200 answer of server-sent events (``stream``: how its body goes)."""
    body = stream if stream is not None else httpx.ByteStream(b"".join(EVENTS))
    return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, stream=body)


# -- httpx -----------------------------------------------------------------------------------


def test_5xx_answers_make_the_instance_degraded_then_unavailable_and_a_success_heals_it(
    runtime: Runtime, leased: Resolution, health: SignalRecorder
) -> None:
    iid, endpoint = leased.instance.instance_id, leased.endpoint
    server = Server(answering(lambda: failure(500, "boom")))

    with httpx_client(runtime, endpoint, transport=server.transport()) as client:
        answers = [client.post("/chat/completions", json=QUESTION) for _ in range(2)]
        degraded = became(health, leased, "degraded")
        snap = runtime.snapshot(iid)

        assert [a.status_code for a in answers] == [500, 500]  # the caller sees them as sent
        assert answers[0].json()["error"]["message"] == "boom"
        assert degraded.payload["cause"] == "callers"
        assert (snap.health, snap.health_cause) == ("degraded", "callers")
        assert "2 failures reported by callers" in snap.health_reason
        assert "last: HTTP 500 boom" in snap.health_reason

        client.post("/chat/completions", json=QUESTION)
        unavailable = became(health, leased, "unavailable")
        assert unavailable.payload["cause"] == "callers"
        assert "3 failures" in unavailable.payload["reason"]

        server.answer = answering(completion)
        assert client.post("/chat/completions", json=QUESTION).status_code == 200
        became(health, leased, "healthy")

    assert runtime.snapshot(iid).health == "healthy"
    assert {str(r.url) for r in server.seen} == {endpoint.base_url + "/chat/completions"}
    assert {r.headers["Authorization"] for r in server.seen} == {f"Bearer {KEY}"}


@pytest.mark.parametrize(
    "error",
    [
        httpx.ReadTimeout("timed out"),
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_transport_error_is_a_failure_named_in_the_health_reason_and_reaches_the_caller_as_is(
    runtime: Runtime, leased: Resolution, health: SignalRecorder, error: httpx.TransportError
) -> None:
    server = Server(raising(error))

    with httpx_client(runtime, leased.endpoint, transport=server.transport()) as client:
        for _ in range(2):
            with pytest.raises(type(error)) as caught:
                client.post("/chat/completions", json=QUESTION)
            assert caught.value is error

    degraded = became(health, leased, "degraded")
    assert degraded.payload["cause"] == "callers"
    assert f"last: {type(error).__name__}: {error}" in degraded.payload["reason"]


@pytest.mark.parametrize(
    ("answer", "shown"),
    [
        (lambda: failure(401, "Invalid API Key"), "HTTP 401 Invalid API Key"),
        (lambda: failure(403, "Forbidden here"), "HTTP 403 Forbidden here"),
        (lambda: failure(408, "Request timeout"), "HTTP 408 Request timeout"),
        (lambda: failure(429, "Too many"), "HTTP 429 Too many"),
        (lambda: httpx.Response(503, text="<html>down</html>"), "HTTP 503 Service Unavailable"),
    ],
    ids=["401", "403", "408", "429", "503-not-json"],
)
def test_auth_timeout_and_overload_answers_count_as_failures_like_5xx(
    runtime: Runtime,
    leased: Resolution,
    health: SignalRecorder,
    answer: Callable[[], httpx.Response],
    shown: str,
) -> None:
    server = Server(answering(answer))

    with httpx_client(runtime, leased.endpoint, transport=server.transport()) as client:
        for _ in range(2):
            client.get("/models")

    assert became(health, leased, "degraded").payload["reason"].endswith(f"last: {shown}")


def test_a_400_or_404_reports_nothing_neither_failure_nor_success(
    runtime: Runtime, leased: Resolution, health: SignalRecorder
) -> None:
    server = Server(answering(lambda: failure(500)))

    with httpx_client(runtime, leased.endpoint, transport=server.transport()) as client:
        client.post("/chat/completions", json=QUESTION)  # one failure
        server.answer = answering(lambda: failure(400, "bad request"))
        assert client.post("/chat/completions", json={}).status_code == 400
        server.answer = answering(lambda: failure(404, "File Not Found"))
        assert client.get("/nowhere").status_code == 404
        server.answer = answering(lambda: failure(500))
        client.post("/chat/completions", json=QUESTION)  # the second

    # Counted as failures, they would have made it degraded at the 400; as successes,
    # they would have cleared the first 500 and left it healthy.
    degraded = became(health, leased, "degraded")
    assert degraded.payload["reason"].startswith("2 failures reported by callers")
    assert degraded.payload["reason"].endswith("last: HTTP 500 boom")


def test_a_stream_that_breaks_mid_way_is_reported_as_a_failure(
    runtime: Runtime, leased: Resolution, health: SignalRecorder
) -> None:
    server = Server(answering(lambda: events(BreakingStream())))
    received: list[str] = []

    with httpx_client(runtime, leased.endpoint, transport=server.transport()) as client:
        for _ in range(2):
            with (
                client.stream("POST", "/chat/completions", json=QUESTION) as response,
                pytest.raises(httpx.RemoteProtocolError),
            ):
                received.extend(line for line in response.iter_lines() if line)

    assert received == ['data: {"n": 0}', 'data: {"n": 0}']  # each got its first event
    reason = became(health, leased, "degraded").payload["reason"]
    assert "last: RemoteProtocolError: peer closed connection" in reason
    assert "the HTTP 200 body broke off" in reason


def test_a_stream_closed_before_its_end_counts_by_its_status(
    runtime: Runtime, leased: Resolution, health: SignalRecorder
) -> None:
    server = Server(answering(lambda: failure(502, "upstream")))

    with httpx_client(runtime, leased.endpoint, transport=server.transport()) as client:
        for _ in range(2):
            with client.stream("GET", "/models"):
                pass  # closed unread: a 502 all the same
        assert became(health, leased, "degraded").payload["reason"].endswith("HTTP 502 Bad Gateway")

        server.answer = answering(events)
        with client.stream("POST", "/chat/completions", json=QUESTION) as response:
            first = next(response.iter_lines())  # the caller stops after one event

    assert first == 'data: {"n": 0}'
    became(health, leased, "healthy")  # the 200 it started to read was a success


def test_a_report_that_cannot_be_made_never_reaches_the_request(
    leased: Resolution, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def report(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("the runtime is on fire")

    runtime = cast(Runtime, Broken())
    server = Server(answering(lambda: failure(500)))

    with (
        caplog.at_level(logging.WARNING, logger="llama_actors.clients"),
        httpx_client(runtime, leased.endpoint, transport=server.transport()) as client,
    ):
        assert client.post("/chat/completions", json=QUESTION).status_code == 500
        server.answer = raising(httpx.ReadTimeout("timed out"))
        with pytest.raises(httpx.ReadTimeout):
            client.post("/chat/completions", json=QUESTION)

    assert [r.getMessage() for r in caplog.records] == [
        f"could not report HTTP 500 boom on lease {leased.lease.lease_ref}",
        f"could not report ReadTimeout: timed out on lease {leased.lease.lease_ref}",
    ]


def test_requests_go_on_after_the_runtime_is_closed(runtime: Runtime, leased: Resolution) -> None:
    server = Server(answering(lambda: failure(503)))

    with httpx_client(runtime, leased.endpoint, transport=server.transport()) as client:
        runtime.close()
        assert client.get("/models").status_code == 503  # its report is dropped, quietly


def test_the_client_has_the_endpoint_url_headers_and_a_timeout_for_generation(
    runtime: Runtime, leased: Resolution
) -> None:
    endpoint = leased.endpoint

    with httpx_client(runtime, endpoint) as client:
        assert str(client.base_url) == endpoint.base_url + "/"
        assert client.headers["Authorization"] == f"Bearer {KEY}"
        assert client.timeout == DEFAULT_TIMEOUT
        assert (client.timeout.connect, client.timeout.read) == (5.0, 600.0)
    with httpx_client(runtime, endpoint, timeout=3, headers={"X-Trace": "t1"}) as client:
        assert client.timeout.read == 3
        assert client.headers["X-Trace"] == "t1"
        assert client.headers["Authorization"] == f"Bearer {KEY}"


def test_a_published_endpoint_is_refused_saying_which_endpoint_to_use(
    runtime: Runtime, leased: Resolution
) -> None:
    published = runtime.published_endpoint(leased.instance.instance_id)
    makers: list[Callable[[], object]] = [
        lambda: httpx_client(runtime, published),
        lambda: async_httpx_client(runtime, published),
        lambda: openai_client(runtime, published),
        lambda: async_openai_client(runtime, published),
        lambda: ReportingTransport(runtime, published),
        lambda: AsyncReportingTransport(runtime, published),
    ]

    for make in makers:
        with pytest.raises(UsageError) as caught:
            make()
        assert f"endpoint {published.endpoint_id} is the published copy" in str(caught.value)
        assert "resolve_endpoint or lease_instance handed you" in str(caught.value)


def test_options_that_would_route_requests_past_the_reporter_are_refused(
    runtime: Runtime, leased: Resolution
) -> None:
    endpoint = leased.endpoint
    mock = httpx.MockTransport(answering(completion))

    with pytest.raises(UsageError, match="mounts= would send requests past the reporter"):
        httpx_client(runtime, endpoint, mounts={"all://": mock})
    with pytest.raises(UsageError, match="proxy configure httpx's default transport"):
        httpx_client(runtime, endpoint, transport=mock, proxy="http://proxy:3128")
    with pytest.raises(UsageError, match="in asyncio code use the async helpers"):
        httpx_client(cast(Runtime, AsyncRuntime.wrap(runtime)), endpoint)


# -- asyncio ---------------------------------------------------------------------------------


async def next_change(changes: SignalStream, new: str) -> SignalEvent:
    """The next health change to ``new``; other changes are skipped."""
    async with asyncio.timeout(WAIT):
        async for event in changes:
            if event.payload["new"] == new:
                return event
    raise AssertionError(f"the stream ended before a change to {new}")


def test_the_async_client_reports_answers_errors_and_broken_streams_the_same_way(
    runtime: Runtime, leased: Resolution
) -> None:
    iid, endpoint = leased.instance.instance_id, leased.endpoint
    server = Server(answering(lambda: failure(500, "boom")))
    timeout = httpx.ReadTimeout("timed out")

    async def main() -> list[SignalEvent]:
        aruntime = AsyncRuntime.wrap(runtime)
        seen = []
        async with (
            signal_stream("health_changed", instance_id=iid) as changes,
            async_httpx_client(aruntime, endpoint, transport=server.transport()) as client,
        ):
            assert (await client.post("/chat/completions", json=QUESTION)).status_code == 500
            server.answer = raising(timeout)
            with pytest.raises(httpx.ReadTimeout) as caught:
                await client.post("/chat/completions", json=QUESTION)
            assert caught.value is timeout
            seen.append(await next_change(changes, "degraded"))

            server.answer = answering(lambda: events(AsyncBreakingStream()))
            async with client.stream("POST", "/chat/completions", json=QUESTION) as response:
                with pytest.raises(httpx.RemoteProtocolError):
                    async for _line in response.aiter_lines():
                        pass
            seen.append(await next_change(changes, "unavailable"))

            server.answer = answering(lambda: failure(400))
            assert (await client.post("/chat/completions", json={})).status_code == 400
            server.answer = answering(events)
            async with client.stream("POST", "/chat/completions", json=QUESTION) as response:
                lines = [line async for line in response.aiter_lines() if line]
            seen.append(await next_change(changes, "healthy"))
        assert len(lines) == len(EVENTS)
        return seen

    degraded, unavailable, healthy = asyncio.run(main())

    assert degraded.payload["cause"] == unavailable.payload["cause"] == "callers"
    assert degraded.payload["reason"].endswith("last: ReadTimeout: timed out")
    assert "last: RemoteProtocolError: peer closed connection" in unavailable.payload["reason"]
    assert healthy.payload["old"] == "unavailable"
    assert runtime.snapshot(iid).health == "healthy"


# -- the OpenAI SDK --------------------------------------------------------------------------


def test_the_openai_client_sends_through_the_reporter(
    runtime: Runtime, leased: Resolution, health: SignalRecorder
) -> None:
    endpoint = leased.endpoint
    server = Server(answering(lambda: failure(500, "boom")))

    with openai_client(runtime, endpoint, transport=server.transport(), max_retries=0) as client:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError, match="boom"):
                client.chat.completions.create(model="fake", messages=[])
        reason = became(health, leased, "degraded").payload["reason"]

        server.answer = answering(lambda: completion("fine"))
        reply = client.chat.completions.create(model="fake", messages=[])
        became(health, leased, "healthy")

    assert reason.endswith("last: HTTP 500 boom")
    assert reply.choices[0].message.content == "fine"
    assert {str(r.url) for r in server.seen} == {endpoint.base_url + "/chat/completions"}
    assert {r.headers["Authorization"] for r in server.seen} == {f"Bearer {KEY}"}


def test_each_retry_of_the_openai_sdk_is_reported_as_a_request_of_its_own(
    runtime: Runtime, leased: Resolution, health: SignalRecorder
) -> None:
    def overloaded() -> httpx.Response:
        answer = failure(503, "Loading model")
        answer.headers["retry-after-ms"] = "1"  # the SDK waits that long between tries
        return answer

    server = Server(answering(overloaded))

    with (
        openai_client(runtime, leased.endpoint, transport=server.transport(), max_retries=2) as c,
        pytest.raises(openai.APIStatusError),
    ):
        c.chat.completions.create(model="fake", messages=[])

    assert len(server.seen) == 3
    assert "3 failures" in became(health, leased, "unavailable").payload["reason"]


def test_the_async_openai_client_sends_through_the_reporter(
    runtime: Runtime, leased: Resolution
) -> None:
    iid, endpoint = leased.instance.instance_id, leased.endpoint
    server = Server(answering(lambda: failure(429, "slow down")))

    async def main() -> tuple[SignalEvent, SignalEvent, str | None]:
        aruntime = AsyncRuntime.wrap(runtime)
        async with (
            signal_stream("health_changed", instance_id=iid) as changes,
            async_openai_client(
                aruntime, endpoint, transport=server.transport(), max_retries=0
            ) as client,
        ):
            for _ in range(2):
                with pytest.raises(openai.RateLimitError):
                    await client.chat.completions.create(model="fake", messages=[])
            degraded = await next_change(changes, "degraded")
            server.answer = answering(lambda: completion("fine"))
            reply = await client.chat.completions.create(model="fake", messages=[])
            healthy = await next_change(changes, "healthy")
        return degraded, healthy, reply.choices[0].message.content

    degraded, healthy, content = asyncio.run(main())

    assert degraded.payload["reason"].endswith("last: HTTP 429 slow down")
    assert healthy.payload["old"] == "degraded"
    assert content == "fine"
    assert {r.headers["Authorization"] for r in server.seen} == {f"Bearer {KEY}"}


def test_the_clients_chat_with_the_fake_server_unchanged(
    runtime: Runtime, leased: Resolution
) -> None:
    endpoint = leased.endpoint
    question: list[Any] = QUESTION["messages"]
    model = endpoint.model_identity

    with httpx_client(runtime, endpoint) as client:
        answer = client.post("/chat/completions", json=QUESTION).json()
    with openai_client(runtime, endpoint) as sdk:
        reply = sdk.chat.completions.create(model=model, messages=question)
        stream = sdk.chat.completions.create(model=model, messages=question, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    async def main() -> str | None:
        async with async_openai_client(AsyncRuntime.wrap(runtime), endpoint) as client:
            reply = await client.chat.completions.create(model=model, messages=question)
        return reply.choices[0].message.content

    assert answer["choices"][0]["message"]["content"] == "You said: hello there"
    assert reply.choices[0].message.content == "You said: hello there"
    assert streamed.split() == ["You", "said:", "hello", "there"]
    assert asyncio.run(main()) == "You said: hello there"
    assert runtime.snapshot(leased.instance.instance_id).health == "healthy"


def test_without_openai_the_openai_helpers_say_pip_install_openai(
    runtime: Runtime, leased: Resolution, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # what a missing package looks like

    for make in (openai_client, async_openai_client):
        with pytest.raises(OpenAIUnavailableError, match="pip install openai") as caught:
            make(runtime, leased.endpoint)
        assert isinstance(caught.value, ImportError)
        assert isinstance(caught.value, LlamaActorsError)


def test_the_clients_module_imports_without_openai() -> None:
    code = (
        "import sys\n"
        "sys.modules['openai'] = None\n"
        "import llama_actors.clients as clients\n"
        "print(clients.httpx_client.__name__, sys.modules['openai'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["httpx_client", "None"]

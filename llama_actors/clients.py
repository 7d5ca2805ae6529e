"""HTTP clients for a leased endpoint that tell the runtime how each request went.

.. code-block:: python

    from llama_actors.clients import httpx_client, openai_client

    resolution = runtime.resolve_endpoint(spec, "my-service")
    with openai_client(runtime, resolution.endpoint) as client:
        client.chat.completions.create(model=..., messages=...)

Every request sent through these clients is reported on the endpoint's lease
(:meth:`Runtime.report <llama_actors.Runtime.report>`) once, when its outcome is known:

- a transport error (it could not connect, a timeout of any kind, the connection broke
  or the server broke the protocol) is a failure, reported with the exception's name and
  raised to the caller unchanged;
- an answer 5xx, 401, 403, 408 or 429 is a failure, reported as ``HTTP <code> <message>``
  (the server's error message when its body is JSON, the reason phrase otherwise);
- any other 4xx reports nothing: the request was wrong, not the server;
- 1xx, 2xx and 3xx are successes.

An answer is reported when its body has been read to its end (streams included) or when
reading it fails mid-way (a failure, whatever the status); a body closed before its end
without an error counts by its status. A body never read nor closed reports nothing.
Reporting never raises into the request: a report that cannot be made is logged.

Failures reported within the policy's ``report_window_ms`` make the instance ``degraded``
after ``report_degraded_after`` of them and ``unavailable`` after
``report_unavailable_after``; a reported success clears them (``guides/integration.md``,
"Tell the runtime what you saw").

httpx is a dependency of llama_actors; the OpenAI helpers need the ``openai`` package
(``pip install openai``) and raise :class:`OpenAIUnavailableError` without it. This module
imports without it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import httpx

from llama_actors._exceptions import OpenAIUnavailableError, UsageError
from llama_actors._kernel.types import EndpointDescriptor
from llama_actors._runtime.aio import AsyncRuntime
from llama_actors._runtime.runtime import Runtime

if TYPE_CHECKING:
    import openai

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncReportingTransport",
    "OpenAIUnavailableError",
    "ReportingTransport",
    "async_httpx_client",
    "async_openai_client",
    "httpx_client",
    "openai_client",
]

log = logging.getLogger("llama_actors.clients")

#: The clients' default timeout: 5 s to connect, 600 s for the rest (a long generation
#: streams its first token late). Pass ``timeout=`` to change it.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)

# Statuses below 500 that are the server's failure, not the caller's: the endpoint's own
# key refused (401, 403), the server timed out reading the request (408) or is overloaded
# (429).
_FAILED_4XX = frozenset({401, 403, 408, 429})

# The api_key the OpenAI helpers give the SDK when the endpoint has no bearer token: a
# llama-server started without a key accepts any.
_NO_KEY = "no-key"

# Transport errors that say something about the server or the way to it. A
# LocalProtocolError or UnsupportedProtocol is the caller's request; a ProxyError a proxy's.
_COUNTED = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# How much of a failed answer's body is kept to read its error message.
_KEEP = 64 * 1024
# The options of httpx's own default transport: given no transport, the clients build
# theirs from them, as httpx does, so the reporter sees every request.
_TRANSPORT_OPTIONS = ("verify", "cert", "trust_env", "http1", "http2", "limits", "proxy")

# What a report says: ``(ok, detail)``, or None for nothing to say.
_Verdict = tuple[bool, str] | None


# -- what an exchange says about the server ------------------------------------------------


def _name(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _failed(status: int) -> bool:
    return status >= 500 or status in _FAILED_4XX


def _error_message(body: bytes, headers: httpx.Headers) -> str | None:
    """The error message of a JSON error body (llama-server and OpenAI:
    ``{"error": {"message": ...}}``; also ``{"error": "..."}``, ``{"message": ...}``,
    ``{"detail": ...}``), or None."""
    try:
        # Through a Response, so a Content-Encoding is decoded as the caller would see it.
        data = httpx.Response(200, headers=headers, content=body).json()
    except Exception:
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    for value in (
        error.get("message") if isinstance(error, dict) else error,
        data.get("message"),
        data.get("detail"),
    ):
        if isinstance(value, str) and value.strip():
            return " ".join(value.split())
    return None


class _Exchange:
    """One request's outcome, decided once: the first of the body's end, its breaking
    and its closing says it; the others say nothing."""

    def __init__(self, status: int, headers: httpx.Headers) -> None:
        self.status = status
        self.headers = headers
        self._said = False
        self._keep = _failed(status)
        self._body = bytearray()

    def took(self, chunk: bytes) -> None:
        if self._keep:
            if len(self._body) + len(chunk) > _KEEP:
                self._keep = False  # too long to be an error message worth reading
                self._body.clear()
            else:
                self._body += chunk

    def ended(self) -> _Verdict:
        """The body was read to its end."""
        message = _error_message(bytes(self._body), self.headers) if self._keep else None
        return self._say(self._by_status(message))

    def broke(self, exc: BaseException) -> _Verdict:
        """Reading the body raised ``exc``: a failure if it is one of the server's."""
        if not isinstance(exc, _COUNTED):
            return None  # the caller's doing (or a bug); its close counts by status
        return self._say((False, f"{_name(exc)} (the HTTP {self.status} body broke off)"))

    def closed(self) -> _Verdict:
        """The body was closed (maybe before its end)."""
        return self._say(self._by_status(None))

    def _by_status(self, message: str | None) -> _Verdict:
        status = self.status
        if not _failed(status):
            return None if status >= 400 else (True, f"HTTP {status}")
        text = message or httpx.codes.get_reason_phrase(status)
        return False, f"HTTP {status} {text}".rstrip()

    def _say(self, verdict: _Verdict) -> _Verdict:
        if self._said:
            return None
        self._said = True
        return verdict


def _with_stream(
    response: httpx.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream
) -> httpx.Response:
    # A new response, not the old one with its stream swapped: a response built with
    # content (as MockTransport handlers do) has read it already and would skip the stream.
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=stream,
        extensions=response.extensions,
    )


# -- reporting -------------------------------------------------------------------------------


def _lease_ref(endpoint: EndpointDescriptor, what: str) -> str:
    if not isinstance(endpoint, EndpointDescriptor):
        raise UsageError(
            f"{what} needs the EndpointDescriptor resolve_endpoint or lease_instance handed "
            f"you, not {endpoint!r}"
        )
    if endpoint.lease_ref is None:
        raise UsageError(
            f"{what}: endpoint {endpoint.endpoint_id} is the published copy, which holds no "
            "lease, so its requests could not be reported; pass the endpoint that "
            "resolve_endpoint or lease_instance handed you (resolution.endpoint)"
        )
    return endpoint.lease_ref


def _sync_runtime(runtime: Runtime | AsyncRuntime, what: str) -> Runtime:
    if isinstance(runtime, AsyncRuntime):
        raise UsageError(
            f"{what} is for blocking code and reports through a Runtime; in asyncio code use "
            "the async helpers (async_httpx_client, async_openai_client, "
            "AsyncReportingTransport), which take an AsyncRuntime"
        )
    return runtime


def _tell(runtime: Runtime, lease_ref: str, verdict: _Verdict) -> None:
    if verdict is None:
        return
    ok, detail = verdict
    try:
        runtime.report(lease_ref, ok, detail=detail)
    except Exception:
        log.warning("could not report %s on lease %s", detail, lease_ref, exc_info=True)


async def _atell(runtime: AsyncRuntime | Runtime, lease_ref: str, verdict: _Verdict) -> None:
    if verdict is None:
        return
    ok, detail = verdict
    try:
        result: Awaitable[None] | None = runtime.report(lease_ref, ok, detail=detail)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.warning("could not report %s on lease %s", detail, lease_ref, exc_info=True)


class _ReportingStream(httpx.SyncByteStream):
    def __init__(
        self, inner: httpx.SyncByteStream, exchange: _Exchange, say: Callable[[_Verdict], None]
    ) -> None:
        self._inner = inner
        self._exchange = exchange
        self._say = say

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                self._exchange.took(chunk)
                yield chunk
        except BaseException as exc:
            self._say(self._exchange.broke(exc))
            raise
        self._say(self._exchange.ended())

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._say(self._exchange.closed())


class _AsyncReportingStream(httpx.AsyncByteStream):
    def __init__(
        self,
        inner: httpx.AsyncByteStream,
        exchange: _Exchange,
        say: Callable[[_Verdict], Awaitable[None]],
    ) -> None:
        self._inner = inner
        self._exchange = exchange
        self._say = say

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                self._exchange.took(chunk)
                yield chunk
        except BaseException as exc:
            # Nothing to say for GeneratorExit or a cancellation: no await in their way.
            verdict = self._exchange.broke(exc)
            if verdict is not None:
                await self._say(verdict)
            raise
        await self._say(self._exchange.ended())

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            await self._say(self._exchange.closed())


class ReportingTransport(httpx.BaseTransport):
    """An httpx transport that sends through ``transport`` (httpx's default transport
    when None) and reports each request's outcome on ``endpoint``'s lease to
    ``runtime``, once (the rules are in :mod:`llama_actors.clients`).

    ``endpoint`` must be a leased endpoint (``resolution.endpoint``): the published copy
    holds no lease, and is refused with :class:`~llama_actors.UsageError`. Closing the
    transport closes ``transport``.
    """

    def __init__(
        self,
        runtime: Runtime,
        endpoint: EndpointDescriptor,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.lease_ref = _lease_ref(endpoint, "ReportingTransport")
        self.runtime = _sync_runtime(runtime, "ReportingTransport")
        self.transport = transport if transport is not None else httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = self.transport.handle_request(request)
        except _COUNTED as exc:
            self._say((False, _name(exc)))
            raise
        exchange = _Exchange(response.status_code, response.headers)
        if not isinstance(response.stream, httpx.SyncByteStream):  # not for this client
            self._say(exchange.closed())
            return response
        return _with_stream(response, _ReportingStream(response.stream, exchange, self._say))

    def close(self) -> None:
        self.transport.close()

    def _say(self, verdict: _Verdict) -> None:
        _tell(self.runtime, self.lease_ref, verdict)


class AsyncReportingTransport(httpx.AsyncBaseTransport):
    """:class:`ReportingTransport` for ``httpx.AsyncClient``: sends through
    ``transport`` (httpx's default async transport when None) and reports each
    request's outcome on ``endpoint``'s lease. ``runtime`` is an
    :class:`~llama_actors.AsyncRuntime` or a :class:`~llama_actors.Runtime` (whose
    ``report`` returns at once too)."""

    def __init__(
        self,
        runtime: AsyncRuntime | Runtime,
        endpoint: EndpointDescriptor,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.lease_ref = _lease_ref(endpoint, "AsyncReportingTransport")
        self.runtime = runtime
        self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self.transport.handle_async_request(request)
        except _COUNTED as exc:
            await self._say((False, _name(exc)))
            raise
        exchange = _Exchange(response.status_code, response.headers)
        if not isinstance(response.stream, httpx.AsyncByteStream):  # not for this client
            await self._say(exchange.closed())
            return response
        stream = _AsyncReportingStream(response.stream, exchange, self._say)
        return _with_stream(response, stream)

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def _say(self, verdict: _Verdict) -> None:
        await _atell(self.runtime, self.lease_ref, verdict)


# -- clients -------------------------------------------------------------------------------


def _client_options(
    endpoint: EndpointDescriptor,
    what: str,
    transport: object,
    headers: Mapping[str, str] | None,
    kwargs: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a helper's keyword arguments into the client's and its default transport's."""
    _lease_ref(endpoint, what)
    if "mounts" in kwargs:
        raise UsageError(
            f"{what}: mounts= would send requests past the reporter; pass one transport= "
            "(it is wrapped) instead"
        )
    options = {name: kwargs.pop(name) for name in _TRANSPORT_OPTIONS if name in kwargs}
    if transport is not None and set(options) - {"trust_env"}:
        raise UsageError(
            f"{what}: {', '.join(sorted(set(options) - {'trust_env'}))} configure httpx's "
            "default transport, which transport= replaces; give them to your transport"
        )
    if "trust_env" in options:
        kwargs["trust_env"] = options["trust_env"]
    client = {
        "base_url": endpoint.base_url,
        "headers": {**endpoint.headers, **(headers or {})},
        "timeout": DEFAULT_TIMEOUT,
        **kwargs,
    }
    return client, options


def httpx_client(
    runtime: Runtime,
    endpoint: EndpointDescriptor,
    *,
    transport: httpx.BaseTransport | None = None,
    headers: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Client:
    """An ``httpx.Client`` for a leased endpoint that reports every request's outcome
    on its lease (the rules are in :mod:`llama_actors.clients`).

    Its ``base_url`` is ``endpoint.base_url`` (so ``client.post("/chat/completions",
    ...)``), its headers the endpoint's (its ``Authorization``) updated by ``headers``,
    and its timeout :data:`DEFAULT_TIMEOUT` unless you pass ``timeout=``. Other keyword
    arguments go to ``httpx.Client``. ``transport`` is the transport the requests go
    through (httpx's default one when None, built from ``verify``, ``cert``,
    ``trust_env``, ``http1``, ``http2``, ``limits`` and ``proxy`` as httpx would); it is
    wrapped in a :class:`ReportingTransport`. ``mounts=`` is refused: it would route
    requests past the reporter.

    The published endpoint (``runtime.published_endpoint(...)``) holds no lease and is
    refused with :class:`~llama_actors.UsageError`. Close the client when done (``with``).
    """
    what = "httpx_client(runtime, endpoint)"
    _sync_runtime(runtime, what)
    client, options = _client_options(endpoint, what, transport, headers, kwargs)
    inner = transport if transport is not None else httpx.HTTPTransport(**options)
    return httpx.Client(transport=ReportingTransport(runtime, endpoint, inner), **client)


def async_httpx_client(
    runtime: AsyncRuntime | Runtime,
    endpoint: EndpointDescriptor,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    headers: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> httpx.AsyncClient:
    """:func:`httpx_client` for asyncio: an ``httpx.AsyncClient`` whose requests are
    reported on the endpoint's lease through ``runtime`` (an
    :class:`~llama_actors.AsyncRuntime`, or a :class:`~llama_actors.Runtime`).
    ``transport`` is an ``httpx.AsyncBaseTransport``; close the client with
    ``async with`` or ``await client.aclose()``."""
    what = "async_httpx_client(runtime, endpoint)"
    client, options = _client_options(endpoint, what, transport, headers, kwargs)
    inner = transport if transport is not None else httpx.AsyncHTTPTransport(**options)
    reporting = AsyncReportingTransport(runtime, endpoint, inner)
    return httpx.AsyncClient(transport=reporting, **client)


def _openai(what: str) -> Any:
    try:
        import openai
    except ImportError as exc:
        raise OpenAIUnavailableError(
            f"{what} needs the openai package, which is not installed ({exc}); install it "
            "with: pip install openai (httpx_client needs nothing more)"
        ) from exc
    return openai


def _api_key(endpoint: EndpointDescriptor) -> str:
    for name, value in endpoint.headers.items():
        if name.lower() == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return _NO_KEY


def _openai_options(
    endpoint: EndpointDescriptor, what: str, kwargs: dict[str, Any]
) -> dict[str, Any]:
    _lease_ref(endpoint, what)
    if "http_client" in kwargs:
        raise UsageError(
            f"{what} builds the http_client itself (the reporting one); to set httpx "
            "options, pass http_client=httpx_client(runtime, endpoint, ...) to openai.OpenAI "
            "yourself"
        )
    return {
        "base_url": endpoint.base_url,
        "api_key": _api_key(endpoint),
        **kwargs,
        # The endpoint's headers win over the SDK's Authorization (a non-bearer one too).
        "default_headers": {**endpoint.headers, **(kwargs.get("default_headers") or {})},
    }


def openai_client(
    runtime: Runtime,
    endpoint: EndpointDescriptor,
    *,
    transport: httpx.BaseTransport | None = None,
    **kwargs: Any,
) -> openai.OpenAI:
    """An ``openai.OpenAI`` client for a leased endpoint whose requests are reported on
    its lease: its ``http_client`` is :func:`httpx_client` (``transport`` is passed to it).

    ``base_url`` is the endpoint's, ``api_key`` its bearer token (a placeholder when it
    has none: a llama-server without a key accepts any), and the endpoint's headers are
    sent with every request. Other keyword arguments go to ``openai.OpenAI``
    (``timeout``, ``max_retries``, ``default_headers``...). ``max_retries`` is the SDK's
    (2 unless you pass it): each retry is a request of its own, reported on its own, so a
    request the SDK retries twice on a 503 reports three failures.

    Needs the ``openai`` package: without it, raises :class:`OpenAIUnavailableError` (an
    ``ImportError``). Close the client when done (``with``): that closes its http client.
    """
    what = "openai_client(runtime, endpoint)"
    _sync_runtime(runtime, what)
    sdk = _openai(what)
    options = _openai_options(endpoint, what, kwargs)
    http = httpx_client(runtime, endpoint, transport=transport, follow_redirects=True)
    client: openai.OpenAI = sdk.OpenAI(http_client=http, **options)
    return client


def async_openai_client(
    runtime: AsyncRuntime | Runtime,
    endpoint: EndpointDescriptor,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    **kwargs: Any,
) -> openai.AsyncOpenAI:
    """:func:`openai_client` for asyncio: an ``openai.AsyncOpenAI`` whose
    ``http_client`` is :func:`async_httpx_client`. Each retry is its own reported
    request. Without ``openai``, raises :class:`OpenAIUnavailableError`."""
    what = "async_openai_client(runtime, endpoint)"
    sdk = _openai(what)
    options = _openai_options(endpoint, what, kwargs)
    http = async_httpx_client(runtime, endpoint, transport=transport, follow_redirects=True)
    client: openai.AsyncOpenAI = sdk.AsyncOpenAI(http_client=http, **options)
    return client

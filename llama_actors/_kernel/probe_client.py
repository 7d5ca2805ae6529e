"""A small HTTP/1.1 GET client for readiness and health probes.

A runtime probes every instance every ``health_interval_ms``; with a hundred instances
the client's own CPU is what the runtime costs. An httpx GET takes 0.3 to 1 ms of CPU,
a GET over the standard library's ``http.client`` about a tenth of that. This client
answers in httpx's shape (``status_code``, ``json()``, ``text``) and raises httpx's
exceptions, so the probe code is the same for both, and tests can still hand the probes
an ``httpx.Client`` on a mock transport (httpx's transport seam).

Every request uses a fresh connection that is closed after the answer: an idle
kept-alive probe connection delays llama-server's exit on SIGTERM.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

__all__ = ["ProbeClient", "ProbeGetter", "ProbeResponse"]


class ProbeResponse:
    """The status and body of one probe answer."""

    __slots__ = ("content", "status_code")

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` when it is not JSON."""
        return json.loads(self.content)


class ProbeClient:
    """GET and POST over ``http.client`` with httpx's exceptions; safe to share between threads
    (it keeps no connection)."""

    def get(self, url: str, *, headers: Mapping[str, str], timeout: float) -> ProbeResponse:
        return self._request("GET", url, headers, None, timeout)

    def _request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        content: bytes | None,
        timeout: float,
    ) -> ProbeResponse:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise httpx.UnsupportedProtocol(f"probes speak plain http to a host, not {url!r}")
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        try:
            sent = {"Connection": "close", **headers}
            if content is not None:
                sent.setdefault("Content-Type", "application/json")
            connection.request(method, path, body=content, headers=sent)
            response = connection.getresponse()
            return ProbeResponse(response.status, response.read())
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"no answer from {url} within {timeout:g}s") from exc
        except (http.client.RemoteDisconnected, http.client.IncompleteRead) as exc:
            raise httpx.RemoteProtocolError(f"{url}: the server closed the connection") from exc
        except http.client.HTTPException as exc:
            raise httpx.RemoteProtocolError(f"{url}: not an HTTP answer ({exc!r})") from exc
        except ConnectionRefusedError as exc:
            raise httpx.ConnectError(f"{url}: connection refused") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"{url}: {exc.strerror or exc}") from exc
        finally:
            connection.close()

    def post(
        self, url: str, *, headers: Mapping[str, str], content: bytes, timeout: float
    ) -> ProbeResponse:
        """POST ``content`` (JSON) to ``url``; the same answers and errors as :meth:`get`."""
        return self._request("POST", url, headers, content, timeout)

    def close(self) -> None:
        """Nothing to close: kept for the same shape as ``httpx.Client``."""


#: What the probes call: the runtime's :class:`ProbeClient`, or an ``httpx.Client``
#: (tests hand one on a mock transport).
ProbeGetter = ProbeClient | httpx.Client

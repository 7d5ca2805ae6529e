"""Health after publication (CONTRACT §5): one probe, its classification, and the
per-instance tracker that turns observations into state changes.

Pure apart from :func:`probe_health`, which makes one HTTP request with a timeout.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import httpx
import msgspec

from llama_actors._kernel.probe_client import ProbeClient, ProbeResponse
from llama_actors._kernel.types import Health

#: What the probes GET with: the runtime's :class:`ProbeClient`, or an ``httpx.Client``
#: (tests hand one on a mock transport).
ProbeGetter = ProbeClient | httpx.Client

__all__ = [
    "HealthTracker",
    "Observation",
    "ProbeGetter",
    "Transition",
    "classify",
    "get_once_more_on_drop",
    "probe_health",
]

Verdict = Literal["healthy", "degraded", "failure"]


class Observation(msgspec.Struct, frozen=True):
    """What one probe saw: a verdict, why, and how long it took."""

    verdict: Verdict
    reason: str
    latency_s: float = 0.0


class Transition(msgspec.Struct, frozen=True):
    old: Health
    new: Health
    reason: str


def _message(body: Any) -> str:
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(body.get("status"), str):
            return str(body["status"])
    return ""


def classify(status: int, body: Any, latency_s: float, slow_s: float) -> Observation:
    """Classify one ``/health`` answer (``body`` is the decoded JSON, or None)."""
    text = _message(body)
    if status == 200:
        state = body.get("status", "ok") if isinstance(body, Mapping) else "ok"
        if state != "ok":
            return Observation("degraded", f"server reports status {state!r}", latency_s)
        if latency_s > slow_s:
            return Observation(
                "degraded",
                f"slow probe: {latency_s * 1000:.0f} ms > {slow_s * 1000:.0f} ms",
                latency_s,
            )
        return Observation("healthy", "200 ok", latency_s)
    if status == 503 and "slot" in text.lower():
        return Observation("degraded", f"503 {text or 'no slot available'}", latency_s)
    if status == 503 and "loading" in text.lower():
        return Observation("degraded", "503 loading model", latency_s)
    if status in (401, 403):
        return Observation(
            "failure",
            f"{status} {text or 'unauthorized'}: the published headers are refused",
            latency_s,
        )
    return Observation("failure", f"HTTP {status} {text}".rstrip(), latency_s)


class HealthTracker:
    """Turns a stream of observations into health states, reporting each change once.

    ``degraded`` and ``healthy`` follow the last observation; failures make the state
    ``degraded`` until ``unavailable_after`` of them in a row make it ``unavailable``.
    """

    def __init__(self, unavailable_after: int, initial: Health = "healthy") -> None:
        self.unavailable_after = unavailable_after
        self.state: Health = initial
        self.failures = 0

    def observe(self, obs: Observation) -> Transition | None:
        if obs.verdict == "failure":
            self.failures += 1
            if self.failures >= self.unavailable_after:
                new: Health = "unavailable"
                reason = f"{self.failures} failed probes in a row; last: {obs.reason}"
            else:
                new = "degraded"
                reason = f"probe failed ({self.failures} of {self.unavailable_after}): {obs.reason}"
        else:
            self.failures = 0
            new = obs.verdict
            reason = obs.reason
        return self._move(new, reason)

    def force(self, new: Health, reason: str) -> Transition | None:
        """Set the state from outside (the process exited, or the instance is ready)."""
        self.failures = 0
        return self._move(new, reason)

    def _move(self, new: Health, reason: str) -> Transition | None:
        if new == self.state:
            return None
        old, self.state = self.state, new
        return Transition(old, new, reason)


def probe_health(
    client: ProbeGetter,
    health_url: str,
    models_url: str,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    slow_s: float,
) -> Observation:
    """GET ``health_url`` once (falling back to ``models_url`` on a 404) and classify it."""
    started = time.monotonic()
    try:
        response = get_once_more_on_drop(client, health_url, headers, timeout_s)
        if response.status_code == 404:
            response = get_once_more_on_drop(client, models_url, headers, timeout_s)
            body: Any = {"status": "ok"} if response.status_code == 200 else _json(response)
        else:
            body = _json(response)
    except httpx.TimeoutException:
        return Observation("failure", f"no answer within {timeout_s * 1000:.0f} ms", timeout_s)
    except httpx.HTTPError as exc:
        return Observation("failure", f"{type(exc).__name__}: {exc}", time.monotonic() - started)
    return classify(response.status_code, body, time.monotonic() - started, slow_s)


def get_once_more_on_drop(
    client: ProbeGetter, url: str, headers: Mapping[str, str], timeout_s: float
) -> httpx.Response | ProbeResponse:
    """GET ``url`` on a fresh connection, closed after the answer; if the server closed
    it without answering, ask once more before calling that a failed probe.

    ``Connection: close`` because an idle kept-alive probe connection makes
    llama-server take about 100 ms longer to exit on SIGTERM, and llama-server
    sometimes drops kept-alive connections after a streamed reply.
    """
    request_headers = {**headers, "Connection": "close"}
    try:
        return client.get(url, headers=request_headers, timeout=timeout_s)
    except httpx.RemoteProtocolError:
        return client.get(url, headers=request_headers, timeout=timeout_s)


def _json(response: httpx.Response | ProbeResponse) -> Any:
    try:
        return response.json()
    except ValueError:
        return None

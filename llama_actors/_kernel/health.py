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

from llama_actors._kernel.probe_client import ProbeGetter, ProbeResponse
from llama_actors._kernel.types import Health

__all__ = [
    "INFERENCE_BODY",
    "HealthCause",
    "HealthTracker",
    "Observation",
    "ProbeGetter",
    "ProbeKind",
    "Transition",
    "classify",
    "get_once_more_on_drop",
    "probe_health",
    "probe_inference",
    "worse",
]

Verdict = Literal["healthy", "degraded", "failure"]
#: Which probe saw it: ``health`` (``/health``) or ``inference`` (real work).
ProbeKind = Literal["health", "inference"]
#: Why the published health is what it is, carried by ``health_changed`` so a
#: subscriber can tell saturation from sickness: ``ready`` (passed readiness),
#: ``probe`` (a health probe), ``inference`` (an inference probe), ``saturated`` (every
#: slot busy with requests deferred), ``callers`` (outcomes reported by callers),
#: ``exited`` (the process ended), ``stopped`` and ``failed``.
HealthCause = Literal[
    "ready", "probe", "inference", "saturated", "callers", "exited", "stopped", "failed"
]
_CAUSE_OF: dict[ProbeKind, HealthCause] = {"health": "probe", "inference": "inference"}


class Observation(msgspec.Struct, frozen=True):
    """What one probe saw: a verdict, why, how long it took, and which probe it was."""

    verdict: Verdict
    reason: str
    latency_s: float = 0.0
    kind: ProbeKind = "health"


class Transition(msgspec.Struct, frozen=True):
    old: Health
    new: Health
    reason: str
    cause: HealthCause = "probe"


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


_RANK: dict[Health, int] = {"unknown": 0, "healthy": 1, "degraded": 2, "unavailable": 3}


def worse(a: Health, b: Health) -> bool:
    """Whether health ``a`` is worse than ``b`` (unknown < healthy < degraded <
    unavailable)."""
    return _RANK[a] > _RANK[b]


class HealthTracker:
    """Turns probe observations and load readings into one health state, reporting
    each change once, with its cause.

    Health and inference probes each keep a run of failures: a failure of either makes
    the state ``degraded`` until ``unavailable_after`` of that kind in a row make it
    ``unavailable``; a success of a kind ends that kind's run. (An inference failure is
    not cleared by a passing ``/health``: that is the point of inference probes.) A
    ``degraded`` health answer, or a load reading that says saturated, makes a state
    that is otherwise healthy ``degraded``.
    """

    def __init__(self, unavailable_after: int, initial: Health = "healthy") -> None:
        self.unavailable_after = unavailable_after
        self.state: Health = initial
        self.cause: HealthCause = "probe"
        self._runs: dict[ProbeKind, int] = {"health": 0, "inference": 0}
        self._last: dict[ProbeKind, Observation] = {}
        self._degraded: str | None = None  # the last health answer said degraded
        self._saturated: str | None = None  # why the last load reading said saturated

    @property
    def failures(self) -> int:
        """The longest current run of failed probes (of either kind)."""
        return max(self._runs.values())

    def observe(self, obs: Observation) -> Transition | None:
        kind = obs.kind
        self._last[kind] = obs
        if obs.verdict == "failure":
            self._runs[kind] += 1
        else:
            self._runs[kind] = 0
            if kind == "health":
                self._degraded = obs.reason if obs.verdict == "degraded" else None
        return self._settle(obs.reason, _CAUSE_OF[kind])

    def observe_load(self, saturated: str | None) -> Transition | None:
        """A load reading: ``saturated`` says why it is saturated, None when it is not."""
        was = self._saturated
        self._saturated = saturated
        if was is not None and saturated is None:
            return self._settle(f"no longer saturated (was: {was})", "saturated")
        return self._settle(saturated or "", "saturated")

    def force(self, new: Health, reason: str, cause: HealthCause = "probe") -> Transition | None:
        """Set the state from outside (the process exited, or the instance is ready)."""
        self._runs = {"health": 0, "inference": 0}
        self._degraded = self._saturated = None
        self.cause = cause
        return self._move(new, reason, cause)

    def _settle(self, reason: str, cause: HealthCause) -> Transition | None:
        new, why, because = self._evaluate(reason, cause)
        return self._move(new, why, because)

    def _evaluate(self, reason: str, cause: HealthCause) -> tuple[Health, str, HealthCause]:
        n = self.unavailable_after
        kinds: tuple[ProbeKind, ...] = ("inference", "health")
        failing = [k for k in kinds if self._runs[k] > 0]
        if failing:
            kind = max(failing, key=lambda k: self._runs[k])
            run, last = self._runs[kind], self._last[kind].reason
            what = "inference probes" if kind == "inference" else "probes"
            if run >= n:
                return "unavailable", f"{run} failed {what} in a row; last: {last}", _CAUSE_OF[kind]
            one = "inference probe" if kind == "inference" else "probe"
            return "degraded", f"{one} failed ({run} of {n}): {last}", _CAUSE_OF[kind]
        if self._degraded is not None:
            return "degraded", self._degraded, "probe"
        if self._saturated is not None:
            return "degraded", self._saturated, "saturated"
        return "healthy", reason, cause

    def _move(self, new: Health, reason: str, cause: HealthCause) -> Transition | None:
        if new == self.state:
            return None
        old, self.state, self.cause = self.state, new, cause
        return Transition(old, new, reason, cause)


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


#: What an inference probe asks for: one token, greedy, of a one-word prompt.
INFERENCE_BODY = {"prompt": "ok", "max_tokens": 1, "temperature": 0}


def probe_inference(
    client: ProbeGetter,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    *,
    timeout_s: float,
) -> Observation:
    """POST ``body`` (a one-token completion) to ``url`` once and say whether real work
    came back. A server whose ``/health`` says 200 while its decode loop is stuck
    answers this with nothing, and a broken one with an error."""
    started = time.monotonic()
    sent = {**headers, "Connection": "close", "Content-Type": "application/json"}
    try:
        response = client.post(
            url, headers=sent, content=msgspec.json.encode(body), timeout=timeout_s
        )
    except httpx.TimeoutException:
        return Observation(
            "failure",
            f"inference probe: no answer within {timeout_s * 1000:.0f} ms",
            timeout_s,
            kind="inference",
        )
    except httpx.HTTPError as exc:
        return Observation(
            "failure",
            f"inference probe: {type(exc).__name__}: {exc}",
            time.monotonic() - started,
            kind="inference",
        )
    latency = time.monotonic() - started
    answer = _json(response)
    if response.status_code == 200 and isinstance(answer, Mapping):
        if answer.get("choices") or answer.get("data"):
            return Observation(
                "healthy",
                f"inference probe answered in {latency * 1000:.0f} ms",
                latency,
                kind="inference",
            )
        return Observation(
            "failure", "inference probe: 200 without an answer", latency, kind="inference"
        )
    text = _message(answer)
    return Observation(
        "failure",
        f"inference probe: HTTP {response.status_code} {text}".rstrip(),
        latency,
        kind="inference",
    )


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

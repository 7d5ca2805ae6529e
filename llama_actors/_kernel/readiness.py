"""Readiness (CONTRACT §4): one probe (TCP connect, then ``/health``) and the stall
deadline that is extended while the server shows load progress.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Literal

import httpx
import msgspec

from llama_actors._kernel.health import ProbeGetter, get_once_more_on_drop

__all__ = ["ReadyProbe", "StallDeadline", "probe_ready"]

ProbeResult = Literal["ready", "loading", "refused", "not_ready"]


class ReadyProbe(msgspec.Struct, frozen=True):
    """One readiness probe: ``ready``, ``loading`` (counts as progress), ``refused``
    (nothing listens yet) or ``not_ready`` (it answered, but not with ok)."""

    result: ProbeResult
    detail: str


def probe_ready(
    client: ProbeGetter,
    host: str,
    port: int,
    health_url: str,
    models_url: str,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
) -> ReadyProbe:
    """TCP connect to ``host:port``, then GET ``health_url`` (``models_url`` on a 404)."""
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout_s):
            pass
    except OSError as exc:
        return ReadyProbe("refused", f"TCP {host}:{port}: {exc.strerror or exc}")
    try:
        response = get_once_more_on_drop(client, health_url, headers, timeout_s)
        if response.status_code == 404:
            fallback = get_once_more_on_drop(client, models_url, headers, timeout_s)
            if fallback.status_code == 200:
                return ReadyProbe("ready", "no /health (older server); /models answered 200")
            return ReadyProbe("not_ready", f"/health 404, /models {fallback.status_code}")
    except httpx.TimeoutException:
        return ReadyProbe("not_ready", f"/health gave no answer within {timeout_s * 1000:.0f} ms")
    except httpx.HTTPError as exc:
        return ReadyProbe("not_ready", f"/health: {type(exc).__name__}: {exc}")
    try:
        body = response.json()
    except ValueError:
        body = None
    status = body.get("status") if isinstance(body, dict) else None
    if response.status_code == 200 and status in (None, "ok"):
        return ReadyProbe("ready", "/health 200 ok")
    message = ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message", ""))
    # Current servers say {"error": {"message": "Loading model"}}; early-2024 builds
    # said {"status": "loading model"}.
    if response.status_code == 503 and "loading" in f"{message} {status or ''}".lower():
        return ReadyProbe("loading", "/health 503 Loading model")
    return ReadyProbe(
        "not_ready", f"/health {response.status_code} {message or status or ''}".rstrip()
    )


class StallDeadline:
    """A deadline ``stall_s`` after the last progress, never past ``ceiling_s`` from start."""

    def __init__(self, now: float, stall_s: float, ceiling_s: float) -> None:
        self.started = now
        self.stall_s = stall_s
        self.ceiling_s = ceiling_s
        self.last_progress = now

    def progress(self, now: float) -> None:
        self.last_progress = max(self.last_progress, now)

    @property
    def deadline(self) -> float:
        return min(self.last_progress + self.stall_s, self.started + self.ceiling_s)

    def expired(self, now: float) -> str | None:
        """None while there is time left, else why the wait is over."""
        if now >= self.started + self.ceiling_s:
            return f"not ready after the hard ceiling of {self.ceiling_s:g}s"
        if now >= self.last_progress + self.stall_s:
            return (
                f"no load progress for {self.stall_s:g}s (ready_timeout_ms); "
                f"{now - self.started:.1f}s since spawn"
            )
        return None

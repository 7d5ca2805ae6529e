"""What a server is doing, read from llama-server's own ``/slots`` and ``/metrics``
(CONTRACT §10): slots total and busy, requests processing and deferred, throughput
and KV-cache use, and whether all that makes it saturated.

Pure apart from :meth:`LoadReader.read`, which makes at most two GETs with a timeout.
A server that does not offer an endpoint (404, or llama-server's 501 when it was
started without ``--metrics`` or with ``--no-slots``) is not asked for it again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import httpx
import msgspec

from llama_actors._kernel.probe_client import ProbeGetter, ProbeResponse

__all__ = ["LoadReader", "ServerLoad", "parse_metrics", "parse_slots"]

_NOT_OFFERED = (404, 501)


class ServerLoad(msgspec.Struct, frozen=True, kw_only=True):
    """One reading of a server's load; a figure is None when the server does not say.

    - ``slots_total``, ``slots_busy``: from ``/slots``;
    - ``requests_processing``, ``requests_deferred``: from ``/metrics`` (a deferred
      request waits for a free slot);
    - ``prompt_tokens_per_s``, ``generation_tokens_per_s``: the server's speed while
      processing, averaged since it started (its token and seconds counters in
      ``/metrics``; 0 before any work);
    - ``kv_cache_tokens``: tokens held in the context of the busy slots, and
      ``kv_cache_ratio``: the fullest busy slot's use of its context (0 to 1), from
      ``/slots``;
    - ``read_at``: when it was read (the runtime clock, seconds);
    - ``error``: why the last reading failed, when it did (the figures are then the
      ones before it).
    """

    slots_total: int | None = None
    slots_busy: int | None = None
    requests_processing: int | None = None
    requests_deferred: int | None = None
    prompt_tokens_per_s: float | None = None
    generation_tokens_per_s: float | None = None
    kv_cache_tokens: int | None = None
    kv_cache_ratio: float | None = None
    read_at: float = 0.0
    error: str | None = None

    @property
    def saturated(self) -> bool:
        """Every slot busy and requests deferred: it cannot take more work now."""
        return (
            self.slots_total is not None
            and self.slots_total > 0
            and self.slots_busy == self.slots_total
            and (self.requests_deferred or 0) > 0
        )

    @property
    def all_slots_busy(self) -> bool:
        """Every slot busy with callers' work (a probe would only queue)."""
        return bool(self.slots_total) and self.slots_busy == self.slots_total

    def describe(self) -> str:
        """``3 of 4 slots busy, 2 requests deferred`` (what is known of it)."""
        parts = []
        if self.slots_total is not None:
            parts.append(f"{self.slots_busy} of {self.slots_total} slots busy")
        if self.requests_deferred is not None:
            n = self.requests_deferred
            parts.append(f"{n} request{'s' if n != 1 else ''} deferred")
        return ", ".join(parts) or "no figures"


def parse_slots(body: Any) -> dict[str, Any]:
    """The figures of a ``/slots`` answer (a JSON list of slots), or ``{}`` if it is
    not one."""
    if not isinstance(body, list) or not all(isinstance(s, Mapping) for s in body):
        return {}
    busy = [s for s in body if s.get("is_processing") is True]
    tokens = 0
    ratio = 0.0
    for slot in busy:
        held = _int(slot.get("n_prompt_tokens"))
        n_ctx = _int(slot.get("n_ctx"))
        tokens += held
        if n_ctx > 0:
            ratio = max(ratio, min(1.0, held / n_ctx))
    return {
        "slots_total": len(body),
        "slots_busy": len(busy),
        "kv_cache_tokens": tokens,
        "kv_cache_ratio": round(ratio, 4),
    }


_GAUGES = {
    "llamacpp:requests_processing": "requests_processing",
    "llamacpp:requests_deferred": "requests_deferred",
}
# Throughput from the counters: llama-server's own ``*_tokens_seconds`` gauges cover only
# the time since the previous read of /metrics (each read resets them), so two readers
# would each see a part. The counters are never reset.
_RATES = {
    "prompt_tokens_per_s": ("llamacpp:prompt_tokens_total", "llamacpp:prompt_seconds_total"),
    "generation_tokens_per_s": (
        "llamacpp:tokens_predicted_total",
        "llamacpp:tokens_predicted_seconds_total",
    ),
}
_WANTED = frozenset(_GAUGES) | {name for pair in _RATES.values() for name in pair}


def parse_metrics(text: str) -> dict[str, Any]:
    """The figures of llama-server's Prometheus text (``llamacpp:`` families); others
    are ignored, so a server of another kind gives ``{}``. Throughput is the average
    while processing since the server started: tokens over seconds spent on them."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("llamacpp:"):
            continue
        name, _, rest = line.partition(" ")
        name = name.split("{", 1)[0]
        if name not in _WANTED:
            continue
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        if math.isfinite(value):
            values[name] = value
    figures: dict[str, Any] = {
        field: int(values[name]) for name, field in _GAUGES.items() if name in values
    }
    for field, (tokens, seconds) in _RATES.items():
        if tokens in values and seconds in values:
            spent = values[seconds]
            figures[field] = round(values[tokens] / spent, 3) if spent > 0 else 0.0
    return figures


class LoadReader:
    """Reads one server's ``/slots`` and ``/metrics`` (``prefix_url`` is its root URL
    with its API prefix; ``headers`` are the published ones), remembering which of them
    it offers."""

    def __init__(self, prefix_url: str, headers: Mapping[str, str]) -> None:
        self.slots_url = f"{prefix_url}/slots"
        self.metrics_url = f"{prefix_url}/metrics"
        self.headers = dict(headers)
        self.slots_offered = True
        self.metrics_offered = True
        self.last: ServerLoad | None = None
        self.timed_out = False  # the last read got no answer in time

    @property
    def offered(self) -> bool:
        """Whether the server offers either endpoint (as far as the reader knows)."""
        return self.slots_offered or self.metrics_offered

    def read(self, client: ProbeGetter, *, timeout_s: float, now: float) -> ServerLoad | None:
        """Read both endpoints; None once the server offers neither. A timeout or an
        error keeps the last figures and says why in ``error``."""
        figures: dict[str, Any] = {}
        self.timed_out = False
        for which, offered in (("slots", self.slots_offered), ("metrics", self.metrics_offered)):
            if not offered:
                continue
            got = self._get(client, which, timeout_s)
            if isinstance(got, str):  # what went wrong; /metrics waits on the same loop
                last = self.last or ServerLoad()
                self.last = msgspec.structs.replace(last, read_at=now, error=got)
                return self.last
            figures |= got
        if not self.offered:
            self.last = None
            return None
        self.last = ServerLoad(**figures, read_at=now)
        return self.last

    def _get(self, client: ProbeGetter, which: str, timeout_s: float) -> dict[str, Any] | str:
        """The figures of ``/slots`` or ``/metrics``, or why there are none."""
        url = self.slots_url if which == "slots" else self.metrics_url
        headers = {**self.headers, "Connection": "close"}
        try:
            response = client.get(url, headers=headers, timeout=timeout_s)
        except httpx.TimeoutException:
            self.timed_out = True
            return f"/{which} did not answer within {timeout_s * 1000:.0f} ms"
        except httpx.HTTPError as exc:
            return f"/{which}: {type(exc).__name__}: {exc}"
        if response.status_code in _NOT_OFFERED:
            self._not_offered(which)
            return {}
        if response.status_code != 200:
            return f"/{which} answered HTTP {response.status_code}"
        if which == "slots":
            try:
                figures = parse_slots(response.json())
            except ValueError:
                return "/slots did not answer JSON"
        else:
            figures = parse_metrics(_text(response))
        if not figures:
            self._not_offered(which)  # not llama-server's format
        return figures

    def _not_offered(self, which: str) -> None:
        if which == "slots":
            self.slots_offered = False
        else:
            self.metrics_offered = False


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _text(response: httpx.Response | ProbeResponse) -> str:
    return response.text

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

__all__ = ["LoadReader", "ServerLoad", "parse_metrics", "parse_slots", "slot_progress"]

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


def slot_progress(body: Any) -> dict[tuple[int, int], int]:
    """Tokens each busy slot's task has processed so far (prompt tokens processed plus
    tokens decoded), keyed by slot and task id: what shows its decode loop at work."""
    progress: dict[tuple[int, int], int] = {}
    if not isinstance(body, list):
        return progress
    for slot in body:
        if not isinstance(slot, Mapping) or slot.get("is_processing") is not True:
            continue
        key = (_int(slot.get("id")), _int(slot.get("id_task")))
        decoded = 0
        nexts = slot.get("next_token")
        if isinstance(nexts, list) and nexts and isinstance(nexts[0], Mapping):
            decoded = _int(nexts[0].get("n_decoded"))
        progress[key] = _int(slot.get("n_prompt_tokens_processed")) + decoded
    return progress


class LoadReader:
    """Reads one server's ``/slots`` and ``/metrics`` (``prefix_url`` is its root URL
    with its API prefix; ``headers`` are the published ones), remembering which of them
    it offers, and how far the tasks in its slots have got.

    ``/metrics`` is read first. When it says no request is processing, the slots are
    idle and ``/slots`` is not read (only its slot count is needed, and it does not
    change), unless the caller asks for ``slots=True``: half the requests on an idle
    server, which is most servers most of the time.
    """

    def __init__(self, prefix_url: str, headers: Mapping[str, str]) -> None:
        self.slots_url = f"{prefix_url}/slots"
        self.metrics_url = f"{prefix_url}/metrics"
        self.headers = dict(headers)
        self.slots_offered = True
        self.metrics_offered = True
        self.last: ServerLoad | None = None
        self.timed_out = False  # the last read got no answer in time
        #: Tokens the busy slots' tasks processed between the last two reads of /slots.
        self.advanced = 0
        self._progress: dict[tuple[int, int], int] = {}

    @property
    def offered(self) -> bool:
        """Whether the server offers either endpoint (as far as the reader knows)."""
        return self.slots_offered or self.metrics_offered

    def read(
        self, client: ProbeGetter, *, timeout_s: float, now: float, slots: bool = False
    ) -> ServerLoad | None:
        """Read the endpoints (``/slots`` always when ``slots``); None once the server
        offers neither. A timeout or an error keeps the last figures and says why in
        ``error``."""
        figures: dict[str, Any] = {}
        self.timed_out = False
        self.advanced = 0
        for which in ("metrics", "slots"):
            if not (self.metrics_offered if which == "metrics" else self.slots_offered):
                continue
            if which == "slots" and not slots and self._idle(figures):
                figures |= {"slots_busy": 0, "kv_cache_tokens": 0, "kv_cache_ratio": 0.0}
                figures["slots_total"] = self.last.slots_total if self.last else None
                self._progress = {}
                continue
            got = self._get(client, which, timeout_s)
            if isinstance(got, str):  # what went wrong; both wait on the decode loop
                last = self.last or ServerLoad()
                self.last = msgspec.structs.replace(last, read_at=now, error=got)
                return self.last
            figures |= got
        if not self.offered:
            self.last = None
            return None
        self.last = ServerLoad(**figures, read_at=now)
        return self.last

    def _idle(self, figures: dict[str, Any]) -> bool:
        """/metrics just said nothing is processing, and the slot count is known."""
        known = self.last is not None and self.last.slots_total is not None
        return known and figures.get("requests_processing") == 0

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
                body = response.json()
            except ValueError:
                return "/slots did not answer JSON"
            figures = parse_slots(body)
            progress = slot_progress(body)
            self.advanced = sum(
                max(0, n - self._progress[key])
                for key, n in progress.items()
                if key in self._progress
            )
            self._progress = progress
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

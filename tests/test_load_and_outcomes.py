"""What a server does, not what /health says (CONTRACT §10), in the pure kernel: slot and
metrics readings, the inference probe's verdicts, how the tracker weighs them, and
the window of failures reported by callers."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from llama_actors._kernel.health import (
    INFERENCE_BODY,
    HealthTracker,
    Observation,
    probe_inference,
)
from llama_actors._kernel.load import LoadReader, ServerLoad, parse_metrics, parse_slots
from llama_actors._kernel.outcomes import OutcomeWindow

PREFIX = "http://127.0.0.1:41000/pre"
HEADERS = {"Authorization": "Bearer sk-test"}

# What the installed llama-server (0.6.0-dev) answered with --parallel 1 --metrics -c 2048,
# one long generation running and one request queued behind it.
REAL_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 9
# HELP llamacpp:prompt_seconds_total Total time spent processing prompts
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 0.072508
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 120
# HELP llamacpp:tokens_predicted_seconds_total Total time spent generating tokens
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 4
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 124.124
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 0
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode gauge
llamacpp:n_busy_slots_per_decode 1
"""
BUSY_SLOT = {
    "id": 0,
    "n_ctx": 2048,
    "speculative": False,
    "is_processing": True,
    "id_task": 2,
    "n_prompt_tokens": 72,
    "n_prompt_tokens_processed": 9,
    "next_token": [{"has_next_token": True, "n_remain": 337, "n_decoded": 63}],
}
IDLE_SLOT = {"id": 1, "n_ctx": 2048, "speculative": False, "is_processing": False}


def client_for(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


# -- readings --------------------------------------------------------------------------


def test_slots_give_total_busy_and_the_tokens_the_busy_ones_hold() -> None:
    figures = parse_slots([BUSY_SLOT, IDLE_SLOT])
    assert figures == {
        "slots_total": 2,
        "slots_busy": 1,
        "kv_cache_tokens": 72,
        "kv_cache_ratio": round(72 / 2048, 4),
    }


def test_the_real_servers_metrics_give_requests_and_throughput_from_its_counters() -> None:
    # Not from llama-server's *_tokens_seconds gauges: each read of /metrics resets them.
    assert parse_metrics(REAL_METRICS) == {
        "requests_processing": 1,
        "requests_deferred": 1,
        "prompt_tokens_per_s": round(9 / 0.072508, 3),
        "generation_tokens_per_s": 30.0,
    }


def test_a_server_that_has_done_no_work_has_a_throughput_of_zero() -> None:
    idle = "llamacpp:tokens_predicted_total 0\nllamacpp:tokens_predicted_seconds_total 0\n"
    assert parse_metrics(idle) == {"generation_tokens_per_s": 0.0}


def test_metrics_of_another_kind_of_server_give_nothing() -> None:
    assert (
        parse_metrics("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 3\n") == {}
    )
    assert parse_slots({"error": "nope"}) == {}


def test_saturated_means_every_slot_busy_and_requests_deferred() -> None:
    full = ServerLoad(slots_total=2, slots_busy=2, requests_deferred=1)
    assert full.saturated
    assert full.describe() == "2 of 2 slots busy, 1 request deferred"
    assert not ServerLoad(slots_total=2, slots_busy=2, requests_deferred=0).saturated
    assert not ServerLoad(slots_total=2, slots_busy=1, requests_deferred=4).saturated
    # Without /metrics nobody knows what waits: busy slots alone are not saturation.
    assert not ServerLoad(slots_total=1, slots_busy=1).saturated
    assert ServerLoad(slots_total=1, slots_busy=1).all_slots_busy


def test_the_reader_reads_both_endpoints_under_the_prefix_with_the_published_headers() -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization")))
        if request.url.path.endswith("/slots"):
            return httpx.Response(200, json=[BUSY_SLOT])
        return httpx.Response(200, text=REAL_METRICS)

    reader = LoadReader(PREFIX, HEADERS)
    load = reader.read(client_for(handler), timeout_s=1.0, now=5.0)
    assert load is not None
    assert (load.slots_total, load.slots_busy, load.requests_deferred) == (1, 1, 1)
    assert load.saturated
    assert load.read_at == 5.0
    assert seen == [("/pre/metrics", "Bearer sk-test"), ("/pre/slots", "Bearer sk-test")]


def test_an_endpoint_the_server_does_not_offer_is_not_asked_for_again() -> None:
    asked: list[str] = []
    not_supported = {"error": {"code": 501, "message": "This server does not support metrics"}}

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path.endswith("/slots"):
            return httpx.Response(200, json=[IDLE_SLOT])
        return httpx.Response(501, json=not_supported)

    reader = LoadReader(PREFIX, {})
    client = client_for(handler)
    first = reader.read(client, timeout_s=1.0, now=1.0)
    second = reader.read(client, timeout_s=1.0, now=2.0)
    assert first is not None
    assert second is not None
    assert second.requests_deferred is None
    assert asked == ["/pre/metrics", "/pre/slots", "/pre/slots"]


def test_a_server_offering_neither_is_read_as_nothing() -> None:
    reader = LoadReader(PREFIX, {})
    assert reader.read(client_for(lambda r: httpx.Response(404)), timeout_s=1.0, now=1.0) is None
    assert not reader.offered


def test_a_reading_that_times_out_keeps_the_last_figures_and_says_why() -> None:
    answers = iter([httpx.Response(200, json=[BUSY_SLOT]), None])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/metrics"):
            return httpx.Response(200, text=REAL_METRICS)
        answer = next(answers)
        if answer is None:
            raise httpx.ReadTimeout("stuck", request=request)
        return answer

    reader = LoadReader(PREFIX, {})
    client = client_for(handler)
    reader.read(client, timeout_s=0.5, now=1.0)
    stale = reader.read(client, timeout_s=0.5, now=2.0)
    assert stale is not None
    assert stale.slots_busy == 1  # the figures before it
    assert stale.error == "/slots did not answer within 500 ms"
    assert reader.timed_out


def test_an_idle_server_is_read_with_one_request_once_its_slot_count_is_known() -> None:
    asked: list[str] = []
    idle_metrics = REAL_METRICS.replace("requests_processing 1", "requests_processing 0")

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path.endswith("/slots"):
            return httpx.Response(200, json=[IDLE_SLOT, IDLE_SLOT])
        return httpx.Response(200, text=idle_metrics)

    reader = LoadReader(PREFIX, {})
    client = client_for(handler)
    reader.read(client, timeout_s=1.0, now=1.0)
    load = reader.read(client, timeout_s=1.0, now=2.0)
    assert load is not None
    assert (load.slots_total, load.slots_busy, load.kv_cache_tokens) == (2, 0, 0)
    assert asked == ["/pre/metrics", "/pre/slots", "/pre/metrics"]
    reader.read(client, timeout_s=1.0, now=3.0, slots=True)  # asked for: read anyway
    assert asked[-1] == "/pre/slots"


def test_the_reader_sees_how_far_callers_tasks_advanced_between_two_readings() -> None:
    steps = iter([(9, 10), (9, 41), (0, 3)])  # (prompt processed, decoded); then a new task

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/metrics"):
            return httpx.Response(200, text=REAL_METRICS)
        prompt, decoded = next(steps)
        task = 2 if decoded > 5 else 3
        slot = {
            **BUSY_SLOT,
            "id_task": task,
            "n_prompt_tokens_processed": prompt,
            "next_token": [{"has_next_token": True, "n_decoded": decoded}],
        }
        return httpx.Response(200, json=[slot])

    reader = LoadReader(PREFIX, {})
    client = client_for(handler)
    reader.read(client, timeout_s=1.0, now=1.0)
    assert reader.advanced == 0  # nothing to compare with yet
    reader.read(client, timeout_s=1.0, now=2.0)
    assert reader.advanced == 31
    reader.read(client, timeout_s=1.0, now=3.0)
    assert reader.advanced == 0  # another task: no progress can be told yet


# -- the inference probe ---------------------------------------------------------------


def inference(handler: Callable[[httpx.Request], httpx.Response]) -> Observation:
    url = "http://127.0.0.1:41000/v1/completions"
    return probe_inference(client_for(handler), url, INFERENCE_BODY, HEADERS, timeout_s=0.5)


def test_an_inference_probe_that_gets_a_token_back_passes() -> None:
    sent: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"text": "!"}]})

    obs = inference(handler)
    assert (obs.verdict, obs.kind) == ("healthy", "inference")
    assert sent == [{"prompt": "ok", "max_tokens": 1, "temperature": 0}]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            httpx.Response(500, json={"error": {"message": "decode failed"}}),
            "HTTP 500 decode failed",
        ),
        (httpx.Response(200, json={"choices": []}), "200 without an answer"),
        (httpx.Response(401, json={"error": {"message": "Invalid API Key"}}), "HTTP 401"),
    ],
)
def test_an_inference_probe_that_gets_no_work_back_fails_saying_so(
    answer: httpx.Response, reason: str
) -> None:
    obs = inference(lambda r: answer)
    assert (obs.verdict, obs.kind) == ("failure", "inference")
    assert reason in obs.reason
    assert obs.reason.startswith("inference probe")


def test_an_inference_probe_that_hangs_fails_after_its_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    obs = inference(handler)
    assert obs.verdict == "failure"
    assert obs.reason == "inference probe: no answer within 500 ms"


# -- the tracker -----------------------------------------------------------------------

OK = Observation("healthy", "200 ok")
HUNG = Observation("failure", "inference probe: no answer within 500 ms", kind="inference")
ANSWERED = Observation("healthy", "inference probe answered in 40 ms", kind="inference")


def test_a_passing_health_probe_does_not_clear_a_failed_inference_probe() -> None:
    tracker = HealthTracker(unavailable_after=2)
    first = tracker.observe(HUNG)
    assert first is not None
    assert (first.new, first.cause) == ("degraded", "inference")
    assert "inference probe failed (1 of 2)" in first.reason
    assert tracker.observe(OK) is None  # /health 200 says nothing about decoding
    second = tracker.observe(HUNG)
    assert second is not None
    assert (second.new, second.cause) == ("unavailable", "inference")
    assert second.reason.startswith("2 failed inference probes in a row")
    back = tracker.observe(ANSWERED)
    assert back is not None
    assert (back.new, back.cause) == ("healthy", "inference")


def test_saturation_degrades_once_and_ends_once_with_its_own_cause() -> None:
    tracker = HealthTracker(unavailable_after=3)
    on = tracker.observe_load("saturated: 1 of 1 slots busy, 1 request deferred")
    assert on is not None
    assert (on.old, on.new, on.cause) == ("healthy", "degraded", "saturated")
    assert tracker.observe_load("saturated: 1 of 1 slots busy, 2 requests deferred") is None
    assert tracker.observe(OK) is None  # still saturated
    off = tracker.observe_load(None)
    assert off is not None
    assert (off.new, off.cause) == ("healthy", "saturated")
    assert "no longer saturated" in off.reason


def test_a_failing_probe_outweighs_saturation() -> None:
    tracker = HealthTracker(unavailable_after=1)
    tracker.observe_load("saturated: 2 of 2 slots busy, 1 request deferred")
    change = tracker.observe(Observation("failure", "HTTP 500"))
    assert change is not None
    assert (change.new, change.cause) == ("unavailable", "probe")


# -- outcomes reported by callers ------------------------------------------------------


def test_failures_reported_within_the_window_degrade_then_make_unavailable() -> None:
    window = OutcomeWindow(window_s=10.0, degraded_after=2, unavailable_after=3)
    window.record(False, "HTTP 500", now=0.0)
    assert window.verdict(0.0) is None
    window.record(False, "ReadTimeout", now=1.0)
    assert window.verdict(1.0) == (
        "degraded",
        "2 failures reported by callers within 10s; last: ReadTimeout",
    )
    window.record(False, "HTTP 502", now=2.0)
    verdict = window.verdict(2.0)
    assert verdict is not None
    assert verdict[0] == "unavailable"


def test_a_reported_success_clears_the_failures() -> None:
    window = OutcomeWindow(window_s=10.0, degraded_after=1, unavailable_after=None)
    window.record(False, "HTTP 500", now=0.0)
    assert window.verdict(0.0) is not None
    window.record(True, "ok", now=1.0)
    assert window.verdict(1.0) is None
    assert (window.reported_ok, window.reported_failed) == (1, 1)


def test_failures_leave_the_count_when_they_are_older_than_the_window() -> None:
    window = OutcomeWindow(window_s=10.0, degraded_after=2, unavailable_after=None)
    window.record(False, "a", now=0.0)
    window.record(False, "b", now=4.0)
    assert window.next_expiry() == 10.0
    assert window.verdict(9.9) is not None
    assert window.verdict(10.0) is None
    assert window.next_expiry() == 14.0

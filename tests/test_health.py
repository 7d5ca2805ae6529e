"""Health after publication (CONTRACT §5): classifying one answer, tracking state
changes, and one probe through httpx's transport seam."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from llama_actors._kernel.health import (
    HealthTracker,
    Observation,
    Transition,
    classify,
    probe_health,
)

HEALTH_URL = "http://127.0.0.1:41000/health"
MODELS_URL = "http://127.0.0.1:41000/v1/models"
HEADERS = {"Authorization": "Bearer sk-test"}
SLOW_S = 0.5

Handler = Callable[[httpx.Request], httpx.Response]


def probe(client: httpx.Client, *, timeout_s: float = 0.2) -> Observation:
    return probe_health(client, HEALTH_URL, MODELS_URL, HEADERS, timeout_s=timeout_s, slow_s=SLOW_S)


# -- classify: every row of CONTRACT §5 --------------------------------------------------


def test_a_fast_ok_answer_is_healthy() -> None:
    obs = classify(200, {"status": "ok"}, latency_s=0.01, slow_s=SLOW_S)
    assert obs.verdict == "healthy"
    assert obs.latency_s == 0.01


def test_an_ok_answer_without_a_json_body_is_healthy() -> None:
    assert classify(200, None, latency_s=0.01, slow_s=SLOW_S).verdict == "healthy"


def test_a_slow_healthy_answer_is_degraded() -> None:
    obs = classify(200, {"status": "ok"}, latency_s=0.75, slow_s=SLOW_S)
    assert obs.verdict == "degraded"
    assert "slow" in obs.reason
    assert "750 ms" in obs.reason
    assert "500 ms" in obs.reason


def test_an_answer_exactly_at_the_slow_threshold_is_still_healthy() -> None:
    assert classify(200, {"status": "ok"}, latency_s=SLOW_S, slow_s=SLOW_S).verdict == "healthy"


def test_a_body_saying_degraded_is_degraded() -> None:
    obs = classify(200, {"status": "degraded"}, latency_s=0.01, slow_s=SLOW_S)
    assert obs.verdict == "degraded"
    assert "degraded" in obs.reason


def test_no_slot_available_is_degraded() -> None:
    body = {"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}}
    obs = classify(503, body, latency_s=0.01, slow_s=SLOW_S)
    assert obs.verdict == "degraded"
    assert "no slot available" in obs.reason


def test_a_server_still_loading_its_model_is_degraded() -> None:
    body = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    obs = classify(503, body, latency_s=0.01, slow_s=SLOW_S)
    assert obs.verdict == "degraded"
    assert "loading" in obs.reason


def test_a_refused_key_is_a_failure_that_blames_the_published_headers() -> None:
    body = {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}
    obs = classify(401, body, latency_s=0.01, slow_s=SLOW_S)
    assert obs.verdict == "failure"
    assert "401" in obs.reason
    assert "Invalid API Key" in obs.reason
    assert "headers" in obs.reason


@pytest.mark.parametrize("status", [500, 502, 504])
def test_server_and_gateway_errors_are_failures_naming_the_status(status: int) -> None:
    obs = classify(status, None, latency_s=0.01, slow_s=SLOW_S)
    assert obs.verdict == "failure"
    assert str(status) in obs.reason


def test_a_503_that_is_neither_busy_nor_loading_is_a_failure() -> None:
    obs = classify(503, {"error": {"message": "shutting down"}}, latency_s=0.01, slow_s=SLOW_S)
    assert obs.verdict == "failure"
    assert "shutting down" in obs.reason


# -- HealthTracker ----------------------------------------------------------------------

OK = Observation("healthy", "200 ok")
BUSY = Observation("degraded", "503 no slot available")
FAILED = Observation("failure", "HTTP 502")


def test_failures_degrade_first_and_make_it_unavailable_after_n_in_a_row() -> None:
    tracker = HealthTracker(unavailable_after=3)
    first = tracker.observe(FAILED)
    assert first is not None
    assert (first.old, first.new) == ("healthy", "degraded")
    assert "1 of 3" in first.reason
    assert tracker.observe(FAILED) is None
    assert tracker.state == "degraded"
    third = tracker.observe(FAILED)
    assert third is not None
    assert (third.old, third.new) == ("degraded", "unavailable")
    assert "3 failed probes in a row" in third.reason
    assert "HTTP 502" in third.reason


def test_a_single_allowed_failure_makes_it_unavailable_at_once() -> None:
    tracker = HealthTracker(unavailable_after=1)
    change = tracker.observe(FAILED)
    assert change is not None
    assert (change.old, change.new) == ("healthy", "unavailable")


def test_a_success_resets_the_count_of_failures() -> None:
    tracker = HealthTracker(unavailable_after=3)
    tracker.observe(FAILED)
    tracker.observe(FAILED)
    back = tracker.observe(OK)
    assert back is not None
    assert (back.old, back.new) == ("degraded", "healthy")
    tracker.observe(FAILED)
    tracker.observe(FAILED)
    assert tracker.state == "degraded"


def test_a_degraded_answer_also_resets_the_count_of_failures() -> None:
    tracker = HealthTracker(unavailable_after=2)
    tracker.observe(FAILED)
    assert tracker.observe(BUSY) is None  # still degraded, but no longer failing
    assert tracker.observe(FAILED) is None
    assert tracker.state == "degraded"


def test_each_change_of_state_is_reported_once() -> None:
    tracker = HealthTracker(unavailable_after=2)
    stream = [OK, OK, BUSY, BUSY, OK, FAILED, FAILED, FAILED, FAILED, OK, OK]
    changes = [c for obs in stream if (c := tracker.observe(obs)) is not None]
    assert [(c.old, c.new) for c in changes] == [
        ("healthy", "degraded"),
        ("degraded", "healthy"),
        ("healthy", "degraded"),
        ("degraded", "unavailable"),
        ("unavailable", "healthy"),
    ]


def test_an_unavailable_instance_recovers_on_the_first_good_answer() -> None:
    tracker = HealthTracker(unavailable_after=1, initial="unavailable")
    change = tracker.observe(OK)
    assert change == Transition("unavailable", "healthy", "200 ok")


def test_force_sets_the_state_once_and_clears_failures() -> None:
    tracker = HealthTracker(unavailable_after=2, initial="unknown")
    tracker.observe(FAILED)
    exited = tracker.force("unavailable", "the process exited with code 1")
    assert exited == Transition("degraded", "unavailable", "the process exited with code 1")
    assert tracker.force("unavailable", "again") is None
    ready = tracker.force("healthy", "instance ready")
    assert ready == Transition("unavailable", "healthy", "instance ready")
    # force cleared the earlier failure: one more is not yet enough for unavailable
    change = tracker.observe(FAILED)
    assert change is not None
    assert change.new == "degraded"


# -- probe_health through MockTransport ---------------------------------------------------


def test_a_probe_sends_the_published_headers_to_the_health_url(mock_client) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    obs = probe(mock_client(handler))
    assert obs.verdict == "healthy"
    assert [str(r.url) for r in seen] == [HEALTH_URL]
    assert seen[0].headers["Authorization"] == "Bearer sk-test"


def test_a_probe_of_an_older_server_falls_back_to_the_models_url(mock_client) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/health":
            return httpx.Response(404, text="Not Found")
        return httpx.Response(200, json={"object": "list", "data": []})

    obs = probe(mock_client(handler))
    assert obs.verdict == "healthy"
    assert [str(r.url) for r in seen] == [HEALTH_URL, MODELS_URL]
    assert all(r.headers["Authorization"] == "Bearer sk-test" for r in seen)


def test_a_refused_key_on_the_models_fallback_is_a_failure(mock_client) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(404)
        return httpx.Response(401, json={"error": {"message": "Invalid API Key"}})

    obs = probe(mock_client(handler))
    assert obs.verdict == "failure"
    assert "401" in obs.reason


def test_a_probe_reads_a_busy_server_as_degraded(mock_client) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"code": 503, "message": "no slot available"}})

    assert probe(mock_client(handler)).verdict == "degraded"


def test_a_probe_with_a_non_json_error_body_is_a_failure(mock_client) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    obs = probe(mock_client(handler))
    assert obs.verdict == "failure"
    assert "502" in obs.reason


def test_a_probe_that_times_out_is_a_failure_naming_the_timeout(mock_client) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    obs = probe(mock_client(handler), timeout_s=0.2)
    assert obs.verdict == "failure"
    assert "no answer within 200 ms" in obs.reason
    assert obs.latency_s == 0.2


def test_a_probe_that_cannot_connect_is_a_failure_naming_the_error(mock_client) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    obs = probe(mock_client(handler))
    assert obs.verdict == "failure"
    assert "ConnectError" in obs.reason
    assert "Connection refused" in obs.reason


def test_a_timeout_on_the_models_fallback_is_a_failure_too(mock_client) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(404)
        raise httpx.ReadTimeout("timed out", request=request)

    obs = probe(mock_client(handler), timeout_s=0.3)
    assert obs.verdict == "failure"
    assert "300 ms" in obs.reason


def test_a_dropped_keep_alive_connection_is_asked_again_not_counted_as_a_failure() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response")
        return httpx.Response(200, json={"status": "ok"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        obs = probe_health(
            client,
            "http://127.0.0.1:9/health",
            "http://127.0.0.1:9/v1/models",
            {},
            timeout_s=1.0,
            slow_s=1.0,
        )

    assert obs.verdict == "healthy"
    assert calls == ["/health", "/health"]

"""What a server does, not what /health says (CONTRACT §10), on the real llama-server
with gemma 3 270M: inference probes, slot and metrics figures, and saturation."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_actors import InstancePolicy, Runtime
from llama_actors.testing.signals import SignalRecorder

from ._ptrace import thread_stopped

pytestmark = pytest.mark.real_server

KEY = "sk-test-truth-7c2e"
WAIT = 60.0
POLICY = InstancePolicy(
    wedged_restart_ms=None,
    unavailable_after=2,
    inference_probe_interval_ms=300,
    inference_probe_timeout_ms=3_000,
    load_interval_ms=100,
)


@pytest.fixture
def spec(real_binary: str, gemma_model: str) -> dict[str, Any]:
    return {
        "model": gemma_model,
        "binary_path": real_binary,
        "api_key": KEY,
        "ctx_size": 1024,
        "threads": 2,
        "parallel": 1,
        "health_interval_ms": 200,
    }


def server_says(client: httpx.Client, root: str) -> tuple[list[Any], str]:
    headers = {"Authorization": f"Bearer {KEY}"}
    slots = client.get(root + "/slots", headers=headers)
    metrics = client.get(root + "/metrics", headers=headers)
    assert slots.status_code == 200, slots.text
    assert metrics.status_code == 200, metrics.text
    return slots.json(), metrics.text


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"llamacpp:{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no llamacpp:{name} in {text!r}")


def test_an_inference_probe_passes_on_a_healthy_server(
    tmp_path: Path, spec: dict[str, Any], recorder: SignalRecorder
) -> None:
    with Runtime(state_dir=tmp_path / "state", policy=POLICY) as rt:
        iid = rt.resolve_endpoint(spec, "tests").instance.instance_id
        passed = recorder.wait_for(
            "probe_completed", iid, kind="inference", verdict="healthy", count=3, timeout=WAIT
        )
        snap = rt.snapshot(iid)
        failed = recorder.find("probe_completed", iid, verdict="failure")

    assert passed.payload["latency_s"] < POLICY.inference_probe_timeout_s
    assert (snap.health, snap.health_cause) == ("healthy", "ready")
    assert failed == []


def test_the_slot_and_metrics_figures_of_a_snapshot_are_the_servers_own(
    tmp_path: Path, spec: dict[str, Any], recorder: SignalRecorder
) -> None:
    # No inference probe here: it would take the slot between two readings.
    policy = InstancePolicy(wedged_restart_ms=None, load_interval_ms=100)
    with Runtime(state_dir=tmp_path / "state", policy=policy) as rt:
        resolution = rt.resolve_endpoint(spec, "tests")
        iid = resolution.instance.instance_id
        with httpx.Client(trust_env=False, timeout=60) as client:
            answer = client.post(
                resolution.endpoint.base_url + "/completions",
                headers=resolution.endpoint.headers,
                json={"prompt": "Once upon a time", "max_tokens": 16},
            )
            assert answer.status_code == 200, answer.text
            # Quiet again, then several readings later: the figures are settled.
            seen = len(recorder.find("probe_completed", iid, kind="health"))
            recorder.wait_for("probe_completed", iid, kind="health", count=seen + 5, timeout=WAIT)
            snap = rt.snapshot(iid)
            slots, metrics = server_says(client, resolution.endpoint.source_runtime_ref)

    load = snap.load
    assert load is not None
    assert load.error is None
    assert load.slots_total == len(slots) == 1
    assert load.slots_busy == sum(1 for s in slots if s["is_processing"]) == 0
    assert load.requests_processing == metric(metrics, "requests_processing") == 0
    assert load.requests_deferred == metric(metrics, "requests_deferred") == 0
    prompt = metric(metrics, "prompt_tokens_total") / metric(metrics, "prompt_seconds_total")
    generated = metric(metrics, "tokens_predicted_total") / metric(
        metrics, "tokens_predicted_seconds_total"
    )
    assert load.prompt_tokens_per_s == round(prompt, 3)
    assert load.generation_tokens_per_s == round(generated, 3)
    assert metric(metrics, "tokens_predicted_total") >= 16


def test_a_long_generation_with_a_queued_request_is_saturated_then_healthy_again(
    tmp_path: Path, spec: dict[str, Any], recorder: SignalRecorder
) -> None:
    with Runtime(state_dir=tmp_path / "state", policy=POLICY) as rt:
        resolution = rt.resolve_endpoint(spec, "tests")
        iid, endpoint = resolution.instance.instance_id, resolution.endpoint
        answers: list[int] = []

        def complete(max_tokens: int) -> None:
            with httpx.Client(trust_env=False, timeout=120) as client:
                reply = client.post(
                    endpoint.base_url + "/completions",
                    headers=endpoint.headers,
                    json={"prompt": "Tell a story.", "max_tokens": max_tokens, "ignore_eos": True},
                )
                answers.append(reply.status_code)

        long = threading.Thread(target=complete, args=(200,))
        long.start()
        recorder.wait_for("probe_completed", iid, kind="health", count=3, timeout=WAIT)
        queued = threading.Thread(target=complete, args=(4,))
        queued.start()
        saturated = recorder.wait_for("health_changed", iid, new="degraded", timeout=WAIT)
        long.join(WAIT)
        queued.join(WAIT)
        back = recorder.wait_for("health_changed", iid, new="healthy", count=2, timeout=WAIT)
        failed = recorder.find("probe_completed", iid, verdict="failure")

        assert answers == [200, 200]
        assert saturated.payload["cause"] == "saturated"
        assert saturated.payload["reason"] == "saturated: 1 of 1 slots busy, 1 request deferred"
        assert back.payload["cause"] == "saturated"
        changes = [
            (r.payload["new"], r.payload["cause"]) for r in recorder.find("health_changed", iid)
        ]
        assert changes == [
            ("healthy", "ready"),
            ("degraded", "saturated"),
            ("healthy", "saturated"),
        ]
        # No inference probe failed meanwhile: none was sent into the full slot.
        assert failed == []


def test_a_stuck_decode_loop_is_found_by_the_inference_probe_while_health_says_200(
    tmp_path: Path, spec: dict[str, Any], recorder: SignalRecorder
) -> None:
    policy = InstancePolicy(
        wedged_restart_ms=None,
        unavailable_after=2,
        inference_probe_interval_ms=500,
        inference_probe_timeout_ms=1_000,
        load_interval_ms=None,
    )
    with Runtime(state_dir=tmp_path / "state", policy=policy) as rt:
        resolution = rt.resolve_endpoint(spec, "tests")
        iid, pid = resolution.instance.instance_id, resolution.instance.pid
        assert pid is not None
        recorder.wait_for("probe_completed", iid, kind="inference", count=1, timeout=WAIT)
        frozen_at = time.time()
        with thread_stopped(pid):  # its main thread runs the decode loop
            down = recorder.wait_for("health_changed", iid, new="unavailable", timeout=WAIT)
            healthy_probes = [
                r
                for r in recorder.find("probe_completed", iid, kind="health")
                if r.payload["at"] > frozen_at
            ]
        recorder.wait_for("health_changed", iid, new="healthy", count=2, timeout=WAIT)

        assert down.payload["cause"] == "inference"
        assert "inference probe" in down.payload["reason"]
        # /health went on answering 200 the whole time.
        assert healthy_probes
        assert all(r.payload["verdict"] == "healthy" for r in healthy_probes)

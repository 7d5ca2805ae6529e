"""What a server does, not what /health says (CONTRACT §10), through a runtime on the
fake llama-server: inference probes, slot and metrics readings, saturation, and
outcomes reported by callers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_actors import InstancePolicy, RestartPolicy, Runtime, UsageError
from llama_actors.testing.signals import SignalRecorder

from ._helpers import FAST, WAIT, Fake

#: Inference probes every 200 ms with a short timeout; one failure is enough.
PROBING = InstancePolicy(
    probe_timeout_ms=1_000,
    slow_probe_ms=1_000,
    unavailable_after=1,
    wedged_restart_ms=None,
    drain_timeout_ms=2_000,
    inference_probe_interval_ms=200,
    inference_probe_timeout_ms=500,
    load_interval_ms=100,
)


def start(rt: Runtime, fake: Fake, **fields: Any) -> str:
    return rt.resolve_endpoint(fake.spec(**fields), "tests").instance.instance_id


def changes(recorder: SignalRecorder, iid: str) -> list[tuple[str, str, str]]:
    return [
        (r.payload["old"], r.payload["new"], r.payload["cause"])
        for r in recorder.find("health_changed", iid)
    ]


# -- inference probes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ({"completions": "hang"}, "inference probe: no answer within 500 ms"),
        ({"completions": "error500"}, "inference probe: HTTP 500"),
        ({"decode_stuck": True}, "inference probe: the decode loop did not answer"),
    ],
    ids=["completions-hang", "completions-500", "decode-loop-stuck"],
)
def test_a_server_whose_health_says_200_but_does_no_work_is_found_by_the_inference_probe(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder, shape: dict[str, Any], reason: str
) -> None:
    with Runtime(state_dir=tmp_path / "state", policy=PROBING) as rt:
        iid = start(rt, fake)
        rt.wait_healthy(iid, timeout=WAIT)

        fake.set(**shape)
        down = recorder.wait_for("health_changed", iid, new="unavailable", timeout=WAIT)
        fake.set(**dict.fromkeys(shape))
        recorder.wait_for("health_changed", iid, old="unavailable", new="healthy", timeout=WAIT)

        assert down.payload["cause"] == "inference"
        assert reason in down.payload["reason"]
        # Exactly one transition each way: /health kept saying 200 throughout.
        assert changes(recorder, iid) == [
            ("unknown", "healthy", "ready"),
            ("healthy", "unavailable", "inference"),
            ("unavailable", "healthy", "inference"),
        ]


def test_a_failed_inference_probe_lets_the_wedge_policy_restart_a_managed_instance(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder
) -> None:
    policy = InstancePolicy(
        restart=RestartPolicy(backoff_initial_ms=100),
        unavailable_after=1,
        wedged_restart_ms=200,
        inference_probe_interval_ms=200,
        inference_probe_timeout_ms=500,
    )
    with Runtime(state_dir=tmp_path / "state", policy=policy) as rt:
        resolution = rt.resolve_endpoint(fake.spec(), "tests")
        iid, pid = resolution.instance.instance_id, resolution.instance.pid
        fake.set(completions="hang")
        restarting = recorder.wait_for("instance_restarting", iid, timeout=WAIT)
        fake.set(completions=None)
        recorder.wait_for("instance_ready", iid, count=2, timeout=WAIT)

        assert "wedged" in restarting.payload["reason"]
        assert rt.snapshot(iid).pid != pid


def test_while_callers_work_advances_no_inference_probe_is_sent(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder
) -> None:
    with Runtime(state_dir=tmp_path / "state", policy=PROBING) as rt:
        resolution = rt.resolve_endpoint(fake.spec(), "tests")
        iid, endpoint = resolution.instance.instance_id, resolution.endpoint
        fake.set(token_seconds=0.02)

        def generate() -> None:
            with httpx.Client(trust_env=False, timeout=30) as client:
                client.post(
                    endpoint.base_url + "/completions",
                    headers=endpoint.headers,
                    json={"prompt": "go", "max_tokens": 150, "ignore_eos": True},
                )

        worker = threading.Thread(target=generate)
        worker.start()
        seen = recorder.wait_for(
            "probe_completed", iid, kind="inference", verdict="healthy", count=3, timeout=WAIT
        )
        worker.join(WAIT)
        fake.set(token_seconds=None)

        during = [
            r.payload["reason"]
            for r in recorder.find("probe_completed", iid, kind="inference")
            if r.payload["at"] <= seen.payload["at"]
        ]
        assert any(reason.startswith("callers' requests advanced") for reason in during)


def test_without_inference_probes_a_server_that_hangs_completions_looks_healthy(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    # The default policy: /health alone, which is what every other supervisor trusts.
    iid = start(runtime, fake)
    fake.set(completions="hang")
    recorder.wait_for("probe_completed", iid, count=5, timeout=WAIT)
    assert runtime.snapshot(iid).health == "healthy"
    fake.set(completions=None)


# -- slots, metrics and saturation ------------------------------------------------------


def test_a_snapshot_shows_the_servers_slots_and_metrics(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder
) -> None:
    with Runtime(state_dir=tmp_path / "state", policy=PROBING) as rt:
        iid = start(rt, fake, parallel=3)
        recorder.wait_for("probe_completed", iid, count=2, timeout=WAIT)
        load = rt.snapshot(iid).load

        assert load is not None
        assert (load.slots_total, load.slots_busy) == (3, 0)
        assert (load.requests_processing, load.requests_deferred) == (0, 0)
        assert load.error is None


def test_an_instance_with_every_slot_busy_and_requests_deferred_is_saturated_not_sick(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder
) -> None:
    # Probes, wedge restarts and inference probes are all on: saturation must not
    # set any of them off (an inference probe would only queue behind the callers).
    policy = InstancePolicy(
        unavailable_after=1,
        wedged_restart_ms=200,
        inference_probe_interval_ms=100,
        inference_probe_timeout_ms=500,
        load_interval_ms=100,
    )
    with Runtime(state_dir=tmp_path / "state", policy=policy) as rt:
        iid = start(rt, fake, parallel=2)
        rt.wait_healthy(iid, timeout=WAIT)

        fake.set(saturated=3)
        busy = recorder.wait_for("health_changed", iid, new="degraded", timeout=WAIT)
        snap = rt.snapshot(iid)
        # Held saturated well past wedged_restart_ms, with probes going on.
        recorder.wait_for("probe_completed", iid, count=15, timeout=WAIT)
        fake.set(saturated=None)
        back = recorder.wait_for("health_changed", iid, new="healthy", count=2, timeout=WAIT)

        assert busy.payload["cause"] == "saturated"
        assert busy.payload["reason"] == "saturated: 2 of 2 slots busy, 3 requests deferred"
        assert busy.payload["load"].requests_deferred == 3
        assert (snap.health, snap.health_cause) == ("degraded", "saturated")
        assert back.payload["cause"] == "saturated"
        assert changes(recorder, iid) == [
            ("unknown", "healthy", "ready"),
            ("healthy", "degraded", "saturated"),
            ("degraded", "healthy", "saturated"),
        ]
        assert recorder.find("instance_restarting", iid) == []
        assert rt.snapshot(iid).restart_count == 0


def test_a_spec_without_metrics_still_shows_slots_but_is_never_called_saturated(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder
) -> None:
    with Runtime(state_dir=tmp_path / "state", policy=PROBING) as rt:
        iid = start(rt, fake, parallel=1, metrics=False)
        fake.set(saturated=2)
        recorder.wait_for("probe_completed", iid, count=5, timeout=WAIT)
        load = rt.snapshot(iid).load
        fake.set(saturated=None)

        assert load is not None
        assert (load.slots_total, load.slots_busy, load.requests_deferred) == (1, 1, None)
        assert rt.snapshot(iid).health == "healthy"


# -- outcomes reported by callers --------------------------------------------------------


REPORTING = InstancePolicy(
    probe_timeout_ms=1_000,
    slow_probe_ms=1_000,
    wedged_restart_ms=None,
    report_window_ms=60_000,
    report_degraded_after=2,
    report_unavailable_after=3,
)


def test_failures_reported_by_callers_move_health_at_once_and_a_success_clears_them(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder
) -> None:
    with Runtime(state_dir=tmp_path / "state", policy=REPORTING) as rt:
        resolution = rt.resolve_endpoint(fake.spec(), "tests")
        iid = resolution.instance.instance_id

        rt.report(resolution.endpoint, False, detail="ReadTimeout after 30 s")
        rt.report(resolution.lease, False, detail="HTTP 502")
        degraded = recorder.wait_for("health_changed", iid, new="degraded", timeout=WAIT)
        rt.report(resolution.lease.lease_ref, False, detail="HTTP 500 decode failed")
        unavailable = recorder.wait_for("health_changed", iid, new="unavailable", timeout=WAIT)
        snap = rt.snapshot(iid)
        rt.report(resolution.lease, True)
        recorder.wait_for("health_changed", iid, new="healthy", count=2, timeout=WAIT)

        assert degraded.payload["cause"] == "callers"
        assert degraded.payload["reason"] == (
            "2 failures reported by callers within 60s; last: HTTP 502"
        )
        assert unavailable.payload["cause"] == "callers"
        assert (snap.health, snap.health_cause) == ("unavailable", "callers")
        assert "HTTP 500 decode failed" in (snap.health_reason or "")
        assert changes(recorder, iid)[-1] == ("unavailable", "healthy", "callers")
        assert rt.snapshot(iid).health_reason == (
            "a caller reported a success; the probes say: ready"
        )


def test_reported_failures_wear_off_when_they_leave_the_window(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder
) -> None:
    policy = InstancePolicy(wedged_restart_ms=None, report_window_ms=300, report_degraded_after=1)
    with Runtime(state_dir=tmp_path / "state", policy=policy) as rt:
        resolution = rt.resolve_endpoint(fake.spec(), "tests")
        iid = resolution.instance.instance_id
        rt.report(resolution.lease, False, detail="HTTP 503")
        recorder.wait_for("health_changed", iid, new="degraded", timeout=WAIT)
        back = recorder.wait_for("health_changed", iid, new="healthy", count=2, timeout=WAIT)
        assert back.payload["cause"] == "callers"
        assert back.payload["reason"].startswith(
            "the failures reported by callers left the 0.3s window"
        )


def test_callers_who_keep_failing_get_a_managed_instance_restarted(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder
) -> None:
    policy = InstancePolicy(
        restart=RestartPolicy(backoff_initial_ms=100),
        wedged_restart_ms=200,
        report_degraded_after=1,
        report_unavailable_after=1,
    )
    with Runtime(state_dir=tmp_path / "state", policy=policy) as rt:
        resolution = rt.resolve_endpoint(fake.spec(), "tests")
        iid = resolution.instance.instance_id
        rt.report(resolution.lease, False, detail="every answer is empty")
        restarting = recorder.wait_for("instance_restarting", iid, timeout=WAIT)
        recorder.wait_for("instance_ready", iid, count=2, timeout=WAIT)

        assert "wedged" in restarting.payload["reason"]
        # The new process starts with a clean slate: the old reports are history.
        assert rt.wait_healthy(iid, timeout=WAIT).health == "healthy"


def test_an_outcome_on_a_lease_that_ended_counts_for_nothing(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder
) -> None:
    policy = InstancePolicy(wedged_restart_ms=None, report_degraded_after=1)
    with Runtime(state_dir=tmp_path / "state", policy=policy) as rt:
        old = rt.resolve_endpoint(fake.spec(), "tests")
        iid = old.instance.instance_id
        rt.release(old.lease.lease_ref)
        rt.report(old.lease, False, detail="too late")
        rt.report("lease-never-granted", False)
        # A report on a live lease, told after them, is seen after them.
        live = rt.resolve_endpoint(fake.spec(), "tests")
        rt.report(live.lease, False, detail="this one counts")
        degraded = recorder.wait_for("health_changed", iid, new="degraded", timeout=WAIT)
        assert "1 failure reported by callers" in degraded.payload["reason"]
        assert degraded.payload["reason"].endswith("this one counts")


def test_a_report_that_cannot_name_a_lease_is_refused_clearly(runtime: Runtime, fake: Fake) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests")
    published = runtime.published_endpoint(resolution.instance.instance_id)
    with pytest.raises(UsageError, match="published copy, which holds no lease"):
        runtime.report(published, False)
    with pytest.raises(UsageError, match="ok must be True or False"):
        runtime.report(resolution.lease, "yes")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="expected a lease ref"):
        runtime.report(42, True)  # type: ignore[arg-type]


def test_the_async_runtime_and_the_actor_face_report_the_same_way(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder
) -> None:
    import asyncio

    import pykka

    from llama_actors import AsyncRuntime

    policy = InstancePolicy(wedged_restart_ms=None, report_degraded_after=2)
    with Runtime(state_dir=tmp_path / "state", policy=policy) as rt:
        resolution = rt.resolve_endpoint(fake.spec(), "tests")
        iid = resolution.instance.instance_id
        asyncio.run(AsyncRuntime.wrap(rt).report(resolution.lease, False, detail="async"))
        rt.actor_face(pykka.ThreadingFuture()).report(resolution.lease, False, detail="actor")
        degraded = recorder.wait_for("health_changed", iid, new="degraded", timeout=WAIT)
        assert degraded.payload["reason"].startswith("2 failures reported by callers")


assert FAST.inference_probe_interval_ms is None  # the default: inference probes are opt-in

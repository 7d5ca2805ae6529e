"""The runtime against the fake llama-server: every path of CONTRACT §4-§7."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pykka
import pytest

from llama_actors import (
    BootSpecError,
    IncompatibleError,
    InstanceFailedError,
    InstanceNotFoundError,
    InstancePolicy,
    LeaseExpiredError,
    LeaseNotFoundError,
    ModelFileError,
    NotReadyError,
    ReadinessTimeoutError,
    Replied,
    Resolution,
    RestartPolicy,
    Runtime,
    RuntimeClosedError,
    ServerExitedError,
    UsageError,
    WaitTimeoutError,
    signals,
)
from llama_actors._llama import render as llama_render
from llama_actors.testing.signals import SignalRecorder

from ._helpers import FAST, WAIT, Fake, wait_gone


def chat(resolution: Resolution, text: str = "hello") -> httpx.Response:
    endpoint = resolution.endpoint
    with httpx.Client(trust_env=False, timeout=5) as client:
        return client.post(
            endpoint.base_url + "/chat/completions",
            headers=endpoint.headers,
            json={"messages": [{"role": "user", "content": text}]},
        )


# -- resolving ---------------------------------------------------------------------------


def test_a_resolved_endpoint_answers_chat_with_the_published_headers(
    runtime: Runtime, fake: Fake
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(api_key="sk-runtime-test"), "tests")

    answer = chat(resolution)

    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "You said: hello"
    assert resolution.endpoint.lease_ref == resolution.lease.lease_ref
    assert resolution.endpoint.headers == {"Authorization": "Bearer sk-runtime-test"}
    assert "sk-runtime-test" not in repr(resolution)
    assert resolution.reused is False
    assert resolution.compatibility.protocol == "openai_chat_completions"


def test_a_snapshot_shows_state_health_pid_port_leases_uptime_and_log(
    runtime: Runtime, fake: Fake
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests")
    iid = resolution.instance.instance_id

    snap = runtime.snapshot(iid)

    assert (snap.state, snap.health, snap.lease_count, snap.restart_count) == (
        "ready",
        "healthy",
        1,
        0,
    )
    assert snap.pid is not None
    assert snap.port == resolution.endpoint.metadata["port"]
    assert snap.uptime_s is not None
    assert snap.uptime_s >= 0
    assert snap.log_path is not None
    assert "listening on" in Path(snap.log_path).read_text()
    assert [s.instance_id for s in runtime.instances()] == [iid]


def test_the_published_endpoint_is_a_lease_less_copy(runtime: Runtime, fake: Fake) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests")

    published = runtime.published_endpoint(resolution.instance.instance_id)

    assert published.lease_ref is None
    assert published.base_url == resolution.endpoint.base_url


def test_a_second_resolve_of_the_same_spec_reuses_the_instance(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    first = runtime.resolve_endpoint(fake.spec(), "a")
    second = runtime.resolve_endpoint(fake.spec(), "b")

    assert second.reused is True
    assert second.instance.instance_id == first.instance.instance_id
    assert second.lease.lease_ref != first.lease.lease_ref
    assert second.instance.lease_count == 2
    assert recorder.names().count("instance_starting") == 1


def test_concurrent_resolves_of_one_identity_spawn_exactly_one_server(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    spec = fake.spec({"load_seconds": "0.5"})
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: runtime.resolve_endpoint(spec, f"c{i}"), range(6)))

    assert len({r.instance.instance_id for r in results}) == 1
    assert [r.reused for r in results].count(False) == 1
    assert recorder.names().count("instance_starting") == 1
    assert runtime.snapshot(results[0].instance.instance_id).lease_count == 6


def test_a_snapshot_says_which_phase_a_starting_instance_is_in(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    spec = fake.spec({"never_ready": "1"})  # it loads until the test lets it finish
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(runtime.ensure_instance, spec)
        iid = recorder.wait_for("instance_starting", timeout=WAIT).instance_id
        phases = {runtime.snapshot(iid).phase}
        never = threading.Event()
        deadline = time.monotonic() + WAIT
        while "loading" not in phases and not pending.done() and time.monotonic() < deadline:
            # A UI-style look at the board, as `up` and the demo do: no signal announces a
            # phase, so look again in a moment. The load lasts until the test ends it.
            never.wait(0.01)
            phases.add(runtime.snapshot(iid).phase)
        fake.set(never_ready=False)
        ready = pending.result(WAIT).instance

    assert "loading" in phases
    assert phases <= {"spawning", "spawned", "loading", "connecting", "waiting"}
    assert ready.state == "ready"
    assert ready.phase is None


def test_two_identities_get_two_servers_on_different_auto_ports(
    runtime: Runtime, tmp_path: Path
) -> None:
    one = runtime.resolve_endpoint(Fake(tmp_path / "one").spec(), "tests")
    two = runtime.resolve_endpoint(Fake(tmp_path / "two").spec(), "tests")

    assert one.instance.instance_id != two.instance.instance_id
    assert one.instance.pid != two.instance.pid
    assert one.endpoint.metadata["port"] != two.endpoint.metadata["port"]
    assert chat(one).status_code == chat(two).status_code == 200


def test_an_incompatible_consumer_is_refused_before_anything_is_spawned(
    runtime: Runtime, fake: Fake
) -> None:
    consumer = {"consumer": "embedder", "accepted_protocols": ["openai_embeddings"]}

    with pytest.raises(IncompatibleError) as caught:
        runtime.resolve_endpoint(fake.spec(), consumer)

    assert caught.value.result.reason == "unsupported_protocol"
    assert runtime.instances() == []


def test_a_missing_model_is_refused_in_the_callers_thread(runtime: Runtime, fake: Fake) -> None:
    spec = fake.spec()
    os.remove(spec.model)

    with pytest.raises(ModelFileError, match=r"fake-model\.gguf"):
        runtime.resolve_endpoint(spec, "tests")

    assert runtime.instances() == []


# -- readiness ---------------------------------------------------------------------------


def test_a_slow_load_that_keeps_progressing_outlasts_the_stall_deadline(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    # The fake's first line comes after its start-up (up to about 0.3 s under load), then
    # a progress line every 0.2 s: a stall deadline of five times that is never reached
    # while it loads, and its load lasts twice the deadline.
    spec = fake.spec({"load_seconds": "3"}, ready_timeout_ms=1_500)

    resolution = runtime.resolve_endpoint(spec, "tests")

    ready = recorder.find("instance_ready", resolution.instance.instance_id)[0]
    assert ready.payload["elapsed_s"] > 1.5  # longer than the stall deadline
    assert chat(resolution).status_code == 200


def test_a_server_that_exits_before_ready_fails_every_waiter_with_its_exit_and_output(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    spec = fake.spec({"exit_before_ready": "3", "exit_stderr": "boom: no such device"})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(runtime.resolve_endpoint, spec, f"w{i}") for i in range(3)]
        errors = [f.exception(timeout=WAIT) for f in futures]

    assert all(isinstance(e, ServerExitedError) for e in errors)
    error = errors[0]
    assert isinstance(error, ServerExitedError)
    assert error.exit.code == 3
    assert "boom: no such device" in str(error)
    (snap,) = runtime.instances()
    assert snap.state == "failed"
    assert recorder.names().count("instance_starting") == 1  # not restarted


def test_a_server_that_never_becomes_ready_fails_after_the_stall_deadline(
    runtime: Runtime, fake: Fake
) -> None:
    spec = fake.spec({"never_ready": "1"}, ready_timeout_ms=300)

    with pytest.raises(ReadinessTimeoutError, match=r"no load progress for 0\.3s") as caught:
        runtime.resolve_endpoint(spec, "tests")

    snap = runtime.snapshot(caught.value.instance_id)
    assert snap.state == "failed"
    assert "ready_timeout_ms" in str(caught.value)


def test_the_hard_ceiling_ends_a_load_that_keeps_progressing(runtime: Runtime, fake: Fake) -> None:
    policy = InstancePolicy(ready_ceiling_ms=600)
    spec = fake.spec({"load_seconds": "30"}, ready_timeout_ms=5_000)

    with pytest.raises(ReadinessTimeoutError, match="hard ceiling"):
        runtime.resolve_endpoint(spec, "tests", policy=policy)


def test_a_non_retryable_boot_failure_is_classified_and_not_retried(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    with pytest.raises(ServerExitedError) as caught:
        runtime.resolve_endpoint(fake.spec({"invalid_model": "1"}), "tests")

    assert caught.value.exit.failure == "model_invalid"
    assert recorder.names().count("instance_starting") == 1


def test_a_caller_that_times_out_gets_wait_timeout_and_no_lease_leaks(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    spec = fake.spec({"never_ready": "1"})  # it loads until the test lets it finish

    with pytest.raises(WaitTimeoutError, match="keeps going for other callers"):
        runtime.resolve_endpoint(spec, "impatient", timeout=0.2)

    fake.set(never_ready=False)
    later = runtime.resolve_endpoint(spec, "patient")
    assert later.reused is True
    assert runtime.snapshot(later.instance.instance_id).lease_count == 1
    assert len(recorder.find("lease_granted")) == 1


# -- health ------------------------------------------------------------------------------


def test_health_goes_degraded_and_back_once_each(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    iid = runtime.resolve_endpoint(fake.spec(), "tests").instance.instance_id

    fake.set(health="degraded")
    recorder.wait_for("health_changed", iid, new="degraded", timeout=WAIT)
    fake.set(health="ok")
    recorder.wait_for("health_changed", iid, old="degraded", new="healthy", timeout=WAIT)

    news = [r.payload["new"] for r in recorder.find("health_changed", iid)]
    assert news == ["healthy", "degraded", "healthy"]
    assert runtime.wait_healthy(iid, timeout=WAIT).health == "healthy"


def test_no_free_slot_is_degraded(runtime: Runtime, fake: Fake, recorder: SignalRecorder) -> None:
    iid = runtime.resolve_endpoint(fake.spec(), "tests").instance.instance_id

    fake.set(health="no_slot")

    record = recorder.wait_for("health_changed", iid, new="degraded", timeout=WAIT)
    assert "slot" in record.payload["reason"]


def test_a_hung_server_becomes_unavailable_after_consecutive_failures_and_recovers(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    iid = runtime.resolve_endpoint(fake.spec(), "tests").instance.instance_id

    fake.set(hang=True)
    degraded = recorder.wait_for("health_changed", iid, new="degraded", timeout=WAIT)
    unavailable = recorder.wait_for("health_changed", iid, new="unavailable", timeout=WAIT)
    fake.set(hang=None)
    recorder.wait_for("health_changed", iid, old="unavailable", new="healthy", timeout=WAIT)

    assert "1 of 2" in degraded.payload["reason"]
    assert "2 failed probes in a row" in unavailable.payload["reason"]
    assert runtime.snapshot(iid).restart_count == 0


def test_a_wedged_server_is_killed_and_restarted(
    tmp_path: Path, fake: Fake, recorder: SignalRecorder
) -> None:
    policy = InstancePolicy(
        restart=RestartPolicy(backoff_initial_ms=300),
        probe_timeout_ms=1_000,  # only the hang makes probes time out, not a busy machine
        unavailable_after=2,
        wedged_restart_ms=300,
    )
    with Runtime(state_dir=tmp_path / "state", policy=policy) as runtime:
        resolution = runtime.resolve_endpoint(fake.spec(), "tests")
        iid, pid = resolution.instance.instance_id, resolution.instance.pid
        fake.set(hang=True)
        restarting = recorder.wait_for("instance_restarting", iid, timeout=WAIT)
        fake.set(hang=None)
        recorder.wait_for("health_changed", iid, new="healthy", timeout=WAIT, count=2)

        assert "wedged" in restarting.payload["reason"]
        snap = runtime.snapshot(iid)
        assert snap.pid != pid
        assert snap.restart_count == 1
        assert wait_gone([pid], timeout=WAIT) == []


# -- supervision -------------------------------------------------------------------------


def test_a_killed_server_is_reported_unavailable_at_once_and_restarted_on_its_port(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests")
    iid, pid = resolution.instance.instance_id, resolution.instance.pid
    assert pid is not None

    os.kill(pid, signal.SIGKILL)
    unavailable = recorder.wait_for("health_changed", iid, new="unavailable", timeout=WAIT)
    restarting = recorder.wait_for("instance_restarting", iid, timeout=WAIT)
    recorder.wait_for("instance_ready", iid, timeout=WAIT, count=2)

    assert "SIGKILL" in unavailable.payload["reason"]
    assert restarting.payload["attempt"] == 1
    assert 0 < restarting.payload["delay_s"] < 0.1
    snap = runtime.snapshot(iid)
    assert (snap.state, snap.restart_count, snap.lease_count) == ("ready", 1, 1)
    assert snap.port == resolution.endpoint.metadata["port"]  # lease holders keep their URL
    assert chat(resolution).status_code == 200
    assert runtime.renew(resolution.lease.lease_ref).lease_ref == resolution.lease.lease_ref


def test_a_spec_is_rendered_once_and_its_restart_reuses_that_plan_on_the_same_port(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    renders: list[str] = []
    real = llama_render._Renderer.plan

    def counting(self: Any) -> Any:
        renders.append(self.spec.alias)
        return real(self)

    monkeypatch.setattr(llama_render._Renderer, "plan", counting)
    spec = fake.spec(alias="rendered-once")
    first = runtime.resolve_endpoint(spec, "tests")
    runtime.resolve_endpoint(dict(alias="rendered-once", **_mapping(spec)), "tests")
    iid, pid = first.instance.instance_id, first.instance.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    recorder.wait_for("instance_ready", iid, timeout=WAIT, count=2)

    assert renders == ["rendered-once"]
    assert runtime.snapshot(iid).port == first.endpoint.metadata["port"]


def _mapping(spec: Any) -> dict[str, Any]:
    """The fields of a BootSpec as a plain mapping, as a caller would pass them."""
    keys = ("model", "binary_path", "launcher_args", "environment", "stop_timeout_ms")
    return {k: getattr(spec, k) for k in keys}


def test_restarts_past_the_intensity_limit_fail_the_instance_and_end_its_leases(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec({"crash_after": "3"}), "tests")
    iid = resolution.instance.instance_id

    failed = recorder.wait_for("instance_failed", iid, timeout=WAIT)

    assert "restart intensity exceeded" in failed.payload["reason"]
    assert "max_restarts=3" in failed.payload["reason"]
    restarts = recorder.find("instance_restarting", iid)
    assert [r.payload["attempt"] for r in restarts] == [1, 2, 3]
    delays = [r.payload["delay_s"] for r in restarts]
    assert delays == sorted(delays)  # exponential: 20, 40, 80 ms, each within ±20% jitter
    assert runtime.snapshot(iid).state == "failed"
    recorder.wait_for("lease_released", iid, timeout=WAIT)
    with pytest.raises(LeaseNotFoundError):
        runtime.renew(resolution.lease.lease_ref)
    with pytest.raises(InstanceFailedError, match="restart intensity exceeded"):
        runtime.wait_healthy(iid, timeout=WAIT)


def test_a_failed_identity_gets_a_fresh_instance_on_the_next_resolve(
    runtime: Runtime, fake: Fake
) -> None:
    spec = fake.spec({"exit_before_ready": "3"})
    with pytest.raises(ServerExitedError):
        runtime.resolve_endpoint(spec, "tests")
    with pytest.raises(ServerExitedError):
        runtime.resolve_endpoint(spec, "tests")

    assert len(runtime.instances()) == 2


def test_a_restart_that_cannot_find_its_model_fails_without_looping(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    spec = fake.spec()
    resolution = runtime.resolve_endpoint(spec, "tests")
    iid, pid = resolution.instance.instance_id, resolution.instance.pid
    assert pid is not None

    os.remove(spec.model)
    os.kill(pid, signal.SIGKILL)
    failed = recorder.wait_for("instance_failed", iid, timeout=WAIT)

    assert "fake-model.gguf" in failed.payload["reason"]
    assert len(recorder.find("instance_restarting", iid)) == 1


# -- leases ------------------------------------------------------------------------------


def test_a_lease_that_is_not_renewed_expires(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests", ttl_ms=150, owner_ref="svc-1")
    iid = resolution.instance.instance_id

    expired = recorder.wait_for("lease_expired", iid, timeout=WAIT)

    assert expired.payload["lease"].lease_ref == resolution.lease.lease_ref
    assert expired.payload["lease"].owner_ref == "svc-1"
    assert runtime.snapshot(iid).lease_count == 0
    with pytest.raises(LeaseExpiredError, match="expired"):
        runtime.renew(resolution.lease.lease_ref)
    assert runtime.snapshot(iid).state == "ready"  # the default idle policy keeps it running


def test_renew_extends_a_live_lease(runtime: Runtime, fake: Fake, recorder: SignalRecorder) -> None:
    # The TTL only has to outlast the moment between the grant and the renew.
    resolution = runtime.resolve_endpoint(fake.spec(), "tests", ttl_ms=5_000)

    renewed = runtime.renew(resolution.lease.lease_ref, ttl_ms=60_000)

    assert renewed.expires_at > resolution.lease.expires_at + 50
    assert renewed.ttl_ms == 60_000
    assert len(recorder.find("lease_renewed")) == 1


def test_release_is_idempotent_and_signalled_once(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests")
    ref = resolution.lease.lease_ref

    assert runtime.release(ref) is True
    assert runtime.release(ref) is False
    assert runtime.release("lease-never-granted") is False

    assert len(recorder.find("lease_released")) == 1
    assert runtime.snapshot(resolution.instance.instance_id).lease_count == 0
    with pytest.raises(LeaseNotFoundError, match="released"):
        runtime.renew(ref)


def test_an_idle_policy_stops_the_instance_after_its_last_lease_ends(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    policy = InstancePolicy(idle_shutdown_ms=100)
    resolution = runtime.resolve_endpoint(fake.spec(), "tests", policy=policy)
    iid, pid = resolution.instance.instance_id, resolution.instance.pid
    assert pid is not None

    runtime.release(resolution.lease.lease_ref)
    stopped = recorder.wait_for("instance_stopped", iid, timeout=WAIT)

    assert "idle" in stopped.payload["reason"]
    assert runtime.snapshot(iid).state == "stopped"
    assert wait_gone([pid], timeout=WAIT) == []


def test_stopping_an_instance_with_leases_drains_first(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "holder")
    iid = resolution.instance.instance_id

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # The drain outlasts what happens before the release, a second server's start
        # included; the release ends it early.
        stopping = pool.submit(runtime.stop_instance, iid, drain_timeout=30)
        draining = recorder.wait_for("instance_draining", iid, timeout=WAIT)
        latecomer = runtime.resolve_endpoint(fake.spec(), "latecomer")
        assert runtime.release(resolution.lease.lease_ref) is True
        final = stopping.result(timeout=WAIT)

    assert draining.payload["lease_refs"] == [resolution.lease.lease_ref]
    assert final.state == "stopped"
    steps = ("instance_draining", "lease_released", "instance_stopped")
    assert [n for n in recorder.names(iid) if n in steps] == list(steps)
    # A caller arriving during the drain is not handed the instance being stopped.
    assert latecomer.instance.instance_id != iid
    assert runtime.snapshot(latecomer.instance.instance_id).state == "ready"


def test_a_drain_that_runs_out_ends_the_remaining_leases(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "holder")
    iid = resolution.instance.instance_id

    final = runtime.stop_instance(iid, drain_timeout=0.2)

    assert final.state == "stopped"
    (released,) = recorder.find("lease_released", iid)
    assert released.payload["reason"] == "drained"
    with pytest.raises(LeaseNotFoundError):
        runtime.renew(resolution.lease.lease_ref)


def test_stop_instance_is_idempotent_and_a_later_resolve_starts_a_new_instance(
    runtime: Runtime, fake: Fake
) -> None:
    first = runtime.resolve_endpoint(fake.spec(), "tests")
    iid = first.instance.instance_id
    runtime.release(first.lease.lease_ref)

    assert runtime.stop_instance(iid).state == "stopped"
    assert runtime.stop_instance(iid).state == "stopped"
    again = runtime.resolve_endpoint(fake.spec(), "tests")

    assert again.instance.instance_id != iid
    assert again.reused is False


def test_a_server_that_ignores_sigterm_is_killed_after_stop_timeout(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    spec = fake.spec({"ignore_sigterm": "1"}, stop_timeout_ms=200)
    resolution = runtime.resolve_endpoint(spec, "tests")
    iid = resolution.instance.instance_id

    runtime.stop_instance(iid, drain_timeout=0)

    stopped = recorder.find("instance_stopped", iid)[0]
    assert stopped.payload["exit"].signal == "SIGKILL"


# -- the runtime itself ------------------------------------------------------------------


def test_unknown_instances_and_not_ready_instances_raise_clear_errors(
    runtime: Runtime, fake: Fake
) -> None:
    with pytest.raises(InstanceNotFoundError, match="no instance 'nope'"):
        runtime.snapshot("nope")
    with pytest.raises(InstanceNotFoundError):
        runtime.stop_instance("nope")
    snap = runtime.ensure_instance(fake.spec()).instance
    runtime.stop_instance(snap.instance_id)
    with pytest.raises(NotReadyError, match="stopped"):
        runtime.published_endpoint(snap.instance_id)


def test_wait_healthy_times_out_with_an_error_and_leaves_the_instance_running(
    runtime: Runtime, fake: Fake
) -> None:
    iid = runtime.resolve_endpoint(fake.spec(), "tests").instance.instance_id
    fake.set(health="degraded")
    with SignalRecorder("health_changed") as rec:
        rec.wait_for("health_changed", iid, new="degraded", timeout=WAIT)

    with pytest.raises(WaitTimeoutError, match=r"not healthy after 0\.2s"):
        runtime.wait_healthy(iid, timeout=0.2)

    assert runtime.snapshot(iid).state == "ready"


@pytest.mark.logs_errors("a receiver of instance-ready raised")
def test_a_receiver_that_raises_does_not_break_the_runtime(
    runtime: Runtime, fake: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(sender: str, **payload: Any) -> None:
        raise RuntimeError("receiver bug")

    signals.instance_ready.connect(broken, weak=False)
    try:
        resolution = runtime.resolve_endpoint(fake.spec(), "tests")
    finally:
        signals.instance_ready.disconnect(broken)

    assert chat(resolution).status_code == 200
    assert "a receiver of instance-ready raised" in caplog.text


def test_signals_can_be_filtered_by_instance_id(runtime: Runtime, tmp_path: Path) -> None:
    seen: list[str] = []
    one = runtime.ensure_instance(Fake(tmp_path / "one").spec()).instance

    def record(sender: str, **payload: Any) -> None:
        seen.append(payload["instance_id"])

    signals.lease_granted.connect(record, sender=one.instance_id, weak=False)
    try:
        runtime.resolve_endpoint(Fake(tmp_path / "two").spec(), "tests")
        runtime.resolve_endpoint(Fake(tmp_path / "one").spec(), "tests")
    finally:
        signals.lease_granted.disconnect(record)

    assert seen == [one.instance_id]


def test_closing_stops_every_server_and_joins_every_actor_thread(
    tmp_path: Path, fake: Fake
) -> None:
    before = set(threading.enumerate())
    runtime = Runtime(state_dir=tmp_path / "state", policy=FAST)
    resolution = runtime.resolve_endpoint(fake.spec(), "tests")
    pid = resolution.instance.pid
    assert pid is not None

    runtime.close()
    runtime.close()

    assert wait_gone([pid], timeout=WAIT) == []
    assert [t.name for t in set(threading.enumerate()) - before if t.is_alive()] == []
    with pytest.raises(RuntimeClosedError):
        runtime.resolve_endpoint(fake.spec(), "tests")
    assert runtime.release(resolution.lease.lease_ref) is False


class _Caller(pykka.ThreadingActor):
    """A service that is an actor: told a spec, it resolves through the actor face from
    its own thread (nothing waits) and is told the answer."""

    def __init__(self, runtime: Runtime, got: pykka.ThreadingFuture[tuple[str, Replied]]) -> None:
        super().__init__()
        self.face = runtime.actor_face(self.actor_ref)
        self.got = got
        self.request_id = ""

    def on_receive(self, message: Any) -> None:
        if isinstance(message, Replied):
            self.got.set((self.request_id, message))
        else:
            self.request_id = self.face.resolve_endpoint(message, "actor")


def test_an_actor_resolves_through_the_actor_face_and_is_told_the_resolution(
    runtime: Runtime, fake: Fake
) -> None:
    got: pykka.ThreadingFuture[tuple[str, Replied]] = pykka.ThreadingFuture()
    caller = _Caller.start(runtime, got)
    try:
        caller.tell(fake.spec())
        request_id, replied = got.get(timeout=WAIT)
    finally:
        caller.stop()

    assert request_id.startswith("req-")
    assert replied.request_id == request_id
    assert replied.error is None
    resolution = replied.value
    assert isinstance(resolution, Resolution)
    assert chat(resolution).status_code == 200
    iid = resolution.instance.instance_id
    assert runtime.snapshot(iid).lease_count == 1
    assert runtime.published_endpoint(iid).lease_ref is None


def test_bad_input_through_the_actor_face_raises_in_the_calling_thread(runtime: Runtime) -> None:
    face = runtime.actor_face(pykka.ThreadingFuture())

    with pytest.raises(BootSpecError, match="model"):
        face.resolve_endpoint({"model": ""}, "x")
    with pytest.raises(UsageError):
        face.renew("lease-x", 0)
    assert runtime.instances() == []


def test_a_renew_of_an_unknown_lease_through_the_actor_face_is_answered_with_the_error(
    runtime: Runtime,
) -> None:
    answer: pykka.ThreadingFuture[Any] = pykka.ThreadingFuture()
    face = runtime.actor_face(answer)

    assert face.renew("lease-unknown") == "lease-unknown"

    with pytest.raises(LeaseNotFoundError):
        answer.get(timeout=5)


def test_ensure_instance_starts_a_server_without_a_lease_and_says_it_did(
    runtime: Runtime, fake: Fake
) -> None:
    ensured = runtime.ensure_instance(fake.spec())
    snap = ensured.instance

    assert ensured.reused is False
    assert (snap.state, snap.health, snap.lease_count) == ("ready", "healthy", 0)
    again = runtime.ensure_instance(fake.spec())
    assert (again.reused, again.instance.instance_id) == (True, snap.instance_id)


def test_only_the_newest_finished_instances_stay_visible(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("llama_actors._runtime.supervisor.KEEP_FINISHED", 1)
    ids = []
    for name in ("a", "b", "c"):
        snap = runtime.ensure_instance(Fake(tmp_path / name).spec()).instance
        runtime.stop_instance(snap.instance_id)
        ids.append(snap.instance_id)

    assert [s.instance_id for s in runtime.instances()] == [ids[-1]]
    with pytest.raises(InstanceNotFoundError):
        runtime.snapshot(ids[0])


def test_statistics_count_instances_by_state_and_health_with_leases_and_restarts(
    runtime: Runtime, tmp_path: Path
) -> None:
    one = runtime.resolve_endpoint(Fake(tmp_path / "one").spec(), "tests")
    runtime.resolve_endpoint(Fake(tmp_path / "one").spec(), "tests")
    two = runtime.ensure_instance(Fake(tmp_path / "two").spec()).instance
    runtime.stop_instance(two.instance_id)

    stats = runtime.statistics()

    assert (stats.instances, stats.leases, stats.restarts) == (2, 2, 0)
    assert stats.states == {"ready": 1, "stopped": 1}
    assert stats.health == {"healthy": 1, "unavailable": 1}
    assert one.instance.instance_id in {s.instance_id for s in runtime.instances()}


def test_a_ttl_that_is_not_positive_is_a_usage_error_before_anything_starts(
    runtime: Runtime, fake: Fake
) -> None:
    with pytest.raises(UsageError, match="ttl_ms must be a positive number"):
        runtime.resolve_endpoint(fake.spec(), "tests", ttl_ms=0)

    assert runtime.instances() == []

"""What the chaos run found, each as one focused, deterministic test, so the bug stays
fixed without waiting for chaos to hit the same race again."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pykka
import pytest

import llama_actors
from llama_actors import (
    InstancePolicy,
    LeaseExpiredError,
    RestartPolicy,
    Runtime,
    signals,
)
from llama_actors._runtime.board import StatusBoard
from llama_actors._runtime.broker import LeaseBroker
from llama_actors._runtime.context import Context
from llama_actors._runtime.messages import (
    GrantLease,
    ReleaseLease,
    RenewLease,
    Resolve,
    TrackInstance,
)
from llama_actors.lowlevel import LlamaCppBackend, ManualTimers
from llama_actors.testing.fake import fake_boot_spec
from llama_actors.testing.signals import SignalRecorder

WAIT = 15.0
SPEC = llama_actors.boot_spec({"model": "/m.gguf"})
COMPAT = llama_actors.compatibility({"consumer": "t"})


class _JumpyTimers(ManualTimers):
    """Manual time that moves on right after the next read, as real time does between
    two reads: the broker's sweep sees ``t``, its renew a moment later ``t + jump``."""

    jump = 0.0

    def now(self) -> float:
        t = super().now()
        if self.jump:
            self._now += self.jump
            self.jump = 0.0
        return t


class _Supervisor(pykka.ThreadingActor):
    """Stands in for the supervisor: keeps what the broker tells it."""

    use_daemon_thread = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        if message == "dump":
            return list(self.seen)
        self.seen.append(message)
        return None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[pykka.ActorRef[Any], _JumpyTimers, Context]]:
    timers = _JumpyTimers()
    ctx = Context(
        timers=timers,
        board=StatusBoard(),
        client=httpx.Client(trust_env=False),
        state_dir=tmp_path,
        rng=random.Random(0),  # noqa: S311 - not used for security
        policy=InstancePolicy(),
        lease_ttl_ms=1_000,
    )
    ctx.supervisor = _Supervisor.start()
    ref = LeaseBroker.start(context=ctx)
    ctx.broker = ref
    yield ref, timers, ctx
    ref.stop(timeout=5)
    ctx.supervisor.stop(timeout=5)
    ctx.client.close()


def _ask(ref: pykka.ActorRef[Any], message_type: Any, **fields: Any) -> Any:
    reply: pykka.ThreadingFuture[Any] = pykka.ThreadingFuture()
    ref.tell(message_type(reply=reply, **fields))
    return reply.get(timeout=5)


def test_a_lease_that_expires_between_the_sweep_and_a_renew_is_signalled_before_the_renew_fails(
    broker: tuple[pykka.ActorRef[Any], _JumpyTimers, Context],
) -> None:
    ref, timers, ctx = broker
    ctx.board.add("inst-1", "key-1", None)
    ref.tell(TrackInstance(instance_id="inst-1", idle_shutdown_s=0.1))
    endpoint = LlamaCppBackend().endpoint(
        SPEC, instance_id="inst-1", port=8080, plan=None, compatibility=COMPAT
    )
    ctx.board.ready("inst-1", port=8080, pid=None, endpoint=endpoint)
    with SignalRecorder("lease_expired") as recorder:
        grant: pykka.ThreadingFuture[Any] = pykka.ThreadingFuture()
        ref.tell(
            GrantLease(
                request_id="r-1",
                instance_id="inst-1",
                endpoint=endpoint,
                compatibility=COMPAT,
                owner_ref=None,
                ttl_ms=1_000,
                reused=False,
                reply=grant,
            )
        )
        lease = grant.get(timeout=5).lease
        timers.advance(0.999)  # 1 ms before expiry
        timers.jump = 0.002  # the sweep reads 999 ms, the renew 1001 ms

        with pytest.raises(LeaseExpiredError):
            _ask(ref, RenewLease, lease_ref=lease.lease_ref, ttl_ms=None)
        # Already signalled when the caller hears "expired" (make chaos found a renew
        # that failed first, its lease_expired following a moment later).
        signalled = [r.payload["lease"].lease_ref for r in recorder.records]
        _ask(ref, ReleaseLease, lease_ref="lease-sync")  # everything before is handled

        assert signalled == [lease.lease_ref]
        assert [r.payload["lease"].lease_ref for r in recorder.records] == [lease.lease_ref]
    snapshot = ctx.board.snapshot("inst-1")
    assert snapshot is not None
    assert snapshot.lease_count == 0


def test_a_grant_that_reaches_the_broker_while_its_instance_restarts_goes_back_to_wait(
    broker: tuple[pykka.ActorRef[Any], _JumpyTimers, Context],
) -> None:
    """A resolve that saw the instance ready just before it crashed is not granted during
    the restart: the broker hands it back to the supervisor, which parks it until ready."""
    ref, _, ctx = broker
    ctx.board.add("inst-1", "key-1", None)
    endpoint = LlamaCppBackend().endpoint(
        SPEC, instance_id="inst-1", port=8080, plan=None, compatibility=COMPAT
    )
    ctx.board.ready("inst-1", port=8080, pid=None, endpoint=endpoint)
    ctx.board.backing_off("inst-1", restart_count=1, last_error="killed by SIGKILL")
    resolve = Resolve(
        request_id="r-1",
        backend=LlamaCppBackend(),
        spec=SPEC,
        plan=llama_actors.lowlevel.LaunchPlan(
            name="m",
            binary_path="/b",
            binary_label="b",
            argv=("/b",),
            env={},
            private_files=(),
            host="127.0.0.1",
            port=None,
            port_mode="bind_zero",
            port_index=0,
            slots={},
            model=None,
            has_key=False,
            stop_timeout_s=5.0,
        ),
        compatibility=COMPAT,
        owner_ref=None,
        ttl_ms=1_000,
        policy=InstancePolicy(),
        reply=pykka.ThreadingFuture(),
    )

    with SignalRecorder("lease_granted") as recorder:
        ref.tell(GrantLease.for_request(resolve, "inst-1", endpoint, reused=True))
        _ask(ref, ReleaseLease, lease_ref="lease-sync")  # everything before is handled

        assert recorder.records == []
    assert ctx.supervisor is not None
    assert ctx.supervisor.ask("dump", timeout=5) == [resolve]
    snapshot = ctx.board.snapshot("inst-1")
    assert snapshot is not None
    assert snapshot.lease_count == 0


def test_a_restart_whose_old_port_is_taken_after_the_free_port_check_moves_to_a_new_port(
    tmp_path: Path,
) -> None:
    spec = fake_boot_spec(tmp_path / "fake", health_interval_ms=100, readiness_interval_ms=20)
    policy = InstancePolicy(restart=RestartPolicy(backoff_initial_ms=50))
    held: list[socket.socket] = []
    with (
        SignalRecorder() as recorder,
        Runtime(state_dir=tmp_path / "state", policy=policy) as runtime,
    ):
        first = runtime.resolve_endpoint(spec, "tests")
        iid, pid, port = first.instance.instance_id, first.instance.pid, first.instance.port
        assert pid is not None

        def take_port(sender: str, *, attempt: int, **_: object) -> None:
            # Runs as the restart is announced: its free-port check has passed and the
            # server is spawned, but it has not bound the port yet.
            if attempt == 1 and not held:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen()
                held.append(sock)

        signals.instance_starting.connect(take_port, sender=iid, weak=False)
        try:
            os.kill(pid, signal.SIGKILL)
            recorder.wait_for("instance_restarting", iid, timeout=WAIT)
            again = runtime.wait_healthy(iid, timeout=WAIT)  # raises at once if it failed
        finally:
            signals.instance_starting.disconnect(take_port, sender=iid)
            for sock in held:
                sock.close()

        assert held, "the port was not taken: the test proved nothing"
        assert again.port != port
        assert again.pid != pid


def test_an_instance_that_fails_while_its_stop_drains_still_stops_and_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = fake_boot_spec(tmp_path / "fake", health_interval_ms=100, readiness_interval_ms=20)
    policy = InstancePolicy(restart=RestartPolicy(max_restarts=0))  # a crash fails it
    runtime = Runtime(state_dir=tmp_path / "state", policy=policy)
    try:
        with SignalRecorder() as recorder, concurrent.futures.ThreadPoolExecutor(1) as pool:
            resolution = runtime.resolve_endpoint(spec, "holder")  # a lease: the stop drains
            iid, pid = resolution.instance.instance_id, resolution.instance.pid
            assert pid is not None
            stopping = pool.submit(runtime.stop_instance, iid, drain_timeout=2.0, timeout=6.0)
            recorder.wait_for("instance_draining", iid, timeout=WAIT)

            os.kill(pid, signal.SIGKILL)
            recorder.wait_for("instance_failed", iid, timeout=WAIT)

            final = stopping.result(timeout=WAIT)  # WaitTimeoutError while the bug is open
        assert final.state == "failed"
        # The bug made close wait out its whole timeout for an instance that never
        # answered its stop, then say so: every instance must answer instead.
        runtime.close(timeout=WAIT)
        gave_up = [r.getMessage() for r in caplog.records if "did not stop" in r.getMessage()]
        assert gave_up == []
    finally:
        runtime.close(timeout=WAIT)

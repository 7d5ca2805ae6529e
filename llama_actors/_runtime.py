"""Runtime: the public entry point. It starts the actors, hands out leased endpoints,
and closing it stops every instance it started and joins every actor thread.

Every call here is synchronous and bounded by a timeout; the same operations are
available without blocking through :meth:`Runtime.proxy` (a pykka proxy of the
supervisor actor, whose waiting calls answer to an actor you name).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import random
import threading
import time
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pykka

from llama_actors._board import StatusBoard
from llama_actors._boot_spec import BootSpec
from llama_actors._broker import LeaseBroker
from llama_actors._clock import Scheduler, Timers
from llama_actors._context import Context, tell
from llama_actors._exceptions import (
    InstanceFailedError,
    InstanceNotFoundError,
    LlamaActorsError,
    NotReadyError,
    RuntimeClosedError,
    WaitTimeoutError,
)
from llama_actors._messages import (
    CancelRequest,
    Close,
    GrantLease,
    Message,
    ReleaseLease,
    RenewLease,
    Resolve,
    StopRequest,
)
from llama_actors._policy import InstancePolicy
from llama_actors._probe_client import ProbeClient
from llama_actors._requests import Consumer, check_ttl, ensure_message, resolve_message
from llama_actors._signals import health_changed, instance_failed, instance_stopped
from llama_actors._state import default_state_dir
from llama_actors._supervisor import Supervisor
from llama_actors._types import (
    EndpointDescriptor,
    Lease,
    Resolution,
    RuntimeSnapshot,
    RuntimeStatistics,
)

__all__ = ["Runtime"]

log = logging.getLogger("llama_actors.runtime")

DEFAULT_LEASE_TTL_MS = 60_000
DEFAULT_RESOLVE_TIMEOUT = 120.0
DEFAULT_ASK_TIMEOUT = 10.0
_open: weakref.WeakSet[Runtime] = weakref.WeakSet()
#: The signals that can change the answer of wait_healthy().
HEALTH_SIGNALS = (health_changed, instance_failed, instance_stopped)


@dataclass(frozen=True, eq=False)
class Request:
    """A message for one of the runtime's actors and what waiting for its answer means.

    Both faces of the runtime build these the same way: :class:`Runtime` blocks on
    ``future``, the asyncio face awaits it. ``request_id`` names a resolve or ensure
    the supervisor must forget (and whose lease it must end) when its caller stops
    waiting.
    """

    message: Message
    future: pykka.Future[Any]
    timeout: float
    what: str
    to_broker: bool = False
    request_id: str | None = None
    spec: BootSpec | None = None


class Runtime:
    """Supervised llama-server instances behind leased endpoints.

    ``policy`` is the default :class:`InstancePolicy` (a resolve may pass its own for a
    new instance); ``lease_ttl_ms`` the default lease TTL; ``timers`` replaces the real
    clock and scheduler (tests); ``state_dir`` holds the server ledger and logs.
    """

    def __init__(
        self,
        *,
        state_dir: str | Path | None = None,
        policy: InstancePolicy | None = None,
        lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS,
        ask_timeout: float = DEFAULT_ASK_TIMEOUT,
        timers: Timers | None = None,
        rng: random.Random | None = None,
    ) -> None:
        check_ttl(lease_ttl_ms)
        self.policy = policy or InstancePolicy()
        self.lease_ttl_ms = lease_ttl_ms
        self.ask_timeout = ask_timeout
        self._scheduler = Scheduler() if timers is None else None
        self._closed = False
        self._close_lock = threading.Lock()
        # Probes go straight to the servers (never through a proxy), each with its own
        # timeout; see _probe_client for why not httpx.
        client = ProbeClient()
        self._ctx = Context(
            timers=timers or self._scheduler,  # type: ignore[arg-type]
            board=StatusBoard(),
            client=client,
            state_dir=Path(state_dir) if state_dir is not None else default_state_dir(),
            rng=rng or random.Random(),  # noqa: S311 - backoff jitter
            policy=self.policy,
            lease_ttl_ms=lease_ttl_ms,
        )
        self._ctx.broker = LeaseBroker.start(context=self._ctx)
        self._ctx.supervisor = Supervisor.start(context=self._ctx)
        _open.add(self)

    # -- context manager --------------------------------------------------------------

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._ctx.board.all())} instances"
        return f"<Runtime {state} state_dir={str(self._ctx.state_dir)!r}>"

    @property
    def state_dir(self) -> Path:
        """The folder holding this runtime's server ledger and per-instance logs."""
        return self._ctx.state_dir

    # -- resolving ----------------------------------------------------------------------

    def resolve_endpoint(
        self,
        spec: BootSpec | Mapping[str, Any],
        consumer: Consumer | None = None,
        *,
        owner_ref: str | None = None,
        ttl_ms: int | None = None,
        policy: InstancePolicy | None = None,
        timeout: float = DEFAULT_RESOLVE_TIMEOUT,
    ) -> Resolution:
        """Check compatibility, spawn or reuse the instance for ``spec``, wait until it
        is ready, and lease its endpoint to ``owner_ref`` for ``ttl_ms``.

        Concurrent callers with the same identity share one spawn and one readiness
        wait. Raises :class:`IncompatibleError` before anything is spawned,
        :class:`ServerExitedError` or :class:`ReadinessTimeoutError` when the server
        cannot come up, and :class:`WaitTimeoutError` when ``timeout`` passes (the
        instance keeps starting for others; nothing is leased to this caller).
        """
        request = self._resolve_request(
            spec,
            consumer,
            owner_ref=owner_ref,
            ttl_ms=ttl_ms,
            policy=policy,
            timeout=timeout,
            future=pykka.ThreadingFuture(),
        )
        self._send(request)
        resolution: Resolution = self._wait(request)
        return resolution

    def ensure_instance(
        self,
        spec: BootSpec | Mapping[str, Any],
        *,
        policy: InstancePolicy | None = None,
        timeout: float = DEFAULT_RESOLVE_TIMEOUT,
    ) -> RuntimeSnapshot:
        """Spawn or reuse the instance for ``spec`` and wait until it is ready, without
        taking a lease. Returns its snapshot."""
        request = self._ensure_request(
            spec, policy=policy, timeout=timeout, future=pykka.ThreadingFuture()
        )
        self._send(request)
        snapshot: RuntimeSnapshot = self._wait(request)
        return snapshot

    # -- leases -------------------------------------------------------------------------

    def renew(self, lease_ref: str, ttl_ms: int | None = None) -> Lease:
        """Extend a live lease to now + ``ttl_ms`` (its own TTL by default).

        Raises :class:`LeaseExpiredError` or :class:`LeaseNotFoundError` when it is gone.
        """
        request = self._renew_request(lease_ref, ttl_ms, pykka.ThreadingFuture())
        self._send(request)
        lease: Lease = self._wait(request)
        return lease

    def release(self, lease_ref: str) -> bool:
        """End a lease. Idempotent: True if it was live, False if it had already ended."""
        request = self._release_request(lease_ref, pykka.ThreadingFuture())
        if request is None:
            return False
        self._send(request)
        released: bool = self._wait(request)
        return released

    # -- looking ------------------------------------------------------------------------

    def snapshot(self, instance_id: str) -> RuntimeSnapshot:
        """A frozen picture of one instance; answers at once from any thread."""
        snap = self._ctx.board.snapshot(instance_id)
        if snap is None:
            raise InstanceNotFoundError(
                f"no instance {instance_id!r} in this runtime; see Runtime.instances()",
                instance_id=instance_id,
            )
        return snap

    def instances(self) -> list[RuntimeSnapshot]:
        """Snapshots of every instance this runtime started, stopped and failed ones too."""
        return self._ctx.board.all()

    def statistics(self) -> RuntimeStatistics:
        """Counts of instances by state and health, live leases and restarts, at once."""
        snaps = self._ctx.board.all()
        return RuntimeStatistics(
            instances=len(snaps),
            states=dict(Counter(s.state for s in snaps)),
            health=dict(Counter(s.health for s in snaps)),
            leases=sum(s.lease_count for s in snaps),
            restarts=sum(s.restart_count for s in snaps),
        )

    def published_endpoint(self, instance_id: str) -> EndpointDescriptor:
        """The published (lease-less) endpoint of a ready instance."""
        snap = self.snapshot(instance_id)
        endpoint = self._ctx.board.endpoint(instance_id)
        if endpoint is None or snap.state != "ready":
            raise NotReadyError(
                f"instance {instance_id} is {snap.state}, so it publishes no endpoint; "
                "wait for it with wait_healthy() or resolve_endpoint()",
                instance_id=instance_id,
            )
        return endpoint

    def wait_healthy(self, instance_id: str, timeout: float) -> RuntimeSnapshot:
        """Wait until the instance is ready and healthy; returns its snapshot.

        Raises :class:`InstanceFailedError` if it fails or stops first and
        :class:`WaitTimeoutError` when ``timeout`` passes.
        """
        changed = threading.Event()

        def wake(_sender: object, **_: object) -> None:
            changed.set()

        for signal in HEALTH_SIGNALS:
            signal.connect(wake, sender=instance_id, weak=False)
        try:
            deadline = _now() + timeout
            while True:
                changed.clear()
                snap = self.snapshot(instance_id)
                if healthy_or_raise(snap, timeout, deadline - _now()):
                    return snap
                changed.wait(deadline - _now())
        finally:
            # No sender here: blinker's disconnect(fn, sender=...) keeps fn connected
            # (and strongly held) with no sender, so each wait would leak a receiver.
            for signal in HEALTH_SIGNALS:
                signal.disconnect(wake)

    # -- stopping -----------------------------------------------------------------------

    def stop_instance(
        self, instance_id: str, *, drain_timeout: float | None = None, timeout: float | None = None
    ) -> RuntimeSnapshot:
        """Stop an instance: no new leases, holders are told (``instance_draining``) and
        given ``drain_timeout`` seconds (the policy's ``drain_timeout_ms`` by default)
        to release, then SIGTERM, then SIGKILL after the spec's ``stop_timeout_ms``.
        Idempotent; returns the final snapshot."""
        request = self._stop_request(instance_id, drain_timeout, timeout, pykka.ThreadingFuture())
        self._send(request)
        result: RuntimeSnapshot = self._wait(request)
        return result

    def close(self, timeout: float = 60.0) -> None:
        """Stop every instance (no drain), stop the actors and join their threads.

        Idempotent. Servers that ignore SIGTERM are killed after their ``stop_timeout_ms``.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _open.discard(self)
        future: pykka.ThreadingFuture[None] = pykka.ThreadingFuture()
        try:
            if tell(self._ctx.supervisor, Close(reply=future)):
                future.get(timeout=timeout)
        except pykka.Timeout:
            log.error("runtime close: instances did not stop within %gs; killing them", timeout)
        finally:
            self._shutdown_actors(timeout)

    def _shutdown_actors(self, timeout: float) -> None:
        for ref in (self._ctx.supervisor, self._ctx.broker):
            if ref is not None:
                with contextlib.suppress(pykka.Timeout, pykka.ActorDeadError):
                    ref.stop(block=True, timeout=timeout)
        joined: set[threading.Thread] = set()
        while True:  # actors stopping may have started others: join until none is new
            with self._ctx.threads_lock:
                threads = [t for t in self._ctx.threads if t not in joined]
            if not threads:
                break
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join(timeout)
                joined.add(thread)
        if self._scheduler is not None:
            self._scheduler.close()
        self._ctx.client.close()

    # -- the actor face -----------------------------------------------------------------

    @property
    def actor_ref(self) -> pykka.ActorRef[Supervisor]:
        """The supervisor actor; ``runtime.actor_ref.proxy()`` is the non-blocking face."""
        if self._ctx.supervisor is None:
            raise RuntimeClosedError("this Runtime has no supervisor")
        return self._ctx.supervisor

    def proxy(self) -> pykka.ActorProxy[Supervisor]:
        """A pykka proxy of the supervisor, for code that lives in actors."""
        return self.actor_ref.proxy()

    # -- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError("this Runtime is closed; create a new one")

    def _tell(self, message: Any) -> None:
        if not tell(self._ctx.supervisor, message):
            raise RuntimeClosedError("this Runtime's supervisor has stopped; create a new Runtime")

    # Each blocking call is built as a Request (checked in the caller's thread), sent,
    # then waited for. The asyncio face (llama_actors._aio) builds and sends the same
    # requests and awaits their answers instead of blocking on them.

    def _resolve_request(
        self,
        spec: BootSpec | Mapping[str, Any],
        consumer: Consumer | None,
        *,
        owner_ref: str | None,
        ttl_ms: int | None,
        policy: InstancePolicy | None,
        timeout: float,
        future: pykka.Future[Any],
    ) -> Request:
        self._check_open()
        message = resolve_message(
            spec,
            consumer,
            owner_ref=owner_ref,
            ttl_ms=ttl_ms,
            policy=policy,
            defaults=(self.lease_ttl_ms, self.policy),
            reply=future,
        )
        what = f"an endpoint for {message.spec.alias}"
        return Request(message, future, timeout, what, False, message.request_id, message.spec)

    def _ensure_request(
        self,
        spec: BootSpec | Mapping[str, Any],
        *,
        policy: InstancePolicy | None,
        timeout: float,
        future: pykka.Future[Any],
    ) -> Request:
        self._check_open()
        message = ensure_message(spec, policy or self.policy, future)
        what = f"instance {message.spec.alias}"
        return Request(message, future, timeout, what, False, message.request_id, message.spec)

    def _renew_request(
        self, lease_ref: str, ttl_ms: int | None, future: pykka.Future[Any]
    ) -> Request:
        self._check_open()
        if ttl_ms is not None:
            check_ttl(ttl_ms)
        message = RenewLease(lease_ref=lease_ref, ttl_ms=ttl_ms, reply=future)
        return Request(message, future, self.ask_timeout, f"renewing {lease_ref}", to_broker=True)

    def _release_request(self, lease_ref: str, future: pykka.Future[Any]) -> Request | None:
        """None when the runtime is closed (every lease has ended then)."""
        if self._closed:
            return None
        message = ReleaseLease(lease_ref=lease_ref, reply=future)
        return Request(message, future, self.ask_timeout, f"releasing {lease_ref}", to_broker=True)

    def _stop_request(
        self,
        instance_id: str,
        drain_timeout: float | None,
        timeout: float | None,
        future: pykka.Future[Any],
    ) -> Request:
        self._check_open()
        snap = self.snapshot(instance_id)
        message = StopRequest(
            instance_id=instance_id,
            reason="stop_instance()",
            drain_timeout_s=drain_timeout,
            reply=future,
        )
        if timeout is None:
            timeout = (
                drain_timeout if drain_timeout is not None else self.policy.drain_timeout_ms / 1000
            ) + 30.0
        return Request(message, future, timeout, f"stopping {snap.instance_id}")

    def _send(self, request: Request) -> None:
        message = request.message
        if isinstance(message, Resolve) and (grant := self._direct_grant(message)) is not None:
            # The instance is ready: straight to the broker, one hop fewer. Should it be
            # draining or gone by then, the broker hands the resolve to the supervisor.
            if not tell(self._ctx.broker, grant):
                raise RuntimeClosedError("this Runtime's broker has stopped; create a new one")
        elif request.to_broker:
            tell(self._ctx.broker, message)
        else:
            self._tell(message)

    def _direct_grant(self, message: Resolve) -> GrantLease | None:
        found = self._ctx.board.ready_endpoint(message.spec.instance_key)
        if found is None:
            return None
        iid, endpoint = found
        return GrantLease.for_resolve(message, iid, endpoint, reused=True, fallback=message)

    def _wait(self, request: Request) -> Any:
        try:
            return request.future.get(timeout=request.timeout)
        except pykka.Timeout:
            raise self._timed_out(request) from None
        except LlamaActorsError as exc:
            # Raised again from here, so the traceback ends in the caller's frame.
            raise exc.with_traceback(None) from None

    def _abandon(self, request: Request) -> None:
        """The caller stopped waiting: the supervisor forgets the request, and a lease
        granted for it in the meantime is released, so none leaks."""
        if request.request_id is not None:
            tell(self._ctx.supervisor, CancelRequest(request_id=request.request_id))

    def _timed_out(self, request: Request) -> WaitTimeoutError:
        """Abandon ``request`` and say what timed out (raise what this returns)."""
        self._abandon(request)
        return WaitTimeoutError(
            f"no answer for {request.what} within {request.timeout:g}s"
            f"{self._describe(request.spec)}"
        )

    def _describe(self, spec: BootSpec | None) -> str:
        if spec is None:
            return ""
        for snap in self._ctx.board.all():
            if snap.instance_key == spec.instance_key and snap.state in ("starting", "ready"):
                return (
                    f"; instance {snap.instance_id} is {snap.state} and keeps going for other "
                    f"callers (log: {snap.log_path})"
                )
        return ""


def healthy_or_raise(snap: RuntimeSnapshot, timeout: float, remaining: float) -> bool:
    """One step of wait_healthy(): True once ``snap`` is ready and healthy,
    :class:`InstanceFailedError` once it failed or stopped, :class:`WaitTimeoutError`
    when no time is ``remaining``, else False (wait for the next signal)."""
    if snap.state == "ready" and snap.health == "healthy":
        return True
    if snap.state in ("failed", "stopped"):
        raise InstanceFailedError(
            f"instance {snap.instance_id} is {snap.state}"
            f"{': ' + snap.last_error if snap.last_error else ''}",
            instance_id=snap.instance_id,
            reason=snap.last_error or snap.state,
        )
    if remaining <= 0:
        raise WaitTimeoutError(
            f"instance {snap.instance_id} is not healthy after {timeout:g}s "
            f"(state {snap.state}, health {snap.health}); it keeps running"
        )
    return False


def _now() -> float:
    return time.monotonic()


@atexit.register
def close_open_runtimes() -> None:
    """Close every Runtime of this process that is still open (at interpreter exit)."""
    for runtime in list(_open):
        runtime.close(timeout=10.0)

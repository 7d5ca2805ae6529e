"""Runtime: the public entry point. It starts the actors, hands out leased endpoints,
and closing it stops every instance it started and joins every actor thread.

Every call here is synchronous and bounded by a timeout. The same requests, built and
sent the same way (see ``calls.py``), are awaitable through
:class:`~llama_actors.AsyncRuntime` and answer to an actor through
:meth:`Runtime.actor_face`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import random
import threading
import time
import weakref
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pykka

from llama_actors._base.clock import Scheduler, Timers
from llama_actors._base.state import default_state_dir
from llama_actors._exceptions import (
    InstanceFailedError,
    InstanceNotFoundError,
    NotReadyError,
    UsageError,
    WaitTimeoutError,
)
from llama_actors._kernel.backend import BackendSpec
from llama_actors._kernel.memory import Capacity, Gpu, detect_gpus
from llama_actors._kernel.policy import InstancePolicy
from llama_actors._kernel.probe_client import ProbeClient
from llama_actors._kernel.types import (
    EndpointDescriptor,
    Ensured,
    HostStatus,
    Lease,
    Resolution,
    RuntimeSnapshot,
    RuntimeStatistics,
)
from llama_actors._runtime.actor_face import ActorFace
from llama_actors._runtime.board import StatusBoard
from llama_actors._runtime.broker import LeaseBroker
from llama_actors._runtime.calls import Calls, LeaseLike
from llama_actors._runtime.context import Context, tell
from llama_actors._runtime.hosts import HostMonitor, HostSource
from llama_actors._runtime.messages import Close
from llama_actors._runtime.requests import Consumer, check_ttl
from llama_actors._runtime.signals import health_changed, instance_failed, instance_stopped
from llama_actors._runtime.supervisor import Supervisor

__all__ = ["Runtime"]

log = logging.getLogger("llama_actors.runtime")

DEFAULT_LEASE_TTL_MS = 60_000
DEFAULT_RESOLVE_TIMEOUT = 120.0
DEFAULT_ASK_TIMEOUT = 10.0
_open: weakref.WeakSet[Runtime] = weakref.WeakSet()
#: The signals that can change the answer of wait_healthy().
HEALTH_SIGNALS = (health_changed, instance_failed, instance_stopped)


class Runtime:
    """Supervised llama-server instances behind leased endpoints.

    ``policy`` is the default :class:`InstancePolicy` (a resolve may pass its own for a
    new instance); ``lease_ttl_ms`` the default lease TTL; ``timers`` replaces the real
    clock and scheduler (tests); ``state_dir`` holds the server ledger and logs.
    ``capacity`` caps the memory its instances may hold (:class:`Capacity`; None: no
    cap, estimates and measured figures are still kept): a new instance that does not
    fit evicts idle ones, waits for room, or fails with
    :class:`InsufficientMemoryError` (see guides/memory-and-admission.md).

    ``hosts`` runs its servers on other hosts (``llama_actors.ray.RayHosts``): each
    host's agent runs them there, while this runtime stays the one authority for
    leases, health, signals and admission, and places each new instance by its spec's
    ``host_labels`` and ``host_gpus`` and by fit (see guides/hosts.md). Attached
    servers stay here. ``connect_timeout`` bounds reaching the hosts.
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
        capacity: Capacity | None = None,
        hosts: HostSource | None = None,
        connect_timeout: float = 60.0,
    ) -> None:
        check_ttl(lease_ttl_ms)
        _check_capacity(capacity)
        _check_hosts(hosts)
        # First, so a host source that fails leaves nothing of this runtime running.
        joined = hosts.connect(connect_timeout) if hosts is not None else []
        capped = any(info.capacity.limits() for _agent, info in joined)
        if hosts is not None and capped and importlib.util.find_spec("gguf") is None:
            hosts.close()
            raise UsageError(
                "these hosts cap their memory, so the head estimates each llama.cpp instance "
                "from its GGUF header, which needs the gguf package here: pip install "
                "'llama-actors[memory]' (or cap nothing: RayHosts(capacity=Capacity()))"
            )
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
            capacity=capacity,
            gpus=_gpus(capacity),
        )
        self._hosts = hosts
        if hosts is not None:
            self._ctx.hosted = True
            self._ctx.host_capacity = {info.host_id: info.capacity for _a, info in joined}
        self._ctx.broker = LeaseBroker.start(context=self._ctx)
        self._ctx.supervisor = Supervisor.start(
            context=self._ctx,
            placement=hosts.placement if hosts is not None else "spread",
            hosts=joined,
        )
        self._monitors = [
            HostMonitor.start(
                host_id=info.host_id,
                agent=agent,
                interval_s=hosts.check_interval_s if hosts is not None else 1.0,
                misses=hosts.lost_after_misses if hosts is not None else 2,
                timeout_s=hosts.check_timeout_s if hosts is not None else None,
                context=self._ctx,
            )
            for agent, info in joined
        ]
        self._calls = Calls(
            self._ctx,
            lease_ttl_ms=lease_ttl_ms,
            policy=self.policy,
            ask_timeout=ask_timeout,
            closed=lambda: self._closed,
        )
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
        spec: BackendSpec | Mapping[str, Any],
        consumer: Consumer | None = None,
        *,
        owner_ref: str | None = None,
        ttl_ms: int | None = None,
        renewable: bool = True,
        metadata: Mapping[str, Any] | None = None,
        policy: InstancePolicy | None = None,
        timeout: float = DEFAULT_RESOLVE_TIMEOUT,
        wait_for_memory: bool = True,
    ) -> Resolution:
        """Check compatibility, spawn or reuse the instance for ``spec``, wait until it
        is ready, and lease its endpoint to ``owner_ref`` for ``ttl_ms``.

        The lease carries ``metadata``; with ``renewable=False`` it cannot be renewed.
        The leased endpoint names the protocol the consumer was matched on
        (``openai_embeddings`` for an embeddings consumer).
        Concurrent callers with the same identity share one spawn and one readiness
        wait. Raises :class:`IncompatibleError` before anything is spawned,
        :class:`ServerExitedError` or :class:`ReadinessTimeoutError` when the server
        cannot come up, and :class:`WaitTimeoutError` when ``timeout`` passes (the
        instance keeps starting for others; nothing is leased to this caller).

        Under a ``capacity``, a new instance that does not fit first evicts instances
        nobody holds a lease on or waits for (least recently used first), then waits
        for room up to ``timeout``; :class:`InsufficientMemoryError` (naming what it
        needs, what is free and who holds the rest) when the time passes, at once when
        the spec is larger than the whole capacity, or at once when it would have to
        wait and ``wait_for_memory`` is False.
        """
        call = self._calls.resolve(
            spec,
            consumer,
            owner_ref=owner_ref,
            ttl_ms=ttl_ms,
            renewable=renewable,
            metadata=metadata,
            policy=policy,
            timeout=timeout,
            reply=pykka.ThreadingFuture(),
            wait_for_memory=wait_for_memory,
        )
        resolution: Resolution = self._calls.wait(call)
        return resolution

    def lease_instance(
        self,
        instance_id: str,
        consumer: Consumer | None = None,
        *,
        owner_ref: str | None = None,
        ttl_ms: int | None = None,
        renewable: bool = True,
        metadata: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_RESOLVE_TIMEOUT,
    ) -> Resolution:
        """Lease the running instance ``instance_id`` (from :meth:`ensure_instance` or
        :meth:`instances`), as :meth:`resolve_endpoint` leases the instance of a spec.

        ``consumer`` is checked against that instance's backend manifest
        (:class:`IncompatibleError`). An instance still starting is waited for, up to
        ``timeout``; an unknown one raises :class:`InstanceNotFoundError`, and one that
        is stopping, stopped or failed :class:`NotReadyError`. ``reused`` is True.
        """
        call = self._calls.lease_instance(
            instance_id,
            consumer,
            owner_ref=owner_ref,
            ttl_ms=ttl_ms,
            renewable=renewable,
            metadata=metadata,
            timeout=timeout,
            reply=pykka.ThreadingFuture(),
        )
        resolution: Resolution = self._calls.wait(call)
        return resolution

    def ensure_instance(
        self,
        spec: BackendSpec | Mapping[str, Any],
        *,
        policy: InstancePolicy | None = None,
        timeout: float = DEFAULT_RESOLVE_TIMEOUT,
        wait_for_memory: bool = True,
    ) -> Ensured:
        """Spawn or reuse the instance for ``spec`` and wait until it is ready, without
        taking a lease. Returns its snapshot and whether it was already there. Memory
        admission works as for :meth:`resolve_endpoint`; an instance that was only
        ensured holds no lease, so it may be evicted once it is ready."""
        call = self._calls.ensure(
            spec,
            policy=policy,
            timeout=timeout,
            reply=pykka.ThreadingFuture(),
            wait_for_memory=wait_for_memory,
        )
        ensured: Ensured = self._calls.wait(call)
        return ensured

    # -- leases -------------------------------------------------------------------------

    def renew(self, lease_ref: LeaseLike, ttl_ms: int | None = None) -> Lease:
        """Extend a live lease to now + ``ttl_ms`` (its own TTL by default). The lease
        is named by its ref, the :class:`Lease` or the leased endpoint.

        Raises :class:`LeaseExpiredError` or :class:`LeaseNotFoundError` when it is gone,
        and :class:`LeaseNotRenewableError` for a lease granted with ``renewable=False``.
        """
        lease: Lease = self._calls.wait(
            self._calls.renew(lease_ref, ttl_ms, pykka.ThreadingFuture())
        )
        return lease

    def release(self, lease_ref: LeaseLike) -> bool:
        """End a lease (its ref, the :class:`Lease` or the leased endpoint). Idempotent:
        True if it was live, False if it had already ended."""
        call = self._calls.release(lease_ref, pykka.ThreadingFuture())
        if call is None:
            return False
        released: bool = self._calls.wait(call)
        return released

    def report(
        self, lease: str | Lease | EndpointDescriptor, ok: bool, *, detail: str | None = None
    ) -> None:
        """Say how a request on a leased endpoint went: ``ok`` False when it failed or
        timed out, with ``detail`` saying how.

        ``lease`` is the lease ref, the :class:`Lease` or the leased endpoint. It
        returns at once (the outcome is told, not asked). Failures reported within
        ``report_window_ms`` make the instance ``degraded`` after
        ``report_degraded_after`` of them and ``unavailable`` after
        ``report_unavailable_after`` (its policy), without waiting for a probe; a
        reported success clears them. An outcome on a lease that has ended counts for
        nothing. :mod:`llama_actors.clients` wires this into httpx and OpenAI clients.
        """
        self._calls.report(lease, ok, detail)

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
        """Counts of instances by state and health, live leases and restarts, and
        memory per resource (capacity, used, free, queued requests, evictions), at once."""
        snaps = self._ctx.board.all()
        return RuntimeStatistics(
            instances=len(snaps),
            states=dict(Counter(s.state for s in snaps)),
            health=dict(Counter(s.health for s in snaps)),
            leases=sum(s.lease_count for s in snaps),
            restarts=sum(s.restart_count for s in snaps),
            memory=self._ctx.board.memory_statistics(),
        )

    def hosts(self) -> list[HostStatus]:
        """Every host of this runtime (empty without hosts): up or lost, its address,
        labels, memory and how many instances it runs; answers at once."""
        return self._ctx.board.hosts()

    @property
    def capacity(self) -> Capacity | None:
        """The memory this runtime's instances may hold (None: not capped)."""
        return self._ctx.capacity

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
        call = self._calls.stop(
            instance_id,
            drain_timeout=drain_timeout,
            timeout=timeout,
            reply=pykka.ThreadingFuture(),
        )
        result: RuntimeSnapshot = self._calls.wait(call)
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
            if self._hosts is not None:
                try:
                    self._hosts.close()
                except Exception:
                    log.exception("runtime close: closing the hosts failed")

    def _shutdown_actors(self, timeout: float) -> None:
        for ref in (*self._monitors, self._ctx.supervisor, self._ctx.broker):
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

    # -- the other faces -----------------------------------------------------------------

    def actor_face(self, reply_to: pykka.ActorRef[Any] | pykka.Future[Any]) -> ActorFace:
        """This runtime for code that lives in a pykka actor: each call checks its
        input and sends its request in your thread, returns the request id at once, and
        the answer is told to ``reply_to`` as a :class:`~llama_actors.Replied` with that
        id (or set on ``reply_to`` if it is a pykka future). Nothing waits, so an actor
        never blocks on the runtime."""
        return ActorFace(self._calls, reply_to)


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


def _check_capacity(capacity: object) -> None:
    if capacity is None:
        return
    if not isinstance(capacity, Capacity):
        raise UsageError(
            f"capacity must be a llama_actors.Capacity, such as Capacity(ram_mib=8000) or "
            f"Capacity.detect() (got {capacity!r})"
        )
    if importlib.util.find_spec("gguf") is None:
        raise UsageError(
            "a Runtime with a capacity estimates each llama.cpp instance's memory from its "
            "GGUF header, which needs the gguf package: pip install 'llama-actors[memory]'"
        )


def _check_hosts(hosts: object) -> None:
    if hosts is not None and not isinstance(hosts, HostSource):
        raise UsageError(
            "hosts must be a host source such as llama_actors.ray.RayHosts(address='auto') "
            f"(got {hosts!r})"
        )


def _gpus(capacity: Capacity | None) -> tuple[Gpu, ...]:
    """The GPUs estimates place layers on: the capacity's, else those NVML finds."""
    if capacity is not None and capacity.gpus is not None:
        return capacity.gpus
    return tuple(detect_gpus())


def _now() -> float:
    return time.monotonic()


@atexit.register
def close_open_runtimes() -> None:
    """Close every Runtime of this process that is still open (at interpreter exit)."""
    for runtime in list(_open):
        runtime.close(timeout=10.0)

"""Every request of a runtime, built once and sent one way.

As httpx splits building a request from sending it, :class:`Calls` builds each request
(checked in the caller's thread: spec, consumer, model file, launch plan, lease options)
into a :class:`Call` and sends it down the one route :func:`route` picks. The three faces of a
runtime only differ in the reply target they pass and in how they wait for it:

- :class:`~llama_actors.Runtime` passes a ``pykka.ThreadingFuture`` and blocks on it
  (:meth:`Calls.wait`);
- :class:`~llama_actors.AsyncRuntime` passes a future that also completes an asyncio
  future, and awaits that;
- the actor face (:meth:`Runtime.actor_face`) passes an actor's ref, which is told a
  :class:`~llama_actors.Replied`, and does not wait at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pykka

from llama_actors._exceptions import (
    InsufficientMemoryError,
    LlamaActorsError,
    RuntimeClosedError,
    UsageError,
    WaitTimeoutError,
)
from llama_actors._kernel.backend import Backend, BackendSpec
from llama_actors._kernel.memory import Gpu, MemoryNeed
from llama_actors._kernel.policy import InstancePolicy
from llama_actors._kernel.types import EndpointDescriptor, Lease
from llama_actors._runtime.board import StatusBoard
from llama_actors._runtime.context import Context, tell
from llama_actors._runtime.messages import (
    CancelRequest,
    Ensure,
    GrantLease,
    LeaseInstance,
    Message,
    ReleaseLease,
    RenewLease,
    ReportOutcome,
    Resolve,
    StopRequest,
)
from llama_actors._runtime.requests import (
    Consumer,
    check_consumer,
    check_lease_options,
    check_ttl,
    instance_not_found,
    launches,
    no_new_leases,
    prepare,
    request_id,
)

__all__ = ["Call", "Calls", "LeaseLike", "lease_ref_of", "route"]

_DETAIL_MAX = 500

#: A reply target: a future to set, or an actor to tell a ``Replied``.
Reply = pykka.Future[Any] | pykka.ActorRef[Any] | None

log = logging.getLogger("llama_actors.runtime")

#: What names a lease: its ref, the :class:`Lease`, or the leased endpoint.
LeaseLike = str | Lease | EndpointDescriptor


@dataclass(frozen=True, eq=False)
class Call:
    """One checked request: its message, how long its caller may wait, and what to say
    when that time passes. ``request_id`` names a resolve or ensure the supervisor
    must forget (and whose lease it must end) when its caller stops waiting."""

    message: Message
    reply: Reply
    timeout: float
    what: str
    request_id: str
    spec: BackendSpec | None = None


def route(message: Message, ctx: Context) -> tuple[pykka.ActorRef[Any] | None, Message]:
    """Which actor a request goes to, and as what.

    Renewals, releases and reported outcomes go to the LeaseBroker; everything else
    to the Supervisor, except a resolve or a lease_instance whose instance is already
    ready: that goes straight to the broker as a grant, one hop fewer on the path every
    warm resolve takes. If the instance is not ready by the time the broker sees it (restarting,
    draining or gone), the broker hands the request to the supervisor, which parks it
    until the instance is ready again, starts a fresh one or refuses it, so the
    shortcut never changes an answer.
    """
    if isinstance(message, RenewLease | ReleaseLease | ReportOutcome):
        return ctx.broker, message
    if isinstance(message, Resolve):
        found = ctx.board.ready_endpoint(message.spec.instance_key)
        if found is not None:
            iid, endpoint = found
            return ctx.broker, GrantLease.for_request(message, iid, endpoint, reused=True)
    if isinstance(message, LeaseInstance):
        ready = ctx.board.endpoint_if_ready(message.instance_id)
        if ready is not None:
            grant = GrantLease.for_request(message, message.instance_id, ready, reused=True)
            return ctx.broker, grant
    return ctx.supervisor, message


class Calls:
    """Builds and sends the requests of one runtime; see the module docstring."""

    def __init__(
        self,
        ctx: Context,
        *,
        lease_ttl_ms: int,
        policy: InstancePolicy,
        ask_timeout: float,
        closed: Callable[[], bool],
    ) -> None:
        self.ctx = ctx
        self.lease_ttl_ms = lease_ttl_ms
        self.policy = policy
        self.ask_timeout = ask_timeout
        self._closed = closed

    @property
    def board(self) -> StatusBoard:
        return self.ctx.board

    # -- building -----------------------------------------------------------------------

    def resolve(
        self,
        spec: BackendSpec | Mapping[str, Any],
        consumer: Consumer | None,
        *,
        owner_ref: str | None,
        ttl_ms: int | None,
        renewable: bool = True,
        metadata: Mapping[str, Any] | None = None,
        policy: InstancePolicy | None,
        timeout: float,
        reply: Reply,
        wait_for_memory: bool = True,
    ) -> Call:
        self._check_open()
        ttl = check_ttl(self.lease_ttl_ms if ttl_ms is None else ttl_ms)
        lease_metadata = check_lease_options(renewable, metadata)
        _check_wait(wait_for_memory)
        backend, spec, result, plan = prepare(spec, consumer, hosted=self.ctx.hosted)
        hosted = self.ctx.hosted and launches(backend)
        rid = request_id()
        message = Resolve(
            request_id=rid,
            backend=backend,
            spec=spec,
            plan=plan,
            compatibility=result,
            owner_ref=owner_ref,
            ttl_ms=ttl,
            renewable=renewable,
            metadata=lease_metadata,
            policy=policy or self.policy,
            reply=reply,
            need=None if hosted else self._estimate(backend, spec),
            wait_for_memory=wait_for_memory,
            hosted=hosted,
            needs=self._host_estimates(backend, spec) if hosted else {},
        )
        return Call(message, reply, timeout, f"an endpoint for {spec.alias}", rid, spec)

    def lease_instance(
        self,
        instance_id: str,
        consumer: Consumer | None,
        *,
        owner_ref: str | None,
        ttl_ms: int | None,
        renewable: bool = True,
        metadata: Mapping[str, Any] | None = None,
        timeout: float,
        reply: Reply,
    ) -> Call:
        self._check_open()
        ttl = check_ttl(self.lease_ttl_ms if ttl_ms is None else ttl_ms)
        lease_metadata = check_lease_options(renewable, metadata)
        snapshot = self.board.snapshot(instance_id)
        manifest = self.board.manifest(instance_id)
        if snapshot is None or manifest is None:
            raise instance_not_found(instance_id)
        if snapshot.state in ("stopping", "stopped", "failed"):
            raise no_new_leases(instance_id, snapshot.state)
        result = check_consumer(consumer, manifest)
        rid = request_id()
        message = LeaseInstance(
            request_id=rid,
            instance_id=instance_id,
            compatibility=result,
            owner_ref=owner_ref,
            ttl_ms=ttl,
            renewable=renewable,
            metadata=lease_metadata,
            reply=reply,
        )
        return Call(message, reply, timeout, f"a lease on instance {instance_id}", rid)

    def ensure(
        self,
        spec: BackendSpec | Mapping[str, Any],
        *,
        policy: InstancePolicy | None,
        timeout: float,
        reply: Reply,
        wait_for_memory: bool = True,
        instance_id: str | None = None,
    ) -> Call:
        """``instance_id`` (a host agent's call, for the head) starts exactly that
        instance, never sharing one of the same spec."""
        self._check_open()
        _check_wait(wait_for_memory)
        backend, spec, _, plan = prepare(spec, None, hosted=self.ctx.hosted)
        hosted = self.ctx.hosted and launches(backend)
        rid = request_id()
        message = Ensure(
            request_id=rid,
            backend=backend,
            spec=spec,
            plan=plan,
            policy=policy or self.policy,
            reply=reply,
            need=None if hosted else self._estimate(backend, spec),
            wait_for_memory=wait_for_memory,
            hosted=hosted,
            needs=self._host_estimates(backend, spec) if hosted else {},
            instance_id=instance_id,
        )
        return Call(message, reply, timeout, f"instance {spec.alias}", rid, spec)

    def renew(self, lease: LeaseLike, ttl_ms: int | None, reply: Reply) -> Call:
        """``lease`` is a ref, a :class:`Lease` or a leased endpoint (any string is a
        ref: one never granted is not found, as the contract says)."""
        self._check_open()
        lease_ref = lease if isinstance(lease, str) else lease_ref_of(lease)
        if ttl_ms is not None:
            check_ttl(ttl_ms)
        message = RenewLease(lease_ref=lease_ref, ttl_ms=ttl_ms, reply=reply)
        return Call(message, reply, self.ask_timeout, f"renewing {lease_ref}", lease_ref)

    def release(self, lease: LeaseLike, reply: Reply) -> Call | None:
        """None when the runtime is closed: every lease has ended then."""
        lease_ref = lease if isinstance(lease, str) else lease_ref_of(lease)
        if self._closed():
            return None
        message = ReleaseLease(lease_ref=lease_ref, reply=reply)
        return Call(message, reply, self.ask_timeout, f"releasing {lease_ref}", lease_ref)

    def report(self, lease: str | Lease | EndpointDescriptor, ok: bool, detail: str | None) -> None:
        """Send a caller's outcome on its lease (told, never answered: it must not slow
        the request path down). Dropped once the runtime is closed."""
        ref = lease_ref_of(lease)
        if not isinstance(ok, bool):
            raise UsageError(f"report(ok={ok!r}): ok must be True or False")
        if detail is not None and not isinstance(detail, str):
            raise UsageError(f"report(detail={detail!r}): detail must be a string or None")
        if self._closed():
            return
        text = (detail or ("ok" if ok else "failed (no detail given)"))[:_DETAIL_MAX]
        target, message = route(ReportOutcome(lease_ref=ref, ok=ok, detail=text), self.ctx)
        tell(target, message)

    def stop(
        self,
        instance_id: str,
        *,
        drain_timeout: float | None,
        timeout: float | None,
        reply: Reply,
    ) -> Call:
        self._check_open()
        if instance_id not in self.ctx.board:
            raise instance_not_found(instance_id)
        message = StopRequest(
            instance_id=instance_id,
            reason="stop_instance()",
            drain_timeout_s=drain_timeout,
            reply=reply,
        )
        if timeout is None:
            drain = self.policy.drain_timeout_s if drain_timeout is None else drain_timeout
            timeout = drain + 30.0
        return Call(message, reply, timeout, f"stopping {instance_id}", instance_id)

    # -- sending and waiting --------------------------------------------------------------

    def send(self, call: Call) -> None:
        """Send ``call`` down its route (:func:`route`)."""
        target, message = route(call.message, self.ctx)
        if not tell(target, message):
            raise RuntimeClosedError("this Runtime's actors have stopped; create a new Runtime")

    def wait(self, call: Call) -> Any:
        """Send ``call`` and block this thread on its future, up to its timeout."""
        future = call.reply
        if not isinstance(future, pykka.Future):
            raise TypeError("Calls.wait needs a call whose reply is a future")
        self.send(call)
        try:
            return future.get(timeout=call.timeout)
        except pykka.Timeout:
            raise self.timed_out(call) from None
        except LlamaActorsError as exc:
            # Raised again from here, so the traceback ends in the caller's frame.
            raise exc.with_traceback(None) from None

    def abandon(self, call: Call) -> None:
        """The caller stopped waiting: the supervisor forgets the request, and a lease
        granted for it in the meantime is released, so none leaks."""
        if isinstance(call.message, Resolve | Ensure | LeaseInstance):
            tell(self.ctx.supervisor, CancelRequest(request_id=call.request_id))

    def _estimate(self, backend: Backend, spec: BackendSpec) -> MemoryNeed | None:
        """The memory the spec's instance will need, from its backend (read here, in
        the caller's thread: the GGUF header is a file read, remembered per file).
        Skipped when the instance is already ready: admission only asks about new
        instances. Without a capacity an estimate that cannot be made is left out;
        with one, its error is the caller's (nothing is admitted unmeasured)."""
        if self.board.ready_endpoint(spec.instance_key) is not None:
            return None
        try:
            return backend.estimate_memory(spec, self.ctx.gpus)
        except LlamaActorsError as exc:
            if self.ctx.capacity is not None:
                raise
            log.debug("no memory estimate for %s: %s", spec.alias, exc)
            return None

    def _host_estimates(self, backend: Backend, spec: BackendSpec) -> dict[str, MemoryNeed]:
        """The spec's estimate on each host (its GPUs decide where layers go), made
        here as for a local one. Hosts with the same GPUs share one estimate. When a
        host caps its memory, an estimate that cannot be made is the caller's error
        (nothing is admitted unmeasured), as under a local capacity."""
        if self.board.ready_endpoint(spec.instance_key) is not None:
            return {}
        out: dict[str, MemoryNeed] = {}
        seen: dict[tuple[Gpu, ...], MemoryNeed | None] = {}
        for host_id, capacity in self.ctx.host_capacity.items():
            gpus = tuple(capacity.gpus or ())
            if gpus not in seen:
                try:
                    seen[gpus] = backend.estimate_memory(spec, gpus)
                except LlamaActorsError as exc:
                    if any(c.limits() for c in self.ctx.host_capacity.values()):
                        raise
                    log.debug("no memory estimate for %s: %s", spec.alias, exc)
                    seen[gpus] = None
            need = seen[gpus]
            if need is not None:
                out[host_id] = need
        return out

    def timed_out(self, call: Call) -> LlamaActorsError:
        """Abandon ``call`` and say what timed out (raise what this returns): an
        :class:`InsufficientMemoryError` when it was waiting for room."""
        waiting = self.ctx.board.memory_wait(call.request_id)
        self.abandon(call)
        if isinstance(waiting, InsufficientMemoryError):
            return InsufficientMemoryError(
                f"waited {call.timeout:g}s for memory: {waiting}",
                need=waiting.need,
                free=waiting.free,
                holders=waiting.holders,
                waited_s=call.timeout,
            )
        return WaitTimeoutError(
            f"no answer for {call.what} within {call.timeout:g}s{self._describe(call)}"
        )

    def _describe(self, call: Call) -> str:
        spec, message = call.spec, call.message
        for snap in self.ctx.board.all():
            ours = (spec is not None and snap.instance_key == spec.instance_key) or (
                isinstance(message, LeaseInstance) and snap.instance_id == message.instance_id
            )
            if ours and snap.state in ("starting", "ready"):
                where = f" (log: {snap.log_path})" if snap.log_path else ""
                return (
                    f"; instance {snap.instance_id} is {snap.state} and keeps going for other "
                    f"callers{where}"
                )
        return ""

    def _check_open(self) -> None:
        if self._closed():
            raise RuntimeClosedError("this Runtime is closed; create a new one")


def _check_wait(wait_for_memory: object) -> None:
    if not isinstance(wait_for_memory, bool):
        raise UsageError(f"wait_for_memory must be True or False (got {wait_for_memory!r})")


def lease_ref_of(lease: LeaseLike) -> str:
    """The lease ref of a lease, a leased endpoint or a ref; a clear error otherwise."""
    if isinstance(lease, str) and lease:
        return lease
    if isinstance(lease, Lease):
        return lease.lease_ref
    if isinstance(lease, EndpointDescriptor):
        if lease.lease_ref is None:
            raise UsageError(
                f"endpoint {lease.endpoint_id} is the published copy, which holds no lease: "
                "report on the endpoint resolve_endpoint or lease_instance handed you"
            )
        return lease.lease_ref
    raise UsageError(f"expected a lease ref, a Lease or a leased EndpointDescriptor, not {lease!r}")

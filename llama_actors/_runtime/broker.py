"""LeaseBroker: grants, renews, releases and expires leases for the whole runtime.

One actor, one lease table, one scheduled wake-up at the earliest expiry (not a timer
per lease). Expired leases are also swept before every message, so no lease is ever
seen alive past its TTL. It also runs each instance's idle policy and its drain.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import msgspec

from llama_actors._base.clock import TimerHandle
from llama_actors._exceptions import InstanceNotFoundError, LlamaActorsError, NotReadyError
from llama_actors._kernel.leases import LeaseTable
from llama_actors._kernel.manifest import CompatibilityResult
from llama_actors._kernel.types import EndpointDescriptor, Lease, Resolution, RuntimeSnapshot
from llama_actors._runtime.actor import RuntimeActor
from llama_actors._runtime.context import Context, deliver, tell, tell_later
from llama_actors._runtime.messages import (
    CancelGrant,
    DrainDeadline,
    Drained,
    DrainInstance,
    Evicted,
    EvictInstance,
    ExpireTick,
    GrantLease,
    IdleCheck,
    IdleExpired,
    InstanceGone,
    InstanceIdle,
    Message,
    OutcomeReported,
    ReleaseLease,
    RenewLease,
    ReportOutcome,
    TrackInstance,
)
from llama_actors._runtime.signals import (
    emit,
    instance_draining,
    lease_expired,
    lease_granted,
    lease_released,
    lease_renewed,
)

__all__ = ["LeaseBroker"]

log = logging.getLogger("llama_actors.runtime")
_REMEMBER_GRANTS = 10_000


class LeaseBroker(RuntimeActor):
    """The runtime's one lease authority; see the module docstring."""

    def __init__(self, *, context: Context) -> None:
        super().__init__(context=context)
        self.table = LeaseTable(context.timers.now)
        self._idle_s: dict[str, float | None] = {}
        self._idle_token: dict[str, int] = {}
        self._draining: dict[str, int] = {}
        self._tokens = 0
        self._grants: OrderedDict[str, str] = OrderedDict()
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._wake: TimerHandle | None = None
        self._wake_at: float | None = None

    def on_stop(self) -> None:
        if self._wake is not None:
            self._wake.cancel()

    def handle(self, message: Message) -> None:
        try:
            self._sweep()
            self._dispatch(message)
        finally:
            self._rearm()

    # -- dispatch -------------------------------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        match message:
            case TrackInstance(instance_id=iid, idle_shutdown_s=idle):
                self._idle_s[iid] = idle
            case GrantLease():
                self._grant(message)
            case RenewLease(lease_ref=ref, ttl_ms=ttl, reply=reply):
                self._answer(reply, ref, lambda: self._renew(ref, ttl))
            case ReleaseLease(lease_ref=ref, reply=reply):
                self._answer(reply, ref, lambda: self._release(ref, "released"))
            case ReportOutcome(lease_ref=ref, ok=ok, detail=detail):
                lease = self.table.get(ref)
                if lease is None:
                    # Ended or never granted: nobody holds it, so it speaks for nobody.
                    log.debug("lease broker: outcome reported on %s, which is not live", ref)
                else:
                    report = OutcomeReported(
                        instance_id=lease.instance_id, lease_ref=ref, ok=ok, detail=detail
                    )
                    tell(self.ctx.supervisor, report)
            case CancelGrant(request_id=rid):
                if (ref := self._grants.pop(rid, "")) != "":
                    self._release(ref, "released")
                else:  # not granted yet, or never will be: remember it a while
                    self._cancelled[rid] = None
                    while len(self._cancelled) > _REMEMBER_GRANTS:
                        self._cancelled.popitem(last=False)
            case ExpireTick():
                pass  # the sweep before dispatch did the work
            case IdleCheck(instance_id=iid, token=token):
                if self._idle_token.get(iid) == token and self.table.count(iid) == 0:
                    tell(self.ctx.supervisor, IdleExpired(instance_id=iid))
            case EvictInstance(instance_id=iid):
                ok = iid not in self._draining and self.table.count(iid) == 0
                if ok:
                    self.table.close_instance(iid, "being evicted")
                    self._idle_token.pop(iid, None)
                tell(self.ctx.supervisor, Evicted(instance_id=iid, ok=ok))
            case DrainInstance(instance_id=iid, timeout_s=timeout, reason=reason):
                self._drain(iid, timeout, reason)
            case DrainDeadline(instance_id=iid, token=token):
                if self._draining.get(iid) == token:
                    for lease in self.table.end_instance(iid, "drained"):
                        emit(lease_released, iid, lease=lease, reason="drained")
                    self._drained(iid)
            case InstanceGone(instance_id=iid, reason=reason):
                self.table.close_instance(iid, reason)
                for lease in self.table.end_instance(iid, reason):
                    emit(lease_released, iid, lease=lease, reason=reason)
                self._draining.pop(iid, None)
                self._idle_token.pop(iid, None)
                self._count(iid)
            case _:
                log.warning("lease broker: unexpected %r", message)

    def _answer(self, reply: Any, ref: str, action: Any) -> None:
        try:
            value = action()
        except LlamaActorsError as exc:
            deliver(reply, ref, error=exc)
        else:
            deliver(reply, ref, value=value)

    # -- leases -------------------------------------------------------------------------

    def _grant(self, msg: GrantLease) -> None:
        if self._cancelled.pop(msg.request_id, "") is None:
            return
        try:
            state = self.ctx.board.state(msg.instance_id)
            if state is None:
                raise InstanceNotFoundError(
                    f"no instance {msg.instance_id} in this runtime", instance_id=msg.instance_id
                )
            if state != "ready":  # it crashed or began to stop since the grant was asked
                raise NotReadyError(
                    f"instance {msg.instance_id} is {state}", instance_id=msg.instance_id
                )
            lease = self.table.grant(
                msg.instance_id,
                msg.owner_ref,
                msg.ttl_ms,
                renewable=msg.renewable,
                metadata=msg.metadata,
            )
        except LlamaActorsError as exc:
            if msg.fallback is not None and isinstance(exc, NotReadyError | InstanceNotFoundError):
                tell(self.ctx.supervisor, msg.fallback)  # it finds or starts a fresh one
            else:
                deliver(msg.reply, msg.request_id, error=exc)
            return
        self._grants[msg.request_id] = lease.lease_ref
        while len(self._grants) > _REMEMBER_GRANTS:
            self._grants.popitem(last=False)
        self._idle_token.pop(msg.instance_id, None)
        self._count(msg.instance_id)
        snapshot = self.ctx.board.snapshot(msg.instance_id) or _missing(msg.instance_id)
        resolution = Resolution(
            endpoint=_leased(msg.endpoint, lease.lease_ref, msg.compatibility),
            lease=lease,
            instance=snapshot,
            compatibility=msg.compatibility,
            reused=msg.reused,
        )
        emit(lease_granted, msg.instance_id, lease=lease)
        deliver(msg.reply, msg.request_id, value=resolution)

    def _renew(self, ref: str, ttl_ms: int | None) -> Lease:
        # One moment for both: a lease whose TTL ran out since this message's first
        # sweep is ended and signalled here, before its caller hears "expired".
        now = self.ctx.timers.now()
        self._sweep(now)
        lease = self.table.renew(ref, ttl_ms, now=now)
        emit(lease_renewed, lease.instance_id, lease=lease)
        return lease

    def _release(self, ref: str, reason: str) -> bool:
        lease = self.table.release(ref)
        if lease is None:
            return False
        self._count(lease.instance_id)  # receivers read the new count from snapshots
        emit(lease_released, lease.instance_id, lease=lease, reason=reason)
        self._after_end(lease.instance_id)
        return True

    def _sweep(self, now: float | None = None) -> None:
        for lease in self.table.expire_due(now):
            self._count(lease.instance_id)
            emit(lease_expired, lease.instance_id, lease=lease)
            self._after_end(lease.instance_id)

    def _rearm(self) -> None:
        when = self.table.next_expiry()
        if when == self._wake_at:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = when
        self._wake = None
        if when is not None:
            self._wake = tell_later(
                self.ctx.timers, when - self.ctx.timers.now(), self.actor_ref, ExpireTick()
            )

    def _count(self, instance_id: str) -> None:
        self.ctx.board.set_lease_count(
            instance_id, self.table.count(instance_id), used_at=self.ctx.timers.now()
        )

    def _after_end(self, instance_id: str) -> None:
        self._count(instance_id)
        if self.table.count(instance_id) > 0:
            return
        if instance_id in self._draining:
            self._drained(instance_id)
            return
        tell(self.ctx.supervisor, InstanceIdle(instance_id=instance_id))
        idle = self._idle_s.get(instance_id)
        if idle is not None:
            self._tokens += 1
            self._idle_token[instance_id] = self._tokens
            tell_later(
                self.ctx.timers,
                idle,
                self.actor_ref,
                IdleCheck(instance_id=instance_id, token=self._tokens),
            )

    # -- draining -----------------------------------------------------------------------

    def _drain(self, instance_id: str, timeout_s: float, reason: str) -> None:
        if instance_id in self._draining:
            return
        self.table.close_instance(instance_id, "draining")
        self._idle_token.pop(instance_id, None)
        refs = [lease.lease_ref for lease in self.table.leases_of(instance_id)]
        self._tokens += 1
        self._draining[instance_id] = self._tokens
        if not refs:  # nobody to tell
            self._drained(instance_id)
            return
        emit(instance_draining, instance_id, lease_refs=refs, reason=reason)
        tell_later(
            self.ctx.timers,
            timeout_s,
            self.actor_ref,
            DrainDeadline(instance_id=instance_id, token=self._tokens),
        )

    def _drained(self, instance_id: str) -> None:
        self._draining.pop(instance_id, None)
        self._count(instance_id)
        tell(self.ctx.supervisor, Drained(instance_id=instance_id))


def _leased(
    endpoint: EndpointDescriptor, lease_ref: str, result: CompatibilityResult
) -> EndpointDescriptor:
    """The caller's copy of ``endpoint``: its lease, and the protocol and management mode
    its compatibility check settled on (an embeddings consumer gets ``openai_embeddings``
    from an instance that also serves chat)."""
    return msgspec.structs.replace(
        endpoint,
        lease_ref=lease_ref,
        protocol=result.protocol or endpoint.protocol,
        management_mode=result.management_mode or endpoint.management_mode,
    )


def _missing(instance_id: str) -> RuntimeSnapshot:
    raise InstanceNotFoundError(
        f"no instance {instance_id} in this runtime", instance_id=instance_id
    )

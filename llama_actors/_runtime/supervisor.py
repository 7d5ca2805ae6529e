"""Supervisor: owns the registry ``instance_id -> BackendActor`` and the index from
identity (``instance_key``) to the live instance, queues callers until their instance
is ready, routes stops through a drain, and admits new instances against the
runtime's memory capacity (evicting idle ones, or queueing callers until there is
room; CONTRACT §11).

Restart decisions live in each BackendActor (one_for_one: an instance's crash touches
nothing else); the supervisor never waits on anyone.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pykka

from llama_actors._exceptions import (
    InstanceNotFoundError,
    InsufficientMemoryError,
    NoHostError,
    NotReadyError,
    RuntimeClosedError,
)
from llama_actors._kernel.admission import Admission, Holder, Verdict
from llama_actors._kernel.backend import BackendSpec
from llama_actors._kernel.memory import MemoryNeed
from llama_actors._kernel.placement import HostView, Placed, PlacementPolicy, place
from llama_actors._kernel.policy import InstancePolicy
from llama_actors._kernel.types import Ensured, HostStatus, InstanceMemory, MemoryStatistics
from llama_actors._runtime.actor import RuntimeActor
from llama_actors._runtime.backend import BackendActor
from llama_actors._runtime.context import Context, deliver, tell
from llama_actors._runtime.hosts import AgentHandle, HostedInstance, HostInfo
from llama_actors._runtime.messages import (
    Boot,
    CancelGrant,
    CancelRequest,
    Close,
    Drained,
    DrainInstance,
    Ensure,
    Evicted,
    EvictInstance,
    GrantLease,
    HostEvent,
    HostEvents,
    HostLost,
    IdleExpired,
    InstanceFailed,
    InstanceGone,
    InstanceIdle,
    InstanceReady,
    InstanceStopped,
    LeaseInstance,
    MemoryMeasured,
    Message,
    OutcomeReported,
    Resolve,
    StopInstance,
    StopRequest,
    TrackInstance,
)
from llama_actors._runtime.requests import instance_not_found, no_new_leases
from llama_actors._runtime.signals import emit, instance_evicted

__all__ = ["Supervisor"]

log = logging.getLogger("llama_actors.runtime")
#: Stopped and failed instances kept visible in snapshots, oldest dropped first.
KEEP_FINISHED = 100


@dataclass(eq=False)
class _Instance:
    ref: pykka.ActorRef[Any]
    key: str
    spec: BackendSpec
    policy: InstancePolicy
    waiting: dict[str, Resolve | Ensure | LeaseInstance] = field(default_factory=dict)
    stop_replies: list[tuple[str, Any]] = field(default_factory=list)
    creator: str = ""
    stop_reason: str = "stopped"
    stopping: bool = False
    done: bool = False
    host: str = "local"


@dataclass(eq=False)
class _Host:
    info: HostInfo
    agent: AgentHandle
    admission: Admission
    up: bool = True
    lost_reason: str | None = None


class Supervisor(RuntimeActor):
    """The runtime's entry actor; see the module docstring."""

    def __init__(
        self,
        *,
        context: Context,
        placement: PlacementPolicy = "spread",
        hosts: Sequence[tuple[AgentHandle, HostInfo]] = (),
    ) -> None:
        super().__init__(context=context)
        self.placement: PlacementPolicy = placement
        #: The runtime's hosts (none: every instance is local), in the order they joined.
        self.hosts: dict[str, _Host] = {
            info.host_id: _Host(info=info, agent=agent, admission=Admission(info.capacity))
            for agent, info in hosts
        }
        self.registry: dict[str, _Instance] = {}
        self.by_key: dict[str, str] = {}
        self.closing: Close | None = None
        self.admission = Admission(context.capacity)
        #: Requests for a new instance waiting for room, first come first served.
        self.queue: OrderedDict[str, tuple[Resolve | Ensure, float]] = OrderedDict()
        #: Instances the broker was asked to close for eviction, and why.
        self.evicting: dict[str, str] = {}
        self.evictions = 0
        self._evicting_for: dict[str, Resolve | Ensure | None] = {}
        self._publish_memory()
        for host_id, host in self.hosts.items():
            log.info(
                "host %s joined (%s, %s)",
                host_id,
                host.info.address,
                host.info.capacity.describe(),
            )

    def on_stop(self) -> None:
        for inst in self.registry.values():
            inst.ref.stop(block=False)

    def handle(self, message: Message) -> None:
        match message:
            case Resolve() | Ensure():
                self._request(message)
            case LeaseInstance():
                self._lease_instance(message)
            case CancelRequest(request_id=rid):
                self._cancel(rid)
            case InstanceReady(instance_id=iid, endpoint=endpoint):
                self._ready(iid, endpoint)
            case InstanceFailed(instance_id=iid, error=error, lease_reason=why):
                self._failed(iid, error, why)
            case InstanceStopped(instance_id=iid):
                self._stopped(iid)
            case StopRequest(instance_id=iid, reason=reason, drain_timeout_s=drain, reply=reply):
                self._begin_stop(iid, reason, drain, reply)
            case IdleExpired(instance_id=iid):
                inst = self.registry.get(iid)
                if inst is not None and not inst.stopping and not inst.done:
                    log.info("instance %s: idle shutdown after its last lease ended", iid)
                    self._begin_stop(iid, "idle: no lease held for idle_shutdown_ms", 0.0, None)
            case InstanceIdle():
                if self.queue or any(a.over() for _h, a in self._admissions()):
                    self._pump()
            case Evicted(instance_id=iid, ok=ok):
                self._evicted(iid, ok)
            case MemoryMeasured(instance_id=iid, measured=measured):
                admission = self._admission_of(iid)
                if iid in admission.held:
                    admission.hold(iid, measured)
                    self._pump()
            case HostEvents(host_id=host_id, events=events):
                for event in events:
                    inst = self.registry.get(event.instance_id)
                    if isinstance(event, HostEvent) and inst is not None and inst.host == host_id:
                        tell(inst.ref, event)
            case HostLost(host_id=host_id, reason=reason):
                self._host_lost(host_id, reason, message)
            case OutcomeReported(instance_id=iid):
                if (inst := self.registry.get(iid)) is not None:
                    tell(inst.ref, message)
            case Drained(instance_id=iid):
                if (inst := self.registry.get(iid)) is not None:
                    tell(inst.ref, StopInstance(reason=inst.stop_reason))
            case Close():
                self._close(message)
            case _:
                log.warning("supervisor: unexpected %r", message)

    # -- resolving --------------------------------------------------------------------

    def _request(self, msg: Resolve | Ensure) -> None:
        if self.closing is not None:
            deliver(msg.reply, msg.request_id, error=RuntimeClosedError("the runtime is closing"))
            return
        iid = None if _exact(msg) else self.by_key.get(msg.spec.instance_key)
        if iid is not None:
            self._join(iid, msg)
            return
        # A new instance: admission decides when it starts (in arrival order).
        self.queue[msg.request_id] = (msg, self.ctx.timers.now())
        self._pump()

    def _join(self, iid: str, msg: Resolve | Ensure) -> None:
        inst = self.registry[iid]
        endpoint = self.ctx.board.endpoint(iid)
        if endpoint is not None and self.ctx.board.state(iid) == "ready":
            self._serve(iid, msg, endpoint, reused=True)
        else:
            inst.waiting[msg.request_id] = msg
            if msg.request_id != inst.creator:
                log.debug("instance %s: caller %s joins the readiness wait", iid, msg.request_id)

    # -- admission --------------------------------------------------------------------

    def _pump(self) -> None:
        """Admit waiting requests in order while they fit; evict for the first one that
        does not, or leave it waiting. Also evicts idle instances while a measured
        figure has put a host past its capacity."""
        for host_id, admission in self._admissions():
            if admission.over():
                for iid in admission.relieve(self._holders(host_id)):
                    self._evict(iid, "the host is past its capacity after measuring", None)
        while self.queue and self.closing is None:
            rid, (msg, _since) = next(iter(self.queue.items()))
            same = None if _exact(msg) else self.by_key.get(msg.spec.instance_key)
            if same is not None:  # started meanwhile for an earlier request: share it
                self._dequeue(rid)
                self._join(same, msg)
                continue
            placed = self._place(msg)
            verdict = placed.verdict
            if verdict is None:
                self._dequeue(rid)
                deliver(msg.reply, rid, error=self._no_host(msg, placed))
                continue
            host_id = placed.host_id or "local"
            need = verdict.need
            if verdict.kind == "fits":
                self._dequeue(rid)
                iid = self._create(msg, need, host_id)
                self.registry[iid].creator = rid
                self.registry[iid].waiting[rid] = msg
                continue
            if verdict.kind == "never" or (not msg.wait_for_memory and verdict.kind == "wait"):
                self._dequeue(rid)
                deliver(msg.reply, rid, error=self._no_room(msg, verdict, host_id))
                continue
            for iid in verdict.evict:
                if iid not in self.evicting:
                    self._evict(iid, self._eviction_reason(msg, need), msg)
            self.ctx.board.waiting_for_memory(rid, self._no_room(msg, verdict, host_id))
            break
        # Behind a request that waits, one that was told not to wait fails now.
        for rid, (msg, _since) in list(self.queue.items())[1:] if self.closing is None else []:
            if not msg.wait_for_memory:
                self._dequeue(rid)
                ahead = next(iter(self.queue.values()))[0]
                error = InsufficientMemoryError(
                    f"no room for {msg.spec.alias} now: a request for {ahead.spec.alias} is "
                    "already waiting for memory, and requests are admitted in order; retry "
                    "later, or pass wait_for_memory=True to wait in line",
                    need=msg.need or MemoryNeed(),
                    free=self.admission.free(),
                )
                deliver(msg.reply, rid, error=error)
        self._publish_memory()

    def _place(self, msg: Resolve | Ensure) -> Placed:
        """The host for a new instance of ``msg`` (``local`` unless it is hosted), with
        admission's verdict for it there."""
        if not msg.hosted:
            need = msg.need or self._known_need(msg.spec.instance_key)
            return Placed("fits", "local", self.admission.check(need, self._holders("local")))
        views = []
        for host_id, host in self.hosts.items():
            need = msg.needs.get(host_id) or msg.need or self._known_need(msg.spec.instance_key)
            views.append(
                HostView(
                    host_id=host_id,
                    labels=host.info.labels,
                    gpus=len(host.info.capacity.gpus or ()),
                    instances=sum(
                        1 for i in self.registry.values() if i.host == host_id and not i.done
                    ),
                    verdict=host.admission.check(need, self._holders(host_id)),
                    up=host.up,
                )
            )
        return place(
            views,
            labels=getattr(msg.spec, "host_labels", {}),
            gpus=getattr(msg.spec, "host_gpus", 0),
            policy=self.placement,
        )

    def _no_host(self, msg: Resolve | Ensure, placed: Placed) -> NoHostError:
        return NoHostError(
            f"no host may run {msg.spec.alias}: {placed.why}. Change the spec's host_labels "
            "or host_gpus, or add a host that has them (see guides/hosts.md)"
        )

    def _admissions(self) -> list[tuple[str, Admission]]:
        return [("local", self.admission)] + [
            (host_id, host.admission) for host_id, host in self.hosts.items()
        ]

    def _admission_of(self, iid: str) -> Admission:
        inst = self.registry.get(iid)
        host = self.hosts.get(inst.host) if inst is not None else None
        return host.admission if host is not None else self.admission

    def _known_need(self, key: str) -> MemoryNeed:
        """What an instance of ``key`` that is going (evicted or stopping) holds: the
        caller skipped the estimate because it saw that one ready."""
        for iid, inst in self.registry.items():
            admission = self._admission_of(iid)
            if inst.key == key and iid in admission.held:
                return admission.held[iid]
        return MemoryNeed()

    def _dequeue(self, request_id: str) -> None:
        self.queue.pop(request_id, None)
        self.ctx.board.waiting_for_memory(request_id, None)

    def _holders(self, host_id: str) -> list[Holder]:
        holders = []
        admission = self.hosts[host_id].admission if host_id in self.hosts else self.admission
        for iid, inst in self.registry.items():
            if inst.done or inst.host != host_id or iid not in admission.held:
                continue
            leases, last_used, state = self.ctx.board.usage(iid) or (0, 0.0, "stopped")
            evictable = (
                not inst.stopping
                and iid not in self.evicting
                and not inst.waiting
                and leases == 0
                and state in ("ready", "starting")
            )
            holders.append(
                Holder(
                    instance_id=iid,
                    need=admission.held[iid],
                    state="stopping" if inst.stopping else state,
                    leases=leases,
                    evictable=evictable,
                    last_used=last_used,
                )
            )
        return holders

    def _evict(self, iid: str, reason: str, msg: Resolve | Ensure | None) -> None:
        """Ask the broker to close ``iid`` if it still holds no lease (:class:`Evicted`
        comes back); only then is it stopped. Its identity is forgotten at once, so a
        resolve of the same spec meanwhile waits for a fresh instance (and its room)
        instead of joining one that is going; a refused eviction restores it."""
        self.evicting[iid] = reason
        self._forget_key(self.registry[iid], iid)
        tell(self.ctx.broker, EvictInstance(instance_id=iid))
        self._evicting_for[iid] = msg

    def _evicted(self, iid: str, ok: bool) -> None:
        reason = self.evicting.get(iid)
        msg = self._evicting_for.pop(iid, None)
        inst = self.registry.get(iid)
        if reason is None or inst is None:
            return
        if not ok or inst.stopping or inst.done:
            # A lease was granted meanwhile (or it is going anyway): admission looks again.
            del self.evicting[iid]
            if not inst.stopping and not inst.done:
                self.by_key.setdefault(inst.key, iid)
            self._pump()
            return
        self.evictions += 1
        held = self._admission_of(iid).held.get(iid, MemoryNeed())
        log.info("instance %s: %s", iid, reason)
        emit(
            instance_evicted,
            iid,
            reason=reason,
            held=held,
            for_alias=msg.spec.alias if msg is not None else None,
            need=msg.need if msg is not None else None,
        )
        self._begin_stop(iid, reason, 0.0, None)
        self._publish_memory()

    def _eviction_reason(self, msg: Resolve | Ensure, need: MemoryNeed) -> str:
        return f"evicted: no lease held; {msg.spec.alias} needs {need.describe()}"

    def _no_room(
        self, msg: Resolve | Ensure, verdict: Verdict, host_id: str = "local"
    ) -> InsufficientMemoryError:
        host = self.hosts.get(host_id)
        cap = host.admission.capacity if host is not None else self.admission.capacity
        where = f"host {host_id}'s" if host is not None else "this runtime's"
        need = verdict.need
        alias = msg.spec.alias
        free = ", ".join(f"{mib:.0f} MiB {_resource(r)}" for r, mib in verdict.free.items())
        short = ", ".join(f"{mib:.0f} MiB {_resource(r)}" for r, mib in verdict.short.items())
        holders = [h for h in verdict.holders if h.need != MemoryNeed()]
        held = "; ".join(
            f"{h.instance_id} ({h.state}, {h.leases} lease{'s' if h.leases != 1 else ''}, "
            f"{h.need.describe()})"
            for h in holders
        )
        if verdict.kind == "never":
            text = (
                f"{alias} needs {need.describe()}, more than {where} whole capacity "
                f"({cap.describe()}); make the spec smaller (ctx_size, parallel, cache_type_k/v, "
                "gpu_layers) or give the runtime a larger Capacity"
            )
        else:
            text = (
                f"no room for {alias}: it needs {need.describe()} and {free or 'nothing'} is "
                f"free of {cap.describe()} ({short or 'nothing'} short, the model's shared "
                f"pages counted once); held by {held or 'nobody'}. Instances with a lease, "
                "or that callers wait on, are never evicted: release a lease or stop an "
                "instance, wait longer (wait_for_memory=True with a longer timeout), or give "
                "the runtime a larger Capacity"
            )
        return InsufficientMemoryError(
            text,
            need=need,
            free=dict(verdict.free),
            holders=tuple((h.instance_id, h.state, h.leases, h.need) for h in holders),
        )

    def _publish_memory(self) -> None:
        for host_id in self.hosts:
            self._publish_host(host_id)
        self.ctx.board.set_memory_statistics(
            MemoryStatistics(
                capacity=self.admission.capacity.limits(),
                used={r: round(v, 2) for r, v in self.admission.used().items()},
                free={r: round(v, 2) for r, v in self.admission.free().items()},
                queued=len(self.queue),
                evictions=self.evictions,
            )
        )

    def _create(self, msg: Resolve | Ensure, need: MemoryNeed, host_id: str = "local") -> str:
        spec, policy = msg.spec, msg.policy
        given = msg.needs.get(host_id) or msg.need
        estimate = given if given is not None or need == MemoryNeed() else need
        iid = msg.instance_id if isinstance(msg, Ensure) and msg.instance_id else None
        iid = iid or f"{_slug(spec.alias)}-{secrets.token_hex(3)}"
        host = self.hosts.get(host_id)
        (host.admission if host is not None else self.admission).hold(iid, need)
        log_path = str(self.ctx.log_path(iid)) if msg.plan is not None else None
        self.ctx.board.add(
            iid,
            spec.instance_key,
            log_path,
            manifest=msg.backend.manifest(spec),
            metadata=spec.metadata,
            memory=InstanceMemory(estimate=estimate),
            created_at=self.ctx.timers.now(),
            host=host_id,
        )
        ref: pykka.ActorRef[Any]
        if host is not None:
            ref = HostedInstance.start(
                instance_id=iid,
                host_id=host_id,
                agent=host.agent,
                spec=spec,
                policy=policy,
                context=self.ctx,
                estimate=estimate,
            )
        else:
            ref = BackendActor.start(
                instance_id=iid,
                backend=msg.backend,
                spec=spec,
                plan=msg.plan,
                policy=policy,
                context=self.ctx,
                estimate=estimate,
            )
        self.registry[iid] = _Instance(
            ref=ref, key=spec.instance_key, spec=spec, policy=policy, host=host_id
        )
        if not (isinstance(msg, Ensure) and msg.instance_id):
            self.by_key[spec.instance_key] = iid
        tell(
            self.ctx.broker,
            TrackInstance(instance_id=iid, idle_shutdown_s=policy.idle_shutdown_s),
        )
        tell(ref, Boot())
        where = f" on host {host_id}" if host is not None else ""
        log.info("instance %s: starting for %s%s", iid, spec.alias, where)
        return iid

    def _lease_instance(self, msg: LeaseInstance) -> None:
        iid = msg.instance_id
        inst = self.registry.get(iid)
        if self.closing is not None:
            deliver(msg.reply, msg.request_id, error=RuntimeClosedError("the runtime is closing"))
        elif inst is None:
            deliver(msg.reply, msg.request_id, error=instance_not_found(iid))
        elif inst.stopping or inst.done:
            state = self.ctx.board.state(iid) or "stopped"
            deliver(msg.reply, msg.request_id, error=no_new_leases(iid, state))
        elif (endpoint := self.ctx.board.endpoint_if_ready(iid)) is not None:
            self._serve(iid, msg, endpoint, reused=True)
        else:  # starting or restarting: it waits with the others
            inst.waiting[msg.request_id] = msg

    def _serve(
        self, iid: str, msg: Resolve | Ensure | LeaseInstance, endpoint: Any, *, reused: bool
    ) -> None:
        match msg:
            case Resolve() | LeaseInstance():
                tell(self.ctx.broker, GrantLease.for_request(msg, iid, endpoint, reused=reused))
            case Ensure():
                snapshot = self.ctx.board.snapshot(iid)
                if snapshot is None:
                    deliver(msg.reply, msg.request_id, error=instance_not_found(iid))
                else:
                    ensured = Ensured(instance=snapshot, reused=reused)
                    deliver(msg.reply, msg.request_id, value=ensured)

    def _cancel(self, request_id: str) -> None:
        if request_id in self.queue:
            self._dequeue(request_id)
            self._pump()
            return
        for inst in self.registry.values():
            if inst.waiting.pop(request_id, None) is not None:
                return
        tell(self.ctx.broker, CancelGrant(request_id=request_id))

    # -- instance news ----------------------------------------------------------------

    def _ready(self, iid: str, endpoint: Any) -> None:
        inst = self.registry.get(iid)
        if inst is None:
            return
        waiting, inst.waiting = inst.waiting, {}
        for msg in waiting.values():
            # The caller that caused the spawn gets reused=False; those who joined, True.
            self._serve(iid, msg, endpoint, reused=msg.request_id != inst.creator)

    def _failed(self, iid: str, error: BaseException, lease_reason: str) -> None:
        inst = self.registry.get(iid)
        if inst is None:
            return
        self._forget_key(inst, iid)
        waiting, inst.waiting = inst.waiting, {}
        for msg in waiting.values():
            deliver(msg.reply, msg.request_id, error=error)
        tell(self.ctx.broker, InstanceGone(instance_id=iid, reason=lease_reason))
        # Wind it down, even mid-drain (the drain ends with InstanceGone): its
        # InstanceStopped follows once the process is gone. A second stop is ignored.
        inst.stopping = True
        tell(inst.ref, StopInstance(reason="failed"))

    def _stopped(self, iid: str) -> None:
        inst = self.registry.get(iid)
        if inst is None:
            return
        inst.done = True
        self._forget_key(inst, iid)
        waiting, inst.waiting = inst.waiting, {}
        for msg in waiting.values():
            deliver(
                msg.reply,
                msg.request_id,
                error=NotReadyError(
                    f"instance {iid} was stopped before it was ready", instance_id=iid
                ),
            )
        tell(self.ctx.broker, InstanceGone(instance_id=iid, reason="instance stopped"))
        for rid, reply in inst.stop_replies:
            deliver(reply, rid, value=self.ctx.board.snapshot(iid))
        inst.stop_replies.clear()
        inst.ref.stop(block=False)
        self._admission_of(iid).release(iid)
        self.evicting.pop(iid, None)
        self._evicting_for.pop(iid, None)
        self._prune()
        self._pump()
        self._maybe_closed()

    def _prune(self) -> None:
        finished = [iid for iid, inst in self.registry.items() if inst.done]
        for iid in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.registry[iid]
            self.ctx.board.remove(iid)

    def _forget_key(self, inst: _Instance, iid: str) -> None:
        if self.by_key.get(inst.key) == iid:
            del self.by_key[inst.key]

    # -- hosts --------------------------------------------------------------------------

    def _host_lost(self, host_id: str, reason: str, message: HostLost) -> None:
        host = self.hosts.get(host_id)
        if host is None or not host.up:
            return
        host.up, host.lost_reason = False, reason
        for iid, inst in self.registry.items():
            if inst.host == host_id and not inst.done:
                self._forget_key(inst, iid)
                tell(inst.ref, message)
        self._publish_host(host_id)
        self._pump()

    def _publish_host(self, host_id: str) -> None:
        host = self.hosts[host_id]
        info, admission = host.info, host.admission
        self.ctx.board.set_host(
            HostStatus(
                host_id=host_id,
                node_id=info.node_id,
                address=info.address,
                state="up" if host.up else "lost",
                labels=dict(info.labels),
                gpus=len(info.capacity.gpus or ()),
                capacity=admission.capacity.limits(),
                used={r: round(v, 2) for r, v in admission.used().items()},
                free={r: round(v, 2) for r, v in admission.free().items()},
                instances=sum(
                    1 for i in self.registry.values() if i.host == host_id and not i.done
                ),
                lost_reason=host.lost_reason,
                agent_pid=info.agent_pid,
            )
        )

    # -- stopping ---------------------------------------------------------------------

    def _begin_stop(self, iid: str, reason: str, drain_s: float | None, reply: Any) -> None:
        inst = self.registry.get(iid)
        if inst is None:
            deliver(
                reply,
                iid,
                error=InstanceNotFoundError(
                    f"no instance {iid!r} in this runtime; see Runtime.instances()",
                    instance_id=iid,
                ),
            )
            return
        if inst.done:
            deliver(reply, iid, value=self.ctx.board.snapshot(iid))
            return
        if reply is not None:
            inst.stop_replies.append((iid, reply))
        if inst.stopping:
            return
        inst.stopping = True
        self._forget_key(inst, iid)
        inst.stop_reason = reason
        waiting, inst.waiting = inst.waiting, {}
        for msg in waiting.values():
            deliver(
                msg.reply,
                msg.request_id,
                error=NotReadyError(f"instance {iid} is stopping ({reason})", instance_id=iid),
            )
        timeout = inst.policy.drain_timeout_s if drain_s is None else drain_s
        tell(self.ctx.broker, DrainInstance(instance_id=iid, timeout_s=timeout, reason=reason))

    def _close(self, msg: Close) -> None:
        if self.closing is None:
            self.closing = msg
        else:
            deliver(msg.reply, "close", value=None)
            return
        for rid, (queued, _since) in list(self.queue.items()):
            self._dequeue(rid)
            deliver(queued.reply, rid, error=RuntimeClosedError("the runtime is closing"))
        for iid, inst in list(self.registry.items()):
            if not inst.done:
                self._begin_stop(iid, "runtime closing", 0.0, None)
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        if self.closing is None:
            return
        if all(inst.done for inst in self.registry.values()):
            deliver(self.closing.reply, "close", value=None)


def _exact(msg: Resolve | Ensure) -> bool:
    """An ensure of one given instance id (from the head, on a host): never shared."""
    return isinstance(msg, Ensure) and msg.instance_id is not None


def _resource(name: str) -> str:
    return "RAM" if name == "ram" else f"on GPU {name.removeprefix('gpu')}"


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    return (slug or "llama")[:40]

"""Supervisor: owns the registry ``instance_id -> BackendActor`` and the index from
identity (``instance_key``) to the live instance, queues callers until their instance
is ready, and routes stops through a drain.

Restart decisions live in each BackendActor (one_for_one: an instance's crash touches
nothing else); the supervisor never waits on anyone.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import pykka

from llama_actors._exceptions import (
    InstanceNotFoundError,
    NotReadyError,
    RuntimeClosedError,
)
from llama_actors._kernel.backend import BackendSpec
from llama_actors._kernel.policy import InstancePolicy
from llama_actors._kernel.types import Ensured
from llama_actors._runtime.actor import RuntimeActor
from llama_actors._runtime.backend import BackendActor
from llama_actors._runtime.context import Context, deliver, tell
from llama_actors._runtime.messages import (
    Boot,
    CancelGrant,
    CancelRequest,
    Close,
    Drained,
    DrainInstance,
    Ensure,
    GrantLease,
    IdleExpired,
    InstanceFailed,
    InstanceGone,
    InstanceReady,
    InstanceStopped,
    LeaseInstance,
    Message,
    OutcomeReported,
    Resolve,
    StopInstance,
    StopRequest,
    TrackInstance,
)
from llama_actors._runtime.requests import instance_not_found, no_new_leases

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


class Supervisor(RuntimeActor):
    """The runtime's entry actor; see the module docstring."""

    def __init__(self, *, context: Context) -> None:
        super().__init__(context=context)
        self.registry: dict[str, _Instance] = {}
        self.by_key: dict[str, str] = {}
        self.closing: Close | None = None

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
            case InstanceFailed(instance_id=iid, error=error):
                self._failed(iid, error)
            case InstanceStopped(instance_id=iid):
                self._stopped(iid)
            case StopRequest(instance_id=iid, reason=reason, drain_timeout_s=drain, reply=reply):
                self._begin_stop(iid, reason, drain, reply)
            case IdleExpired(instance_id=iid):
                inst = self.registry.get(iid)
                if inst is not None and not inst.stopping and not inst.done:
                    log.info("instance %s: idle shutdown after its last lease ended", iid)
                    self._begin_stop(iid, "idle: no lease held for idle_shutdown_ms", 0.0, None)
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
        key = msg.spec.instance_key
        iid = self.by_key.get(key)
        created = iid is None
        if iid is None:
            iid = self._create(msg)
        inst = self.registry[iid]
        if created:
            inst.creator = msg.request_id
        endpoint = self.ctx.board.endpoint(iid)
        if endpoint is not None and self.ctx.board.state(iid) == "ready":
            self._serve(iid, msg, endpoint, reused=True)
        else:
            inst.waiting[msg.request_id] = msg
            if not created:
                log.debug("instance %s: caller %s joins the readiness wait", iid, msg.request_id)

    def _create(self, msg: Resolve | Ensure) -> str:
        spec, policy = msg.spec, msg.policy
        iid = f"{_slug(spec.alias)}-{secrets.token_hex(3)}"
        self.ctx.board.add(
            iid,
            spec.instance_key,
            str(self.ctx.log_path(iid)) if msg.plan is not None else None,
            manifest=msg.backend.manifest(spec),
            metadata=spec.metadata,
        )
        ref = BackendActor.start(
            instance_id=iid,
            backend=msg.backend,
            spec=spec,
            plan=msg.plan,
            policy=policy,
            context=self.ctx,
        )
        self.registry[iid] = _Instance(ref=ref, key=spec.instance_key, spec=spec, policy=policy)
        self.by_key[spec.instance_key] = iid
        tell(
            self.ctx.broker,
            TrackInstance(instance_id=iid, idle_shutdown_s=policy.idle_shutdown_s),
        )
        tell(ref, Boot())
        log.info("instance %s: starting for %s", iid, spec.alias)
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

    def _failed(self, iid: str, error: BaseException) -> None:
        inst = self.registry.get(iid)
        if inst is None:
            return
        self._forget_key(inst, iid)
        waiting, inst.waiting = inst.waiting, {}
        for msg in waiting.values():
            deliver(msg.reply, msg.request_id, error=error)
        tell(self.ctx.broker, InstanceGone(instance_id=iid, reason="instance failed"))
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
        self._prune()
        self._maybe_closed()

    def _prune(self) -> None:
        finished = [iid for iid, inst in self.registry.items() if inst.done]
        for iid in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.registry[iid]
            self.ctx.board.remove(iid)

    def _forget_key(self, inst: _Instance, iid: str) -> None:
        if self.by_key.get(inst.key) == iid:
            del self.by_key[inst.key]

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
        for iid, inst in list(self.registry.items()):
            if not inst.done:
                self._begin_stop(iid, "runtime closing", 0.0, None)
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        if self.closing is None:
            return
        if all(inst.done for inst in self.registry.values()):
            deliver(self.closing.reply, "close", value=None)


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    return (slug or "llama")[:40]

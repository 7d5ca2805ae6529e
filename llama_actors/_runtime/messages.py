"""Every message between the runtime's actors: frozen, tagged msgspec Structs.

Actors dispatch on them with ``match``. A request that needs an answer carries a
``reply`` target: a ``pykka.Future`` (the synchronous facade waits on it with a
timeout) or a ``pykka.ActorRef`` (told a :class:`Replied`), so no actor ever blocks
on another. Fields typed ``Any`` hold live objects (futures, exit reports, errors).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from llama_actors._kernel.backend import Backend, BackendSpec
from llama_actors._kernel.health import HealthCause
from llama_actors._kernel.manifest import CompatibilityResult
from llama_actors._kernel.memory import MemoryNeed
from llama_actors._kernel.policy import InstancePolicy
from llama_actors._kernel.types import EndpointDescriptor, Health
from llama_actors._process.plan import LaunchPlan

__all__ = [
    "AgentAnswered",
    "Boot",
    "CancelGrant",
    "CancelRequest",
    "Close",
    "DrainDeadline",
    "DrainInstance",
    "Drained",
    "Ensure",
    "EvictInstance",
    "Evicted",
    "ExpireTick",
    "GrantLease",
    "HealthReport",
    "HostCheckDue",
    "HostEvent",
    "HostEvents",
    "HostLost",
    "IdleCheck",
    "IdleExpired",
    "InstanceFailed",
    "InstanceGone",
    "InstanceIdle",
    "InstanceReady",
    "InstanceStopped",
    "KillDeadline",
    "LeaseInstance",
    "MemoryMeasured",
    "Message",
    "OutcomeReported",
    "OutcomeWindowCheck",
    "Pause",
    "Paused",
    "PortKnown",
    "ProbeTick",
    "ProcessExited",
    "ReadinessTick",
    "ReleaseLease",
    "RenewLease",
    "Replied",
    "ReportOutcome",
    "Resolve",
    "Respawn",
    "SigtermDue",
    "StopInstance",
    "StopRequest",
    "TrackInstance",
    "Watch",
    "WedgeCheck",
]


class Message(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every actor message (tagged with its class name)."""


class Replied(Message, frozen=True, tag=True, kw_only=True):
    """The answer to a request whose ``reply`` was an actor: a value or an error."""

    request_id: str
    value: Any = None
    error: Any = None


# -- to the Supervisor -----------------------------------------------------------------


class Resolve(Message, frozen=True, tag=True, kw_only=True):
    request_id: str
    backend: Backend
    spec: BackendSpec
    plan: LaunchPlan | None
    compatibility: CompatibilityResult
    owner_ref: str | None
    ttl_ms: int
    renewable: bool = True
    metadata: dict[str, Any] = {}
    policy: InstancePolicy
    reply: Any
    need: MemoryNeed | None = None
    wait_for_memory: bool = True
    #: Placed on one of the runtime's hosts (the plan is rendered there, not here).
    hosted: bool = False
    #: The estimate on each host, by host id (its GPUs change where layers go).
    needs: dict[str, MemoryNeed] = {}


class LeaseInstance(Message, frozen=True, tag=True, kw_only=True):
    """Lease the instance ``instance_id`` itself (``lease_instance``), once it is ready."""

    request_id: str
    instance_id: str
    compatibility: CompatibilityResult
    owner_ref: str | None
    ttl_ms: int
    renewable: bool = True
    metadata: dict[str, Any] = {}
    reply: Any


class Ensure(Message, frozen=True, tag=True, kw_only=True):
    request_id: str
    backend: Backend
    spec: BackendSpec
    plan: LaunchPlan | None
    policy: InstancePolicy
    reply: Any
    need: MemoryNeed | None = None
    wait_for_memory: bool = True
    hosted: bool = False
    needs: dict[str, MemoryNeed] = {}
    #: Start exactly this instance (a host agent: the head chose the id and the
    #: identity is the head's to share), never joining one of the same spec.
    instance_id: str | None = None


class CancelRequest(Message, frozen=True, tag=True, kw_only=True):
    """The caller of ``request_id`` gave up waiting: drop it, or release its lease."""

    request_id: str


class StopRequest(Message, frozen=True, tag=True, kw_only=True):
    instance_id: str
    reason: str
    drain_timeout_s: float | None
    reply: Any


class Close(Message, frozen=True, tag=True, kw_only=True):
    reply: Any


class InstanceReady(Message, frozen=True, tag=True, kw_only=True):
    instance_id: str
    endpoint: EndpointDescriptor


class InstanceFailed(Message, frozen=True, tag=True, kw_only=True):
    """The instance gave up for good; ``error`` goes to everyone waiting on it."""

    instance_id: str
    error: Any
    #: Why its leases end (``host lost`` when its host went).
    lease_reason: str = "instance failed"


class InstanceStopped(Message, frozen=True, tag=True, kw_only=True):
    instance_id: str


class Drained(Message, frozen=True, tag=True, kw_only=True):
    instance_id: str


class IdleExpired(Message, frozen=True, tag=True, kw_only=True):
    instance_id: str


class InstanceIdle(Message, frozen=True, tag=True, kw_only=True):
    """The instance's last lease ended: admission may evict it now."""

    instance_id: str


class Evicted(Message, frozen=True, tag=True, kw_only=True):
    """The broker's answer to :class:`EvictInstance`: ``ok`` when the instance held no
    lease and takes none from now on; False when a lease was granted meanwhile."""

    instance_id: str
    ok: bool


class MemoryMeasured(Message, frozen=True, tag=True, kw_only=True):
    """The instance is ready and its memory was measured: it replaces the estimate."""

    instance_id: str
    measured: MemoryNeed


# -- to a BackendActor -------------------------------------------------------------------


class Boot(Message, frozen=True, tag=True, kw_only=True):
    pass


class ReadinessTick(Message, frozen=True, tag=True, kw_only=True):
    generation: int


class PortKnown(Message, frozen=True, tag=True, kw_only=True):
    generation: int


class ProcessExited(Message, frozen=True, tag=True, kw_only=True):
    generation: int
    exit: Any


class HealthReport(Message, frozen=True, tag=True, kw_only=True):
    """The poller's verdict changed (from its probes and load readings)."""

    generation: int
    new: Health
    reason: str
    cause: HealthCause = "probe"


class OutcomeReported(Message, frozen=True, tag=True, kw_only=True):
    """A caller holding ``lease_ref`` on the instance says how its request went."""

    instance_id: str
    lease_ref: str
    ok: bool
    detail: str


class OutcomeWindowCheck(Message, frozen=True, tag=True, kw_only=True):
    """The oldest failure reported by callers leaves its window now."""

    token: int


class WedgeCheck(Message, frozen=True, tag=True, kw_only=True):
    generation: int
    token: int


class Respawn(Message, frozen=True, tag=True, kw_only=True):
    token: int


class StopInstance(Message, frozen=True, tag=True, kw_only=True):
    reason: str


class KillDeadline(Message, frozen=True, tag=True, kw_only=True):
    generation: int


# -- to a HealthPoller -------------------------------------------------------------------


class Watch(Message, frozen=True, tag=True, kw_only=True):
    generation: int
    port: int | None


class Pause(Message, frozen=True, tag=True, kw_only=True):
    """Stop probing ``generation``; with ``ack``, tell the owner :class:`Paused` once no
    probe is in flight (a stop waits for that before SIGTERM)."""

    generation: int
    ack: bool = False


class Paused(Message, frozen=True, tag=True, kw_only=True):
    """The poller has no probe in flight and sends none for ``generation``."""

    generation: int


class SigtermDue(Message, frozen=True, tag=True, kw_only=True):
    """The poller did not say :class:`Paused` in time: send SIGTERM anyway."""

    generation: int
    token: int


class ProbeTick(Message, frozen=True, tag=True, kw_only=True):
    """Time for one probe: ``health`` (``/health``), ``load`` (``/slots`` and
    ``/metrics``) or ``inference`` (real work)."""

    generation: int
    kind: Literal["health", "load", "inference"] = "health"


# -- to the LeaseBroker ------------------------------------------------------------------


class TrackInstance(Message, frozen=True, tag=True, kw_only=True):
    instance_id: str
    idle_shutdown_s: float | None


class GrantLease(Message, frozen=True, tag=True, kw_only=True):
    """Lease ``instance_id`` to the caller. ``fallback`` is the caller's own Resolve (or
    LeaseInstance): if the instance is not ready by the time the broker sees this
    (restarting after a crash, draining, gone), the broker hands that to the
    supervisor, which parks it until the instance is ready again, starts a fresh one
    (a resolve) or refuses it (a lease on a stopping instance), instead of granting a
    lease on an instance that cannot serve it. ``endpoint`` is the published one; the
    caller's copy names the protocol of ``compatibility``."""

    request_id: str
    instance_id: str
    endpoint: EndpointDescriptor
    compatibility: CompatibilityResult
    owner_ref: str | None
    ttl_ms: int
    renewable: bool = True
    metadata: dict[str, Any] = {}
    reused: bool
    reply: Any
    fallback: Any = None

    @classmethod
    def for_request(
        cls,
        msg: Resolve | LeaseInstance,
        instance_id: str,
        endpoint: EndpointDescriptor,
        *,
        reused: bool,
    ) -> GrantLease:
        """The grant that answers ``msg`` (a resolve or a lease_instance) with a lease on
        ``instance_id``."""
        return cls(
            request_id=msg.request_id,
            instance_id=instance_id,
            endpoint=endpoint,
            compatibility=msg.compatibility,
            owner_ref=msg.owner_ref,
            ttl_ms=msg.ttl_ms,
            renewable=msg.renewable,
            metadata=msg.metadata,
            reused=reused,
            reply=msg.reply,
            fallback=msg,
        )


class RenewLease(Message, frozen=True, tag=True, kw_only=True):
    lease_ref: str
    ttl_ms: int | None
    reply: Any


class ReleaseLease(Message, frozen=True, tag=True, kw_only=True):
    lease_ref: str
    reply: Any


class ReportOutcome(Message, frozen=True, tag=True, kw_only=True):
    """``Runtime.report``: the broker finds the lease's instance and passes it on."""

    lease_ref: str
    ok: bool
    detail: str


class CancelGrant(Message, frozen=True, tag=True, kw_only=True):
    request_id: str


class ExpireTick(Message, frozen=True, tag=True, kw_only=True):
    pass


class IdleCheck(Message, frozen=True, tag=True, kw_only=True):
    instance_id: str
    token: int


class EvictInstance(Message, frozen=True, tag=True, kw_only=True):
    """Admission wants the instance gone: close it to new leases if it holds none, and
    say so (:class:`Evicted`). The broker decides, being the one lease authority, so
    a lease granted a moment before is never evicted."""

    instance_id: str


class DrainInstance(Message, frozen=True, tag=True, kw_only=True):
    instance_id: str
    timeout_s: float
    reason: str


class DrainDeadline(Message, frozen=True, tag=True, kw_only=True):
    instance_id: str
    token: int


class InstanceGone(Message, frozen=True, tag=True, kw_only=True):
    instance_id: str
    reason: str


# -- hosts (CONTRACT §12) ----------------------------------------------------------------


class HostLost(Message, frozen=True, tag=True, kw_only=True):
    """The head stopped hearing from a host's agent: its instances are gone."""

    host_id: str
    reason: str


class HostEvents(Message, frozen=True, tag=True, kw_only=True):
    """What a host's agent reported since the last poll, in order."""

    host_id: str
    events: tuple[Any, ...]


class HostEvent(Message, frozen=True, tag=True, kw_only=True):
    """One instance's transition on a host, as its agent saw it (``kind`` names it;
    ``data`` holds the signal's keywords, or the instance's figures)."""

    instance_id: str
    kind: str
    data: dict[str, Any] = {}


class AgentAnswered(Message, frozen=True, tag=True, kw_only=True):
    """A call to an agent completed (``error`` set when it failed)."""

    call: str
    token: int
    value: Any = None
    error: Any = None


class HostCheckDue(Message, frozen=True, tag=True, kw_only=True):
    """Time for a host's next check (``kind="check"``), for the answer to check
    ``token`` (``deadline``) or, after a failed events poll, its next poll (``poll``)."""

    token: int
    kind: Literal["check", "deadline", "poll"] = "check"

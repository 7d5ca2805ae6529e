"""The contract's value types: endpoint descriptors, leases and runtime snapshots."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from llama_actors._base.secret import MASK
from llama_actors._kernel.load import ServerLoad
from llama_actors._kernel.manifest import CONTRACT_VERSION, CompatibilityResult
from llama_actors._kernel.memory import MemoryNeed

__all__ = [
    "EndpointDescriptor",
    "EndpointUrls",
    "Ensured",
    "Health",
    "HostStatus",
    "InstanceMemory",
    "InstanceState",
    "Lease",
    "MemoryStatistics",
    "Resolution",
    "RuntimeSnapshot",
    "RuntimeStatistics",
]

#: Where an instance is in its life: ``starting -> ready -> stopping -> stopped``, or
#: ``failed`` when supervision gave up (a restart goes back to ``starting``).
InstanceState = Literal["starting", "ready", "stopping", "stopped", "failed"]
#: What the health probes say of a ready instance (``unknown`` before its first probe).
Health = Literal["unknown", "healthy", "degraded", "unavailable"]


class EndpointUrls(msgspec.Struct, frozen=True):
    """The URLs a server serves on a given port (CONTRACT §1, derived)."""

    root_url: str
    base_url: str
    health_url: str

    @classmethod
    def build(cls, host: str, port: int | str, api_prefix: str) -> EndpointUrls:
        """URLs for ``host:port``; ``port`` may be a placeholder such as ``<port>``."""
        if ":" in host:
            host = f"[{host.replace('%', '%25')}]"
        root = f"http://{host}:{port}"
        return cls(root, f"{root}{api_prefix}/v1", f"{root}{api_prefix}/health")

    @property
    def prefix_url(self) -> str:
        """The root URL with the API prefix: where ``/slots`` and ``/metrics`` live."""
        return self.base_url.removesuffix("/v1")


class EndpointDescriptor(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how to call a published endpoint (CONTRACT §6).

    Callers POST to ``base_url + "/chat/completions"`` with ``headers``. The published
    copy has ``lease_ref`` None; a leased copy carries its lease. The repr masks the
    Authorization header.
    """

    contract_version: str = CONTRACT_VERSION
    endpoint_id: str
    runtime_kind: str
    management_mode: str
    target_class: str = "self_hosted_endpoint"
    protocol: str
    base_url: str
    headers: dict[str, str]
    provider_identity: str
    model_identity: str
    source_runtime_ref: str
    health_ref: str
    lease_ref: str | None = None
    capabilities: dict[str, bool | str]
    metadata: dict[str, Any]

    def __repr__(self) -> str:
        parts = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name == "headers":
                value = {k: (MASK if k.lower() == "authorization" else v) for k, v in value.items()}
            parts.append(f"{name}={value!r}")
        return f"EndpointDescriptor({', '.join(parts)})"


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """A caller's claim on an endpoint until ``expires_at`` (seconds on the runtime clock).

    ``renewable`` False means ``renew`` refuses it; ``metadata`` is what the caller
    passed with the request, kept as given.
    """

    lease_ref: str
    instance_id: str
    owner_ref: str | None
    ttl_ms: int
    renewable: bool = True
    granted_at: float
    expires_at: float
    metadata: dict[str, Any] = {}


class InstanceMemory(msgspec.Struct, frozen=True, kw_only=True):
    """An instance's memory: ``estimate`` made before it started (None when its
    backend cannot estimate, e.g. an attached server or a model file that is not
    GGUF), ``measured`` once it was ready (what the server reported, raised to its
    resident memory; None before), ``rss_mib`` its process's resident memory then, and
    ``error_pct`` how far the estimate was from the measured figure (positive: the
    estimate was larger). ``held`` is what admission counts for it: the measured
    figure once there is one, else the estimate."""

    estimate: MemoryNeed | None = None
    measured: MemoryNeed | None = None
    rss_mib: float | None = None
    error_pct: float | None = None

    @property
    def held(self) -> MemoryNeed | None:
        return self.measured if self.measured is not None else self.estimate


class MemoryStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A runtime's memory at one moment, per resource (``ram``, ``gpu0``...), in MiB:
    its ``capacity`` (capped resources only), what its instances hold (``used``; the
    shared pages of a model file counted once), what is ``free`` of each capped one,
    how many requests wait for room (``queued``) and how many instances were evicted
    to make room since it started (``evictions``)."""

    capacity: dict[str, float] = {}
    used: dict[str, float] = {}
    free: dict[str, float] = {}
    queued: int = 0
    evictions: int = 0


class RuntimeSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A frozen picture of one instance, safe to hand to any thread.

    ``phase`` says where a ``starting`` instance is (None in other states):
    ``spawning``, ``spawned`` (no output yet), ``loading`` (its log is moving before
    it listens, or it answers "Loading model"), ``connecting`` (nothing answers on the
    port yet), ``waiting``
    (it answers, but not ready yet) or ``backoff`` (waiting to be restarted).
    ``health_reason`` and ``health_cause`` say why ``health`` is what it is (the
    reason and cause of its last change: ``saturated`` is not sickness). ``load`` is
    the last reading of the server's slots and metrics (None when it offers none, or
    before the first reading). ``memory`` holds its estimate and measured memory.
    ``metadata`` is the spec's own ``metadata``. ``host`` names the host it runs on
    (``local`` without hosts); ``pid`` is that host's, and a hosted instance's log is
    on its host (under the host's state folder, ``logs/ID@HOST.log``), so ``log_path``
    is None.
    """

    instance_id: str
    instance_key: str
    state: InstanceState
    health: Health = "unknown"
    phase: str | None = None
    pid: int | None = None
    port: int | None = None
    lease_count: int = 0
    restart_count: int = 0
    uptime_s: float | None = None
    log_path: str | None = None
    last_error: str | None = None
    health_reason: str | None = None
    health_cause: str | None = None
    load: ServerLoad | None = None
    memory: InstanceMemory = InstanceMemory()
    metadata: dict[str, Any] = {}
    host: str = "local"


class Resolution(msgspec.Struct, frozen=True, kw_only=True):
    """What ``resolve_endpoint`` gives: a leased endpoint and where it came from.

    ``endpoint`` is the published descriptor with ``lease_ref`` set; ``reused`` is True
    when the instance was already running (or starting) for an earlier caller.
    """

    endpoint: EndpointDescriptor
    lease: Lease
    instance: RuntimeSnapshot
    compatibility: CompatibilityResult
    reused: bool


class Ensured(msgspec.Struct, frozen=True, kw_only=True):
    """What ``ensure_instance`` gives: the ready instance, and whether it was already
    running (or starting) for an earlier caller (``reused``) or this call started it."""

    instance: RuntimeSnapshot
    reused: bool


class HostStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A frozen picture of one host of a runtime with hosts (CONTRACT §12).

    ``state`` is ``up`` while its agent answers the head's checks and ``lost`` once it
    missed too many (``lost_reason`` says how). ``address`` is what its servers bind
    and publish; ``labels`` its node labels; ``capacity``, ``used`` and ``free`` its
    memory per resource in MiB (``ram``, ``gpu0``...); ``gpus`` how many GPUs it has;
    ``instances`` how many of the runtime's instances it runs now; ``last_answer_s``
    how long ago its agent last answered (at the time of the read).
    """

    host_id: str
    node_id: str
    address: str
    state: Literal["up", "lost"] = "up"
    labels: dict[str, str] = {}
    gpus: int = 0
    capacity: dict[str, float] = {}
    used: dict[str, float] = {}
    free: dict[str, float] = {}
    instances: int = 0
    last_answer_s: float | None = None
    lost_reason: str | None = None
    agent_pid: int | None = None


class RuntimeStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counts over every instance a runtime knows, taken at one moment."""

    instances: int
    states: dict[str, int]
    health: dict[str, int]
    leases: int
    restarts: int
    memory: MemoryStatistics = MemoryStatistics()

"""The status board: the runtime's read model of every instance.

Each field has one writer (the instance's BackendActor; its HealthPoller for the load
reading; the LeaseBroker for lease counts); anyone may read. So ``snapshot()`` and
``instances()`` answer at once from any thread, even while every actor is busy, and
nobody asks an actor for its state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from llama_actors._kernel.load import ServerLoad
from llama_actors._kernel.manifest import BackendManifest
from llama_actors._kernel.types import (
    EndpointDescriptor,
    Health,
    HostStatus,
    InstanceMemory,
    InstanceState,
    MemoryStatistics,
    RuntimeSnapshot,
)

__all__ = ["StatusBoard"]


class _Row:
    __slots__ = (
        "endpoint",
        "health",
        "health_cause",
        "health_reason",
        "host",
        "instance_id",
        "instance_key",
        "last_error",
        "last_used",
        "lease_count",
        "load",
        "log_path",
        "manifest",
        "memory",
        "metadata",
        "phase",
        "pid",
        "port",
        "ready_since",
        "restart_count",
        "state",
    )

    def __init__(
        self,
        instance_id: str,
        instance_key: str,
        log_path: str | None,
        manifest: BackendManifest | None,
        metadata: dict[str, Any],
    ) -> None:
        self.instance_id = instance_id
        self.instance_key = instance_key
        self.manifest = manifest
        self.metadata = metadata
        self.state: InstanceState = "starting"
        self.health: Health = "unknown"
        self.health_reason: str | None = None
        self.health_cause: str | None = None
        self.load: ServerLoad | None = None
        self.phase: str | None = "spawning"
        self.pid: int | None = None
        self.port: int | None = None
        self.lease_count = 0
        self.last_used = 0.0
        self.memory = InstanceMemory()
        self.restart_count = 0
        self.ready_since: float | None = None
        self.log_path = log_path
        self.last_error: str | None = None
        self.endpoint: EndpointDescriptor | None = None
        self.host = "local"


class StatusBoard:
    """Thread-safe rows of instance state, turned into frozen snapshots on read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, _Row] = {}
        self._ready: dict[str, str] = {}  # instance_key -> the ready instance of it
        self._memory = MemoryStatistics()
        self._waiting_for_memory: dict[str, BaseException] = {}
        self._hosts: dict[str, HostStatus] = {}
        self._host_answers: dict[str, float] = {}

    def add(
        self,
        instance_id: str,
        instance_key: str,
        log_path: str | None,
        *,
        manifest: BackendManifest | None = None,
        metadata: Mapping[str, Any] | None = None,
        memory: InstanceMemory | None = None,
        created_at: float = 0.0,
        host: str = "local",
    ) -> None:
        """A row for a new instance: what its backend offers (``manifest``, which
        ``lease_instance`` checks consumers against), its spec's ``metadata``, its
        memory estimate, when it was made (it counts as last used then) and the host
        it runs on."""
        row = _Row(instance_id, instance_key, log_path, manifest, dict(metadata or {}))
        row.memory = memory or InstanceMemory()
        row.last_used = created_at
        row.host = host
        with self._lock:
            self._rows[instance_id] = row

    def remove(self, instance_id: str) -> None:
        with self._lock:
            row = self._rows.pop(instance_id, None)
            if row is not None and self._ready.get(row.instance_key) == instance_id:
                del self._ready[row.instance_key]

    # -- writes: one per kind of change, each by the row's one writer ---------------

    def starting(self, instance_id: str, *, pid: int | None, phase: str) -> None:
        """A server was spawned for the instance, or an attached one is being probed
        (BackendActor)."""
        self._write(instance_id, "starting", pid=pid, phase=phase)

    def backing_off(self, instance_id: str, *, restart_count: int, last_error: str) -> None:
        """The instance waits to restart after a crash (BackendActor)."""
        self._write(
            instance_id,
            "starting",
            restart_count=restart_count,
            last_error=last_error,
            phase="backoff",
        )

    def ready(
        self, instance_id: str, *, port: int, pid: int | None, endpoint: EndpointDescriptor
    ) -> None:
        """The instance passed readiness and publishes ``endpoint`` (BackendActor)."""
        self._write(
            instance_id,
            "ready",
            port=port,
            pid=pid,
            ready_since=time.monotonic(),
            endpoint=endpoint,
            last_error=None,
        )

    def stopping(self, instance_id: str) -> None:
        """The instance's server is being stopped (BackendActor)."""
        self._write(instance_id, "stopping")

    def stopped(self, instance_id: str) -> None:
        """The instance stopped; it publishes nothing any more (BackendActor)."""
        self._write(instance_id, "stopped", ready_since=None, endpoint=None, load=None)

    def failed(self, instance_id: str, *, last_error: str) -> None:
        """Supervision gave up on the instance (BackendActor)."""
        self._write(
            instance_id, "failed", ready_since=None, endpoint=None, last_error=last_error, load=None
        )

    def set_health(self, instance_id: str, health: Health, reason: str, cause: str) -> None:
        """The instance's published health changed (BackendActor)."""
        self._write(instance_id, None, health=health, health_reason=reason, health_cause=cause)

    def set_load(self, instance_id: str, load: ServerLoad | None) -> None:
        """The last reading of the server's slots and metrics (HealthPoller)."""
        self._write(instance_id, None, load=load)

    def load(self, instance_id: str) -> ServerLoad | None:
        """The instance's last load reading, if any."""
        with self._lock:
            row = self._rows.get(instance_id)
            return None if row is None else row.load

    def set_phase(self, instance_id: str, phase: str) -> None:
        self._write(instance_id, None, phase=phase)

    def process_gone(self, instance_id: str) -> None:
        """The instance's server process exited."""
        self._write(instance_id, None, pid=None)

    def set_lease_count(self, instance_id: str, count: int, *, used_at: float) -> None:
        """The instance's live lease count, changed at ``used_at`` (LeaseBroker)."""
        self._write(instance_id, None, lease_count=count, last_used=used_at)

    def set_memory(self, instance_id: str, memory: InstanceMemory) -> None:
        """The instance's memory estimate and measured figure (BackendActor)."""
        self._write(instance_id, None, memory=memory)

    def set_memory_statistics(self, stats: MemoryStatistics) -> None:
        """The runtime's memory per resource (Supervisor)."""
        with self._lock:
            self._memory = stats

    def memory_statistics(self) -> MemoryStatistics:
        with self._lock:
            return self._memory

    def waiting_for_memory(self, request_id: str, error: BaseException | None) -> None:
        """``request_id`` waits for room, and would fail with ``error`` now; None: it
        waits no longer (Supervisor)."""
        with self._lock:
            if error is None:
                self._waiting_for_memory.pop(request_id, None)
            else:
                self._waiting_for_memory[request_id] = error

    def memory_wait(self, request_id: str) -> BaseException | None:
        """Why ``request_id`` is still waiting for room, if it is."""
        with self._lock:
            return self._waiting_for_memory.get(request_id)

    def set_host(self, status: HostStatus) -> None:
        """A host's row: joined, its memory changed, or lost (Supervisor)."""
        with self._lock:
            self._hosts[status.host_id] = status

    def host_answered(self, host_id: str, at: float) -> None:
        """The host's agent answered a check at ``at`` (monotonic; its HostMonitor)."""
        with self._lock:
            self._host_answers[host_id] = at

    def hosts(self) -> list[HostStatus]:
        """Every host of the runtime, up and lost, in the order they joined."""
        now = time.monotonic()
        with self._lock:
            out = []
            for host_id, status in self._hosts.items():
                answered = self._host_answers.get(host_id)
                age = None if answered is None else round(max(0.0, now - answered), 3)
                out.append(msgspec.structs.replace(status, last_answer_s=age))
            return out

    def usage(self, instance_id: str) -> tuple[int, float, InstanceState] | None:
        """Lease count, last use and state of ``instance_id`` (admission reads them)."""
        with self._lock:
            row = self._rows.get(instance_id)
            return None if row is None else (row.lease_count, row.last_used, row.state)

    def _write(self, instance_id: str, state: InstanceState | None, **fields: object) -> None:
        with self._lock:
            row = self._rows.get(instance_id)
            if row is None:
                return
            for name, value in fields.items():
                setattr(row, name, value)
            if state is None:
                return
            row.state = state
            if state == "ready":
                self._ready[row.instance_key] = instance_id
            elif self._ready.get(row.instance_key) == instance_id:
                del self._ready[row.instance_key]

    # -- reads ---------------------------------------------------------------------

    def ready_endpoint(self, instance_key: str) -> tuple[str, EndpointDescriptor] | None:
        """The ready instance of ``instance_key`` and its endpoint, if there is one."""
        with self._lock:
            iid = self._ready.get(instance_key)
            row = self._rows.get(iid) if iid is not None else None
            if row is None or row.endpoint is None or row.state != "ready":
                return None
            return row.instance_id, row.endpoint

    def endpoint_if_ready(self, instance_id: str) -> EndpointDescriptor | None:
        """The endpoint of ``instance_id`` while it is ready, else None."""
        with self._lock:
            row = self._rows.get(instance_id)
            return row.endpoint if row is not None and row.state == "ready" else None

    def manifest(self, instance_id: str) -> BackendManifest | None:
        """What the instance's backend offers, or None if there is no such instance."""
        with self._lock:
            row = self._rows.get(instance_id)
            return None if row is None else row.manifest

    def state(self, instance_id: str) -> InstanceState | None:
        """The instance's state, or None if there is no such instance."""
        with self._lock:
            row = self._rows.get(instance_id)
            return None if row is None else row.state

    def __contains__(self, instance_id: object) -> bool:
        with self._lock:
            return instance_id in self._rows

    def snapshot(self, instance_id: str) -> RuntimeSnapshot | None:
        with self._lock:
            row = self._rows.get(instance_id)
            return None if row is None else self._freeze(row)

    def endpoint(self, instance_id: str) -> EndpointDescriptor | None:
        with self._lock:
            row = self._rows.get(instance_id)
            return None if row is None else row.endpoint

    def all(self) -> list[RuntimeSnapshot]:
        with self._lock:
            return [self._freeze(row) for row in self._rows.values()]

    @staticmethod
    def _freeze(row: _Row) -> RuntimeSnapshot:
        uptime = None
        if row.ready_since is not None and row.state == "ready":
            uptime = round(max(0.0, time.monotonic() - row.ready_since), 3)
        return RuntimeSnapshot(
            instance_id=row.instance_id,
            instance_key=row.instance_key,
            state=row.state,
            health=row.health,
            phase=row.phase if row.state == "starting" else None,
            pid=row.pid,
            port=row.port,
            lease_count=row.lease_count,
            restart_count=row.restart_count,
            uptime_s=uptime,
            log_path=row.log_path,
            last_error=row.last_error,
            health_reason=row.health_reason,
            health_cause=row.health_cause,
            load=row.load if row.state == "ready" else None,
            memory=row.memory,
            metadata=dict(row.metadata),
            host=row.host,
        )

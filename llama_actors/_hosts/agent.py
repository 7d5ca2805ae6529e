"""The host agent: one per host, running that host's servers for a head (CONTRACT §12).

An agent is a small local :class:`~llama_actors.Runtime` with no leases of its own:
the process seam (spawn, lifeline guard, ledger), readiness and health on the host's
own loopback and restarts under each instance's policy all work as on one machine.
The head (the caller's runtime) decides what runs where, holds every lease and
publishes every signal; the agent starts and stops what the head asks, and reports
each transition as it happens through :meth:`HostAgent.events`, a long poll that also
serves as a liveness answer.

Every method returns quickly (none waits on a server), so a transport may call them
from any thread; Ray runs this class as an actor (``llama_actors.ray``), and
``llama_actors.testing.hosts`` runs it in-process.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pykka

from llama_actors._base.secret import Secret
from llama_actors._base.state import default_state_dir
from llama_actors._exceptions import HostError, LlamaActorsError
from llama_actors._kernel.backend import BackendSpec
from llama_actors._kernel.memory import Capacity
from llama_actors._kernel.policy import InstancePolicy
from llama_actors._kernel.types import EndpointDescriptor, InstanceMemory
from llama_actors._llama.boot_spec import BootSpec, boot_spec
from llama_actors._runtime.context import tell
from llama_actors._runtime.hosts import HostInfo
from llama_actors._runtime.messages import HostEvent, OutcomeReported
from llama_actors._runtime.runtime import Runtime
from llama_actors._runtime.signals import (
    health_changed,
    instance_failed,
    instance_ready,
    instance_restarting,
    instance_starting,
    instance_stopped,
)

__all__ = ["HostAgent", "is_loopback"]

log = logging.getLogger("llama_actors.hosts")

#: The most events an agent keeps for a head that has not polled (oldest dropped).
_KEEP_EVENTS = 10_000
#: How long a start may take on the host before the agent stops waiting for it
#: (readiness itself is bounded by the spec's own deadlines).
_START_TIMEOUT_S = 24 * 3600.0

_SIGNALS = {
    "starting": instance_starting,
    "ready": instance_ready,
    "health": health_changed,
    "restarting": instance_restarting,
    "failed": instance_failed,
    "stopped": instance_stopped,
}


def is_loopback(address: str) -> bool:
    """Whether ``address`` is this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


class HostAgent:
    """Runs one host's servers for a head; see the module docstring.

    ``address`` is what the host's servers bind and publish (the Ray node's address);
    ``capacity`` what the agent reports the host may hold (None: what it has free now,
    :meth:`Capacity.detect`); ``state_dir`` the host's folder for logs and its ledger.
    """

    def __init__(
        self,
        *,
        host_id: str,
        node_id: str = "",
        address: str = "127.0.0.1",
        labels: Mapping[str, str] | None = None,
        capacity: Capacity | None = None,
        state_dir: str | Path | None = None,
    ) -> None:
        _reset_sigchld()
        self.host_id = host_id
        self.node_id = node_id
        self.address = address
        self.labels = dict(labels or {})
        self.capacity = capacity or Capacity.detect(host=host_id)
        folder = Path(state_dir) if state_dir is not None else default_state_dir()
        self._cond = threading.Condition()
        self._events: list[HostEvent] = []
        self._first = 0  # the sequence number of self._events[0]
        #: The head's id of each instance this agent runs, by its id here
        #: (``ID@HOST``: the head's own signals never look like this host's).
        self._mine: dict[str, str] = {}
        #: Instances whose start is still awaited: a failure waits for its error.
        self._starting: dict[str, dict[str, Any]] = {}
        self._shown: dict[str, tuple[str | None, InstanceMemory]] = {}
        self._closed = False
        self.runtime = Runtime(state_dir=folder / "hosts" / host_id)
        self._receivers = []
        for kind, sig in _SIGNALS.items():
            receiver = self._receiver(kind)
            sig.connect(receiver, weak=False)
            self._receivers.append((sig, receiver))

    def __repr__(self) -> str:
        return f"<HostAgent {self.host_id} at {self.address}>"

    # -- what the head calls ------------------------------------------------------------

    def hello(self) -> HostInfo:
        """What this host is: the head's first call."""
        return HostInfo(
            host_id=self.host_id,
            node_id=self.node_id,
            address=self.address,
            labels=dict(self.labels),
            capacity=self.capacity,
            agent_pid=os.getpid(),
        )

    def ping(self) -> int:
        """The head's check that this agent is alive; answers at once."""
        return os.getpid()

    def start(
        self, instance_id: str, spec: BackendSpec, policy: InstancePolicy
    ) -> LlamaActorsError | None:
        """Start ``instance_id`` from ``spec`` on this host: bound to the host's
        address, with a generated key when it has none. Returns at once; an error the
        spec has here (a missing model or binary) is returned, not raised."""
        try:
            hosted = self._for_host(spec)
            calls = self.runtime._calls
            call = calls.ensure(
                hosted,
                policy=policy,
                timeout=_START_TIMEOUT_S,
                reply=_Answer(self, instance_id),
                instance_id=self._here(instance_id),
            )
            with self._cond:
                self._mine[self._here(instance_id)] = instance_id
                self._starting[instance_id] = {}
            calls.send(call)
        except LlamaActorsError as exc:
            log.info("host %s: cannot start %s: %s", self.host_id, instance_id, exc)
            return exc
        return None

    def stop(self, instance_id: str, reason: str) -> None:
        """Stop ``instance_id`` (the head drained it already): SIGTERM, then SIGKILL
        after its stop timeout. Its ``stopped`` event follows."""
        here = self._here(instance_id)
        if here not in self.runtime._ctx.board:
            self._record(instance_id, "stopped", {"reason": reason, "exit": None})
            return
        calls = self.runtime._calls
        reply = _Stopped(self, instance_id, reason)
        calls.send(calls.stop(here, drain_timeout=0.0, timeout=None, reply=reply))

    def report(self, instance_id: str, ok: bool, detail: str) -> None:
        """A caller's outcome on the instance, relayed by the head (it holds the lease)."""
        here = self._here(instance_id)
        message = OutcomeReported(instance_id=here, lease_ref="", ok=ok, detail=detail)
        tell(self.runtime._ctx.supervisor, message)

    def events(self, cursor: int, wait_s: float) -> tuple[int, list[HostEvent]]:
        """The events after ``cursor``, waiting up to ``wait_s`` for one; returns the
        new cursor with them. Memory figures and starting phases that changed since
        the last poll come as ``memory`` and ``phase`` events."""
        with self._cond:
            self._cond.wait_for(lambda: self._first + len(self._events) > cursor, wait_s)
        self._figures()
        with self._cond:
            end = self._first + len(self._events)
            start = max(cursor, self._first) - self._first
            return end, list(self._events[start:])

    def close(self) -> None:
        """Stop every server of this host and the local runtime."""
        if self._closed:
            return
        self._closed = True
        self.runtime.close()
        for sig, receiver in self._receivers:
            sig.disconnect(receiver)

    # -- inside ---------------------------------------------------------------------------

    def _for_host(self, spec: BackendSpec) -> BackendSpec:
        """``spec`` bound to this host's address, with a key when it has none (a host's
        servers are reached from other machines, and every Ray worker on the host shares
        its loopback). The key goes to the server as a private file, never in argv."""
        if not isinstance(spec, BootSpec):
            return spec
        changes: dict[str, Any] = {"host": self.address}
        if spec.published_key is None:
            changes["api_key"] = Secret(secrets.token_urlsafe(32))
        return boot_spec(msgspec.structs.replace(spec, **changes))

    def _here(self, instance_id: str) -> str:
        return f"{instance_id}@{self.host_id}"

    def _receiver(self, kind: str) -> Any:
        def receive(here: Any, **data: Any) -> None:
            sender = self._mine.get(here)
            if sender is None:
                return
            if kind == "restarting":
                snap = self.runtime._ctx.board.snapshot(here)
                data = {**data, "restart_count": snap.restart_count if snap else 0}
            if kind == "ready" and isinstance(data.get("endpoint"), EndpointDescriptor):
                endpoint = data["endpoint"]
                data = {**data, "endpoint": _as_head(endpoint, here, sender)}
            with self._cond:
                if kind == "ready":
                    self._starting.pop(sender, None)
                elif kind == "failed" and sender in self._starting:
                    # Its start is still awaited: the error that ends it follows.
                    self._starting[sender] = data
                    return
            self._record(sender, kind, data)

        return receive

    def _start_failed(self, instance_id: str, error: BaseException) -> None:
        with self._cond:
            data = self._starting.pop(instance_id, None)
        if data is None:
            return
        reason = str(data.get("reason") or error)
        self._record(instance_id, "failed", {**data, "reason": reason, "error": error})

    def _start_done(self, instance_id: str) -> None:
        with self._cond:
            self._starting.pop(instance_id, None)

    def _record(self, instance_id: str, kind: str, data: Mapping[str, Any]) -> None:
        event = HostEvent(instance_id=instance_id, kind=kind, data=dict(data))
        with self._cond:
            self._events.append(event)
            if len(self._events) > _KEEP_EVENTS:
                drop = len(self._events) - _KEEP_EVENTS
                del self._events[:drop]
                self._first += drop
            self._cond.notify_all()

    def _figures(self) -> None:
        for here, iid in list(self._mine.items()):
            snap = self.runtime._ctx.board.snapshot(here)
            if snap is None:
                continue
            shown = (snap.phase, snap.memory)
            before = self._shown.get(iid)
            if before == shown:
                continue
            self._shown[iid] = shown
            if snap.phase is not None and (before is None or before[0] != snap.phase):
                self._record(iid, "phase", {"phase": snap.phase})
            if before is None or before[1] != snap.memory:
                self._record(iid, "memory", {"memory": snap.memory})


def _as_head(endpoint: EndpointDescriptor, here: str, instance_id: str) -> EndpointDescriptor:
    """The endpoint as the head publishes it: named by the head's instance id."""
    endpoint_id = endpoint.endpoint_id.replace(here, instance_id, 1)
    return msgspec.structs.replace(endpoint, endpoint_id=endpoint_id)


class _Answer(pykka.ThreadingFuture[Any]):
    """The reply target of an agent's start: its error (the start failed) becomes the
    instance's ``failed`` event; its value (ready) only ends the wait."""

    def __init__(self, agent: HostAgent, instance_id: str) -> None:
        super().__init__()
        self._agent = agent
        self._instance_id = instance_id

    def set(self, value: Any = None) -> None:
        self._agent._start_done(self._instance_id)

    def set_exception(self, exc_info: Any = None) -> None:
        error = exc_info[1] if isinstance(exc_info, tuple) else exc_info
        if isinstance(error, BaseException):
            self._agent._start_failed(self._instance_id, error)


class _Stopped(pykka.ThreadingFuture[Any]):
    """The reply target of an agent's stop: once the instance is stopped here (even
    one that had failed, which sends no ``instance_stopped``), the head hears
    ``stopped`` (a second one, after the signal's, is ignored there)."""

    def __init__(self, agent: HostAgent, instance_id: str, reason: str) -> None:
        super().__init__()
        self._agent = agent
        self._instance_id = instance_id
        self._reason = reason

    def set(self, value: Any = None) -> None:
        self._agent._record(self._instance_id, "stopped", {"reason": self._reason, "exit": None})

    def set_exception(self, exc_info: Any = None) -> None:
        self.set()


def _reset_sigchld() -> None:
    """Ray's subreaper option sets SIGCHLD to SIG_IGN in its workers, which makes the
    kernel reap children at once and breaks ``waitpid`` (measured: NOTES.md)."""
    if signal.getsignal(signal.SIGCHLD) != signal.SIG_IGN:
        return
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except ValueError as exc:  # not the main thread
        raise HostError(
            "SIGCHLD is ignored in this process, so server exits cannot be seen; unset "
            "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper on the hosts"
        ) from exc

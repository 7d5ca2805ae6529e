"""The head's side of hosts (CONTRACT §12): the seam to host agents, one
:class:`HostMonitor` per host and one :class:`HostedInstance` per instance placed on one.

The caller's runtime stays the authority for leases, health, signals and admission;
each host's agent runs the process seam there (spawn, lifeline guard, ledger,
readiness and health on the host's loopback, restarts) and reports every transition.
The head reaches an agent only through an :class:`AgentHandle`: a call returns a
``concurrent.futures.Future`` whose completion is told to an actor, so no actor ever
waits on a host. Ray is one way to run agents (``llama_actors.ray``); the same handle
over an in-process agent is how the head is tested without a cluster.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pykka

from llama_actors._base.clock import TimerHandle
from llama_actors._exceptions import (
    HostLostError,
    InstanceFailedError,
    LlamaActorsError,
    UsageError,
)
from llama_actors._kernel.backend import BackendSpec
from llama_actors._kernel.health import HealthCause
from llama_actors._kernel.memory import Capacity, MemoryNeed
from llama_actors._kernel.placement import PlacementPolicy
from llama_actors._kernel.policy import InstancePolicy
from llama_actors._kernel.types import EndpointDescriptor, Health, InstanceMemory
from llama_actors._runtime.actor import RuntimeActor
from llama_actors._runtime.context import Context, tell, tell_later
from llama_actors._runtime.messages import (
    AgentAnswered,
    Boot,
    HostCheckDue,
    HostEvent,
    HostEvents,
    HostLost,
    InstanceFailed,
    InstanceReady,
    InstanceStopped,
    MemoryMeasured,
    Message,
    OutcomeReported,
    StopInstance,
)
from llama_actors._runtime.signals import (
    emit,
    health_changed,
    instance_failed,
    instance_ready,
    instance_restarting,
    instance_starting,
    instance_stopped,
)

__all__ = [
    "AgentHandle",
    "HostInfo",
    "HostMonitor",
    "HostRules",
    "HostSource",
    "HostedInstance",
    "on_done",
]

log = logging.getLogger("llama_actors.hosts")


@dataclass(frozen=True)
class HostInfo:
    """What an agent says of its host when it starts: its name, Ray node, the address
    its servers bind and publish, its labels, what it may hold, and the agent's pid."""

    host_id: str
    node_id: str
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: Capacity = field(default_factory=Capacity)
    agent_pid: int | None = None


@runtime_checkable
class AgentHandle(Protocol):
    """How the head calls one host's agent. ``call`` sends at once and never waits: the
    answer (or the error) completes the future. ``kill`` ends the agent for good (its
    lifeline guard then kills its servers); it must not raise."""

    @property
    def host_id(self) -> str: ...
    def call(self, method: str, *args: Any) -> concurrent.futures.Future[Any]: ...
    def kill(self) -> None: ...


@runtime_checkable
class HostSource(Protocol):
    """What ``Runtime(hosts=...)`` takes: how to reach the hosts' agents, and the
    head's rules for them. ``connect`` runs once, in the caller's thread, and returns
    each agent with what it said of its host; ``close`` runs once the runtime's
    instances have stopped."""

    @property
    def placement(self) -> PlacementPolicy: ...
    @property
    def check_interval_s(self) -> float: ...
    @property
    def lost_after_misses(self) -> int: ...
    @property
    def check_timeout_s(self) -> float: ...
    def connect(self, timeout_s: float) -> list[tuple[AgentHandle, HostInfo]]: ...
    def close(self) -> None: ...


class HostRules:
    """The head's rules for its hosts, shared by every host source: ``placement``
    (``spread`` or ``pack``), a check of each agent every ``check_interval_ms`` that
    counts as missed after half an interval (``check_timeout_s``), and
    ``lost_after_misses`` misses in a row before a host is lost."""

    def __init__(
        self,
        *,
        placement: PlacementPolicy = "spread",
        check_interval_ms: int = 1000,
        lost_after_misses: int = 2,
    ) -> None:
        if placement not in ("spread", "pack"):
            raise UsageError(f"placement must be 'spread' or 'pack' (got {placement!r})")
        if isinstance(check_interval_ms, bool) or not isinstance(check_interval_ms, int):
            raise UsageError(f"check_interval_ms must be an int (got {check_interval_ms!r})")
        if check_interval_ms < 100:
            raise UsageError(
                f"check_interval_ms={check_interval_ms}: check hosts at most every 100 ms"
            )
        if (
            isinstance(lost_after_misses, bool)
            or not isinstance(lost_after_misses, int)
            or lost_after_misses < 1
        ):
            raise UsageError(f"lost_after_misses must be an int >= 1 (got {lost_after_misses!r})")
        self._placement: PlacementPolicy = placement
        self.check_interval_ms = check_interval_ms
        self._lost_after = lost_after_misses

    @property
    def placement(self) -> PlacementPolicy:
        return self._placement

    @property
    def check_interval_s(self) -> float:
        return self.check_interval_ms / 1000.0

    @property
    def lost_after_misses(self) -> int:
        return self._lost_after

    @property
    def check_timeout_s(self) -> float:
        """How long a check may take before it counts as missed: half an interval."""
        return self.check_interval_s / 2


def on_done(
    future: concurrent.futures.Future[Any], ref: pykka.ActorRef[Any], call: str, token: int
) -> None:
    """Tell ``ref`` an :class:`AgentAnswered` when ``future`` completes (from whatever
    thread completes it: the receiving actor does the work)."""

    def done(f: concurrent.futures.Future[Any]) -> None:
        try:
            value = f.result()
        except BaseException as exc:
            tell(ref, AgentAnswered(call=call, token=token, error=exc))
        else:
            tell(ref, AgentAnswered(call=call, token=token, value=value))

    future.add_done_callback(done)


class HostMonitor(RuntimeActor):
    """One per host: checks its agent every ``interval_s`` (a check not answered
    within ``timeout_s``, half an interval by default, or failed, is a miss, and is
    followed by another check at once; ``misses`` in a row and the host is lost)
    and keeps one long poll for the agent's events open, handing them to the
    supervisor as they come. A lost host's agent is killed, so a host that was only
    cut off does not keep servers the head has written off."""

    def __init__(
        self,
        *,
        host_id: str,
        agent: AgentHandle,
        interval_s: float,
        misses: int,
        context: Context,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(context=context)
        self.host_id = host_id
        self.agent = agent
        self.interval_s = interval_s
        #: How long a check may take before it counts as missed.
        self.timeout_s = min(interval_s, timeout_s if timeout_s is not None else interval_s / 2)
        self.misses_allowed = misses
        self.misses = 0
        self.lost = False
        self.cursor = 0
        self._check_token = 0
        self._ping_token = 0
        #: Pings sent and not answered, by token: whether each one was counted a miss.
        self._pending: dict[int, bool] = {}
        self._poll_token = 0
        self._timer: TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<HostMonitor of {self.host_id}>"

    def on_start(self) -> None:
        super().on_start()
        self._answered()
        self._poll()
        self._check()

    def on_stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def handle(self, message: Message) -> None:
        match message:
            case HostCheckDue(token=token, kind="check"):
                if token == self._check_token and not self.lost:
                    self._check()
            case HostCheckDue(token=token, kind="poll"):
                if token == self._poll_token and not self.lost:
                    self._poll()
            case HostCheckDue(token=token, kind="deadline"):
                if self._pending.get(token) is False and not self.lost:
                    self._pending[token] = True
                    self._miss(f"no answer to a check within {self.timeout_s:g}s")
            case AgentAnswered(call="ping", token=token, error=error):
                self._pong(token, error)
            case AgentAnswered(call="events", token=token, value=value, error=error):
                if token == self._poll_token and not self.lost:
                    self._events(value, error)
            case _:
                log.warning("host %s: unexpected %r", self.host_id, message)

    def _check(self) -> None:
        self._ping_token += 1
        self._pending[self._ping_token] = False
        deadline = HostCheckDue(token=self._ping_token, kind="deadline")
        tell_later(self.ctx.timers, self.timeout_s, self.actor_ref, deadline)
        try:
            future = self.agent.call("ping")
        except Exception as exc:
            self._pong(self._ping_token, exc)
        else:
            on_done(future, self.actor_ref, "ping", self._ping_token)
        self._check_token += 1
        if self._timer is not None:
            self._timer.cancel()
        self._timer = tell_later(
            self.ctx.timers, self.interval_s, self.actor_ref, HostCheckDue(token=self._check_token)
        )

    def _pong(self, token: int, error: BaseException | None) -> None:
        counted = self._pending.pop(token, None)
        if self.lost or counted is None:
            return
        if error is None:
            self.misses = 0
            self._answered()
            return
        if not counted:
            self._miss(f"a check failed: {type(error).__name__}: {error}")

    def _miss(self, why: str) -> None:
        self.misses += 1
        log.info(
            "host %s: missed check %d of %d (%s)",
            self.host_id,
            self.misses,
            self.misses_allowed,
            why,
        )
        if self.misses >= self.misses_allowed and not self.lost:
            self.lost = True
            reason = (
                f"host lost: its agent missed {self.misses} checks in a row "
                f"(every {self.interval_s:g}s; last: {why})"
            )
            log.warning("host %s: %s", self.host_id, reason)
            tell(self.ctx.supervisor, HostLost(host_id=self.host_id, reason=reason))
        elif not self.lost:
            # After a miss, check again at once rather than at the next interval: a
            # host that is gone is known sooner, one that only hiccupped answers.
            self._check()
            self.agent.kill()

    def _poll(self) -> None:
        self._poll_token += 1
        try:
            future = self.agent.call("events", self.cursor, self.interval_s)
        except Exception as exc:
            self._events(None, exc)
            return
        on_done(future, self.actor_ref, "events", self._poll_token)

    def _events(self, value: Any, error: BaseException | None) -> None:
        if error is not None or value is None:
            # The checks decide whether the host is lost; poll again after a pause.
            log.debug("host %s: events poll failed: %r", self.host_id, error)
            self._poll_token += 1
            again = HostCheckDue(token=self._poll_token, kind="poll")
            tell_later(self.ctx.timers, self.interval_s, self.actor_ref, again)
            return
        self.misses = 0
        self._answered()
        cursor, events = value
        self.cursor = cursor
        if events:
            tell(self.ctx.supervisor, HostEvents(host_id=self.host_id, events=tuple(events)))
        self._poll()

    def _answered(self) -> None:
        self.ctx.board.host_answered(self.host_id, time.monotonic())


class HostedInstance(RuntimeActor):
    """One instance placed on a host, as the head sees it: it asks the agent to start
    and stop it, and mirrors what the agent reports (the board, the signals, and the
    supervisor's ``InstanceReady``/``InstanceFailed``/``InstanceStopped``) as a
    BackendActor does for a local one. Restarts are the agent's, under the instance's
    policy; a lost host fails the instance at once."""

    def __init__(
        self,
        *,
        instance_id: str,
        host_id: str,
        agent: AgentHandle,
        spec: BackendSpec,
        policy: InstancePolicy,
        context: Context,
        estimate: MemoryNeed | None = None,
    ) -> None:
        super().__init__(context=context)
        self.instance_id = instance_id
        self.host_id = host_id
        self.agent = agent
        self.spec = spec
        self.policy = policy
        self.estimate = estimate
        self.state = "starting"
        self.health: Health = "unknown"
        self.ever_ready = False
        self.stop_reason: str | None = None
        self._ended = False
        self._memory: InstanceMemory | None = None

    def __repr__(self) -> str:
        return f"<HostedInstance {self.instance_id} on {self.host_id}>"

    def handle(self, message: Message) -> None:
        match message:
            case Boot():
                self._send("start", self.instance_id, self.spec, self.policy)
            case HostEvent(kind=kind, data=data):
                self._event(kind, data)
            case AgentAnswered(call=call, error=error, value=value):
                self._answer(call, error, value)
            case OutcomeReported(ok=ok, detail=detail):
                if self.state == "ready":
                    self._send("report", self.instance_id, ok, detail)
            case StopInstance(reason=reason):
                self._begin_stop(reason)
            case HostLost(reason=reason):
                self._host_lost(reason)
            case _:
                log.warning("instance %s: unexpected %r", self.instance_id, message)

    def after_internal_error(self, exc: Exception) -> None:
        self._give_up(f"internal error: {type(exc).__name__}: {exc}", exc)

    def _send(self, method: str, *args: Any) -> None:
        try:
            future = self.agent.call(method, *args)
        except Exception as exc:
            self._answer(method, exc, None)
            return
        on_done(future, self.actor_ref, method, 0)

    def _answer(self, call: str, error: BaseException | None, value: Any) -> None:
        problem = error if error is not None else value
        if not isinstance(problem, BaseException):
            return
        if call == "start":
            cause = _unwrap(problem)
            if isinstance(cause, LlamaActorsError):
                self._give_up(str(cause), cause)
            else:
                message = (
                    f"instance {self.instance_id}: the agent on host {self.host_id} could not "
                    f"start it: {type(cause).__name__}: {cause}"
                )
                self._give_up(
                    message,
                    InstanceFailedError(message, instance_id=self.instance_id, reason=message),
                )
        elif call == "stop" and self.stop_reason is not None:
            # The agent cannot stop it (gone): the host's lifeline guard does.
            log.info(
                "instance %s: stop on host %s failed: %r", self.instance_id, self.host_id, problem
            )
            self._stopped(None)

    # -- what the agent reports ------------------------------------------------------

    def _event(self, kind: str, data: Mapping[str, Any]) -> None:
        iid = self.instance_id
        board = self.ctx.board
        if self._ended:
            return
        if kind == "starting":
            if self.state in ("failed", "stopping"):
                return
            self.state = "starting"
            board.starting(iid, pid=data.get("pid"), phase="spawned")
            emit(instance_starting, iid, attempt=data.get("attempt", 0), pid=data.get("pid"))
        elif kind == "phase":
            if self.state == "starting" and data.get("phase"):
                board.set_phase(iid, str(data["phase"]))
        elif kind == "ready":
            if self.state in ("failed", "stopping"):
                return
            endpoint: EndpointDescriptor = data["endpoint"]
            self.state = "ready"
            self.ever_ready = True
            board.ready(iid, port=data["port"], pid=data.get("pid"), endpoint=endpoint)
            emit(
                instance_ready,
                iid,
                endpoint=endpoint,
                pid=data.get("pid"),
                port=data["port"],
                elapsed_s=data.get("elapsed_s", 0.0),
            )
            tell(self.ctx.supervisor, InstanceReady(instance_id=iid, endpoint=endpoint))
        elif kind == "health":
            self._set_health(data["new"], data["reason"], data["cause"], data.get("load"))
        elif kind == "restarting":
            if self.state in ("failed", "stopping"):
                return
            self.state = "starting"
            board.backing_off(
                iid, restart_count=data.get("restart_count", 0), last_error=data["reason"]
            )
            emit(
                instance_restarting,
                iid,
                attempt=data["attempt"],
                delay_s=data["delay_s"],
                reason=data["reason"],
            )
        elif kind == "memory":
            self._set_memory(data["memory"])
        elif kind == "failed":
            error = data.get("error")
            if not isinstance(error, BaseException):
                error = InstanceFailedError(
                    str(data["reason"]), instance_id=iid, reason=str(data["reason"])
                )
            self._give_up(str(data["reason"]), error, data.get("exit"))
        elif kind == "stopped":
            self._stopped(data.get("exit"))

    def _set_health(self, new: Health, reason: str, cause: HealthCause, load: Any) -> None:
        if new == self.health:
            return
        old, self.health = self.health, new
        self.ctx.board.set_health(self.instance_id, new, reason, cause)
        if load is not None:
            self.ctx.board.set_load(self.instance_id, load)
        emit(
            health_changed,
            self.instance_id,
            old=old,
            new=new,
            reason=reason,
            cause=cause,
            load=load,
        )

    def _set_memory(self, memory: InstanceMemory) -> None:
        if memory == self._memory:
            return
        self._memory = memory
        shown = InstanceMemory(
            estimate=self.estimate if self.estimate is not None else memory.estimate,
            measured=memory.measured,
            rss_mib=memory.rss_mib,
            error_pct=memory.error_pct,
        )
        self.ctx.board.set_memory(self.instance_id, shown)
        if memory.measured is not None:
            tell(
                self.ctx.supervisor,
                MemoryMeasured(instance_id=self.instance_id, measured=memory.measured),
            )

    # -- stopping, failing, losing the host ------------------------------------------

    def _begin_stop(self, reason: str) -> None:
        if self.stop_reason is not None or self._ended:
            return
        self.stop_reason = reason
        if self.state == "lost":
            self._stopped(None)
            return
        if self.state != "failed":
            self.state = "stopping"
            self.ctx.board.stopping(self.instance_id)
        self._send("stop", self.instance_id, reason)

    def _host_lost(self, reason: str) -> None:
        if self._ended:
            return
        was = self.state
        self.state = "lost"
        if self.stop_reason is not None or was == "failed":
            self._stopped(None)
            return
        self._set_health("unavailable", reason, "exited", None)
        self.ctx.board.process_gone(self.instance_id)
        self.ctx.board.failed(self.instance_id, last_error=reason)
        emit(instance_failed, self.instance_id, reason=reason, exit=None)
        error = HostLostError(
            f"instance {self.instance_id}: {reason}; a new resolve places its spec on "
            "another host that may run it",
            instance_id=self.instance_id,
            host_id=self.host_id,
        )
        tell(
            self.ctx.supervisor,
            InstanceFailed(instance_id=self.instance_id, error=error, lease_reason="host lost"),
        )

    def _give_up(self, reason: str, error: BaseException, report: Any = None) -> None:
        if self.state in ("failed", "lost") or self._ended:
            return
        self.state = "failed"
        self.ctx.board.failed(self.instance_id, last_error=reason)
        if self.health not in ("unknown", "unavailable"):
            self._set_health("unavailable", reason, "failed", None)
        emit(instance_failed, self.instance_id, reason=reason, exit=report)
        tell(self.ctx.supervisor, InstanceFailed(instance_id=self.instance_id, error=error))

    def _stopped(self, report: Any) -> None:
        if self._ended:
            return
        self._ended = True
        if self.state not in ("failed", "lost"):
            reason = self.stop_reason or "stopped"
            self.ctx.board.stopped(self.instance_id)
            if self.health not in ("unknown", "unavailable"):
                self._set_health("unavailable", f"stopped: {reason}", "stopped", None)
            emit(instance_stopped, self.instance_id, reason=reason, exit=report)
        self.state = "stopped" if self.state != "lost" else "lost"
        tell(self.ctx.supervisor, InstanceStopped(instance_id=self.instance_id))


def _unwrap(error: BaseException) -> BaseException:
    """The error a remote call raised, without the transport's wrapper (Ray wraps a
    task's exception; its ``cause`` is the original)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error

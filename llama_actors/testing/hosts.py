"""Hosts in this process, for tests of code that runs on a runtime with hosts.

``Runtime(hosts=LocalHosts({"a": {"zone": "x"}, "b": {}}))`` gives the runtime two
hosts whose agents are real :class:`~llama_actors.ray.HostAgent`\\ s (each a local
runtime with its own process seam) called on threads instead of through Ray: the head
(placement, checks, leases, signals) is exactly the one a Ray cluster gets, with no
cluster to start. :meth:`LocalHosts.cut` makes a host stop answering, as a host that
lost its power or its network does, and ends its servers (as its lifeline does).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from llama_actors._exceptions import UsageError
from llama_actors._hosts.agent import HostAgent
from llama_actors._kernel.memory import Capacity
from llama_actors._kernel.placement import PlacementPolicy
from llama_actors._runtime.hosts import AgentHandle, HostInfo, HostRules

__all__ = ["LocalAgent", "LocalHosts"]


class LocalAgent:
    """An :class:`AgentHandle` on an in-process agent: each call runs on a thread.
    Once cut, calls never complete (like calls to a host that is gone)."""

    def __init__(self, agent: HostAgent) -> None:
        self.agent = agent
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix=f"agent-{agent.host_id}"
        )
        self.cut = threading.Event()
        self.killed = threading.Event()

    @property
    def host_id(self) -> str:
        return self.agent.host_id

    def call(self, method: str, *args: Any) -> concurrent.futures.Future[Any]:
        answer: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self.cut.is_set() or self.killed.is_set():
            return answer  # never answered
        inner = self._pool.submit(getattr(self.agent, method), *args)

        def relay(done: concurrent.futures.Future[Any]) -> None:
            if self.cut.is_set():
                return  # what a cut-off host says never arrives
            if done.exception() is not None:
                answer.set_exception(done.exception())
            else:
                answer.set_result(done.result())

        inner.add_done_callback(relay)
        return answer

    def kill(self) -> None:
        self.killed.set()

    def shutdown(self) -> None:
        self.agent.close()
        self._pool.shutdown(wait=True, cancel_futures=True)


class LocalHosts(HostRules):
    """Hosts ``name -> labels`` run in this process; see the module docstring.

    ``capacity`` is what every host may hold (or one per host name; default: RAM not
    capped, no GPUs, so specs need no GGUF header); ``state_dir`` holds each host's
    logs and ledger. The rest is as for ``RayHosts``.
    """

    def __init__(
        self,
        hosts: Mapping[str, Mapping[str, str]],
        *,
        state_dir: str | Path,
        capacity: Capacity | Mapping[str, Capacity] | None = None,
        placement: PlacementPolicy = "spread",
        check_interval_ms: int = 1000,
        lost_after_misses: int = 2,
    ) -> None:
        super().__init__(
            placement=placement,
            check_interval_ms=check_interval_ms,
            lost_after_misses=lost_after_misses,
        )
        if not hosts:
            raise UsageError("LocalHosts needs at least one host, such as {'a': {}}")
        self.labels = {name: dict(labels) for name, labels in hosts.items()}
        self.state_dir = Path(state_dir)
        self.capacity = capacity
        self.agents: dict[str, LocalAgent] = {}

    def connect(self, timeout_s: float) -> list[tuple[AgentHandle, HostInfo]]:
        joined: list[tuple[AgentHandle, HostInfo]] = []
        for name, labels in self.labels.items():
            agent = HostAgent(
                host_id=name,
                node_id=f"local-{name}",
                labels={**labels, "host": name},
                capacity=self._capacity_of(name),
                state_dir=self.state_dir,
            )
            handle = LocalAgent(agent)
            self.agents[name] = handle
            joined.append((handle, agent.hello()))
        return joined

    def cut(self, name: str) -> None:
        """Host ``name`` stops answering and its servers end (its agent is closed)."""
        handle = self.agents[name]
        handle.cut.set()
        handle.agent.close()

    def pids(self, name: str) -> list[int]:
        """The server pids host ``name``'s agent runs now."""
        return [s.pid for s in handle_instances(self.agents[name].agent) if s.pid is not None]

    def close(self) -> None:
        for handle in self.agents.values():
            handle.shutdown()

    def _capacity_of(self, name: str) -> Capacity:
        capacity = self.capacity
        if isinstance(capacity, Mapping):
            capacity = capacity.get(name)
        return msgspec.structs.replace(capacity or Capacity(gpus=()), host=name)


def handle_instances(agent: HostAgent) -> list[Any]:
    """The snapshots of the instances an agent's local runtime runs."""
    return [s for s in agent.runtime.instances() if s.state in ("starting", "ready", "stopping")]

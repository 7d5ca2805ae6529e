"""Hosts through Ray (CONTRACT §12): one :class:`HostAgent` actor on every Ray node that
offers the ``llama_host`` resource, pinned there, owned by the caller's process.

Ray gives the membership (``ray.nodes()``), the node labels, the calls between the
head and the agents, and ownership: an agent is a non-detached actor, so it dies with
the process that created it, and its lifeline guard then kills its servers. Ray's own
verdict on a lost node comes after about 14 s here (NOTES.md), so the head does not
wait for it: it checks each agent itself (``check_interval_ms``, ``lost_after_misses``).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from llama_actors._exceptions import HostError, RayUnavailableError, UsageError
from llama_actors._hosts.agent import HostAgent
from llama_actors._kernel.memory import Capacity
from llama_actors._kernel.placement import PlacementPolicy
from llama_actors._runtime.hosts import AgentHandle, HostInfo, HostRules

__all__ = ["RayAgent", "RayHosts"]

log = logging.getLogger("llama_actors.hosts")

#: Concurrent calls an agent serves: its events poll, checks, starts and stops.
_AGENT_CONCURRENCY = 16


def _ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise RayUnavailableError(
            "llama_actors.ray needs the ray package: pip install 'llama-actors[ray]'"
        ) from exc


class RayAgent:
    """The head's :class:`AgentHandle` on one Ray actor."""

    def __init__(self, actor: Any, host_id: str) -> None:
        self.actor = actor
        self._host_id = host_id

    @property
    def host_id(self) -> str:
        return self._host_id

    def __repr__(self) -> str:
        return f"<RayAgent of {self._host_id}>"

    def call(self, method: str, *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = getattr(self.actor, method).remote(*args).future()
        return future

    def kill(self) -> None:
        try:
            _ray().kill(self.actor, no_restart=True)
        except Exception as exc:  # the host may be gone already
            log.debug("host %s: killing its agent: %r", self._host_id, exc)


class RayHosts(HostRules):
    """The hosts of a Ray cluster, for ``Runtime(hosts=RayHosts(...))``.

    ``address`` is given to ``ray.init`` when this process is not connected yet
    (``"auto"``: the cluster this machine belongs to; None: start a local one). Every
    alive node with the ``resource`` (``llama_host``: start hosts with
    ``ray start --resources '{"llama_host": 1}'``) gets one agent. A host is named by
    its node label ``host`` when it has one, else by the start of its node id.

    ``placement`` picks among the hosts where a new instance fits: ``spread`` (the most
    free RAM) or ``pack`` (the least that still fits). The head checks each agent every
    ``check_interval_ms``; ``lost_after_misses`` checks in a row unanswered and the host
    is lost. ``capacity`` replaces what the agents detect (one for every host, or one per
    host id); ``state_dir`` is the folder on each host for logs and the server ledger.
    ``init`` holds more keywords for ``ray.init`` (``namespace``, ``runtime_env``...).
    """

    def __init__(
        self,
        address: str | None = "auto",
        *,
        placement: PlacementPolicy = "spread",
        check_interval_ms: int = 1000,
        lost_after_misses: int = 2,
        capacity: Capacity | Mapping[str, Capacity] | None = None,
        state_dir: str | Path | None = None,
        resource: str = "llama_host",
        init: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            placement=placement,
            check_interval_ms=check_interval_ms,
            lost_after_misses=lost_after_misses,
        )
        if capacity is not None and not isinstance(capacity, Capacity | Mapping):
            raise UsageError(
                "capacity must be a Capacity, or a mapping of host id to Capacity "
                f"(got {capacity!r})"
            )
        self.address = address
        self.capacity = capacity
        self.state_dir = str(state_dir) if state_dir is not None else None
        self.resource = resource
        self.init = dict(init or {})
        self._agents: list[RayAgent] = []
        self._started_ray = False

    def __repr__(self) -> str:
        return f"RayHosts(address={self.address!r}, placement={self.placement!r})"

    def connect(self, timeout_s: float) -> list[tuple[AgentHandle, HostInfo]]:
        """Connect to Ray (unless this process is already), start an agent on each
        host and wait up to ``timeout_s`` for each to say what its host is."""
        ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, **self.init)
            except Exception as exc:
                raise HostError(
                    f"cannot connect to the Ray cluster at address={self.address!r} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    "check the head is up (`ray status` on it) and the address, or pass "
                    "address=None to start a local cluster"
                ) from exc
            self._started_ray = True
        nodes = [
            n
            for n in ray.nodes()
            if n.get("Alive") and n.get("Resources", {}).get(self.resource, 0) >= 1
        ]
        if not nodes:
            self.close()
            raise HostError(
                f"no alive Ray node offers the resource {self.resource!r}, so there is no "
                "host to run servers on; start each host with "
                f"ray start --address=HEAD:6379 --resources '{{\"{self.resource}\": 1}}'"
            )
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = ray.remote(HostAgent)
        pending = []
        named: dict[str, str] = {}
        for node in nodes:
            node_id = node["NodeID"]
            labels = {
                k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")
            }
            host_id = labels.get("host") or f"host-{node_id[:8]}"
            if host_id in named:
                self.close()
                raise HostError(
                    f"two Ray nodes ({named[host_id][:12]} and {node_id[:12]}) have the label "
                    f"host={host_id}; give each host its own (ray start --labels host=NAME)",
                    host_id=host_id,
                )
            named[host_id] = node_id
            actor = remote.options(
                num_cpus=0,
                resources={self.resource: 1},
                max_concurrency=_AGENT_CONCURRENCY,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(
                host_id=host_id,
                node_id=node_id,
                address=node["NodeManagerAddress"],
                labels=labels,
                capacity=self._capacity_of(host_id),
                state_dir=self.state_dir,
            )
            agent = RayAgent(actor, host_id)
            self._agents.append(agent)
            pending.append((agent, actor.hello.remote()))
        joined: list[tuple[AgentHandle, HostInfo]] = []
        problems: list[str] = []
        deadline = time.monotonic() + timeout_s
        for agent, ref in pending:
            try:
                info = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                # A node Ray still lists may be gone (its verdict takes ~14 s): skip it.
                problems.append(f"{agent.host_id}: {type(exc).__name__}: {exc}".split("\n")[0])
                log.warning("host %s: its agent did not start: %s", agent.host_id, exc)
                agent.kill()
                self._agents.remove(agent)
                continue
            joined.append((agent, info))
            log.info("host %s: agent pid %s at %s", info.host_id, info.agent_pid, info.address)
        if not joined:
            self.close()
            raise HostError(
                f"no host agent started within {timeout_s:g}s ({'; '.join(problems)}); each "
                f"host runs one agent (it holds the host's {self.resource!r} resource), so "
                "another runtime connected to the same cluster keeps them busy until it "
                "closes; else check `ray status` and the logs under /tmp/ray/session_latest/logs"
            )
        return joined

    def close(self) -> None:
        """End every agent (their servers stopped already when the runtime closed)."""
        agents, self._agents = self._agents, []
        if agents:
            ray = _ray()
            try:  # each agent closes its runtime (stops what is left), then goes
                ray.get([agent.actor.close.remote() for agent in agents], timeout=30)
            except Exception as exc:  # a lost host does not answer
                log.debug("closing the host agents: %r", exc)
        for agent in agents:
            agent.kill()
        if self._started_ray:
            self._started_ray = False
            _ray().shutdown()

    def _capacity_of(self, host_id: str) -> Capacity | None:
        capacity = self.capacity
        if isinstance(capacity, Mapping):
            capacity = capacity.get(host_id)
        return msgspec.structs.replace(capacity, host=host_id) if capacity is not None else None

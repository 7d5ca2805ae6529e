"""A Ray cluster of several hosts on this machine, for tests, examples and benchmarks.

``local_cluster`` starts ``ray.cluster_utils.Cluster``: a head node with no CPUs (so
no agent lands there) and one node per host, each with the ``llama_host`` resource
and its labels (``host`` names it). Every address stays on loopback: Ray otherwise
publishes this machine's interface address even for a local cluster, so the cluster
is told ``127.0.0.1`` and Ray's own look-up of "the" node address is turned off.
One cluster costs about 1 GB and 5-10 s here (NOTES.md): share one per test module.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

from llama_actors._exceptions import RayUnavailableError

__all__ = ["LocalCluster", "is_ray_process", "local_cluster", "loopback_only", "open_clusters"]

_NODE = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024 * 1024}
_open: list[LocalCluster] = []
#: What Ray's own processes look like: its binaries and workers (a worker renames
#: itself ``ray::ClassName``), never the servers its actors start.
_RAY_PROCESS = re.compile(r"^ray::|/ray/(core|_private|dashboard|autoscaler)/|raylet|gcs_server")
#: How long Ray's processes may take to end once the cluster is shut down.
_SHUTDOWN_GRACE_S = 30.0


def open_clusters() -> int:
    """How many local clusters this process has open now."""
    return len(_open)


def is_ray_process(proc: psutil.Process) -> bool:
    """Whether ``proc`` is one of Ray's own processes (not a server an agent started)."""
    try:
        return bool(_RAY_PROCESS.search(" ".join(proc.cmdline()) or proc.name()))
    except psutil.Error:
        return False


def loopback_only() -> None:
    """Keep Ray's addresses on loopback in this process and the nodes it starts:
    without it Ray turns ``127.0.0.1`` into the machine's interface address."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants
    except ImportError:
        return
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time, so this holds now


@dataclass
class LocalCluster:
    """A running local cluster: its address for ``RayHosts(address=...)``, and each
    host's Ray node by name (for ``remove_node``)."""

    cluster: Any
    address: str
    nodes: dict[str, Any] = field(default_factory=dict)

    def remove_host(self, name: str, *, graceful: bool = False) -> None:
        """Take host ``name`` away (hard by default: its raylet is killed)."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=graceful)

    def add_host(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        """Add a host ``name`` with ``labels`` (its ``host`` label is ``name``)."""
        self.nodes[name] = self.cluster.add_node(
            num_cpus=1,
            resources={"llama_host": 1},
            labels={**(labels or {}), "host": name},
            **_NODE,
        )


@contextlib.contextmanager
def local_cluster(
    hosts: Mapping[str, Mapping[str, str]], *, connect: bool = True
) -> Iterator[LocalCluster]:
    """A local Ray cluster with one node per entry of ``hosts`` (name -> labels),
    connected to from this process unless ``connect`` is False; shut down after."""
    loopback_only()
    try:
        ray: Any = importlib.import_module("ray")
        Cluster: Any = importlib.import_module("ray.cluster_utils").Cluster
    except ImportError as exc:
        raise RayUnavailableError(
            "local_cluster needs the ray package: pip install 'llama-actors[ray]'"
        ) from exc
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, **_NODE},
    )
    local = LocalCluster(cluster=cluster, address=str(cluster.address))
    _open.append(local)
    try:
        for name, labels in hosts.items():
            local.add_host(name, labels)
        cluster.wait_for_nodes()
        if connect:
            ray.init(address=local.address)
        yield local
    finally:
        try:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
        finally:
            _open.remove(local)
        _wait_for_ray_to_end()


def _wait_for_ray_to_end() -> None:
    """Every Ray process this one started has ended, or RuntimeError naming them."""
    mine = [p for p in psutil.Process().children(recursive=True) if is_ray_process(p)]
    _gone, alive = psutil.wait_procs(mine, timeout=_SHUTDOWN_GRACE_S)
    if alive:
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        raise RuntimeError(
            f"Ray processes still running {_SHUTDOWN_GRACE_S:g}s after the cluster shut "
            f"down (now killed): {sorted(p.pid for p in alive)}"
        )

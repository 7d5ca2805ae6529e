"""llama_actors on several hosts through Ray (CONTRACT §12; guides/hosts.md).

``Runtime(hosts=RayHosts(address="auto"))`` runs each new llama-server instance on a
host of the Ray cluster (a node started with the ``llama_host`` resource), placed by
its spec's ``host_labels`` and ``host_gpus`` and by the memory it needs, while the
caller's runtime stays the one authority for leases, health, signals and admission.
Needs the ``ray`` extra: ``pip install 'llama-actors[ray]'``.
"""

from llama_actors._hosts.agent import HostAgent
from llama_actors._hosts.ray_hosts import RayAgent, RayHosts
from llama_actors._runtime.hosts import AgentHandle, HostInfo, HostSource

__all__ = ["AgentHandle", "HostAgent", "HostInfo", "HostSource", "RayAgent", "RayHosts"]

"""llama_actors: llama.cpp's llama-server as supervised actors behind leased endpoints.

This namespace is what a service uses: the runtimes, boot specs and policies, the
values they hand back, and the errors they raise. The plumbing underneath (the process
seam, the binary probe, rendering, the scheduler, the actors themselves) is in
:mod:`llama_actors.lowlevel`, for tools and tests that need it.
"""

from llama_actors import _exceptions, lowlevel, signals
from llama_actors._backends.attach import AttachSpec, attach_spec
from llama_actors._backends.registry import (
    backend_manifest,
    backends,
    compatibility,
    register_backend,
    unregister_backend,
    validate_spec,
)
from llama_actors._cli.config import Config, load_config, parse_config
from llama_actors._exceptions import *  # noqa: F403 - every error is public
from llama_actors._kernel.backend import Backend, BackendBase, BackendSpec, ExitVerdict
from llama_actors._kernel.load import ServerLoad
from llama_actors._kernel.manifest import BackendManifest, CompatibilityResult, ConsumerManifest
from llama_actors._kernel.memory import Capacity, Gpu, MemoryNeed
from llama_actors._kernel.policy import InstancePolicy, RestartPolicy
from llama_actors._kernel.types import (
    EndpointDescriptor,
    Ensured,
    Health,
    HostStatus,
    InstanceMemory,
    InstanceState,
    Lease,
    MemoryStatistics,
    Resolution,
    RuntimeSnapshot,
    RuntimeStatistics,
)
from llama_actors._llama.boot_spec import BootSpec, boot_spec
from llama_actors._runtime.actor_face import ActorFace
from llama_actors._runtime.aio import AsyncRuntime, SignalEvent, SignalStream, signal_stream
from llama_actors._runtime.messages import Replied
from llama_actors._runtime.runtime import Runtime

__version__ = "0.1.0"

__all__ = [
    "ActorFace",
    "AsyncRuntime",
    "AttachSpec",
    "Backend",
    "BackendBase",
    "BackendManifest",
    "BackendSpec",
    "BootSpec",
    "Capacity",
    "CompatibilityResult",
    "Config",
    "ConsumerManifest",
    "EndpointDescriptor",
    "Ensured",
    "ExitVerdict",
    "Gpu",
    "Health",
    "HostStatus",
    "InstanceMemory",
    "InstancePolicy",
    "InstanceState",
    "Lease",
    "MemoryNeed",
    "MemoryStatistics",
    "Replied",
    "Resolution",
    "RestartPolicy",
    "Runtime",
    "RuntimeSnapshot",
    "RuntimeStatistics",
    "ServerLoad",
    "SignalEvent",
    "SignalStream",
    "attach_spec",
    "backend_manifest",
    "backends",
    "boot_spec",
    "compatibility",
    "load_config",
    "lowlevel",
    "parse_config",
    "register_backend",
    "signal_stream",
    "signals",
    "unregister_backend",
    "validate_spec",
    *_exceptions.__all__,
]

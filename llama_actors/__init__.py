"""llama_actors: llama.cpp's llama-server as supervised actors behind leased endpoints.

This namespace is what a service uses: the runtimes, boot specs and policies, the
values they hand back, and the errors they raise. The plumbing underneath (the process
seam, the binary probe, rendering, the scheduler, the actors themselves) is in
:mod:`llama_actors.lowlevel`, for tools and tests that need it.
"""

from llama_actors import lowlevel, signals
from llama_actors._cli.config import Config, load_config, parse_config
from llama_actors._exceptions import (
    BinaryError,
    BinaryNotFoundError,
    BinaryProbeError,
    BootSpecError,
    IncompatibleError,
    InstanceError,
    InstanceFailedError,
    InstanceNotFoundError,
    LeaseError,
    LeaseExpiredError,
    LeaseNotFoundError,
    LlamaActorsError,
    ManifestError,
    MetricsUnavailableError,
    ModelFileError,
    NotReadyError,
    PortInUseError,
    PortNotBoundError,
    ReadinessTimeoutError,
    RuntimeClosedError,
    ServerExitedError,
    SignalOverflowError,
    SpawnError,
    UnsupportedFlagError,
    UsageError,
    WaitTimeoutError,
)
from llama_actors._kernel.manifest import (
    BackendManifest,
    CompatibilityResult,
    ConsumerManifest,
    compatibility,
)
from llama_actors._kernel.policy import InstancePolicy, RestartPolicy
from llama_actors._kernel.types import (
    EndpointDescriptor,
    Health,
    InstanceState,
    Lease,
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
    "BackendManifest",
    "BinaryError",
    "BinaryNotFoundError",
    "BinaryProbeError",
    "BootSpec",
    "BootSpecError",
    "CompatibilityResult",
    "Config",
    "ConsumerManifest",
    "EndpointDescriptor",
    "Health",
    "IncompatibleError",
    "InstanceError",
    "InstanceFailedError",
    "InstanceNotFoundError",
    "InstancePolicy",
    "InstanceState",
    "Lease",
    "LeaseError",
    "LeaseExpiredError",
    "LeaseNotFoundError",
    "LlamaActorsError",
    "ManifestError",
    "MetricsUnavailableError",
    "ModelFileError",
    "NotReadyError",
    "PortInUseError",
    "PortNotBoundError",
    "ReadinessTimeoutError",
    "Replied",
    "Resolution",
    "RestartPolicy",
    "Runtime",
    "RuntimeClosedError",
    "RuntimeSnapshot",
    "RuntimeStatistics",
    "ServerExitedError",
    "SignalEvent",
    "SignalOverflowError",
    "SignalStream",
    "SpawnError",
    "UnsupportedFlagError",
    "UsageError",
    "WaitTimeoutError",
    "boot_spec",
    "compatibility",
    "load_config",
    "lowlevel",
    "parse_config",
    "signal_stream",
    "signals",
]

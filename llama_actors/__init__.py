"""llama_actors: llama.cpp's llama-server as supervised actors behind leased endpoints."""

from llama_actors import signals
from llama_actors._aio import (
    AsyncRuntime,
    SignalEvent,
    SignalOverflowError,
    SignalStream,
    signal_stream,
)
from llama_actors._binary import (
    FlagInfo,
    ServerBinary,
    clear_probe_cache,
    locate_binary,
    parse_help,
    parse_version,
    probe_binary,
)
from llama_actors._boot_spec import (
    BootSpec,
    EndpointUrls,
    PortNotBoundError,
    boot_spec,
)
from llama_actors._clock import ManualTimers, Scheduler, Timers
from llama_actors._config import Config, load_config, parse_config
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
    ModelFileError,
    NotReadyError,
    PortInUseError,
    ReadinessTimeoutError,
    RuntimeClosedError,
    ServerExitedError,
    SpawnError,
    UnsupportedFlagError,
    UsageError,
    WaitTimeoutError,
)
from llama_actors._failure import NON_RETRYABLE, FailureKind, classify_line
from llama_actors._ledger import Ledger, LedgerEntry
from llama_actors._manifest import (
    BackendManifest,
    CompatibilityResult,
    ConsumerManifest,
    ManifestError,
    compatibility,
    llama_manifest,
)
from llama_actors._messages import Replied
from llama_actors._policy import InstancePolicy, RestartDecision, RestartPolicy, RestartTracker
from llama_actors._process import ProcessExit, ServerProcess
from llama_actors._render import LaunchPlan, PrivateFile, check_model_file, render_command
from llama_actors._runtime import Runtime
from llama_actors._secret import Secret
from llama_actors._state import default_state_dir
from llama_actors._supervisor import Supervisor
from llama_actors._types import (
    EndpointDescriptor,
    Health,
    InstanceState,
    Lease,
    Resolution,
    RuntimeSnapshot,
    RuntimeStatistics,
)

__version__ = "0.1.0"

__all__ = [
    "NON_RETRYABLE",
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
    "EndpointUrls",
    "FailureKind",
    "FlagInfo",
    "Health",
    "IncompatibleError",
    "InstanceError",
    "InstanceFailedError",
    "InstanceNotFoundError",
    "InstancePolicy",
    "InstanceState",
    "LaunchPlan",
    "Lease",
    "LeaseError",
    "LeaseExpiredError",
    "LeaseNotFoundError",
    "Ledger",
    "LedgerEntry",
    "LlamaActorsError",
    "ManifestError",
    "ManualTimers",
    "ModelFileError",
    "NotReadyError",
    "PortInUseError",
    "PortNotBoundError",
    "PrivateFile",
    "ProcessExit",
    "ReadinessTimeoutError",
    "Replied",
    "Resolution",
    "RestartDecision",
    "RestartPolicy",
    "RestartTracker",
    "Runtime",
    "RuntimeClosedError",
    "RuntimeSnapshot",
    "RuntimeStatistics",
    "Scheduler",
    "Secret",
    "ServerBinary",
    "ServerExitedError",
    "ServerProcess",
    "SignalEvent",
    "SignalOverflowError",
    "SignalStream",
    "SpawnError",
    "Supervisor",
    "Timers",
    "UnsupportedFlagError",
    "UsageError",
    "WaitTimeoutError",
    "boot_spec",
    "check_model_file",
    "classify_line",
    "clear_probe_cache",
    "compatibility",
    "default_state_dir",
    "llama_manifest",
    "load_config",
    "locate_binary",
    "parse_config",
    "parse_help",
    "parse_version",
    "probe_binary",
    "render_command",
    "signal_stream",
    "signals",
]

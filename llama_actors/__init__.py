"""llama_actors: llama.cpp's llama-server as supervised actors behind leased endpoints."""

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
from llama_actors._config import Config, load_config, parse_config
from llama_actors._exceptions import (
    BinaryError,
    BinaryNotFoundError,
    BinaryProbeError,
    BootSpecError,
    IncompatibleError,
    LlamaActorsError,
    ModelFileError,
    UnsupportedFlagError,
)
from llama_actors._manifest import (
    BackendManifest,
    CompatibilityResult,
    ConsumerManifest,
    ManifestError,
    compatibility,
    llama_manifest,
)
from llama_actors._render import LaunchPlan, PrivateFile, check_model_file, render_command
from llama_actors._secret import Secret
from llama_actors._types import EndpointDescriptor, Health, InstanceState, Lease, RuntimeSnapshot

__version__ = "0.1.0"

__all__ = [
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
    "FlagInfo",
    "Health",
    "IncompatibleError",
    "InstanceState",
    "LaunchPlan",
    "Lease",
    "LlamaActorsError",
    "ManifestError",
    "ModelFileError",
    "PortNotBoundError",
    "PrivateFile",
    "RuntimeSnapshot",
    "Secret",
    "ServerBinary",
    "UnsupportedFlagError",
    "boot_spec",
    "check_model_file",
    "clear_probe_cache",
    "compatibility",
    "llama_manifest",
    "load_config",
    "locate_binary",
    "parse_config",
    "parse_help",
    "parse_version",
    "probe_binary",
    "render_command",
]

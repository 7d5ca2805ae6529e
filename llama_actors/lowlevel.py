"""The plumbing under :mod:`llama_actors`, for tools, tests and backends.

A service needs none of this: :class:`~llama_actors.Runtime` does it all. It is here
for what sits next to a runtime: rendering a spec without starting it (a dry run),
probing a llama-server binary, starting one server by hand through the process seam,
reading the server ledger, classifying a server's log lines, driving time in tests
(:class:`ManualTimers`), the probes and readers a backend of your own may call, and
the pieces the runtime's actors are made of.

These names are stable enough to use, but they follow the runtime's needs: expect
them to change more often than the top-level API.
"""

from llama_actors._base.clock import ManualTimers, Scheduler, TimerHandle, Timers
from llama_actors._base.secret import Secret
from llama_actors._base.state import default_state_dir
from llama_actors._kernel.admission import Admission, Holder, Verdict
from llama_actors._kernel.health import (
    HealthTracker,
    Observation,
    ProbeGetter,
    probe_health,
    probe_inference,
)
from llama_actors._kernel.load import LoadReader, parse_metrics, parse_slots
from llama_actors._kernel.memory import BufferLog, detect_gpus, parse_buffer_line
from llama_actors._kernel.outcomes import OutcomeWindow
from llama_actors._kernel.policy import RestartDecision, RestartTracker
from llama_actors._kernel.readiness import ReadyProbe, probe_ready
from llama_actors._kernel.types import EndpointUrls
from llama_actors._llama.backend import LlamaCppBackend, llama_manifest
from llama_actors._llama.binary import (
    FlagInfo,
    ServerBinary,
    locate_binary,
    parse_help,
    parse_version,
    probe_binary,
)
from llama_actors._llama.render import clear_probe_cache, render_command
from llama_actors._process.failure import NON_RETRYABLE, FailureKind, classify_line
from llama_actors._process.ledger import Ledger, LedgerEntry
from llama_actors._process.plan import LaunchPlan, PrivateFile, check_model_file
from llama_actors._process.process import ProcessExit, ServerProcess
from llama_actors._runtime.supervisor import Supervisor

__all__ = [
    "NON_RETRYABLE",
    "Admission",
    "BufferLog",
    "EndpointUrls",
    "FailureKind",
    "FlagInfo",
    "HealthTracker",
    "Holder",
    "LaunchPlan",
    "Ledger",
    "LedgerEntry",
    "LlamaCppBackend",
    "LoadReader",
    "ManualTimers",
    "Observation",
    "OutcomeWindow",
    "PrivateFile",
    "ProbeGetter",
    "ProcessExit",
    "ReadyProbe",
    "RestartDecision",
    "RestartTracker",
    "Scheduler",
    "Secret",
    "ServerBinary",
    "ServerProcess",
    "Supervisor",
    "TimerHandle",
    "Timers",
    "Verdict",
    "check_model_file",
    "classify_line",
    "clear_probe_cache",
    "default_state_dir",
    "detect_gpus",
    "llama_manifest",
    "locate_binary",
    "parse_buffer_line",
    "parse_help",
    "parse_metrics",
    "parse_slots",
    "parse_version",
    "probe_binary",
    "probe_health",
    "probe_inference",
    "probe_ready",
    "render_command",
]

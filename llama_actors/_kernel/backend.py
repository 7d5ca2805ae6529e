"""The backend protocol: what the runtime needs from one kind of server (CONTRACT §9).

The kernel (leases, readiness, health, signals, supervision) knows servers only through
a :class:`Backend` and the :class:`BackendSpec` it validates. llama.cpp is one backend,
``attach`` (a server someone else runs) another; a user registers more with
``llama_actors.register_backend``. :class:`BackendBase` gives the probes, the exit
verdict and the endpoint every OpenAI-compatible HTTP server shares, so a new backend
only says how its spec is validated, what it offers, and how it is launched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec

from llama_actors._kernel.health import (
    INFERENCE_BODY,
    Observation,
    ProbeGetter,
    probe_health,
    probe_inference,
)
from llama_actors._kernel.load import LoadReader
from llama_actors._kernel.manifest import BackendManifest, CompatibilityResult
from llama_actors._kernel.memory import Gpu, MemoryNeed
from llama_actors._kernel.readiness import ReadyProbe, probe_ready
from llama_actors._kernel.types import EndpointDescriptor, EndpointUrls
from llama_actors._process.plan import LaunchPlan
from llama_actors._process.process import ProcessExit

__all__ = ["Backend", "BackendBase", "BackendSpec", "ExitVerdict", "host_port"]


@runtime_checkable
class BackendSpec(Protocol):
    """What the runtime reads from a validated spec of any backend.

    ``instance_key`` is the identity: equal keys share one instance. The three
    durations are in seconds (specs take milliseconds; see ``llama_actors._base.units``).
    ``urls(port)`` gives the URLs on the port the server bound (None when the spec's
    port is fixed); ``headers`` are what callers send.
    """

    @property
    def backend(self) -> str: ...
    @property
    def instance_key(self) -> str: ...
    @property
    def alias(self) -> str: ...
    @property
    def model_identity(self) -> str: ...
    @property
    def metadata(self) -> dict[str, Any]: ...
    @property
    def headers(self) -> dict[str, str]: ...
    @property
    def ready_timeout_s(self) -> float: ...
    @property
    def readiness_interval_s(self) -> float: ...
    @property
    def health_interval_s(self) -> float: ...
    def urls(self, bound_port: int | None = None) -> EndpointUrls: ...


class ExitVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """What a server's exit means: ``reason`` for people, ``retryable`` for the restart
    policy (False: the same spec would fail the same way, so it is not restarted), and
    ``failure``, the kind of failure when it is known (``bind_failure``: it could not
    bind its port, which a restart on a new port may cure)."""

    reason: str
    retryable: bool
    failure: str | None = None


@runtime_checkable
class Backend(Protocol):
    """One kind of server, as the runtime sees it. Every method may be called from any
    thread (the caller's for :meth:`spec`, :meth:`manifest` and :meth:`launch`; an
    actor's for the rest) and must not block longer than the timeout it is given.

    - :meth:`spec` validates a mapping (or a spec it made before) into a frozen spec,
      raising :class:`~llama_actors.BootSpecError` naming the field;
    - :meth:`manifest` says what it offers, for that spec when one is given;
    - :meth:`launch` checks the spec can start (files, binary, flags) and returns the
      launch plan the process seam spawns, or None when nothing is launched (the
      server runs elsewhere: it is probed, leased and forgotten, never signalled);
    - :meth:`estimate_memory` says what an instance will hold once ready, before it
      starts (None: nothing on this host, or not known), for memory admission;
    - :meth:`probe_ready`, :meth:`probe_health` and :meth:`probe_inference` make one
      probe each (the last one does real work: CONTRACT §10);
    - :meth:`load_reader` gives what reads the server's slots and metrics, or None;
    - :meth:`classify_exit` says whether a launched server's exit is worth a restart;
    - :meth:`endpoint` builds the published descriptor once the instance is ready.

    How a launched server stops is the process seam's: SIGTERM to its process group,
    then SIGKILL after the plan's ``stop_timeout_s``.
    """

    @property
    def name(self) -> str: ...
    def spec(self, data: Mapping[str, Any] | BackendSpec) -> BackendSpec: ...
    def manifest(self, spec: BackendSpec | None = None) -> BackendManifest: ...
    def launch(self, spec: BackendSpec) -> LaunchPlan | None: ...
    def estimate_memory(self, spec: BackendSpec, gpus: Sequence[Gpu]) -> MemoryNeed | None: ...
    def probe_ready(
        self, client: ProbeGetter, spec: BackendSpec, port: int | None, *, timeout_s: float
    ) -> ReadyProbe: ...
    def probe_health(
        self,
        client: ProbeGetter,
        spec: BackendSpec,
        port: int | None,
        *,
        timeout_s: float,
        slow_s: float,
    ) -> Observation: ...
    def probe_inference(
        self, client: ProbeGetter, spec: BackendSpec, port: int | None, *, timeout_s: float
    ) -> Observation: ...
    def load_reader(self, spec: BackendSpec, port: int | None) -> LoadReader | None: ...
    def classify_exit(self, report: ProcessExit) -> ExitVerdict: ...
    def endpoint(
        self,
        spec: BackendSpec,
        *,
        instance_id: str,
        port: int | None,
        plan: LaunchPlan | None,
        compatibility: CompatibilityResult | None = None,
    ) -> EndpointDescriptor: ...


class BackendBase:
    """The parts of :class:`Backend` that every OpenAI-compatible HTTP server shares:
    readiness and health probes on the spec's ``health_url`` (``/models`` when a server
    has no ``/health``), an inference probe (a one-token ``/completions``), load read
    from llama-server-style ``/slots`` and ``/metrics`` (a server without them is not
    asked again), the process seam's exit classification, and an endpoint built from
    the manifest and the spec's URLs. Subclasses set ``name`` and define ``spec``,
    ``manifest`` and ``launch``. ``launches`` says whether it starts servers (False
    for one that only attaches to running ones): with hosts, only those are placed on
    a host, and their plans are rendered there."""

    name: str = ""
    launches: bool = True

    def manifest(self, spec: BackendSpec | None = None) -> BackendManifest:
        raise NotImplementedError

    def estimate_memory(self, spec: BackendSpec, gpus: Sequence[Gpu]) -> MemoryNeed | None:
        """None: the server's memory is not known before it starts (admission counts
        it as nothing until it is measured, once ready). A backend that launches
        servers overrides this (CONTRACT §11)."""
        return None

    def probe_ready(
        self, client: ProbeGetter, spec: BackendSpec, port: int | None, *, timeout_s: float
    ) -> ReadyProbe:
        """TCP connect, then GET ``/health`` (CONTRACT §4)."""
        urls = spec.urls(port)
        host, bound = host_port(urls.root_url)
        return probe_ready(
            client,
            host,
            bound,
            urls.health_url,
            urls.base_url + "/models",
            spec.headers,
            timeout_s=timeout_s,
        )

    def probe_health(
        self,
        client: ProbeGetter,
        spec: BackendSpec,
        port: int | None,
        *,
        timeout_s: float,
        slow_s: float,
    ) -> Observation:
        """GET ``/health`` and classify the answer (CONTRACT §5)."""
        urls = spec.urls(port)
        return probe_health(
            client,
            urls.health_url,
            urls.base_url + "/models",
            spec.headers,
            timeout_s=timeout_s,
            slow_s=slow_s,
        )

    def probe_inference(
        self, client: ProbeGetter, spec: BackendSpec, port: int | None, *, timeout_s: float
    ) -> Observation:
        """POST a one-token completion to ``base_url + "/completions"`` (CONTRACT §10)."""
        urls = spec.urls(port)
        body = {**INFERENCE_BODY, "model": spec.alias}
        return probe_inference(
            client, urls.base_url + "/completions", body, spec.headers, timeout_s=timeout_s
        )

    def load_reader(self, spec: BackendSpec, port: int | None) -> LoadReader | None:
        """A reader of ``/slots`` and ``/metrics`` under the spec's API prefix."""
        urls = spec.urls(port)
        return LoadReader(urls.prefix_url, spec.headers)

    def classify_exit(self, report: ProcessExit) -> ExitVerdict:
        """The process seam's reading of the server's last log lines."""
        return ExitVerdict(
            reason=report.describe(),
            retryable=report.retryable,
            failure=report.failure,
        )

    def endpoint(
        self,
        spec: BackendSpec,
        *,
        instance_id: str,
        port: int | None,
        plan: LaunchPlan | None,
        compatibility: CompatibilityResult | None = None,
    ) -> EndpointDescriptor:
        """The published descriptor: the manifest's first mode and protocol (or the
        ones ``compatibility`` chose) on the spec's URLs, with the capabilities and
        metadata the two hooks below give."""
        manifest = self.manifest(spec)
        urls = spec.urls(port)
        host, bound = host_port(urls.root_url)
        mode = compatibility.management_mode if compatibility else None
        protocol = compatibility.protocol if compatibility else None
        metadata: dict[str, Any] = {"host": host, "port": bound, "backend": self.name}
        if plan is not None:
            metadata["binary"] = plan.binary_label
        return EndpointDescriptor(
            endpoint_id=f"{instance_id}:endpoint",
            runtime_kind=manifest.runtime_kind,
            management_mode=mode or manifest.management_modes[0],
            protocol=protocol or manifest.protocols[0],
            base_url=urls.base_url,
            headers=spec.headers,
            provider_identity=manifest.backend,
            model_identity=spec.model_identity,
            source_runtime_ref=urls.root_url,
            health_ref=urls.health_url,
            capabilities=self.endpoint_capabilities(spec, manifest),
            metadata=self.endpoint_metadata(spec, plan, metadata),
        )

    def endpoint_capabilities(
        self, spec: BackendSpec, manifest: BackendManifest
    ) -> dict[str, bool | str]:
        """What the endpoint says it can do: the manifest's capabilities by default."""
        return dict(manifest.capabilities)

    def endpoint_metadata(
        self, spec: BackendSpec, plan: LaunchPlan | None, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """The endpoint's metadata: ``host``, ``port``, ``backend`` (and ``binary`` for a
        launched server) by default; a backend may add to it."""
        return metadata


def host_port(root_url: str) -> tuple[str, int]:
    """Host (brackets kept off) and port of ``http://HOST:PORT``."""
    netloc = root_url.split("://", 1)[1]
    host, _, port = netloc.rpartition(":")
    return host.strip("[]").replace("%25", "%"), int(port)

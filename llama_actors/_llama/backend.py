"""llama.cpp as a backend: llama-server spawned from a :class:`BootSpec`.

It is registered as ``llama_cpp``, the backend a spec names when it names none, and
uses the backend protocol like any other: its spec is the boot spec, its launch plan
the rendered command (checked in the caller's thread), its probes and endpoint the
ones every OpenAI-compatible server shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llama_actors._exceptions import BootSpecError
from llama_actors._kernel.backend import BackendBase, BackendSpec
from llama_actors._kernel.manifest import BackendManifest
from llama_actors._kernel.memory import Gpu, MemoryNeed
from llama_actors._llama.boot_spec import BootSpec, boot_spec
from llama_actors._llama.estimate import estimate_memory
from llama_actors._llama.render import plan_for
from llama_actors._process.plan import LaunchPlan, check_model_file

__all__ = ["LLAMA_CPP", "LlamaCppBackend", "llama_manifest"]

#: The llama.cpp backend's registered name, and the default of every spec.
LLAMA_CPP = "llama_cpp"


def llama_manifest(spec: BootSpec | None = None) -> BackendManifest:
    """The llama.cpp backend manifest; with ``embeddings`` on, embeddings are offered too."""
    protocols: tuple[str, ...] = ("openai_chat_completions",)
    if spec is not None and spec.embeddings:
        protocols += ("openai_embeddings",)
    return BackendManifest(
        backend=LLAMA_CPP,
        runtime_kind="service",
        management_modes=("managed",),
        startup_kind="spawned",
        protocols=protocols,
        capabilities={"streaming": True, "tool_calling": "unknown", "embeddings": "unknown"},
        supported_surfaces=("local_subprocess",),
        resource_profile={"scheduler": "none", "placement": "model_dependent", "gpu": "optional"},
    )


class LlamaCppBackend(BackendBase):
    """llama-server, spawned and supervised (CONTRACT §1-§7)."""

    name = LLAMA_CPP

    def spec(self, data: Mapping[str, Any] | BackendSpec) -> BootSpec:
        if isinstance(data, BootSpec | Mapping):
            return boot_spec(data)
        raise BootSpecError(
            "spec", type(data).__name__, "the llama_cpp backend takes a mapping or a BootSpec"
        )

    def manifest(self, spec: BackendSpec | None = None) -> BackendManifest:
        return llama_manifest(spec if isinstance(spec, BootSpec) else None)

    def launch(self, spec: BackendSpec) -> LaunchPlan:
        """Check the model file, then render for the installed build (remembered per
        identity, so a warm resolve does not render again)."""
        boot = _boot(spec)
        check_model_file(boot.model)
        return plan_for(boot)

    def estimate_memory(self, spec: BackendSpec, gpus: Sequence[Gpu]) -> MemoryNeed:
        """From the model's GGUF header and the spec (``llama_actors._llama.estimate``);
        :class:`~llama_actors.ModelFileError` when the header cannot be read."""
        return estimate_memory(_boot(spec), gpus)

    def endpoint_capabilities(
        self, spec: BackendSpec, manifest: BackendManifest
    ) -> dict[str, bool | str]:
        """CONTRACT §6: embeddings are a capability of a spec with ``embeddings`` on."""
        embeddings: bool | str = True if _boot(spec).embeddings else "unknown"
        return {**manifest.capabilities, "embeddings": embeddings}

    def endpoint_metadata(
        self, spec: BackendSpec, plan: LaunchPlan | None, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """Which binary serves where (CONTRACT §6)."""
        boot = _boot(spec)
        return {
            **metadata,
            "binary": plan.binary_path if plan is not None else boot.binary_path,
            "host": boot.host,
            "api_prefix": boot.api_prefix,
            "execution_surface": boot.execution_surface,
        }


def _boot(spec: BackendSpec) -> BootSpec:
    if not isinstance(spec, BootSpec):
        raise TypeError(f"the llama_cpp backend serves BootSpecs, not {type(spec).__name__}")
    return spec

"""The registry of backends, by name: llama.cpp (``llama_cpp``, the default) and
``attach`` are built in; ``register_backend`` adds more.

A spec names its backend with its ``backend`` field; a spec that names none is a
llama.cpp boot spec, so every spec written before backends existed works unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from llama_actors._backends.attach import ATTACH, AttachBackend
from llama_actors._exceptions import BootSpecError, IncompatibleError, UsageError
from llama_actors._kernel import manifest as _manifest
from llama_actors._kernel.backend import Backend, BackendSpec
from llama_actors._kernel.manifest import BackendManifest, CompatibilityResult, ConsumerManifest
from llama_actors._llama.backend import LLAMA_CPP, LlamaCppBackend

__all__ = [
    "backend_for",
    "backend_manifest",
    "backends",
    "compatibility",
    "register_backend",
    "unregister_backend",
    "validate_spec",
]

_BUILT_IN: dict[str, Backend] = {LLAMA_CPP: LlamaCppBackend(), ATTACH: AttachBackend()}
_lock = threading.Lock()
_registry: dict[str, Backend] = dict(_BUILT_IN)


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Make ``backend`` available to specs that name it (``{"backend": name, ...}``).

    A name that is taken is refused unless ``replace`` is True (a built-in may be
    replaced that way too). Instances already running keep the backend they started
    with.
    """
    if not isinstance(backend, Backend):
        raise UsageError(
            f"{backend!r} is not a backend: it needs name, spec, manifest, launch, "
            "estimate_memory, probe_ready, probe_health, probe_inference, load_reader, "
            "classify_exit and endpoint (see guides/backends.md; llama_actors.BackendBase "
            "gives all but the first four)"
        )
    name = backend.name
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"a backend's name must be a non-empty string (got {name!r})")
    with _lock:
        if name in _registry and not replace and _registry[name] is not backend:
            raise UsageError(
                f"a backend named {name!r} is registered already; pass replace=True to replace it"
            )
        _registry[name] = backend


def unregister_backend(name: str) -> None:
    """Forget the backend ``name``; specs naming it are refused from then on (running
    instances keep going). A built-in backend is restored instead of forgotten."""
    with _lock:
        if name not in _registry:
            raise UsageError(f"no backend named {name!r} is registered; see backends()")
        if name in _BUILT_IN:
            _registry[name] = _BUILT_IN[name]
        else:
            del _registry[name]


def backends() -> tuple[str, ...]:
    """The names of the registered backends, built-ins first."""
    with _lock:
        return tuple(_registry)


def backend_manifest(name: str) -> BackendManifest:
    """The manifest of the registered backend ``name`` (for no particular spec)."""
    backend = backend_for(name)
    if backend is None:
        raise UsageError(f"no backend named {name!r} is registered; registered: {_names()}")
    return backend.manifest(None)


def backend_for(name: str) -> Backend | None:
    with _lock:
        return _registry.get(name)


def backend_name(spec: Mapping[str, Any] | BackendSpec) -> str:
    """The backend a spec names: its ``backend`` field, ``llama_cpp`` when it has none."""
    if isinstance(spec, Mapping):
        name = spec.get("backend")
        if name is None:
            return LLAMA_CPP
        if not isinstance(name, str):
            raise BootSpecError("backend", name, f"must be a backend's name, one of {_names()}")
        return name
    return spec.backend


def unregistered(name: str) -> CompatibilityResult:
    """The compatibility answer for a spec naming a backend nobody registered."""
    return CompatibilityResult(
        compatible=False,
        reason="backend_unregistered",
        detail=(
            f"no backend named {name!r} is registered (registered: {_names()}); "
            "register it with llama_actors.register_backend() first"
        ),
    )


def resolve_backend(spec: Mapping[str, Any] | BackendSpec) -> Backend:
    """The registered backend of ``spec``; :class:`IncompatibleError` with the reason
    ``backend_unregistered`` when there is none."""
    name = backend_name(spec)
    backend = backend_for(name)
    if backend is None:
        raise IncompatibleError(unregistered(name))
    return backend


def validate_spec(spec: Mapping[str, Any] | BackendSpec) -> BackendSpec:
    """Validate a spec of any registered backend (``llama_cpp`` when it names none).

    Raises :class:`BootSpecError` naming the field, ``backend`` when no backend of
    that name is registered."""
    name = backend_name(spec)
    backend = backend_for(name)
    if backend is None:
        raise BootSpecError(
            "backend",
            name,
            f"no backend of that name is registered (registered: {_names()}); "
            "register it with llama_actors.register_backend() first",
        )
    return backend.spec(spec)


def compatibility(
    consumer: ConsumerManifest | Mapping[str, Any], manifest: BackendManifest | None = None
) -> CompatibilityResult:
    """Check ``consumer`` against ``manifest`` (the llama.cpp one by default).

    Checks run in CONTRACT §3 order and the first failure wins.
    """
    if manifest is None:
        manifest = backend_manifest(LLAMA_CPP)
    return _manifest.compatibility(consumer, manifest)


def _names() -> str:
    return ", ".join(backends())

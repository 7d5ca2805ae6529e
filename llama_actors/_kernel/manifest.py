"""Backend and consumer manifests, and the compatibility check between them (CONTRACT §3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from llama_actors._exceptions import ManifestError

__all__ = [
    "CONTRACT_VERSION",
    "BackendManifest",
    "CompatibilityResult",
    "ConsumerManifest",
    "compatibility",
]

CONTRACT_VERSION = "inference.v1"

Capability = bool | str
FailureReason = Literal[
    "runtime_kind_mismatch",
    "management_mode_mismatch",
    "unsupported_protocol",
    "startup_kind_unsupported",
    "missing_capability",
    "backend_unregistered",
]


class BackendManifest(msgspec.Struct, frozen=True, kw_only=True):
    """What a backend offers (``llama_actors.backend_manifest(name)`` gives a registered
    backend's). ``metadata`` is free-form, for the backend's own notes."""

    contract_version: str = CONTRACT_VERSION
    backend: str
    runtime_kind: str
    management_modes: tuple[str, ...]
    startup_kind: str
    protocols: tuple[str, ...]
    capabilities: dict[str, Capability]
    supported_surfaces: tuple[str, ...]
    resource_profile: dict[str, str]
    metadata: dict[str, Any] = {}


class ConsumerManifest(msgspec.Struct, frozen=True, kw_only=True):
    """What a consumer needs.

    ``accepted_management_modes`` defaults to ``("managed",)``; an empty list never
    matches. ``required_capabilities`` must equal the backend's values exactly
    (``"unknown"`` matches only ``"unknown"``); ``optional_capabilities`` that differ
    become warnings. ``constraints`` understands ``startup_kind``.
    """

    consumer: str
    accepted_runtime_kinds: tuple[str, ...] = ("service",)
    accepted_management_modes: tuple[str, ...] = ("managed",)
    accepted_protocols: tuple[str, ...] = ("openai_chat_completions",)
    required_capabilities: dict[str, Capability] = {}
    optional_capabilities: dict[str, Capability] = {}
    constraints: dict[str, str] = {}
    metadata: dict[str, Any] = {}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ConsumerManifest:
        """Validate a plain mapping (from TOML or JSON) into a manifest."""
        try:
            return msgspec.convert(dict(data), cls)
        except (msgspec.ValidationError, TypeError) as exc:
            raise ManifestError(f"consumer manifest: {exc}") from None


class CompatibilityResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of :func:`compatibility`. ``reason`` is None when compatible;
    ``backend_unregistered`` when the spec names a backend nobody registered.
    ``metadata`` is the consumer's, so whoever holds the result knows who asked."""

    compatible: bool
    reason: FailureReason | None = None
    detail: str = ""
    missing: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    runtime_kind: str | None = None
    management_mode: str | None = None
    protocol: str | None = None
    metadata: dict[str, Any] = {}


def _same(a: Capability, b: Capability) -> bool:
    # True == 1 in Python; a capability of True must not match a value of 1.
    return type(a) is type(b) and a == b


def compatibility(
    consumer: ConsumerManifest | Mapping[str, Any], backend: BackendManifest
) -> CompatibilityResult:
    """Check ``consumer`` against a backend's manifest.

    Checks run in CONTRACT §3 order and the first failure wins.
    """
    if not isinstance(consumer, ConsumerManifest):
        consumer = ConsumerManifest.from_mapping(consumer)
    metadata = consumer.metadata

    def fail(
        reason: FailureReason, detail: str, missing: tuple[str, ...] = ()
    ) -> CompatibilityResult:
        return CompatibilityResult(
            compatible=False,
            reason=reason,
            detail=detail,
            missing=missing,
            metadata=dict(metadata),
        )

    if backend.runtime_kind not in consumer.accepted_runtime_kinds:
        return fail(
            "runtime_kind_mismatch",
            f"backend runtime kind {backend.runtime_kind!r} is not in "
            f"{list(consumer.accepted_runtime_kinds)}",
        )
    mode = next(
        (m for m in backend.management_modes if m in consumer.accepted_management_modes), None
    )
    if mode is None:
        return fail(
            "management_mode_mismatch",
            f"backend modes {list(backend.management_modes)} share none with "
            f"{list(consumer.accepted_management_modes)}; to take such an instance, add its "
            "mode to the consumer's accepted_management_modes",
        )
    protocol = next((p for p in backend.protocols if p in consumer.accepted_protocols), None)
    if protocol is None:
        return fail(
            "unsupported_protocol",
            f"backend protocols {list(backend.protocols)} share none with "
            f"{list(consumer.accepted_protocols)}",
        )
    wanted = consumer.constraints.get("startup_kind")
    if wanted is not None and wanted != backend.startup_kind:
        return fail(
            "startup_kind_unsupported",
            f"consumer wants startup kind {wanted!r}, backend is {backend.startup_kind!r}",
        )
    missing = tuple(
        name
        for name, value in consumer.required_capabilities.items()
        if name not in backend.capabilities or not _same(backend.capabilities[name], value)
    )
    if missing:
        details = ", ".join(
            f"{n}={consumer.required_capabilities[n]!r} (backend: "
            f"{backend.capabilities.get(n, 'absent')!r})"
            for n in missing
        )
        return fail("missing_capability", f"required capabilities not met: {details}", missing)
    warnings = [
        f"optional capability {name}={value!r} differs (backend: "
        f"{backend.capabilities.get(name, 'absent')!r})"
        for name, value in consumer.optional_capabilities.items()
        if name not in backend.capabilities or not _same(backend.capabilities[name], value)
    ]
    warnings += [
        f"constraint {name!r} is not understood and was ignored"
        for name in consumer.constraints
        if name != "startup_kind"
    ]
    return CompatibilityResult(
        compatible=True,
        warnings=tuple(warnings),
        runtime_kind=backend.runtime_kind,
        management_mode=mode,
        protocol=protocol,
        metadata=dict(metadata),
    )

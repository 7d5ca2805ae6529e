"""Checks every request goes through before it reaches an actor, in the caller's
thread, so bad input fails with a clear error before anything is spawned."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, NamedTuple

from llama_actors._backends.registry import resolve_backend
from llama_actors._exceptions import (
    IncompatibleError,
    InstanceNotFoundError,
    NotReadyError,
    UsageError,
)
from llama_actors._kernel.backend import Backend, BackendSpec
from llama_actors._kernel.manifest import (
    BackendManifest,
    CompatibilityResult,
    ConsumerManifest,
    compatibility,
)
from llama_actors._process.plan import LaunchPlan

__all__ = [
    "Consumer",
    "Prepared",
    "check_consumer",
    "check_lease_options",
    "check_ttl",
    "consumer_manifest",
    "instance_not_found",
    "launches",
    "no_new_leases",
    "prepare",
    "request_id",
]

#: A consumer manifest, a mapping of its fields, or just the consumer's name.
Consumer = ConsumerManifest | Mapping[str, Any] | str


#: The consumer of a call that names none: it takes a managed or an attached server.
ANONYMOUS = ConsumerManifest(
    consumer="anonymous", accepted_management_modes=("managed", "externally_managed")
)


def consumer_manifest(consumer: Consumer | None) -> ConsumerManifest:
    """``consumer`` as a manifest (None is the anonymous consumer, which accepts managed
    and externally managed servers alike; a named consumer accepts what its manifest
    says, managed only by default)."""
    if consumer is None:
        return ANONYMOUS
    if isinstance(consumer, str):
        return ConsumerManifest(consumer=consumer)
    if isinstance(consumer, ConsumerManifest):
        return consumer
    return ConsumerManifest.from_mapping(consumer)


class Prepared(NamedTuple):
    """A checked spec, its backend, the consumer's compatibility with it, and its
    launch plan (None when the backend launches nothing)."""

    backend: Backend
    spec: BackendSpec
    compatibility: CompatibilityResult
    plan: LaunchPlan | None


def prepare(
    spec: BackendSpec | Mapping[str, Any], consumer: Consumer | None, *, hosted: bool = False
) -> Prepared:
    """Find the spec's backend, validate the spec, check ``consumer`` against the
    backend's manifest, and let the backend check that it can start (model file, binary,
    flags) and render its launch plan: bad input fails here, in the caller's thread,
    before anything is spawned. The plan travels with the request to the actor that
    starts the server, which never renders again. With ``hosted`` (a runtime with
    hosts, for a backend that launches servers) nothing is rendered here: the host's
    agent renders the plan for the binary that host has."""
    backend = resolve_backend(spec)
    checked = backend.spec(spec)
    result = compatibility(consumer_manifest(consumer), backend.manifest(checked))
    if not result.compatible:
        raise IncompatibleError(result)
    if hosted and launches(backend):
        return Prepared(backend, checked, result, None)
    return Prepared(backend, checked, result, backend.launch(checked))


def launches(backend: Backend) -> bool:
    """Whether ``backend`` starts servers (the attach backend does not)."""
    return bool(getattr(backend, "launches", True))


def request_id() -> str:
    return f"req-{secrets.token_hex(8)}"


def check_ttl(ttl_ms: int) -> int:
    """``ttl_ms`` if it is a positive int, else :class:`UsageError`."""
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
        raise UsageError(f"ttl_ms must be a positive number of milliseconds (got {ttl_ms!r})")
    return ttl_ms


def check_consumer(consumer: Consumer | None, manifest: BackendManifest) -> CompatibilityResult:
    """``consumer`` checked against what a backend offers; :class:`IncompatibleError` if
    it cannot use it."""
    result = compatibility(consumer_manifest(consumer), manifest)
    if not result.compatible:
        raise IncompatibleError(result)
    return result


def check_lease_options(renewable: bool, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check a lease's ``renewable`` and ``metadata`` (:class:`UsageError` when either is
    of the wrong kind); returns the metadata as a dict of its own."""
    if not isinstance(renewable, bool):
        raise UsageError(f"renewable must be True or False (got {renewable!r})")
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise UsageError(
            f"metadata must be a mapping with str keys, such as {{'team': 'search'}} "
            f"(got {metadata!r})"
        )
    return dict(metadata)


def instance_not_found(instance_id: str) -> InstanceNotFoundError:
    return InstanceNotFoundError(
        f"no instance {instance_id!r} in this runtime; see Runtime.instances()",
        instance_id=instance_id,
    )


def no_new_leases(instance_id: str, state: str) -> NotReadyError:
    """The refusal of a lease on an instance that is going or gone."""
    how = {"failed": "has failed", "stopped": "has stopped"}.get(state, "is stopping")
    return NotReadyError(
        f"instance {instance_id} {how} and takes no new leases; resolve_endpoint(spec) "
        "starts a fresh instance of its spec",
        instance_id=instance_id,
    )

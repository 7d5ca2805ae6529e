"""Checks every request goes through before it reaches an actor, in the caller's
thread, so bad input fails with a clear error before anything is spawned."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from llama_actors._exceptions import (
    IncompatibleError,
    InstanceNotFoundError,
    NotReadyError,
    UsageError,
)
from llama_actors._kernel.manifest import (
    BackendManifest,
    CompatibilityResult,
    ConsumerManifest,
    compatibility,
    llama_manifest,
)
from llama_actors._llama.boot_spec import BootSpec, boot_spec
from llama_actors._llama.render import plan_for
from llama_actors._process.plan import LaunchPlan, check_model_file

__all__ = [
    "Consumer",
    "check_consumer",
    "check_lease_options",
    "check_ttl",
    "consumer_manifest",
    "instance_not_found",
    "no_new_leases",
    "prepare",
    "request_id",
]

#: A consumer manifest, a mapping of its fields, or just the consumer's name.
Consumer = ConsumerManifest | Mapping[str, Any] | str


def consumer_manifest(consumer: Consumer | None) -> ConsumerManifest:
    """``consumer`` as a manifest (None is the anonymous consumer)."""
    if consumer is None:
        return ConsumerManifest(consumer="anonymous")
    if isinstance(consumer, str):
        return ConsumerManifest(consumer=consumer)
    if isinstance(consumer, ConsumerManifest):
        return consumer
    return ConsumerManifest.from_mapping(consumer)


def prepare(
    spec: BootSpec | Mapping[str, Any], consumer: Consumer | None
) -> tuple[BootSpec, CompatibilityResult, LaunchPlan]:
    """Normalise ``spec``, check ``consumer`` against it, check that it can be started
    (model file, binary, flags) and render its launch plan: bad input fails here, in
    the caller's thread, before anything is spawned. The plan travels with the request
    to the actor that starts the server, which never renders again."""
    spec = boot_spec(spec)
    result = compatibility(consumer_manifest(consumer), llama_manifest(spec))
    if not result.compatible:
        raise IncompatibleError(result)
    check_model_file(spec.model)
    return spec, result, plan_for(spec)


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

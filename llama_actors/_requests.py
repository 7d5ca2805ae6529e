"""Checks every request goes through before it reaches an actor, in the caller's
thread, so bad input fails with a clear error before anything is spawned."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from llama_actors._boot_spec import BootSpec, boot_spec
from llama_actors._exceptions import IncompatibleError, UsageError
from llama_actors._manifest import (
    CompatibilityResult,
    ConsumerManifest,
    compatibility,
    llama_manifest,
)
from llama_actors._messages import Ensure, Resolve
from llama_actors._policy import InstancePolicy
from llama_actors._render import check_model_file, render_command

__all__ = [
    "Consumer",
    "check_ttl",
    "ensure_message",
    "prepare_request",
    "request_id",
    "resolve_message",
]

#: A consumer manifest, a mapping of its fields, or just the consumer's name.
Consumer = ConsumerManifest | Mapping[str, Any] | str


def prepare_request(
    spec: BootSpec | Mapping[str, Any], consumer: Consumer | None
) -> tuple[BootSpec, CompatibilityResult]:
    """Normalise ``spec``, check ``consumer`` against it, and check that it can be
    started (binary, flags, model file), so bad input fails in the caller's thread
    before anything is spawned."""
    spec = boot_spec(spec)
    if consumer is None:
        manifest = ConsumerManifest(consumer="anonymous")
    elif isinstance(consumer, str):
        manifest = ConsumerManifest(consumer=consumer)
    elif isinstance(consumer, ConsumerManifest):
        manifest = consumer
    else:
        manifest = ConsumerManifest.from_mapping(consumer)
    result = compatibility(manifest, llama_manifest(spec))
    if not result.compatible:
        raise IncompatibleError(result)
    check_model_file(spec.model)
    key = spec.instance_key
    if key not in _rendered:
        # The actor renders again at every spawn; this early render is only there to
        # fail bad flags in the caller's thread, so once per identity is enough.
        render_command(spec)
        _rendered[key] = None
        while len(_rendered) > _RENDERED_MAX:
            del _rendered[next(iter(_rendered))]
    return spec, result


#: Identities whose spec has rendered for its binary once (oldest first).
_rendered: dict[str, None] = {}
_RENDERED_MAX = 1024


def request_id() -> str:
    return f"req-{secrets.token_hex(8)}"


def check_ttl(ttl_ms: int) -> int:
    """``ttl_ms`` if it is a positive int, else :class:`UsageError`."""
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
        raise UsageError(f"ttl_ms must be a positive number of milliseconds (got {ttl_ms!r})")
    return ttl_ms


def resolve_message(
    spec: BootSpec | Mapping[str, Any],
    consumer: Consumer | None,
    *,
    owner_ref: str | None,
    ttl_ms: int | None,
    policy: InstancePolicy | None,
    defaults: tuple[int, InstancePolicy],
    reply: Any,
) -> Resolve:
    """Check a resolve request and build its message (``defaults``: TTL and policy)."""
    ttl = check_ttl(defaults[0] if ttl_ms is None else ttl_ms)
    spec, result = prepare_request(spec, consumer)
    return Resolve(
        request_id=request_id(),
        spec=spec,
        compatibility=result,
        owner_ref=owner_ref,
        ttl_ms=ttl,
        policy=policy or defaults[1],
        reply=reply,
    )


def ensure_message(
    spec: BootSpec | Mapping[str, Any], policy: InstancePolicy, reply: Any
) -> Ensure:
    """Check an ensure request and build its message."""
    spec, _ = prepare_request(spec, None)
    return Ensure(request_id=request_id(), spec=spec, policy=policy, reply=reply)

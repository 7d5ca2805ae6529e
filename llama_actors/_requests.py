"""Checks every request goes through before it reaches an actor, in the caller's
thread, so bad input fails with a clear error before anything is spawned."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from llama_actors._boot_spec import BootSpec, boot_spec
from llama_actors._exceptions import IncompatibleError
from llama_actors._manifest import (
    CompatibilityResult,
    ConsumerManifest,
    compatibility,
    llama_manifest,
)
from llama_actors._render import check_model_file, render_command

__all__ = ["Consumer", "prepare_request", "request_id"]

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
    render_command(spec)  # the probe is cached; the actor renders the same plan again
    return spec, result


def request_id() -> str:
    return f"req-{secrets.token_hex(8)}"

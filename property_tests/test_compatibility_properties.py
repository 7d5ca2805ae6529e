"""Properties of the compatibility check."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from llama_actors import BackendManifest, ConsumerManifest, compatibility
from llama_actors.testing import strategies as las


def widen(consumer: ConsumerManifest, extra: ConsumerManifest) -> ConsumerManifest:
    """Accept everything ``consumer`` accepts and more; require less."""
    return msgspec.structs.replace(
        consumer,
        accepted_runtime_kinds=consumer.accepted_runtime_kinds + extra.accepted_runtime_kinds,
        accepted_management_modes=consumer.accepted_management_modes
        + extra.accepted_management_modes,
        accepted_protocols=consumer.accepted_protocols + extra.accepted_protocols,
        required_capabilities={
            k: v for k, v in consumer.required_capabilities.items() if k not in extra.constraints
        },
        constraints={},
    )


@given(las.consumer_manifests(), las.consumer_manifests(), las.backend_manifests())
def test_accepting_more_never_breaks_a_match(
    consumer: ConsumerManifest, extra: ConsumerManifest, backend: BackendManifest
) -> None:
    if compatibility(consumer, backend).compatible:
        assert compatibility(widen(consumer, extra), backend).compatible


@given(
    las.consumer_manifests(),
    las.backend_manifests(),
    st.sampled_from(["streaming", "tool_calling", "embeddings", "vision"]),
    las.capability_values(),
)
def test_an_unmet_required_capability_always_fails(
    consumer: ConsumerManifest, backend: BackendManifest, name: str, value: bool | str
) -> None:
    have = backend.capabilities.get(name)
    if have is not None and type(have) is type(value) and have == value:
        return  # met, not unmet
    needy = msgspec.structs.replace(
        consumer, required_capabilities={**consumer.required_capabilities, name: value}
    )
    result = compatibility(needy, backend)
    assert not result.compatible
    if result.reason == "missing_capability":
        assert name in result.missing


@given(las.consumer_manifests(), las.backend_manifests())
def test_a_match_always_resolves_choices_the_backend_offers(
    consumer: ConsumerManifest, backend: BackendManifest
) -> None:
    result = compatibility(consumer, backend)
    if result.compatible:
        assert result.management_mode in backend.management_modes
        assert result.management_mode in consumer.accepted_management_modes
        assert result.protocol in backend.protocols
        assert result.protocol in consumer.accepted_protocols
    else:
        assert result.reason is not None
        assert result.protocol is None

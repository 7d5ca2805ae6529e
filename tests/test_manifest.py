"""Manifests and the compatibility check, one failure reason at a time."""

from __future__ import annotations

from typing import Any

import pytest

from llama_actors import (
    ConsumerManifest,
    IncompatibleError,
    ManifestError,
    boot_spec,
    compatibility,
)
from llama_actors.lowlevel import llama_manifest


def consumer(**fields: Any) -> ConsumerManifest:
    return ConsumerManifest(consumer="tests", **fields)


def test_the_llama_manifest_is_the_contracts() -> None:
    manifest = llama_manifest()
    assert manifest.contract_version == "inference.v1"
    assert manifest.backend == "llama_cpp"
    assert manifest.runtime_kind == "service"
    assert manifest.management_modes == ("managed",)
    assert manifest.startup_kind == "spawned"
    assert manifest.protocols == ("openai_chat_completions",)
    assert manifest.capabilities == {
        "streaming": True,
        "tool_calling": "unknown",
        "embeddings": "unknown",
    }
    assert manifest.supported_surfaces == ("local_subprocess",)
    assert manifest.resource_profile == {
        "scheduler": "none",
        "placement": "model_dependent",
        "gpu": "optional",
    }
    assert manifest.metadata == {}


def test_a_spec_with_embeddings_adds_the_embeddings_protocol() -> None:
    spec = boot_spec({"model": "/m.gguf", "embeddings": True})
    assert llama_manifest(spec).protocols == ("openai_chat_completions", "openai_embeddings")


def test_a_default_consumer_matches_and_gets_the_resolved_choices() -> None:
    result = compatibility(consumer())
    assert result.compatible
    assert result.reason is None
    assert (result.runtime_kind, result.management_mode, result.protocol) == (
        "service",
        "managed",
        "openai_chat_completions",
    )
    assert result.missing == ()
    assert result.warnings == ()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"accepted_runtime_kinds": ("library",)}, "runtime_kind_mismatch"),
        ({"accepted_runtime_kinds": ()}, "runtime_kind_mismatch"),
        ({"accepted_management_modes": ("external",)}, "management_mode_mismatch"),
        ({"accepted_management_modes": ()}, "management_mode_mismatch"),
        ({"accepted_protocols": ("anthropic_messages",)}, "unsupported_protocol"),
        ({"accepted_protocols": ("openai_embeddings",)}, "unsupported_protocol"),
        ({"constraints": {"startup_kind": "attached"}}, "startup_kind_unsupported"),
        ({"required_capabilities": {"tool_calling": True}}, "missing_capability"),
        ({"required_capabilities": {"streaming": "unknown"}}, "missing_capability"),
        ({"required_capabilities": {"vision": True}}, "missing_capability"),
    ],
)
def test_each_failure_has_its_reason(fields: dict[str, Any], reason: str) -> None:
    result = compatibility(consumer(**fields))
    assert not result.compatible
    assert result.reason == reason
    assert result.detail
    assert result.protocol is None


def test_the_first_failure_in_contract_order_wins() -> None:
    result = compatibility(
        consumer(
            accepted_protocols=("anthropic_messages",),
            required_capabilities={"vision": True},
            accepted_management_modes=("external",),
        )
    )
    assert result.reason == "management_mode_mismatch"


def test_a_missing_capability_names_every_unmet_one() -> None:
    result = compatibility(
        consumer(required_capabilities={"vision": True, "streaming": True, "tool_calling": True})
    )
    assert result.missing == ("vision", "tool_calling")
    assert "vision" in result.detail
    assert "tool_calling" in result.detail


def test_unknown_matches_only_unknown_and_true_is_not_one() -> None:
    assert compatibility(consumer(required_capabilities={"tool_calling": "unknown"})).compatible
    assert not compatibility(consumer(required_capabilities={"streaming": 1})).compatible


def test_an_embeddings_consumer_matches_only_an_embeddings_endpoint() -> None:
    wants = consumer(accepted_protocols=("openai_embeddings",))
    spec = boot_spec({"model": "/m.gguf", "embeddings": True})
    result = compatibility(wants, llama_manifest(spec))
    assert result.compatible
    assert result.protocol == "openai_embeddings"


def test_differing_optional_capabilities_and_unknown_constraints_are_warnings() -> None:
    result = compatibility(
        consumer(optional_capabilities={"tool_calling": True}, constraints={"region": "eu"})
    )
    assert result.compatible
    assert len(result.warnings) == 2
    assert "tool_calling" in result.warnings[0]
    assert "region" in result.warnings[1]


def test_a_consumer_can_be_given_as_a_mapping() -> None:
    assert compatibility({"consumer": "svc", "accepted_protocols": ["openai_chat_completions"]})
    with pytest.raises(ManifestError, match="accepted_protocols"):
        compatibility({"consumer": "svc", "accepted_protocols": "openai_chat_completions"})
    with pytest.raises(ManifestError, match="consumer"):
        compatibility({"accepted_protocols": []})


def test_incompatible_error_carries_the_result() -> None:
    result = compatibility(consumer(accepted_runtime_kinds=("library",)))
    error = IncompatibleError(result)
    assert error.result is result
    assert "runtime_kind_mismatch" in str(error)


def test_the_result_carries_the_consumers_metadata_whether_it_matches_or_not() -> None:
    who = {"app": "search", "version": 3}
    matched = compatibility(consumer(metadata=who))
    refused = compatibility(consumer(metadata=who, accepted_runtime_kinds=("batch",)))

    assert matched.compatible
    assert matched.metadata == who
    assert not refused.compatible
    assert refused.metadata == who
    assert compatibility(consumer()).metadata == {}

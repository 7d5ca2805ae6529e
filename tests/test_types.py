"""Contract value types: endpoint descriptors, leases and snapshots."""

from __future__ import annotations

import msgspec
import pytest

import llama_actors
from llama_actors import Lease, RuntimeSnapshot, boot_spec, compatibility
from llama_actors.lowlevel import LlamaCppBackend


def test_a_published_endpoint_describes_where_and_how_to_call() -> None:
    spec = boot_spec({"model": "/m/gemma.gguf", "api_key": "sk-1", "api_prefix": "/llm"})
    endpoint = LlamaCppBackend().endpoint(
        spec,
        instance_id="i-1",
        port=41000,
        plan=None,
        compatibility=compatibility(llama_actors.ConsumerManifest(consumer="x")),
    )
    assert endpoint.endpoint_id == "i-1:endpoint"
    assert endpoint.base_url == "http://127.0.0.1:41000/llm/v1"
    assert endpoint.health_ref == "http://127.0.0.1:41000/llm/health"
    assert endpoint.source_runtime_ref == "http://127.0.0.1:41000"
    assert endpoint.headers == {"Authorization": "Bearer sk-1"}
    assert endpoint.target_class == "self_hosted_endpoint"
    assert endpoint.protocol == "openai_chat_completions"
    assert endpoint.management_mode == "managed"
    assert endpoint.model_identity == "gemma"
    assert endpoint.lease_ref is None
    assert endpoint.metadata["port"] == 41000
    assert endpoint.capabilities["embeddings"] == "unknown"
    assert "sk-1" not in repr(endpoint)


def test_an_embeddings_endpoint_says_it_has_embeddings() -> None:
    spec = boot_spec({"model": "/m.gguf", "embeddings": True})
    endpoint = LlamaCppBackend().endpoint(spec, instance_id="i", port=1, plan=None)
    assert endpoint.capabilities["embeddings"] is True


def test_contract_types_are_frozen() -> None:
    lease = Lease(
        lease_ref="l-1",
        instance_id="i",
        owner_ref=None,
        ttl_ms=1000,
        granted_at=0.0,
        expires_at=1.0,
    )
    snapshot = RuntimeSnapshot(instance_id="i", instance_key="k", state="starting")
    with pytest.raises(AttributeError):
        lease.ttl_ms = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        snapshot.state = "ready"  # type: ignore[misc]
    assert snapshot.health == "unknown"
    assert msgspec.json.decode(msgspec.json.encode(lease), type=Lease) == lease

"""The contract's lease options on the fake llama-server: embeddings endpoints."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llama_actors import (
    ConsumerManifest,
    IncompatibleError,
    Resolution,
    Runtime,
)
from llama_actors.testing.signals import SignalRecorder

from ._helpers import Fake

EMBEDDER = ConsumerManifest(consumer="embedder", accepted_protocols=("openai_embeddings",))


@pytest.fixture
def recorder() -> Iterator[SignalRecorder]:
    with SignalRecorder() as rec:
        yield rec


def post(resolution: Resolution, path: str, body: dict[str, Any]) -> httpx.Response:
    endpoint = resolution.endpoint
    with httpx.Client(trust_env=False, timeout=5) as client:
        return client.post(endpoint.base_url + path, headers=endpoint.headers, json=body)


def chat(resolution: Resolution) -> httpx.Response:
    return post(resolution, "/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})


# -- embeddings endpoints --------------------------------------------------------------------


def test_an_embeddings_consumer_is_leased_an_embeddings_endpoint_that_returns_vectors(
    runtime: Runtime, fake: Fake
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(embeddings=True, api_key="sk-emb"), EMBEDDER)

    answer = post(resolution, "/embeddings", {"input": ["one", "two"]})

    assert resolution.endpoint.protocol == "openai_embeddings"
    assert resolution.compatibility.protocol == "openai_embeddings"
    assert answer.status_code == 200, answer.text
    vectors = [item["embedding"] for item in answer.json()["data"]]
    assert len(vectors) == 2
    assert all(len(v) > 0 and all(isinstance(x, float) for x in v) for v in vectors)


def test_chat_and_embeddings_consumers_of_one_identity_each_get_their_own_protocol(
    runtime: Runtime, fake: Fake
) -> None:
    spec = fake.spec(embeddings=True)
    # The first resolve starts the instance (through the supervisor); the later ones
    # find it ready and are granted straight by the broker: both routes name the protocol.
    first = runtime.resolve_endpoint(spec, EMBEDDER)
    talker = runtime.resolve_endpoint(spec, "talker")
    second = runtime.resolve_endpoint(spec, EMBEDDER)

    assert (first.reused, talker.reused, second.reused) == (False, True, True)
    assert {r.instance.instance_id for r in (first, talker, second)} == {first.instance.instance_id}
    assert first.endpoint.protocol == "openai_embeddings"
    assert second.endpoint.protocol == "openai_embeddings"
    assert talker.endpoint.protocol == "openai_chat_completions"
    assert talker.endpoint.base_url == first.endpoint.base_url
    assert chat(talker).status_code == 200
    assert post(second, "/embeddings", {"input": "x"}).status_code == 200
    published = runtime.published_endpoint(first.instance.instance_id)
    assert published.protocol == "openai_chat_completions"
    assert published.lease_ref is None


def test_an_embeddings_consumer_is_refused_a_spec_without_embeddings(
    runtime: Runtime, fake: Fake
) -> None:
    with pytest.raises(IncompatibleError) as caught:
        runtime.resolve_endpoint(fake.spec(), EMBEDDER)

    assert caught.value.result.reason == "unsupported_protocol"
    assert runtime.instances() == []

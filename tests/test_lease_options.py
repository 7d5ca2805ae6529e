"""The contract's lease options on the fake llama-server: embeddings endpoints, leases
that cannot be renewed, leasing an instance by id, what ensure_instance says, and the
metadata that travels with leases, snapshots and compatibility results."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
from pathlib import Path
from typing import Any

import httpx
import pykka
import pytest

from llama_actors import (
    AsyncRuntime,
    ConsumerManifest,
    Ensured,
    IncompatibleError,
    InstanceNotFoundError,
    LeaseError,
    LeaseNotRenewableError,
    LlamaActorsError,
    NotReadyError,
    Replied,
    Resolution,
    Runtime,
    UsageError,
    WaitTimeoutError,
)
from llama_actors.testing.signals import SignalRecorder

from ._helpers import WAIT, Fake

EMBEDDER = ConsumerManifest(consumer="embedder", accepted_protocols=("openai_embeddings",))


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


# -- leases that cannot be renewed ----------------------------------------------------------


def test_a_lease_granted_as_not_renewable_refuses_renewal_and_stays_live(
    runtime: Runtime, fake: Fake
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests", renewable=False)
    ref = resolution.lease.lease_ref

    with pytest.raises(LeaseNotRenewableError, match="renewable=False") as caught:
        runtime.renew(ref)

    assert isinstance(caught.value, LeaseError)
    assert isinstance(caught.value, LlamaActorsError)
    assert caught.value.lease_ref == ref
    assert "take a new lease" in str(caught.value)
    assert resolution.lease.renewable is False
    assert runtime.snapshot(resolution.instance.instance_id).lease_count == 1
    assert runtime.release(ref) is True  # it was still live


def test_leases_are_renewable_unless_asked_otherwise(runtime: Runtime, fake: Fake) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests")

    renewed = runtime.renew(resolution.lease.lease_ref)

    assert resolution.lease.renewable is True
    assert renewed.renewable is True


def test_lease_options_of_the_wrong_kind_are_refused_before_anything_starts(
    runtime: Runtime, fake: Fake
) -> None:
    with pytest.raises(UsageError, match="renewable must be True or False"):
        runtime.resolve_endpoint(fake.spec(), "tests", renewable="no")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="metadata must be a mapping"):
        runtime.resolve_endpoint(fake.spec(), "tests", metadata=["team"])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="str keys"):
        runtime.resolve_endpoint(fake.spec(), "tests", metadata={1: "x"})  # type: ignore[dict-item]

    assert runtime.instances() == []


# -- metadata -------------------------------------------------------------------------------


def test_a_leases_metadata_is_kept_through_renewal_and_in_its_signals(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    resolution = runtime.resolve_endpoint(
        fake.spec(), "tests", metadata={"team": "search", "request": 7}
    )
    iid = resolution.instance.instance_id

    renewed = runtime.renew(resolution.lease.lease_ref)

    assert resolution.lease.metadata == {"team": "search", "request": 7}
    assert renewed.metadata == {"team": "search", "request": 7}
    (granted,) = recorder.find("lease_granted", iid)
    assert granted.payload["lease"].metadata == {"team": "search", "request": 7}
    other = runtime.resolve_endpoint(fake.spec(), "tests")
    assert other.lease.metadata == {}


def test_a_snapshot_carries_its_specs_metadata(runtime: Runtime, fake: Fake) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(metadata={"owner": "ops", "tier": 2}), "t")
    iid = resolution.instance.instance_id

    assert resolution.instance.metadata == {"owner": "ops", "tier": 2}
    assert runtime.snapshot(iid).metadata == {"owner": "ops", "tier": 2}
    assert [s.metadata for s in runtime.instances()] == [{"owner": "ops", "tier": 2}]


def test_a_snapshot_of_a_spec_without_metadata_has_none(runtime: Runtime, fake: Fake) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests")

    assert resolution.instance.metadata == {}


def test_the_compatibility_result_of_a_lease_carries_the_consumers_metadata(
    runtime: Runtime, fake: Fake
) -> None:
    consumer = ConsumerManifest(consumer="svc", metadata={"app": "search", "version": "3"})

    resolved = runtime.resolve_endpoint(fake.spec(), consumer)

    assert resolved.compatibility.metadata == {"app": "search", "version": "3"}


# -- ensure_instance says whether it reused ---------------------------------------------------


def test_ensure_instance_says_whether_it_started_the_instance_on_every_face(
    runtime: Runtime, fake: Fake
) -> None:
    first = runtime.ensure_instance(fake.spec())

    async def main() -> Ensured:
        return await AsyncRuntime.wrap(runtime).ensure_instance(fake.spec(), timeout=WAIT)

    by_await = asyncio.run(main())
    answer: pykka.ThreadingFuture[Any] = pykka.ThreadingFuture()
    runtime.actor_face(answer).ensure_instance(fake.spec())
    by_actor = answer.get(timeout=WAIT)

    assert isinstance(first, Ensured)
    assert first.reused is False
    assert first.instance.state == "ready"
    assert isinstance(by_actor, Ensured)
    assert (by_await.reused, by_actor.reused) == (True, True)
    assert by_await.instance.instance_id == by_actor.instance.instance_id


def test_concurrent_ensures_of_one_identity_report_exactly_one_start(
    runtime: Runtime, fake: Fake
) -> None:
    spec = fake.spec({"load_seconds": "0.5"})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: runtime.ensure_instance(spec), range(4)))

    assert [r.reused for r in results].count(False) == 1
    assert len({r.instance.instance_id for r in results}) == 1


# -- leasing an instance by id --------------------------------------------------------------


def test_lease_instance_leases_an_ensured_instance_by_its_id(runtime: Runtime, fake: Fake) -> None:
    iid = runtime.ensure_instance(fake.spec()).instance.instance_id

    resolution = runtime.lease_instance(iid, "tests", owner_ref="by-id", ttl_ms=30_000)

    assert resolution.reused is True
    assert resolution.instance.instance_id == iid
    assert resolution.endpoint.lease_ref == resolution.lease.lease_ref
    assert (resolution.lease.owner_ref, resolution.lease.ttl_ms) == ("by-id", 30_000)
    assert resolution.endpoint.protocol == "openai_chat_completions"
    assert chat(resolution).status_code == 200
    assert runtime.snapshot(iid).lease_count == 1
    assert runtime.renew(resolution.lease.lease_ref).lease_ref == resolution.lease.lease_ref


def test_lease_instance_checks_the_consumer_against_that_instances_manifest(
    runtime: Runtime, tmp_path: Path
) -> None:
    chat_only = runtime.ensure_instance(Fake(tmp_path / "chat").spec()).instance.instance_id
    both = runtime.ensure_instance(Fake(tmp_path / "emb").spec(embeddings=True)).instance

    with pytest.raises(IncompatibleError) as caught:
        runtime.lease_instance(chat_only, EMBEDDER)
    embedding = runtime.lease_instance(both.instance_id, EMBEDDER)

    assert caught.value.result.reason == "unsupported_protocol"
    assert runtime.snapshot(chat_only).lease_count == 0
    assert embedding.endpoint.protocol == "openai_embeddings"
    assert post(embedding, "/embeddings", {"input": "x"}).status_code == 200


def test_lease_instance_refuses_an_unknown_instance_and_says_where_to_look(
    runtime: Runtime,
) -> None:
    with pytest.raises(InstanceNotFoundError, match=r"no instance 'nope'.*Runtime\.instances"):
        runtime.lease_instance("nope", "tests")


def test_lease_instance_refuses_a_stopped_instance_and_says_how_to_get_a_fresh_one(
    runtime: Runtime, fake: Fake
) -> None:
    iid = runtime.ensure_instance(fake.spec()).instance.instance_id
    runtime.stop_instance(iid)

    with pytest.raises(NotReadyError, match=r"has stopped.*resolve_endpoint\(spec\)") as caught:
        runtime.lease_instance(iid, "tests")

    assert caught.value.instance_id == iid


def test_lease_instance_refuses_an_instance_that_is_draining(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    holder = runtime.resolve_endpoint(fake.spec(), "holder")
    iid = holder.instance.instance_id

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stopping = pool.submit(runtime.stop_instance, iid, drain_timeout=60)
        recorder.wait_for("instance_draining", iid, timeout=WAIT)
        with pytest.raises(NotReadyError, match="is stopping and takes no new leases"):
            runtime.lease_instance(iid, "latecomer")
        runtime.release(holder.lease.lease_ref)
        assert stopping.result(timeout=WAIT).state == "stopped"

    assert len(recorder.find("lease_granted", iid)) == 1


def test_lease_instance_waits_for_an_instance_that_is_still_starting(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    spec = fake.spec({"never_ready": "1"})  # it loads until the test lets it finish
    answer: pykka.ThreadingFuture[Any] = pykka.ThreadingFuture()
    face = runtime.actor_face(answer)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ensuring = pool.submit(runtime.ensure_instance, spec)
        iid = recorder.wait_for("instance_starting", timeout=WAIT).instance_id
        # Sent while it cannot be ready: the supervisor has it before the instance's
        # InstanceReady, so it waits for readiness with the ensure.
        face.lease_instance(iid, "early", owner_ref="early")
        assert runtime.snapshot(iid).state == "starting"
        fake.set(never_ready=False)
        ensured = ensuring.result(WAIT)

    resolution = answer.get(timeout=WAIT)
    assert isinstance(resolution, Resolution)
    assert (resolution.instance.instance_id, resolution.reused) == (iid, True)
    assert resolution.instance.state == "ready"
    assert resolution.lease.owner_ref == "early"
    assert ensured.reused is False
    assert runtime.snapshot(iid).lease_count == 1


def test_a_lease_instance_that_times_out_says_so_and_leaves_no_lease(
    runtime: Runtime, fake: Fake, recorder: SignalRecorder
) -> None:
    spec = fake.spec({"never_ready": "1"})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ensuring = pool.submit(runtime.ensure_instance, spec)
        iid = recorder.wait_for("instance_starting", timeout=WAIT).instance_id
        said = rf"no answer for a lease on instance {re.escape(iid)}.*is starting"
        with pytest.raises(WaitTimeoutError, match=said):
            runtime.lease_instance(iid, "impatient", timeout=0.2)
        fake.set(never_ready=False)
        ensuring.result(WAIT)

    later = runtime.lease_instance(iid, "patient")
    assert runtime.snapshot(iid).lease_count == 1
    assert [r.payload["lease"].lease_ref for r in recorder.find("lease_granted", iid)] == [
        later.lease.lease_ref
    ]


def test_lease_instance_is_awaitable_and_answers_actors_too(runtime: Runtime, fake: Fake) -> None:
    iid = runtime.ensure_instance(fake.spec()).instance.instance_id

    async def main() -> Resolution:
        rt = AsyncRuntime.wrap(runtime)
        return await rt.lease_instance(iid, "async", renewable=False, timeout=WAIT)

    by_await = asyncio.run(main())
    answer: pykka.ThreadingFuture[Any] = pykka.ThreadingFuture()
    request_id = runtime.actor_face(answer).lease_instance(iid, "actor", metadata={"a": 1})
    by_actor = answer.get(timeout=WAIT)

    assert (by_await.instance.instance_id, by_await.lease.renewable) == (iid, False)
    assert request_id.startswith("req-")
    assert isinstance(by_actor, Resolution)
    assert by_actor.lease.metadata == {"a": 1}
    assert runtime.snapshot(iid).lease_count == 2


class _Asker(pykka.ThreadingActor):
    """An actor that leases an instance by id through the actor face, without waiting."""

    def __init__(self, runtime: Runtime, got: pykka.ThreadingFuture[Replied]) -> None:
        super().__init__()
        self.face = runtime.actor_face(self.actor_ref)
        self.got = got

    def on_receive(self, message: Any) -> None:
        if isinstance(message, Replied):
            self.got.set(message)
        else:
            self.face.lease_instance(message, "actor")


def test_an_actor_leases_an_instance_by_id_without_waiting_and_is_told_the_resolution(
    runtime: Runtime, fake: Fake
) -> None:
    iid = runtime.ensure_instance(fake.spec()).instance.instance_id
    got: pykka.ThreadingFuture[Replied] = pykka.ThreadingFuture()
    asker = _Asker.start(runtime, got)
    try:
        asker.tell(iid)
        replied = got.get(timeout=WAIT)
    finally:
        asker.stop()

    assert replied.error is None
    assert isinstance(replied.value, Resolution)
    assert replied.value.instance.instance_id == iid
    assert chat(replied.value).status_code == 200


def test_a_lease_on_an_unknown_instance_through_the_actor_face_raises_in_the_calling_thread(
    runtime: Runtime,
) -> None:
    face = runtime.actor_face(pykka.ThreadingFuture())

    with pytest.raises(InstanceNotFoundError):
        face.lease_instance("nope", "actor")


def test_a_lease_by_id_carries_its_own_metadata_and_the_consumers(
    runtime: Runtime, fake: Fake
) -> None:
    consumer = ConsumerManifest(consumer="svc", metadata={"app": "search"})
    iid = runtime.ensure_instance(fake.spec()).instance.instance_id

    by_id = runtime.lease_instance(iid, consumer, metadata={"why": "by id"})

    assert by_id.compatibility.metadata == {"app": "search"}
    assert by_id.lease.metadata == {"why": "by id"}


def test_renew_and_release_take_the_lease_or_the_leased_endpoint_as_well_as_its_ref(
    runtime: Runtime, fake: Fake
) -> None:
    first = runtime.resolve_endpoint(fake.spec(), timeout=WAIT)
    assert runtime.renew(first.lease).lease_ref == first.lease.lease_ref
    assert runtime.renew(first.endpoint, ttl_ms=5_000).ttl_ms == 5_000
    assert runtime.release(first.lease) is True
    assert runtime.release(first.endpoint) is False  # already ended: idempotent
    second = runtime.resolve_endpoint(fake.spec(), timeout=WAIT)
    assert runtime.release(second.endpoint) is True


def test_renew_or_release_of_something_that_is_not_a_lease_fails_at_once_saying_what_to_give(
    runtime: Runtime, fake: Fake
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), timeout=WAIT)
    published = runtime.published_endpoint(resolution.instance.instance_id)
    for bad in ({"lease_ref": "x"}, 42, published):
        with pytest.raises(UsageError, match=r"lease ref|holds no lease"):
            runtime.release(bad)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match=r"lease ref|holds no lease"):
            runtime.renew(bad)  # type: ignore[arg-type]
    assert runtime.release(resolution.lease) is True

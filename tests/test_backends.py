"""Backends as plugins (CONTRACT §9): the registry, specs that name their backend, a
backend of one's own, and the attach backend against a fake server someone else runs."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

import llama_actors
from llama_actors import (
    AttachSpec,
    BackendBase,
    BackendManifest,
    BootSpec,
    BootSpecError,
    ConsumerManifest,
    IncompatibleError,
    ReadinessTimeoutError,
    Resolution,
    Runtime,
    UsageError,
    attach_spec,
    backend_manifest,
    backends,
    register_backend,
    unregister_backend,
    validate_spec,
)
from llama_actors._backends.registry import backend_for
from llama_actors._cli.config import validate_config_file
from llama_actors._cli.main import main as cli_main
from llama_actors.lowlevel import EndpointUrls, LaunchPlan, ProcessExit
from llama_actors.testing.fake import FAKE_SERVER, FakeLlama, start_fake
from llama_actors.testing.signals import SignalRecorder

from ._helpers import WAIT, Fake

BOTH_MODES = ConsumerManifest(
    consumer="tests", accepted_management_modes=("managed", "externally_managed")
)


def chat(resolution: Resolution) -> httpx.Response:
    endpoint = resolution.endpoint
    with httpx.Client(trust_env=False, timeout=5) as client:
        return client.post(
            endpoint.base_url + "/chat/completions",
            headers=endpoint.headers,
            json={"messages": [{"role": "user", "content": "hi"}]},
        )


# -- the registry ------------------------------------------------------------------------


def test_llama_cpp_and_attach_are_built_in_and_llama_cpp_is_the_default() -> None:
    assert backends()[:2] == ("llama_cpp", "attach")
    assert backend_manifest("llama_cpp").management_modes == ("managed",)
    attach = backend_manifest("attach")
    assert (attach.management_modes, attach.startup_kind) == (
        ("externally_managed",),
        "attach_existing_service",
    )
    spec = validate_spec({"model": "/m.gguf"})
    assert isinstance(spec, BootSpec)
    assert spec.backend == "llama_cpp"
    assert validate_spec({"backend": "llama_cpp", "model": "/m.gguf"}) == spec


def test_a_spec_naming_a_backend_nobody_registered_is_refused_before_anything_starts(
    runtime: Runtime,
) -> None:
    with pytest.raises(IncompatibleError) as caught:
        runtime.resolve_endpoint({"backend": "vllm", "model": "m"}, "tests")

    assert caught.value.result.reason == "backend_unregistered"
    assert "'vllm'" in str(caught.value)
    assert "register_backend" in str(caught.value)
    assert runtime.instances() == []
    with pytest.raises(BootSpecError, match=r"^backend: no backend.*register_backend.*got 'vllm'"):
        validate_spec({"backend": "vllm"})


def test_a_name_is_registered_once_unless_replaced_and_a_built_in_comes_back() -> None:
    class Other(BackendBase):
        name = "llama_cpp"

        def spec(self, data: Any) -> Any:
            raise NotImplementedError

        def launch(self, spec: Any) -> None:
            return None

    with pytest.raises(UsageError, match="registered already; pass replace=True"):
        register_backend(Other())
    register_backend(Other(), replace=True)
    try:
        assert isinstance(backend_for("llama_cpp"), Other)
    finally:
        unregister_backend("llama_cpp")
    assert not isinstance(backend_for("llama_cpp"), Other)
    with pytest.raises(UsageError, match="no backend named 'nope'"):
        unregister_backend("nope")
    with pytest.raises(UsageError, match="no backend named 'nope'"):
        backend_manifest("nope")


def test_something_that_is_not_a_backend_is_refused_with_what_it_lacks() -> None:
    with pytest.raises(UsageError, match="is not a backend: it needs name, spec, manifest"):
        register_backend(object())  # type: ignore[arg-type]


# -- a backend of one's own --------------------------------------------------------------


class ScriptSpec(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    alias: str = "script"
    backend: str = "script"
    retryable: bool = True
    metadata: dict[str, Any] = {}
    ready_timeout_s: float = 30.0
    readiness_interval_s: float = 0.02
    health_interval_s: float = 0.1

    @property
    def model_identity(self) -> str:
        return self.alias

    @property
    def headers(self) -> dict[str, str]:
        return {}

    @property
    def instance_key(self) -> str:
        return hashlib.sha256(f"{self.model}\0{self.alias}".encode()).hexdigest()[:32]

    def urls(self, bound_port: int | None = None) -> EndpointUrls:
        return EndpointUrls.build("127.0.0.1", bound_port or 0, "")


class ScriptBackend(BackendBase):
    """Launches the fake server; says whether an exit may be retried as its spec says."""

    name = "script"

    def __init__(self) -> None:
        self.exits: list[ProcessExit] = []

    def spec(self, data: Any) -> ScriptSpec:
        return data if isinstance(data, ScriptSpec) else msgspec.convert(dict(data), ScriptSpec)

    def manifest(self, spec: Any = None) -> BackendManifest:
        return BackendManifest(
            backend="script",
            runtime_kind="service",
            management_modes=("managed",),
            startup_kind="spawned",
            protocols=("openai_chat_completions",),
            capabilities={"streaming": True},
            supported_surfaces=("local_subprocess",),
            resource_profile={},
        )

    def launch(self, spec: Any) -> LaunchPlan:
        argv = [sys.executable, FAKE_SERVER, "-m", spec.model, "-a", spec.alias, "--port", "{port}"]
        return LaunchPlan.simple(argv, name=spec.alias, stop_timeout_s=2.0)

    def classify_exit(self, report: ProcessExit) -> llama_actors.ExitVerdict:
        self.exits.append(report)
        verdict = super().classify_exit(report)
        return msgspec.structs.replace(verdict, retryable=True, failure="script says so")


@pytest.fixture
def script(tmp_path: Path) -> Iterator[tuple[ScriptBackend, dict[str, Any]]]:
    backend = ScriptBackend()
    register_backend(backend)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF fake\n")
    try:
        yield backend, {"backend": "script", "model": str(model)}
    finally:
        unregister_backend("script")


def test_a_registered_backend_is_launched_leased_and_restarted_like_llama_cpp(
    runtime: Runtime,
    script: tuple[ScriptBackend, dict[str, Any]],
    recorder: SignalRecorder,
) -> None:
    backend, spec = script
    got = runtime.resolve_endpoint(spec, "tests")
    iid, pid = got.instance.instance_id, got.instance.pid
    assert got.endpoint.provider_identity == "script"
    assert chat(got).status_code == 200
    assert pid is not None

    os.kill(pid, 9)
    restarting = recorder.wait_for("instance_restarting", iid, timeout=WAIT)
    recorder.wait_for("instance_ready", iid, timeout=WAIT, count=2)

    assert len(backend.exits) == 1
    assert backend.exits[0].signal == "SIGKILL"
    assert "SIGKILL" in restarting.payload["reason"]
    assert runtime.snapshot(iid).restart_count == 1
    assert runtime.renew(got.lease.lease_ref).lease_ref == got.lease.lease_ref
    runtime.stop_instance(iid)
    assert runtime.snapshot(iid).state == "stopped"


def test_a_plan_of_ones_own_needs_the_port_token_once() -> None:
    with pytest.raises(UsageError, match=r"token '\{port\}' once"):
        LaunchPlan.simple(["/bin/server", "--port", "8080"], name="x")
    plan = LaunchPlan.simple(["/bin/server", "--port", "{port}"], name="x", port=9000)
    assert (plan.argv, plan.port_mode) == (("/bin/server", "--port", "9000"), "fixed")


# -- attach specs ------------------------------------------------------------------------


def test_an_attach_spec_takes_a_root_url_and_publishes_it_plus_v1() -> None:
    spec = attach_spec({"backend": "attach", "url": "http://127.0.0.1:8080/llama/"})

    assert isinstance(spec, AttachSpec)
    assert (spec.host, spec.port, spec.api_prefix, spec.alias) == (
        "127.0.0.1",
        8080,
        "/llama",
        "127.0.0.1:8080",
    )
    assert spec.urls().base_url == "http://127.0.0.1:8080/llama/v1"
    assert spec.urls().health_url == "http://127.0.0.1:8080/llama/health"
    assert validate_spec({"backend": "attach", "url": "http://127.0.0.1:8080/llama"}) == spec


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({}, "url", "is required: the root URL"),
        ({"url": "https://example.test:8443"}, "url", "must be an http:// URL"),
        ({"url": "http://127.0.0.1:8080/v1"}, "url", "without /v1"),
        ({"url": "http://u:pw@127.0.0.1:8080"}, "url", "must not hold credentials"),
        ({"url": "http://127.0.0.1:8080", "modle": "x"}, "modle", "unknown field"),
        ({"url": "http://127.0.0.1:8080", "protocols": ["grpc"]}, "protocols", "is not one of"),
        ({"url": "http://127.0.0.1:8080", "api_key": " "}, "api_key", "must not be empty"),
    ],
)
def test_a_bad_attach_spec_names_the_field_and_what_to_do(
    fields: dict[str, Any], field: str, says: str
) -> None:
    with pytest.raises(BootSpecError) as caught:
        attach_spec({"backend": "attach", **fields})
    assert caught.value.field == field
    assert says in str(caught.value)


def test_an_attach_spec_masks_its_key_and_keys_enter_its_identity_as_digests() -> None:
    one = attach_spec({"url": "http://127.0.0.1:8080", "api_key": "sekrit-1"})
    two = attach_spec({"url": "http://127.0.0.1:8080", "api_key": "sekrit-2"})

    assert "sekrit" not in repr(one)
    assert one.headers == {"Authorization": "Bearer sekrit-1"}
    assert one.instance_key != two.instance_key
    same = attach_spec({"url": "http://127.0.0.1:8080", "api_key": "sekrit-1", "metadata": {1: 2}})
    assert same.instance_key == one.instance_key


def test_declared_embeddings_offer_the_embeddings_protocol_too() -> None:
    spec = attach_spec({"url": "http://127.0.0.1:8080", "capabilities": {"embeddings": True}})
    manifest = backend_for("attach").manifest(spec)  # type: ignore[union-attr]

    assert manifest.protocols == ("openai_chat_completions", "openai_embeddings")
    assert manifest.capabilities["embeddings"] is True


# -- attached servers --------------------------------------------------------------------


@pytest.fixture
def external(tmp_path: Path) -> Iterator[list[FakeLlama]]:
    """Fake servers that 'someone else' runs; stopped after the test."""
    servers: list[FakeLlama] = []
    yield servers
    for server in servers:
        server.stop(timeout=5)


def run_external(external: list[FakeLlama], folder: Path, **fields: Any) -> FakeLlama:
    server = start_fake(folder, **fields)
    external.append(server)
    return server


def attach(server: FakeLlama, **fields: Any) -> dict[str, Any]:
    return {
        "backend": "attach",
        "url": server.urls.root_url,
        "health_interval_ms": 100,
        "readiness_interval_ms": 20,
        **fields,
    }


def test_an_attached_server_is_leased_with_no_pid_and_an_externally_managed_endpoint(
    runtime: Runtime, external: list[FakeLlama], tmp_path: Path
) -> None:
    server = run_external(external, tmp_path / "ext")

    got = runtime.resolve_endpoint(attach(server), BOTH_MODES)
    again = runtime.resolve_endpoint(attach(server), BOTH_MODES)

    assert chat(got).status_code == 200
    assert got.endpoint.management_mode == "externally_managed"
    assert got.endpoint.base_url == server.urls.root_url + "/v1"
    assert got.endpoint.metadata["url"] == server.urls.root_url
    snap = runtime.snapshot(got.instance.instance_id)
    assert (snap.state, snap.health, snap.pid, snap.port) == ("ready", "healthy", None, server.port)
    assert snap.log_path is None
    assert (again.reused, again.instance.instance_id) == (True, snap.instance_id)
    assert (got.instance.lease_count, snap.lease_count) == (1, 2)


def test_a_consumer_that_accepts_only_managed_instances_is_refused_an_attached_one(
    runtime: Runtime, external: list[FakeLlama], tmp_path: Path
) -> None:
    server = run_external(external, tmp_path / "ext")

    with pytest.raises(IncompatibleError) as caught:
        runtime.resolve_endpoint(attach(server), "managed-only")

    assert caught.value.result.reason == "management_mode_mismatch"
    assert runtime.instances() == []
    assert runtime.resolve_endpoint(attach(server)).endpoint.management_mode == (
        "externally_managed"
    )  # a call that names no consumer takes either


def test_an_attached_server_that_stops_answering_is_unavailable_then_healthy_and_never_restarted(
    runtime: Runtime, external: list[FakeLlama], tmp_path: Path, recorder: SignalRecorder
) -> None:
    server = run_external(external, tmp_path / "ext")
    port = server.port
    got = runtime.resolve_endpoint(attach(server), BOTH_MODES, ttl_ms=600_000)
    iid = got.instance.instance_id

    server.stop(timeout=5)
    recorder.wait_for("health_changed", iid, new="unavailable", timeout=WAIT)
    assert runtime.snapshot(iid).state == "ready"  # still published: leases keep their URL
    run_external(external, tmp_path / "ext", port=port)
    recorder.wait_for("health_changed", iid, new="healthy", count=2, timeout=WAIT)

    assert chat(got).status_code == 200
    assert runtime.renew(got.lease.lease_ref).lease_ref == got.lease.lease_ref
    assert recorder.find("instance_restarting") == []
    assert recorder.find("lease_released") == []
    assert recorder.find("lease_expired") == []
    snap = runtime.snapshot(iid)
    assert (snap.restart_count, snap.lease_count, snap.health) == (0, 1, "healthy")


def test_stopping_an_attached_instance_drains_and_forgets_it_and_the_server_keeps_running(
    runtime: Runtime, external: list[FakeLlama], tmp_path: Path, recorder: SignalRecorder
) -> None:
    server = run_external(external, tmp_path / "ext")
    got = runtime.resolve_endpoint(attach(server), BOTH_MODES)
    iid = got.instance.instance_id

    final = runtime.stop_instance(iid, drain_timeout=0)

    assert final.state == "stopped"
    stopped = recorder.wait_for("instance_stopped", iid, timeout=WAIT)
    assert stopped.payload["exit"] is None
    assert recorder.wait_for("lease_released", iid, timeout=WAIT).payload["reason"] == "drained"
    assert server.process.running
    with httpx.Client(trust_env=False, timeout=5) as client:
        assert client.get(server.urls.health_url).status_code == 200
    fresh = runtime.resolve_endpoint(attach(server), BOTH_MODES)
    assert fresh.instance.instance_id != iid
    assert fresh.reused is False


def test_attaching_to_nothing_fails_after_the_ready_timeout_with_the_last_probe(
    runtime: Runtime, tmp_path: Path
) -> None:
    fake = Fake(tmp_path / "gone")
    server = start_fake(fake.folder)
    spec = attach(server, ready_timeout_ms=500)
    server.stop(timeout=5)

    with pytest.raises(ReadinessTimeoutError, match=r"last probe: TCP .*nothing launched"):
        runtime.resolve_endpoint(spec, BOTH_MODES, timeout=WAIT)

    (snap,) = runtime.instances()
    assert (snap.state, snap.pid, snap.restart_count) == ("failed", None, 0)


def test_an_attached_server_with_a_key_is_probed_and_published_with_it(
    runtime: Runtime, external: list[FakeLlama], tmp_path: Path
) -> None:
    server = run_external(external, tmp_path / "ext", api_key="attach-key-1", api_prefix="/llm")

    url = server.urls.root_url + "/llm"
    got = runtime.resolve_endpoint(attach(server, url=url, api_key="attach-key-1"), BOTH_MODES)

    assert got.endpoint.base_url == url + "/v1"

    assert got.endpoint.headers == {"Authorization": "Bearer attach-key-1"}
    assert "attach-key-1" not in repr(got.endpoint)
    assert chat(got).status_code == 200
    with httpx.Client(trust_env=False, timeout=5) as client:
        assert client.post(got.endpoint.base_url + "/chat/completions", json={}).status_code == 401


def test_an_attached_server_in_an_up_file_is_validated_with_its_fields(tmp_path: Path) -> None:
    path = tmp_path / "up.toml"
    path.write_text(
        '[backends.shared]\nbackend = "attach"\nurl = "http://127.0.0.1:8080"\n'
        "capabilities = { tool_calling = true }\n"
        '[backends.local]\nmodel = "m.gguf"\n'
        '[backends.bad]\nbackend = "attach"\nurl = "ftp://x"\n'
    )

    specs, errors = validate_config_file(str(path))

    assert isinstance(specs["shared"], AttachSpec)
    assert isinstance(specs["local"], BootSpec)
    assert specs["shared"].capabilities["tool_calling"] is True
    assert [e.field for e in errors] == ["backends.bad.url"]


def test_render_and_check_show_an_attached_server_without_contacting_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "up.toml"
    path.write_text('[backends.shared]\nbackend = "attach"\nurl = "http://127.0.0.1:9/llm"\n')

    assert cli_main(["render", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "argv:         nothing: the server runs elsewhere" in shown
    assert "base_url:     http://127.0.0.1:9/llm/v1" in shown
    assert cli_main(["check", str(path)]) == 0
    assert "ok   shared: attach at http://127.0.0.1:9 (not contacted)" in capsys.readouterr().out

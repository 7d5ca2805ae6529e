"""Boot specs: every field's accepted and rejected forms, derived URLs and identity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

import llama_actors
from llama_actors import BootSpecError, PortNotBoundError, boot_spec
from llama_actors.lowlevel import Secret

MODEL = "/models/gemma-3-270m.Q4_K_M.gguf"
INT_MAX = 2**31 - 1
OPTIONAL_INTS = (
    "ctx_size",
    "threads",
    "threads_batch",
    "parallel",
    "timeout_seconds",
    "threads_http",
)


def spec(**fields: Any) -> llama_actors.BootSpec:
    return boot_spec({"model": MODEL, **fields})


# -- accepted forms -------------------------------------------------------------------

ACCEPTED = [
    ("binary_path", None, None),
    ("binary_path", "llama-server", "llama-server"),
    ("binary_path", "/opt/llama/bin/llama-server", "/opt/llama/bin/llama-server"),
    ("launcher_args", ["fake_server.py"], ("fake_server.py",)),
    ("launcher_args", None, ()),
    ("alias", " chat ", "chat"),
    ("model_identity", "gemma-3-270m-it", "gemma-3-270m-it"),
    ("host", None, "127.0.0.1"),
    ("host", "LocalHost", "localhost"),
    ("host", "0.0.0.0", "0.0.0.0"),
    ("host", "[::1]", "::1"),
    ("host", "0:0:0:0:0:0:0:1", "::1"),
    ("port", None, "auto"),
    ("port", "auto", "auto"),
    ("port", 0, "auto"),
    ("port", 1, 1),
    ("port", 8080, 8080),
    ("port", 65535, 65535),
    ("api_prefix", None, ""),
    ("api_prefix", "", ""),
    ("api_prefix", "/", ""),
    ("api_prefix", "llama", "/llama"),
    ("api_prefix", "/llama/", "/llama"),
    ("api_prefix", "//team//llama//", "/team/llama"),
    ("gpu_layers", None, "auto"),
    ("gpu_layers", "auto", "auto"),
    ("gpu_layers", "all", "all"),
    ("gpu_layers", 0, 0),
    ("gpu_layers", 99, 99),
    ("flash_attn", None, "auto"),
    ("flash_attn", True, "on"),
    ("flash_attn", False, "off"),
    ("flash_attn", "on", "on"),
    ("flash_attn", "off", "off"),
    ("flash_attn", "auto", "auto"),
    ("embeddings", None, False),
    ("embeddings", True, True),
    ("pooling", None, None),
    *[("pooling", p, p) for p in ("none", "mean", "cls", "last", "rank")],
    ("api_key", None, None),
    ("api_key", "  sk-local-123  ", Secret("sk-local-123")),
    ("api_key", Secret("sk-local-123"), Secret("sk-local-123")),
    ("execution_surface", None, "local_subprocess"),
    ("execution_surface", "local_subprocess", "local_subprocess"),
    ("environment", None, {}),
    (
        "environment",
        {"GGML_NTHREADS": "2", "DEBUG": True, "QUIET": False, "N": 3, "RATIO": 1.5},
        {"GGML_NTHREADS": "2", "DEBUG": "true", "QUIET": "false", "N": "3", "RATIO": "1.5"},
    ),
    ("extra_args", None, ()),
    ("extra_args", ["--jinja", "--seed", "42"], ("--jinja", "--seed", "42")),
    ("metadata", None, {}),
    ("metadata", {"team": "search", "tier": 2}, {"team": "search", "tier": 2}),
]
for _name in OPTIONAL_INTS:
    ACCEPTED += [(_name, None, None), (_name, 1, 1), (_name, INT_MAX, INT_MAX)]
for _name, _default in llama_actors._llama.boot_spec.DEFAULTS.items():
    ACCEPTED += [(_name, None, _default), (_name, 1, 1), (_name, 250, 250)]


@pytest.mark.parametrize(("field", "given", "expected"), ACCEPTED)
def test_an_accepted_value_is_normalised(field: str, given: Any, expected: Any) -> None:
    assert getattr(spec(**{field: given}), field) == expected


def test_only_model_is_required_and_every_default_is_the_contracts() -> None:
    result = boot_spec({"model": MODEL})
    assert result.alias == "gemma-3-270m.Q4_K_M"
    assert result.model_identity == result.alias
    assert (result.host, result.port, result.api_prefix) == ("127.0.0.1", "auto", "")
    assert (result.gpu_layers, result.flash_attn, result.embeddings) == ("auto", "auto", False)
    assert (result.readiness_interval_ms, result.health_interval_ms) == (100, 1000)
    assert result.stop_timeout_ms == 5000
    assert result.ready_timeout_ms == 30000
    assert result.execution_surface == "local_subprocess"
    assert result.headers == {}


def test_the_alias_defaults_to_the_file_name_minus_its_last_extension() -> None:
    assert boot_spec({"model": "relative/dir/qwen.gguf"}).alias == "qwen"
    assert boot_spec({"model": "noext"}).alias == "noext"
    assert boot_spec({"model": "/m/phi-3.mini.bin"}).alias == "phi-3.mini"


def test_model_identity_defaults_to_an_explicit_alias() -> None:
    assert spec(alias="chat").model_identity == "chat"


# -- rejected forms -------------------------------------------------------------------

REJECTED = [
    ({"model": None}, "model"),
    ({"model": ""}, "model"),
    ({"model": "   "}, "model"),
    ({"model": 5}, "model"),
    ({"model": "/m/a\x00b.gguf"}, "model"),
    ({"model": "/"}, "alias"),
    ({"binary_path": ""}, "binary_path"),
    ({"binary_path": 3}, "binary_path"),
    ({"launcher_args": "script.py"}, "launcher_args"),
    ({"launcher_args": ["ok", 1]}, "launcher_args[1]"),
    ({"alias": ""}, "alias"),
    ({"alias": "a,b"}, "alias"),
    ({"alias": 3}, "alias"),
    ({"model_identity": " "}, "model_identity"),
    ({"host": ""}, "host"),
    ({"host": "/run/llama.sock"}, "host"),
    ({"host": "two words"}, "host"),
    ({"host": "127.0.0.1,::1"}, "host"),
    ({"host": "1::2::3"}, "host"),
    ({"host": 127}, "host"),
    ({"port": "8080"}, "port"),
    ({"port": True}, "port"),
    ({"port": -1}, "port"),
    ({"port": 65536}, "port"),
    ({"port": 80.0}, "port"),
    ({"port": "any"}, "port"),
    ({"api_prefix": 5}, "api_prefix"),
    ({"api_prefix": "/a b"}, "api_prefix"),
    ({"api_prefix": "/a?x=1"}, "api_prefix"),
    ({"gpu_layers": -1}, "gpu_layers"),
    ({"gpu_layers": "most"}, "gpu_layers"),
    ({"gpu_layers": True}, "gpu_layers"),
    ({"gpu_layers": 2**31}, "gpu_layers"),
    ({"flash_attn": "yes"}, "flash_attn"),
    ({"flash_attn": "ON"}, "flash_attn"),
    ({"flash_attn": 1}, "flash_attn"),
    ({"embeddings": "true"}, "embeddings"),
    ({"embeddings": 1}, "embeddings"),
    ({"pooling": "max"}, "pooling"),
    ({"api_key": 5}, "api_key"),
    ({"execution_surface": "ssh_exec"}, "execution_surface"),
    ({"execution_surface": "guest_bridge"}, "execution_surface"),
    ({"environment": "A=1"}, "environment"),
    ({"environment": {"A": None}}, "environment.A"),
    ({"environment": {"A": [1]}}, "environment.A"),
    ({"environment": {"A": "x\x00y"}}, "environment.A"),
    ({"environment": {"": "x"}}, "environment."),
    ({"environment": {"A=B": "x"}}, "environment.A=B"),
    ({"extra_args": "--jinja"}, "extra_args"),
    ({"extra_args": ["--jinja", 7]}, "extra_args[1]"),
    ({"extra_args": ["--jinja", "--port", "9000"]}, "extra_args[1]"),
    ({"extra_args": ["-c", "4096"]}, "extra_args[0]"),
    ({"extra_args": ["--ctx-size=4096"]}, "extra_args[0]"),
    ({"extra_args": ["--n-gpu-layers", "9"]}, "extra_args[0]"),
    ({"metadata": "x"}, "metadata"),
    ({"ctx-size": 4096}, "ctx-size"),
    ({"modle": "x"}, "modle"),
]
for _name in OPTIONAL_INTS:
    REJECTED += [({_name: v}, _name) for v in (0, -1, True, "4096", 1.5, 2**31)]
for _name in llama_actors._llama.boot_spec.DEFAULTS:
    REJECTED += [({_name: v}, _name) for v in (0, -5, "100", 1.5, False)]


@pytest.mark.parametrize(("fields", "field"), REJECTED)
def test_a_rejected_value_raises_boot_spec_error_naming_the_field(
    fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(BootSpecError) as caught:
        boot_spec({"model": MODEL, **fields})
    assert caught.value.field == field
    assert field in str(caught.value)
    assert isinstance(caught.value, llama_actors.LlamaActorsError)


@pytest.mark.parametrize("key", ["", "has space", "#starts-with-hash", "é-accent", "tab\tkey"])
def test_a_bad_api_key_is_rejected_without_showing_it(key: str) -> None:
    with pytest.raises(BootSpecError) as caught:
        spec(api_key=key)
    assert caught.value.field == "api_key"
    assert caught.value.value == "********"
    if key.strip():
        assert key not in str(caught.value)


def test_a_secret_looking_environment_value_is_masked_in_errors() -> None:
    with pytest.raises(BootSpecError) as caught:
        spec(environment={"HF_TOKEN": ["hf_abcdef"]})
    assert caught.value.field == "environment.HF_TOKEN"
    assert "hf_abcdef" not in str(caught.value)


def test_an_api_key_in_extra_args_is_refused_and_masked() -> None:
    with pytest.raises(BootSpecError) as caught:
        spec(extra_args=["--api-key", "sk-visible"])
    assert caught.value.field == "extra_args[0]"
    assert "set api_key instead" in caught.value.reason
    assert "sk-visible" not in str(caught.value)


def test_an_unknown_key_is_named_and_a_close_field_is_suggested() -> None:
    with pytest.raises(BootSpecError) as caught:
        spec(ctx_szie=1024)
    assert caught.value.field == "ctx_szie"
    assert "did you mean 'ctx_size'" in str(caught.value)


@pytest.mark.parametrize("value", [["model"], "model=x", 42, None])
def test_a_spec_that_is_not_a_mapping_is_a_boot_spec_error(value: Any) -> None:
    with pytest.raises(BootSpecError) as caught:
        boot_spec(value)
    assert caught.value.field == "spec"


def test_a_non_string_key_is_a_boot_spec_error() -> None:
    with pytest.raises(BootSpecError):
        boot_spec({"model": MODEL, 3: "x"})  # type: ignore[dict-item]


def test_the_unsupported_host_and_surface_errors_say_so() -> None:
    with pytest.raises(BootSpecError, match="unsupported host"):
        spec(host="/tmp/x.sock")
    with pytest.raises(BootSpecError, match="unsupported execution surface"):
        spec(execution_surface="ssh_exec")


# -- derived urls and headers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "root", "base", "health"),
    [
        ({"port": 8080}, "http://127.0.0.1:8080", "/v1", "/health"),
        ({"port": 8080, "api_prefix": "/"}, "http://127.0.0.1:8080", "/v1", "/health"),
        ({"port": 8080, "api_prefix": "llm/"}, "http://127.0.0.1:8080", "/llm/v1", "/llm/health"),
        ({"port": 9000, "host": "::1"}, "http://[::1]:9000", "/v1", "/health"),
        ({"port": 9000, "host": "[fe80::1]"}, "http://[fe80::1]:9000", "/v1", "/health"),
        ({"port": 1, "host": "localhost"}, "http://localhost:1", "/v1", "/health"),
    ],
)
def test_derived_urls_follow_host_port_and_prefix(
    fields: dict[str, Any], root: str, base: str, health: str
) -> None:
    result = spec(**fields)
    assert result.root_url == root
    assert result.base_url == root + base
    assert result.health_url == root + health


def test_urls_of_an_auto_port_need_the_bound_port() -> None:
    result = spec(api_prefix="/p")
    with pytest.raises(PortNotBoundError, match="bound_port"):
        _ = result.base_url
    assert result.urls(41234).base_url == "http://127.0.0.1:41234/p/v1"
    assert result.urls(41234).health_url == "http://127.0.0.1:41234/p/health"


def test_headers_carry_a_bearer_token_only_when_a_key_is_known() -> None:
    assert spec().headers == {}
    assert spec(api_key="sk-1").headers == {"Authorization": "Bearer sk-1"}


# -- api_key_file ---------------------------------------------------------------------


def test_an_api_key_file_is_read_trimmed_and_comments_skipped(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("\n# rotated monthly\n   sk-first  \nsk-second\n\n")
    result = spec(api_key_file=str(keys))
    assert result.headers == {"Authorization": "Bearer sk-first"}
    assert [k.reveal() for k in result.server_keys] == ["sk-first", "sk-second"]


def test_api_key_wins_for_the_header_and_the_server_accepts_both(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-from-file\n")
    result = spec(api_key="sk-inline", api_key_file=str(keys))
    assert result.headers == {"Authorization": "Bearer sk-inline"}
    assert [k.reveal() for k in result.server_keys] == ["sk-inline", "sk-from-file"]


@pytest.mark.parametrize("content", ["", "   \n\n", "# only a comment\n"])
def test_an_api_key_file_with_no_key_is_rejected(tmp_path: Path, content: str) -> None:
    keys = tmp_path / "keys"
    keys.write_text(content)
    with pytest.raises(BootSpecError, match="holds no key") as caught:
        spec(api_key_file=str(keys))
    assert caught.value.field == "api_key_file"
    assert caught.value.value == str(keys)


def test_an_unreadable_api_key_file_is_rejected_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(BootSpecError, match="cannot be read") as caught:
        spec(api_key_file=str(missing))
    assert (caught.value.field, caught.value.value) == ("api_key_file", str(missing))
    with pytest.raises(BootSpecError, match="not a regular file"):
        spec(api_key_file=str(tmp_path))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00key")
    with pytest.raises(BootSpecError, match="not UTF-8"):
        spec(api_key_file=str(binary))


def test_an_api_key_file_without_read_permission_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The suite runs as root in CI, where mode 000 does not stop a read; make the open
    # fail the way it does for an ordinary user instead.
    keys = tmp_path / "keys"
    keys.write_text("sk\n")

    def denied(path: str, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr("llama_actors._llama.boot_spec.open", denied, raising=False)
    with pytest.raises(BootSpecError, match="Permission denied") as caught:
        spec(api_key_file=str(keys))
    assert caught.value.field == "api_key_file"


def test_a_bad_key_inside_the_file_names_its_line_and_hides_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-ok\nsk bad\n")
    with pytest.raises(BootSpecError) as caught:
        spec(api_key_file=str(keys))
    assert caught.value.field == "api_key_file:2"
    assert "sk bad" not in str(caught.value)


# -- secrets stay secret --------------------------------------------------------------


def test_repr_masks_the_api_key_and_secret_looking_settings(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-in-file\n")
    result = spec(
        api_key="sk-inline",
        api_key_file=str(keys),
        environment={"HF_TOKEN": "hf_123", "PLAIN": "visible"},
        extra_args=["--hf-token", "hf_456"],
    )
    text = repr(result)
    for secret in ("sk-inline", "sk-in-file", "hf_123", "hf_456"):
        assert secret not in text
    assert "visible" in text


def test_a_spec_with_a_key_cannot_be_serialised_by_accident() -> None:
    with pytest.raises(TypeError):
        msgspec.json.encode(spec(api_key="sk-1"))
    assert b'"model"' in msgspec.json.encode(spec())


# -- identity -------------------------------------------------------------------------


def test_metadata_and_timing_fields_do_not_change_the_instance_key() -> None:
    base = spec(port=8080)
    varied = spec(
        port=8080,
        metadata={"owner": "x"},
        ready_timeout_ms=1,
        readiness_interval_ms=2,
        health_interval_ms=3,
        stop_timeout_ms=4,
    )
    assert base.instance_key == varied.instance_key


@pytest.mark.parametrize(
    "fields",
    [
        {"ctx_size": 4096},
        {"port": 8081},
        {"host": "::1"},
        {"api_key": "sk-2"},
        {"environment": {"A": "1"}},
        {"extra_args": ["--jinja"]},
        {"alias": "other"},
        {"binary_path": "/opt/llama-server"},
    ],
)
def test_an_identity_field_changes_the_instance_key(fields: dict[str, Any]) -> None:
    assert spec(port=8080).instance_key != spec(**{"port": 8080, **fields}).instance_key


def test_equivalent_spellings_share_an_instance_key() -> None:
    assert spec(port=0).instance_key == spec(port="auto").instance_key == spec().instance_key
    assert spec(host="[::1]").instance_key == spec(host="0::1").instance_key
    assert spec(api_prefix="/a/").instance_key == spec(api_prefix="a").instance_key


def test_the_instance_key_does_not_contain_the_key() -> None:
    assert "sk-1" not in spec(api_key="sk-1").instance_key


def test_normalising_a_spec_again_gives_an_equal_spec(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-file\n")
    first = spec(api_key="sk-1", api_key_file=str(keys), extra_args=["--jinja"], port=0)
    assert boot_spec(first) == first
    assert boot_spec(first.to_mapping()) == first


def test_the_order_of_environment_entries_does_not_change_identity() -> None:
    assert (
        spec(environment={"A": "1", "B": "2"}).instance_key
        == spec(environment={"B": "2", "A": "1"}).instance_key
    )


def test_a_spec_made_by_boot_spec_comes_back_as_is_and_keeps_its_identity_key() -> None:
    spec = boot_spec({"model": "/models/a.gguf", "ctx_size": 4096})
    assert boot_spec(spec) is spec
    assert spec.instance_key == spec.instance_key == boot_spec(spec.to_mapping()).instance_key


def test_a_spec_built_directly_is_still_validated() -> None:
    spec = llama_actors.BootSpec(model="", alias="a", model_identity="a")
    with pytest.raises(BootSpecError, match="model"):
        boot_spec(spec)

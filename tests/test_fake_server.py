"""The fake llama-server behaves like the real one where the library looks, and
misbehaves on request."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from llama_actors import boot_spec
from llama_actors._llama.boot_spec import MANAGED_FLAGS
from llama_actors.lowlevel import clear_probe_cache, probe_binary, render_command
from llama_actors.testing import fake_server
from llama_actors.testing.fake_server import CRASH_EXIT_CODE, write_control

FAKE_PATH = str(Path(fake_server.__file__).resolve())
WAIT = 10.0  # generous deadline for anything that should take milliseconds
LISTENING = re.compile(r"listening on http://(\S+):(\d+)")
UNAUTHORIZED = {
    "error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}
}
LOADING = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
NO_METRICS = {
    "error": {
        "code": 501,
        "message": "This server does not support metrics endpoint. Start it with `--metrics`",
        "type": "not_supported_error",
    }
}
NO_SLOTS = {
    "error": {
        "code": 501,
        "message": "This server does not support slots endpoint. Start it with `--slots`",
        "type": "not_supported_error",
    }
}
NO_SLOT_AVAILABLE = {
    "error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}
}
COMPUTE_ERROR = {"error": {"code": 500, "message": "Compute error.", "type": "server_error"}}
DEFERRED = r"^fake: no slot is available, defer task, id_task = (\d+)$"
STALLED = httpx.Timeout(WAIT, read=0.3)  # long enough to show a request gets no answer
# GET /metrics of the real llama-server (build 0.6.0-dev) right after it started.
REAL_IDLE_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 0
# HELP llamacpp:prompt_tokens_cached_total Number of prompt tokens reused from the cache
# TYPE llamacpp:prompt_tokens_cached_total counter
llamacpp:prompt_tokens_cached_total 0
# HELP llamacpp:prompt_seconds_total Total time spent processing prompts
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 0
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 0
# HELP llamacpp:tokens_predicted_seconds_total Total time spent generating tokens
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 0
# HELP llamacpp:n_decode_total Total number of llama_decode() calls, excluding speculative \
decoding and multimodal decoding
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 0
# HELP llamacpp:n_tokens_max Largest observed sequence length (prompt + generation)
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max 0
# HELP llamacpp:spec_decode_num_draft_tokens_total Speculative: Total draft tokens generated
# TYPE llamacpp:spec_decode_num_draft_tokens_total counter
llamacpp:spec_decode_num_draft_tokens_total 0
# HELP llamacpp:spec_decode_num_accepted_tokens_total Speculative: Total draft tokens accepted \
by the target model
# TYPE llamacpp:spec_decode_num_accepted_tokens_total counter
llamacpp:spec_decode_num_accepted_tokens_total 0
# HELP llamacpp:spec_decode_num_drafts_total Speculative: Total speculative decoding \
verification steps
# TYPE llamacpp:spec_decode_num_drafts_total counter
llamacpp:spec_decode_num_drafts_total 0
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 0
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 0
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode gauge
llamacpp:n_busy_slots_per_decode 0
"""


class Fake:
    """A started fake: its process, and its stderr lines as they arrive."""

    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """The first stderr line matching ``pattern``; fails on exit or deadline."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    pytest.fail(f"no line matching {pattern!r}; stderr so far:\n{self.text}")
                self._changed.wait(left)

    def listening(self) -> int:
        """Wait for the real server's ``listening on`` line; the port it shows."""
        return int(self.wait_for(LISTENING.pattern).group(2))

    def bound_port(self) -> int:
        """The port from the fake's own ``fake: bound port N`` line (before loading)."""
        return int(self.wait_for(r"^fake: bound port (\d+)$").group(1))

    def exit_code(self, timeout: float = WAIT) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(WAIT)
        self._reader.join(WAIT)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


StartFake = Callable[..., Fake]


@pytest.fixture
def start(model_file: Path) -> Iterator[StartFake]:
    """Start fakes (``start(*args, env={...}, model=...)``); each one's whole process
    group is killed at the end of the test."""
    started: list[Fake] = []

    def run(
        *args: str,
        env: Mapping[str, str] | None = None,
        model: str | None = str(model_file),
        host_port: bool = True,
    ) -> Fake:
        argv = [sys.executable, FAKE_PATH]
        if model is not None:
            argv += ["--model", model]
        if host_port:
            argv += ["--host", "127.0.0.1", "--port", "0"]
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_LLAMA_")}
        fake = Fake([*argv, *args], {**clean, **(env or {})})
        started.append(fake)
        return fake

    yield run
    for fake in started:
        fake.stop()


def wait_gone(pid: int, timeout: float = WAIT) -> bool:
    """True once ``pid`` has terminated (a zombie counts: an orphan's reaper may be slow)."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([handle], [], [], timeout)[0])
    finally:
        os.close(handle)


def url(port: int, path: str, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}{path}"


def get(port: int, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url(port, path), **{"timeout": WAIT, **kwargs})


def chat(port: int, text: str, prefix: str = "", **body: Any) -> httpx.Response:
    payload = {"messages": [{"role": "user", "content": text}], **body}
    return httpx.post(url(port, f"{prefix}/v1/chat/completions"), json=payload, timeout=WAIT)


def parse_metrics(text: str) -> dict[str, float]:
    """Each family's value (which must read as a float) by its name without the
    ``llamacpp:`` prefix."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.split(" ")
            values[name.removeprefix("llamacpp:")] = float(value)
    return values


def metrics(port: int, **kwargs: Any) -> dict[str, float]:
    """GET /metrics, parsed."""
    answer = get(port, "/metrics", **kwargs)
    assert answer.status_code == 200, answer.text
    return parse_metrics(answer.text)


def stalls(port: int, method: str, path: str, **kwargs: Any) -> bool:
    """True when the request gets no answer within :data:`STALLED`'s read timeout."""
    try:
        httpx.request(method, url(port, path), timeout=STALLED, **kwargs)
    except httpx.ReadTimeout:
        return True
    return False


# -- the command line ---------------------------------------------------------------


def test_probing_the_fake_finds_the_current_flag_forms_and_every_managed_flag() -> None:
    clear_probe_cache()
    binary = probe_binary(sys.executable, launcher_args=[FAKE_PATH])
    assert binary.build_number == fake_server.DEFAULT_BUILD
    assert binary.flash_attn_form == "value"
    assert binary.gpu_layers_words
    assert binary.pooling_values == {"none", "mean", "cls", "last", "rank"}
    assert binary.port_zero
    for field, names in MANAGED_FLAGS.items():
        for name in names:
            assert binary.supports(name), f"{name} ({field})"
    for extra in ("--no-webui", "--seed", "--help", "--version"):
        assert binary.supports(extra)


def test_an_old_build_number_makes_the_library_reserve_ports_itself(
    monkeypatch: pytest.MonkeyPatch, start: StartFake
) -> None:
    monkeypatch.setenv("FAKE_LLAMA_BUILD", "4000")
    clear_probe_cache()
    try:
        binary = probe_binary(sys.executable, launcher_args=[FAKE_PATH])
    finally:
        clear_probe_cache()
    assert binary.build_number == 4000
    assert not binary.port_zero
    # Such builds bound a free port for --port 0 but never said which one.
    fake = start(env={"FAKE_LLAMA_BUILD": "4000"})
    assert fake.listening() == 0
    assert get(fake.bound_port(), "/health").json() == {"status": "ok"}


def test_the_rendered_command_of_a_full_spec_is_accepted_and_served(
    tmp_path: Path, model_file: Path
) -> None:
    argv_file = tmp_path / "argv.json"
    spec = boot_spec(
        {
            "model": str(model_file),
            "binary_path": sys.executable,
            "launcher_args": [FAKE_PATH],
            "alias": "chat",
            "api_key": "sk-fake-test",
            "api_prefix": "/llm",
            "ctx_size": 512,
            "gpu_layers": "all",
            "threads": 1,
            "threads_batch": 1,
            "parallel": 2,
            "flash_attn": "off",
            "embeddings": True,
            "pooling": "mean",
            "timeout_seconds": 30,
            "threads_http": 2,
            "extra_args": ["--no-webui", "--seed", "7"],
            "environment": {"FAKE_LLAMA_ARGV_FILE": str(argv_file)},
        }
    )
    clear_probe_cache()
    plan = render_command(spec)
    assert plan.port_mode == "bind_zero"
    paths = plan.write_private_files(tmp_path)
    fake = Fake(plan.argv_for(paths), plan.child_env())
    try:
        urls = spec.urls(fake.listening())
        assert httpx.get(urls.health_url, headers=spec.headers, timeout=WAIT).json() == {
            "status": "ok"
        }
        answer = httpx.post(
            urls.base_url + "/chat/completions",
            headers=spec.headers,
            json={"messages": [{"role": "user", "content": "ping"}]},
            timeout=WAIT,
        )
        assert answer.status_code == 200
        assert answer.json()["model"] == "chat"
        assert json.loads(argv_file.read_text()) == plan.argv_for(paths)[2:]
        assert "sk-fake-test" not in fake.text
    finally:
        fake.stop()


def test_help_goes_to_stdout_and_version_to_stderr_like_the_real_binary() -> None:
    shown = subprocess.run(
        [sys.executable, FAKE_PATH, "--help"], capture_output=True, text=True, timeout=WAIT
    )
    assert shown.returncode == 0
    assert shown.stdout.startswith("----- common params -----\n\n-h,    --help, --usage")
    version = subprocess.run(
        [sys.executable, "-m", "llama_actors.testing.fake_server", "--version"],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert version.returncode == 0
    assert version.stdout == ""
    assert version.stderr.startswith(f"version: 0.6.0 (build {fake_server.DEFAULT_BUILD}, commit")


@pytest.mark.parametrize(
    ("args", "stderr"),
    [
        (["--bogus"], "error: invalid argument: --bogus\n"),
        (["--port", "12abc", "--no_such_flag"], "error: invalid argument: --no-such-flag\n"),
        (
            ["--port", "abc"],
            'error while handling argument "--port": stoi\n\nusage:\n'
            "--port PORT                             port to listen (default: 8080)\n"
            "                                        (env: LLAMA_ARG_PORT)\n\n\n"
            "to show complete usage, run with -h\n",
        ),
    ],
)
def test_an_unknown_flag_or_bad_value_is_rejected_as_the_real_binary_does(
    args: list[str], stderr: str
) -> None:
    done = subprocess.run(
        [sys.executable, FAKE_PATH, *args], capture_output=True, text=True, timeout=WAIT
    )
    assert (done.returncode, done.stdout, done.stderr) == (1, "", stderr)


@pytest.mark.real_server
@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["--port", "abc"],
        ["--port"],
        ["--flash-attn", "maybe"],
        ["--pooling", "avg"],
        ["-np", "0"],
        ["--gpu-layers", "lots"],
        ["--host", ","],
        ["--seed", "x"],
        ["--api-key-file", "/nonexistent/keys"],
        ["--api_key", "k", "--threads-http"],
        ["--metrics", "--no-slots", "--slots", "--bogus"],
        ["--metrics", "1"],
    ],
)
def test_argument_errors_are_byte_for_byte_those_of_the_real_binary(
    args: list[str], real_binary: str
) -> None:
    real = subprocess.run(
        [real_binary, *args], capture_output=True, timeout=60, start_new_session=True
    )
    fake = subprocess.run([sys.executable, FAKE_PATH, *args], capture_output=True, timeout=WAIT)
    assert (fake.returncode, fake.stdout, fake.stderr) == (
        real.returncode,
        real.stdout,
        real.stderr,
    )


def test_the_argv_is_recorded_before_anything_else(tmp_path: Path, start: StartFake) -> None:
    record = tmp_path / "argv.json"
    fake = start("--bogus", env={"FAKE_LLAMA_ARGV_FILE": str(record)})
    assert fake.exit_code() == 1
    assert json.loads(record.read_text()) == fake.argv[2:]
    assert not list(tmp_path.glob("*.tmp"))


# -- startup and failures -----------------------------------------------------------


def test_port_zero_binds_a_free_port_and_logs_it_after_the_model_is_loaded(
    start: StartFake,
) -> None:
    fake = start()
    port = fake.listening()
    assert port == fake.bound_port() > 0
    lines = fake.lines
    loaded = next(i for i, line in enumerate(lines) if line.endswith("model loaded"))
    listening = next(i for i, line in enumerate(lines) if LISTENING.search(line))
    assert loaded < listening
    assert re.fullmatch(
        r"\d+\.\d\d\.\d{3}\.\d{3} I srv  llama_server: listening on http://127\.0\.0\.1:\d+",
        lines[listening],
    )
    with httpx.Client(timeout=WAIT) as client:  # one keep-alive connection, two answers
        assert client.get(url(port, "/health")).json() == {"status": "ok"}
        assert client.get(url(port, "/v1/health")).json() == {"status": "ok"}


def test_an_ipv6_host_is_served_and_shown_in_brackets(start: StartFake) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    fake = start("--host", "::1", "--port", "0", host_port=False)
    match = fake.wait_for(LISTENING.pattern)
    assert match.group(1) == "[::1]"
    health = httpx.get(url(int(match.group(2)), "/health", "[::1]"), timeout=WAIT)
    assert health.json() == {"status": "ok"}


def test_a_held_port_fails_the_bind_with_the_real_message(start: StartFake) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        fake = start("--host", "127.0.0.1", "--port", str(port), host_port=False)
        assert fake.exit_code() == 1
    assert (
        f"E srv         start: couldn't bind HTTP server socket, hostname: 127.0.0.1, "
        f"port: {port}" in fake.text
    )
    assert fake.lines[-1].endswith("E srv  llama_server: exiting due to HTTP server error")


def test_a_missing_model_fails_with_the_real_servers_lines(
    tmp_path: Path, start: StartFake
) -> None:
    missing = tmp_path / "nope.gguf"
    fake = start(model=str(missing))
    assert fake.exit_code() == 1
    assert (
        f"E gguf_init_from_file: failed to open GGUF file '{missing}' (No such file or directory)"
        in fake.text
    )
    assert f"E srv    load_model: failed to load model, '{missing}'" in fake.text
    assert fake.lines[-1].endswith("E srv  llama_server: exiting due to model loading error")
    assert not LISTENING.search(fake.text)


def test_a_model_can_be_made_to_fail_as_a_file_that_is_not_gguf(start: StartFake) -> None:
    fake = start(env={"FAKE_LLAMA_INVALID_MODEL": "1"})
    assert fake.exit_code() == 1
    assert "E gguf_init_from_reader: failed to read magic" in fake.text
    assert "failed to open GGUF file" not in fake.text
    assert fake.lines[-1].endswith("exiting due to model loading error")


def test_exit_before_ready_prints_its_text_and_exits_with_its_code(start: StartFake) -> None:
    fake = start(
        env={"FAKE_LLAMA_EXIT_BEFORE_READY": "7", "FAKE_LLAMA_EXIT_STDERR": "boom: no luck"}
    )
    assert fake.exit_code() == 7
    assert fake.lines[-1] == "boom: no luck"
    assert "fake: bound port" not in fake.text


def test_health_says_loading_until_the_load_time_has_passed(start: StartFake) -> None:
    # A load long enough for both requests to arrive during it and for a progress line
    # (every 0.2 s) to be logged however slowly the fake's loop runs.
    fake = start(env={"FAKE_LLAMA_LOAD_SECONDS": "1"})
    port = fake.bound_port()
    loading = get(port, "/health")
    assert (loading.status_code, loading.json()) == (503, LOADING)
    assert get(port, "/v1/models").status_code == 503  # every route, as in the real server
    fake.wait_for(r"I load_tensors: loading model tensors, \d+% done")
    assert fake.listening() == port
    assert get(port, "/health").json() == {"status": "ok"}


def test_a_never_ready_server_loads_once_the_control_file_allows_it(
    tmp_path: Path, start: StartFake
) -> None:
    control = tmp_path / "control.json"
    fake = start(env={"FAKE_LLAMA_NEVER_READY": "1", "FAKE_LLAMA_CONTROL": str(control)})
    port = fake.bound_port()
    assert get(port, "/health").json() == LOADING
    assert "load_tensors" not in fake.text
    write_control(control, never_ready=False)
    assert fake.listening() == port
    assert get(port, "/health").json() == {"status": "ok"}


# -- routes -------------------------------------------------------------------------


def test_chat_answers_deterministically_under_the_alias(start: StartFake) -> None:
    fake = start("--alias", "tiny")
    port = fake.listening()
    first = chat(port, "Tell me something about llamas")
    second = chat(port, "Tell me something about llamas")
    assert first.status_code == 200
    body = first.json()
    assert body["model"] == "tiny"
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "You said: Tell me something about llamas"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert second.json()["choices"] == body["choices"]
    short = chat(port, "one two three", max_tokens=2).json()["choices"][0]
    assert (short["message"]["content"], short["finish_reason"]) == ("You said:", "length")
    models = get(port, "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert get(port, "/models").status_code == 200


def test_without_an_alias_the_model_is_named_by_its_path_as_in_the_real_server(
    start: StartFake, model_file: Path
) -> None:
    port = start().listening()
    assert chat(port, "hi").json()["model"] == str(model_file)


def test_a_streamed_chat_sends_delta_chunks_a_finish_reason_and_done(start: StartFake) -> None:
    port = start().listening()
    expected = chat(port, "stream these words").json()["choices"][0]["message"]["content"]
    payload = {"messages": [{"role": "user", "content": "stream these words"}], "stream": True}
    with httpx.stream(
        "POST", url(port, "/v1/chat/completions"), json=payload, timeout=WAIT
    ) as response:
        assert response.headers["content-type"] == "text/event-stream"
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_embeddings_are_served_only_with_the_embedding_flag(start: StartFake) -> None:
    plain = start().listening()
    refused = httpx.post(url(plain, "/v1/embeddings"), json={"input": "hi"}, timeout=WAIT)
    assert refused.status_code == 501
    assert refused.json() == {
        "error": {
            "code": 501,
            "message": "This server does not support embeddings. Start it with `--embeddings`",
            "type": "not_supported_error",
        }
    }
    port = start("--embedding").listening()
    served = httpx.post(url(port, "/v1/embeddings"), json={"input": ["a", "b"]}, timeout=WAIT)
    data = served.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert len(data[0]["embedding"]) == fake_server.EMBEDDING_SIZE
    assert data[0]["embedding"] != data[1]["embedding"]


def test_routes_live_under_the_api_prefix(start: StartFake) -> None:
    port = start("--api-prefix", "/llm").listening()
    assert get(port, "/llm/health").json() == {"status": "ok"}
    assert get(port, "/llm/v1/models").status_code == 200
    assert chat(port, "hi", prefix="/llm").status_code == 200
    missing = get(port, "/health")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {"message": "File Not Found", "type": "not_found_error", "code": 404}
    }


def test_a_request_without_the_key_gets_401_but_health_stays_public(start: StartFake) -> None:
    fake = start("--api-key", "sk-one,sk-two")
    port = fake.listening()
    assert get(port, "/health").json() == {"status": "ok"}
    assert get(port, "/v1/health").status_code == 200
    refused = get(port, "/v1/models")
    assert (refused.status_code, refused.json()) == (401, UNAUTHORIZED)
    assert get(port, "/v1/models", headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
    assert get(port, "/v1/models", headers={"Authorization": "Bearer sk-two"}).status_code == 200
    assert get(port, "/v1/models", headers={"X-Api-Key": "sk-one"}).status_code == 200
    assert "W srv    operator(): unauthorized: Invalid API Key" in fake.text
    assert "sk-one" not in fake.text
    assert "sk-two" not in fake.text


def test_keys_come_from_the_api_key_file_one_per_line(tmp_path: Path, start: StartFake) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# a comment, not a key\n\nsk-first\nsk-second\n")
    port = start("--api-key-file", str(keys)).listening()
    for key in ("sk-first", "sk-second"):
        assert get(port, "/v1/models", headers={"Authorization": f"Bearer {key}"}).is_success
    assert (
        get(
            port, "/v1/models", headers={"Authorization": "Bearer # a comment, not a key"}
        ).status_code
        == 401
    )
    assert get(port, "/v1/models").status_code == 401  # the blank line is no (empty) key


def test_with_a_prefix_health_needs_the_key_as_it_does_in_the_real_server(start: StartFake) -> None:
    # llama-server's public paths are the literal "/health" and "/v1/health".
    port = start("--api-key", "sk-k", "--api-prefix", "/llm").listening()
    assert get(port, "/llm/health").json() == UNAUTHORIZED
    assert get(port, "/llm/health", headers={"Authorization": "Bearer sk-k"}).json() == {
        "status": "ok"
    }


# -- misbehaviour -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "status", "body"),
    [
        ("degraded", 200, {"status": "degraded"}),
        (
            "no_slot",
            503,
            {"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}},
        ),
        ("loading", 503, LOADING),
    ],
)
def test_health_reports_the_mode_the_environment_asks_for(
    start: StartFake, mode: str, status: int, body: dict[str, Any]
) -> None:
    port = start(env={"FAKE_LLAMA_HEALTH": mode}).listening()
    answer = get(port, "/health")
    assert (answer.status_code, answer.json()) == (status, body)


def test_the_control_file_flips_health_while_the_server_runs(
    tmp_path: Path, start: StartFake
) -> None:
    control = tmp_path / "control.json"
    port = start(env={"FAKE_LLAMA_CONTROL": str(control)}).listening()
    assert get(port, "/health").json() == {"status": "ok"}
    write_control(control, health="error500")
    failing = get(port, "/health")
    assert failing.status_code == 500
    assert failing.json()["error"]["type"] == "server_error"
    write_control(control, health="no_slot")
    assert get(port, "/health").status_code == 503
    write_control(control, health=None)
    assert get(port, "/health").json() == {"status": "ok"}


def test_a_hanging_server_accepts_but_answers_only_when_released(
    tmp_path: Path, start: StartFake
) -> None:
    control = tmp_path / "control.json"
    port = start(env={"FAKE_LLAMA_HANG": "1", "FAKE_LLAMA_CONTROL": str(control)}).listening()
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url(port, "/health"), timeout=httpx.Timeout(WAIT, read=0.2))
    write_control(control, hang=False)
    assert get(port, "/health").json() == {"status": "ok"}


def test_a_slow_probe_delays_only_health(start: StartFake) -> None:
    # The delay is five times the read timeout that must run out before the answer, and
    # twice the one /v1/models must answer within.
    port = start(env={"FAKE_LLAMA_SLOW_PROBE_SECONDS": "1"}).listening()
    began = time.monotonic()
    assert get(port, "/health").status_code == 200
    assert time.monotonic() - began >= 1.0
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url(port, "/health"), timeout=httpx.Timeout(WAIT, read=0.2))
    assert get(port, "/v1/models", timeout=httpx.Timeout(WAIT, read=0.5)).status_code == 200


def test_the_server_crashes_after_n_answered_requests(start: StartFake) -> None:
    fake = start(env={"FAKE_LLAMA_CRASH_AFTER": "2"})
    port = fake.listening()
    assert get(port, "/health").status_code == 200
    assert chat(port, "last words").status_code == 200
    assert fake.exit_code() == CRASH_EXIT_CODE
    assert fake.lines[-1] == "fake: crashing after 2 answered requests"


def test_crash_after_from_the_control_file_counts_from_when_it_is_set(
    tmp_path: Path, start: StartFake
) -> None:
    control = tmp_path / "control.json"
    fake = start(env={"FAKE_LLAMA_CONTROL": str(control)})
    port = fake.listening()
    for _ in range(3):
        assert get(port, "/health").status_code == 200
    write_control(control, crash_after=1)
    assert get(port, "/health").status_code == 200
    assert fake.exit_code() == CRASH_EXIT_CODE


def test_exit_now_in_the_control_file_ends_the_server_at_once(
    tmp_path: Path, start: StartFake
) -> None:
    control = tmp_path / "control.json"
    fake = start(env={"FAKE_LLAMA_CONTROL": str(control)})
    fake.listening()
    write_control(control, exit_now=5)
    assert fake.exit_code() == 5


def test_sigterm_once_loaded_is_a_clean_exit_with_the_real_shutdown_line(start: StartFake) -> None:
    fake = start()
    fake.listening()
    os.killpg(fake.proc.pid, signal.SIGTERM)
    assert fake.exit_code() == 0
    assert fake.lines[-1].endswith("I srv    operator(): operator(): cleaning up before exit...")


def test_sigterm_while_loading_kills_as_it_does_the_real_server(start: StartFake) -> None:
    fake = start(env={"FAKE_LLAMA_NEVER_READY": "1"})
    fake.bound_port()
    os.killpg(fake.proc.pid, signal.SIGTERM)
    assert fake.exit_code() == -signal.SIGTERM


def test_an_ignored_sigterm_leaves_server_and_grandchild_to_sigkill_on_the_group(
    start: StartFake,
) -> None:
    fake = start(env={"FAKE_LLAMA_IGNORE_SIGTERM": "1", "FAKE_LLAMA_GRANDCHILD": "1"})
    port = fake.listening()
    grandchild = psutil.Process(int(fake.wait_for(r"^fake: grandchild pid (\d+)$").group(1)))
    assert os.getpgid(grandchild.pid) == fake.proc.pid
    assert grandchild.ppid() == fake.proc.pid
    os.killpg(fake.proc.pid, signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        fake.proc.wait(0.3)
    assert get(port, "/health").status_code == 200
    assert grandchild.is_running()
    os.killpg(fake.proc.pid, signal.SIGKILL)
    assert fake.exit_code() == -signal.SIGKILL
    assert wait_gone(grandchild.pid)


def test_the_grandchild_outlives_its_parent_killed_alone(start: StartFake) -> None:
    fake = start(env={"FAKE_LLAMA_GRANDCHILD": "1"})
    fake.listening()
    grandchild = psutil.Process(int(fake.wait_for(r"^fake: grandchild pid (\d+)$").group(1)))
    os.kill(fake.proc.pid, signal.SIGKILL)
    assert fake.proc.wait(WAIT) == -signal.SIGKILL
    assert grandchild.is_running()
    assert grandchild.status() != psutil.STATUS_ZOMBIE
    assert os.getpgid(grandchild.pid) == fake.proc.pid
    os.killpg(fake.proc.pid, signal.SIGKILL)
    assert wait_gone(grandchild.pid)


# -- the control helper -------------------------------------------------------------


def test_write_control_merges_removes_and_replaces_the_file_atomically(tmp_path: Path) -> None:
    control = tmp_path / "control.json"
    assert write_control(control, health="degraded", hang=True) == {
        "health": "degraded",
        "hang": True,
    }
    inode = control.stat().st_ino
    assert write_control(control, hang=None, crash_after=3) == {
        "health": "degraded",
        "crash_after": 3,
    }
    assert json.loads(control.read_text()) == {"health": "degraded", "crash_after": 3}
    assert control.stat().st_ino != inode
    assert [p.name for p in tmp_path.iterdir()] == ["control.json"]


# -- /slots and /metrics ------------------------------------------------------------


def test_metrics_is_the_real_servers_prometheus_page_and_counts_what_was_answered(
    start: StartFake,
) -> None:
    port = start("--metrics", "--embedding").listening()
    idle = get(port, "/metrics")
    assert idle.status_code == 200
    assert idle.headers["content-type"] == "text/plain; version=0.0.4"
    assert idle.text == REAL_IDLE_METRICS
    answer = chat(port, "one two three").json()["usage"]
    assert (answer["prompt_tokens"], answer["completion_tokens"]) == (3, 5)
    assert httpx.post(url(port, "/v1/embeddings"), json={"input": ["a b", "c"]}).is_success
    page = get(port, "/metrics").text
    lines = page.splitlines()
    names = [line.split(" ")[0] for line in REAL_IDLE_METRICS.splitlines()]
    assert [line.split(" ")[0] for line in lines] == names  # every family, HELP and TYPE
    assert [line.split(" ")[:3] for line in lines if line.startswith("#")] == [
        line.split(" ")[:3] for line in REAL_IDLE_METRICS.splitlines() if line.startswith("#")
    ]
    after = parse_metrics(page)
    assert after["prompt_tokens_total"] == 3 + 3  # the chat's prompt, the two inputs'
    assert after["tokens_predicted_total"] == 5
    assert after["prompt_seconds_total"] > 0
    assert after["tokens_predicted_seconds_total"] > 0
    assert after["n_decode_total"] >= 5
    assert after["n_tokens_max"] == 3 + 5 - 1  # the context's tokens: the last is not in it
    assert after["n_busy_slots_per_decode"] == 1
    assert after["requests_processing"] == after["requests_deferred"] == 0


def test_the_throughput_gauges_are_tokens_per_second_since_the_previous_scrape(
    start: StartFake,
) -> None:
    # Each generated token takes token_seconds, and /metrics counts that time.
    port = start("--metrics", env={"FAKE_LLAMA_TOKEN_SECONDS": "0.01"}).listening()
    metrics(port)
    assert chat(port, "one two three four five six seven eight").status_code == 200
    first = metrics(port)
    assert first["tokens_predicted_total"] == 10
    assert first["tokens_predicted_seconds_total"] == pytest.approx(10 * 0.01)
    assert first["predicted_tokens_seconds"] == pytest.approx(100, rel=1e-5)
    assert first["prompt_tokens_seconds"] == pytest.approx(
        first["prompt_tokens_total"] / first["prompt_seconds_total"], rel=1e-5
    )
    second = metrics(port)
    assert second["predicted_tokens_seconds"] == second["prompt_tokens_seconds"] == 0
    assert second["tokens_predicted_total"] == 10  # the counters stay


def test_metrics_answers_501_without_the_metrics_flag_and_slots_501_with_no_slots(
    start: StartFake,
) -> None:
    port = start("--no-slots").listening()
    for path, body in (("/metrics", NO_METRICS), ("/slots", NO_SLOTS)):
        refused = get(port, path)
        assert (refused.status_code, refused.json()) == (501, body)
    assert chat(port, "still answers").status_code == 200


@pytest.mark.parametrize(
    ("args", "n_slots", "n_ctx", "unified"),
    [
        ([], 4, 4096, "true"),
        (["-c", "2048"], 4, 2048, "true"),
        (["-c", "1000"], 4, 1024, "true"),
        (["-np", "3", "-c", "2048"], 3, 768, "false"),
        (["-np", "2", "-c", "1000"], 2, 512, "false"),
        (["--parallel", "1", "-c", "2048"], 1, 2048, "false"),
    ],
)
def test_idle_slots_show_the_context_each_one_gets_as_in_the_real_server(
    start: StartFake, args: list[str], n_slots: int, n_ctx: int, unified: str
) -> None:
    fake = start(*args)
    port = fake.listening()
    line = f"initializing, n_slots = {n_slots}, n_ctx_slot = {n_ctx}, kv_unified = '{unified}'"
    assert line in fake.text
    assert get(port, "/slots").json() == [
        {"id": slot, "n_ctx": n_ctx, "speculative": False, "is_processing": False}
        for slot in range(n_slots)
    ]


def test_slots_and_metrics_need_the_key_and_live_under_the_prefix(start: StartFake) -> None:
    port = start("--api-key", "sk-k", "--api-prefix", "/llm", "--metrics").listening()
    key = {"Authorization": "Bearer sk-k"}
    for path in ("/llm/slots", "/llm/metrics"):
        refused = get(port, path)
        assert (refused.status_code, refused.json()) == (401, UNAUTHORIZED)
        assert get(port, path, headers=key).status_code == 200
    assert get(port, "/slots", headers=key).status_code == 404
    assert get(port, "/metrics", headers=key).status_code == 404


def test_with_one_slot_a_long_generation_holds_it_and_the_next_request_waits_deferred(
    tmp_path: Path, start: StartFake
) -> None:
    control = tmp_path / "control.json"
    fake = start(
        "--parallel",
        "1",
        "--metrics",
        env={"FAKE_LLAMA_TOKEN_SECONDS": "0.05", "FAKE_LLAMA_CONTROL": str(control)},
    )
    port = fake.listening()
    with ThreadPoolExecutor(2) as pool:
        # 200 tokens at 0.05 s: ten seconds of generation unless token_seconds drops.
        story = {"max_tokens": 200, "ignore_eos": True, "temperature": 0.5}
        long = pool.submit(chat, port, "tell me a long story", **story)
        task = int(fake.wait_for(r"slot launch_slot_: id  0 \| task (\d+) \|").group(1))
        (busy,) = get(port, "/slots").json()
        assert (busy["id"], busy["is_processing"], busy["id_task"]) == (0, True, task)
        (progress,) = busy["next_token"]
        assert progress["has_next_token"] is True
        assert progress["n_remain"] == 200 - progress["n_decoded"]
        assert busy["n_prompt_tokens_processed"] == 5
        assert busy["n_prompt_tokens"] == 5 + progress["n_decoded"]
        assert busy["params"]["max_tokens"] == busy["params"]["n_predict"] == 200
        assert busy["params"]["temperature"] == pytest.approx(0.5)
        assert busy["params"]["stream"] is False
        short = pool.submit(chat, port, "and then?")
        deferred = int(fake.wait_for(DEFERRED).group(1))
        during = metrics(port)
        assert (during["requests_processing"], during["requests_deferred"]) == (1, 1)
        refused = get(port, "/slots?fail_on_no_slot=1")
        assert (refused.status_code, refused.json()) == (503, NO_SLOT_AVAILABLE)
        assert get(port, "/health").json() == {"status": "ok"}
        assert not short.done()
        write_control(control, token_seconds=0)  # let the story end now
        assert long.result(WAIT).json()["usage"]["completion_tokens"] == 200
        assert short.result(WAIT).json()["choices"][0]["message"]["content"] == (
            "You said: and then?"
        )
    released = fake.text.index(f"release: id  0 | task {task} |")
    assert fake.text.index(f"launch_slot_: id  0 | task {deferred} |") > released
    after = metrics(port)
    assert (after["requests_processing"], after["requests_deferred"]) == (0, 0)
    assert after["tokens_predicted_total"] == 200 + 4
    assert get(port, "/slots").json()[0]["is_processing"] is False


def test_token_seconds_paces_a_streamed_answer_chunk_by_chunk(start: StartFake) -> None:
    port = start(env={"FAKE_LLAMA_TOKEN_SECONDS": "0.05"}).listening()
    payload = {"messages": [{"role": "user", "content": "a b c d e f g h"}], "stream": True}
    arrivals: list[float] = []
    with httpx.stream(
        "POST", url(port, "/v1/chat/completions"), json=payload, timeout=WAIT
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content":"' in line:
                arrivals.append(time.monotonic())
    assert len(arrivals) == 10
    # Ten tokens, 0.05 s each: the last comes well after the first (0.45 s by the fake's
    # clock, a little less if the first was late to arrive).
    assert arrivals[-1] - arrivals[0] >= 0.3


def test_a_busy_slot_is_freed_when_its_streaming_client_goes_away(start: StartFake) -> None:
    fake = start("--parallel", "1", env={"FAKE_LLAMA_TOKEN_SECONDS": "0.02"})
    port = fake.listening()
    payload = {
        "messages": [{"role": "user", "content": "go on"}],
        "stream": True,
        "max_tokens": 10_000,
        "ignore_eos": True,
    }
    with httpx.stream("POST", url(port, "/v1/chat/completions"), json=payload, timeout=WAIT) as r:
        next(r.iter_lines())
    fake.wait_for(r"slot      release: id  0 \| task \d+ \| stop processing")
    assert chat(port, "next please").status_code == 200


# -- failure shapes -----------------------------------------------------------------


def test_completions_can_hang_or_fail_with_500_while_health_stays_ok(
    tmp_path: Path, start: StartFake
) -> None:
    control = tmp_path / "control.json"
    fake = start(
        "--embedding",
        env={"FAKE_LLAMA_COMPLETIONS": "hang", "FAKE_LLAMA_CONTROL": str(control)},
    )
    port = fake.listening()
    routes = ("/v1/chat/completions", "/completion", "/v1/embeddings")
    body = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi"}
    assert get(port, "/health").json() == {"status": "ok"}
    for route in routes:
        assert stalls(port, "POST", route, json=body), route
    assert get(port, "/v1/models").status_code == 200
    write_control(control, completions="error500")
    for route in routes:
        failed = httpx.post(url(port, route), json=body, timeout=WAIT)
        assert (failed.status_code, failed.json()) == (500, COMPUTE_ERROR), route
    assert get(port, "/health").json() == {"status": "ok"}
    fake.wait_for(r"E srv    send_error: task id = \d+, error: Compute error\.$")
    write_control(control, completions="ok")
    for route in routes:
        assert httpx.post(url(port, route), json=body, timeout=WAIT).status_code == 200


def test_a_stuck_decode_loop_leaves_health_and_models_answering_but_nothing_else(
    tmp_path: Path, start: StartFake
) -> None:
    # What a real llama-server whose decode loop is stopped answers (see the docstring).
    control = tmp_path / "control.json"
    fake = start(
        "--metrics", env={"FAKE_LLAMA_DECODE_STUCK": "1", "FAKE_LLAMA_CONTROL": str(control)}
    )
    port = fake.listening()
    assert get(port, "/health", timeout=STALLED).json() == {"status": "ok"}
    assert get(port, "/v1/models", timeout=STALLED).status_code == 200
    refused = httpx.post(url(port, "/v1/embeddings"), json={"input": "x"}, timeout=STALLED)
    assert refused.status_code == 501  # answered before any task reaches the loop
    assert stalls(port, "POST", "/v1/chat/completions", json={"messages": [], "max_tokens": 1})
    assert stalls(port, "GET", "/slots")
    assert stalls(port, "GET", "/metrics")
    write_control(control, decode_stuck=False)
    assert chat(port, "unstuck").status_code == 200
    assert get(port, "/slots").status_code == 200
    assert metrics(port)["requests_deferred"] == 0
    write_control(control, decode_stuck=True)
    assert stalls(port, "GET", "/slots")
    assert get(port, "/health", timeout=STALLED).status_code == 200


def test_a_saturated_server_shows_every_slot_busy_and_defers_requests_until_released(
    tmp_path: Path, start: StartFake
) -> None:
    control = tmp_path / "control.json"
    fake = start("--parallel", "2", "--metrics", env={"FAKE_LLAMA_CONTROL": str(control)})
    port = fake.listening()
    write_control(control, saturated=3)
    assert get(port, "/health").json() == {"status": "ok"}
    slots = get(port, "/slots").json()
    assert [(s["id"], s["is_processing"]) for s in slots] == [(0, True), (1, True)]
    for slot in slots:
        (progress,) = slot["next_token"]
        assert progress["n_remain"] + progress["n_decoded"] == slot["params"]["n_predict"]
        assert slot["n_prompt_tokens"] > slot["n_prompt_tokens_processed"] > 0
    assert get(port, "/slots?fail_on_no_slot=1").status_code == 503
    saturated = metrics(port)
    assert (saturated["requests_processing"], saturated["requests_deferred"]) == (2, 3)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(chat, port, "anyone there?")
        fake.wait_for(DEFERRED)
        assert metrics(port)["requests_deferred"] == 4
        assert not waiting.done()
        write_control(control, saturated=0)
        assert waiting.result(WAIT).status_code == 200
    released = metrics(port)
    assert (released["requests_processing"], released["requests_deferred"]) == (0, 0)
    assert not any(s["is_processing"] for s in get(port, "/slots").json())


def test_saturation_from_the_environment_shows_from_the_start(start: StartFake) -> None:
    port = start("--metrics", env={"FAKE_LLAMA_SATURATED": "2"}).listening()
    assert all(s["is_processing"] for s in get(port, "/slots").json())
    assert metrics(port)["requests_deferred"] == 2


def test_a_bad_control_value_is_reported_once_and_the_environments_value_is_used(
    tmp_path: Path, start: StartFake
) -> None:
    control = tmp_path / "control.json"
    fake = start(env={"FAKE_LLAMA_CONTROL": str(control)})
    port = fake.listening()
    write_control(control, saturated=-1, completions="sometimes")
    assert not any(s["is_processing"] for s in get(port, "/slots").json())
    assert chat(port, "fine").status_code == 200
    assert chat(port, "still fine").status_code == 200
    fake.wait_for(r"^fake: ignoring control value saturated=-1: expected a whole number >= 0")
    complaint = "fake: ignoring control value completions='sometimes': expected one of"
    fake.wait_for("^" + re.escape(complaint))
    assert sum(line.startswith(complaint) for line in fake.lines) == 1


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("FAKE_LLAMA_TOKEN_SECONDS", "-1", "expected a number of seconds >= 0"),
        ("FAKE_LLAMA_TOKEN_SECONDS", "fast", "expected a number of seconds >= 0"),
        ("FAKE_LLAMA_COMPLETIONS", "flaky", "expected one of ('ok', 'hang', 'error500')"),
        ("FAKE_LLAMA_SATURATED", "2.5", "expected a whole number >= 0"),
    ],
)
def test_a_bad_environment_value_stops_the_fake_with_a_clear_message(
    start: StartFake, name: str, value: str, problem: str
) -> None:
    fake = start(env={name: value})
    assert fake.exit_code() == 2
    assert fake.lines[-1].startswith(f"fake: bad environment: {name}={value!r}: {problem}")


@pytest.mark.real_server
def test_slots_and_metrics_answer_as_the_real_server_does(
    real_binary: str, gemma_model: str, start: StartFake
) -> None:
    keyed = ["-np", "3", "-c", "2048", "--metrics", "--api-key", "sk-k", "--api-prefix", "/llm"]
    key = {"Authorization": "Bearer sk-k"}
    where = ["--host", "127.0.0.1", "--port", "0"]
    for args, checks in (
        (keyed, [("/llm/slots", {}), ("/llm/metrics", {}), ("/llm/slots", key)]),
        (["--no-slots"], [("/slots", {}), ("/metrics", {})]),
    ):
        real = Fake([real_binary, "--model", gemma_model, *where, *args], os.environ)
        try:
            real_port = int(real.wait_for(LISTENING.pattern, timeout=120).group(2))
            fake_port = start(*args).listening()
            for path, headers in checks:
                want = get(real_port, path, headers=headers)
                got = get(fake_port, path, headers=headers)
                assert (got.status_code, got.json()) == (want.status_code, want.json()), path
            if "--metrics" in args:
                want = get(real_port, "/llm/metrics", headers=key)
                got = get(fake_port, "/llm/metrics", headers=key)
                assert got.headers["content-type"] == want.headers["content-type"]
                assert got.text == want.text
        finally:
            real.stop()

"""The API key stays secret: never in a command line, an environment, a log, a repr or
an error; its private file is 0600, in a 0700 folder, and gone once its server is;
and a server reachable from other hosts without a key is warned about.

Every server here is one this test started: command lines and environments are read
from ``/proc`` of the servers' own pids (from snapshots) and of their descendants.
Nothing talks to anything but loopback: the non-loopback cases only bind (0.0.0.0,
and no traffic) or cannot even bind (192.0.2.1, a documentation address).
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil
import pytest

from llama_actors import (
    BootSpecError,
    InstancePolicy,
    LlamaActorsError,
    RestartPolicy,
    Runtime,
    ServerExitedError,
    boot_spec,
)
from llama_actors.lowlevel import render_command
from llama_actors.testing.fake import fake_boot_spec, start_fake
from llama_actors.testing.signals import SignalRecorder

from ._helpers import wait_gone

KEY = "sk-security-7c41d09e2b"
FILE_KEY = "sk-from-a-file-5a3e"
WAIT = 15.0
POLICY = InstancePolicy(
    restart=RestartPolicy(backoff_initial_ms=20, backoff_max_ms=200),
    probe_timeout_ms=300,
    unavailable_after=2,
    wedged_restart_ms=None,
    drain_timeout_ms=1_000,
)
CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def fake_spec(folder: Path, behaviour: dict[str, str] | None = None, **fields: Any) -> Any:
    fields.setdefault("health_interval_ms", 100)
    fields.setdefault("readiness_interval_ms", 20)
    fields.setdefault("stop_timeout_ms", 2_000)
    return fake_boot_spec(folder, behaviour=behaviour, **fields)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    with Runtime(state_dir=tmp_path / "state", policy=POLICY) as rt:
        yield rt


def process_tree(pid: int) -> list[psutil.Process]:
    """The server and every descendant of it (grandchildren included)."""
    server = psutil.Process(pid)
    return [server, *server.children(recursive=True)]


def assert_key_not_in_proc(proc: psutil.Process, *keys: str) -> None:
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
    for key in keys:
        assert key.encode() not in cmdline, f"pid {proc.pid} has the key in its command line"
        assert key.encode() not in environ, f"pid {proc.pid} has the key in its environment"


def key_file_of(pid: int) -> Path:
    """The ``--api-key-file`` a running server was given, from its command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"--api-key-file" in argv, argv
    return Path(os.fsdecode(argv[argv.index(b"--api-key-file") + 1]))


def assert_private(path: Path) -> None:
    """Mode 0600 in a folder of mode 0700, both ours, holding the key (and only keys)."""
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
    assert stat.S_ISREG(info.st_mode)
    assert info.st_uid == os.getuid()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert KEY in path.read_text().split()


def assert_no_key_in_files(folder: Path) -> None:
    """No file under ``folder`` (server logs, rotated logs, the ledger) holds the key."""
    checked = 0
    for path in folder.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"{path} holds the key"
            checked += 1
    assert checked > 0


def assert_hidden(text: str) -> None:
    assert KEY not in text
    assert FILE_KEY not in text


# -- command lines and environments ---------------------------------------------------


def test_the_key_is_in_no_command_line_or_environment_of_a_server_or_its_children(
    runtime: Runtime, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# second key\n{FILE_KEY}\n")
    spec = fake_spec(tmp_path / "fake", {"grandchild": "1"}, api_key=KEY, api_key_file=str(keys))

    resolution = runtime.resolve_endpoint(spec, "tests")
    pid = resolution.instance.pid
    assert pid is not None

    tree = process_tree(pid)
    assert len(tree) >= 2  # the fake's grandchild is there to be checked too
    for proc in tree:
        assert_key_not_in_proc(proc, KEY, FILE_KEY)
    # Every other process this test started (the lifeline guard, for one) too.
    for proc in psutil.Process().children(recursive=True):
        assert_key_not_in_proc(proc, KEY, FILE_KEY)
    received = (tmp_path / "fake" / "argv.json").read_text()
    assert_hidden(received)
    assert "--api-key-file" in received


def test_the_server_gets_every_key_through_its_private_file_and_accepts_only_those(
    runtime: Runtime, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{FILE_KEY}\n")
    spec = fake_spec(tmp_path / "fake", api_key=KEY, api_key_file=str(keys))
    resolution = runtime.resolve_endpoint(spec, "tests")
    url = resolution.endpoint.base_url + "/chat/completions"

    with httpx.Client(trust_env=False, timeout=5) as client:
        assert client.post(url, json=CHAT).status_code == 401
        for key in (KEY, FILE_KEY):
            auth = {"Authorization": f"Bearer {key}"}
            assert client.post(url, json=CHAT, headers=auth).status_code == 200

    assert resolution.instance.pid is not None
    key_file = key_file_of(resolution.instance.pid)
    assert key_file.read_text().split() == [KEY, FILE_KEY]


# -- the private key file ---------------------------------------------------------------


def test_the_key_file_is_private_while_the_server_runs_and_removed_when_it_stops(
    runtime: Runtime, tmp_path: Path
) -> None:
    resolution = runtime.resolve_endpoint(fake_spec(tmp_path / "fake", api_key=KEY), "tests")
    pid = resolution.instance.pid
    assert pid is not None
    key_file = key_file_of(pid)
    assert_private(key_file)

    runtime.release(resolution.lease.lease_ref)
    final = runtime.stop_instance(resolution.instance.instance_id)

    assert final.state == "stopped"
    assert wait_gone([pid], timeout=WAIT) == []
    assert not key_file.exists()
    assert not key_file.parent.exists()


def test_a_killed_server_leaves_no_key_file_and_its_restart_gets_a_fresh_private_one(
    tmp_path: Path,
) -> None:
    with SignalRecorder() as recorder:
        runtime = Runtime(state_dir=tmp_path / "state", policy=POLICY)
        try:
            resolution = runtime.resolve_endpoint(
                fake_spec(tmp_path / "fake", api_key=KEY), "tests"
            )
            iid, pid = resolution.instance.instance_id, resolution.instance.pid
            assert pid is not None
            first = key_file_of(pid)

            os.kill(pid, signal.SIGKILL)
            ready = recorder.wait_for("instance_ready", iid, timeout=WAIT, count=2)
            second = key_file_of(ready.payload["pid"])

            assert not first.exists()  # removed when the killed server was reaped
            assert not first.parent.exists()
            assert second != first
            assert_private(second)
            assert_key_not_in_proc(psutil.Process(ready.payload["pid"]), KEY)
        finally:
            runtime.close()

    assert not second.exists()
    assert not second.parent.exists()
    assert wait_gone([pid, ready.payload["pid"]], timeout=WAIT) == []


def test_closing_the_runtime_removes_the_key_files_of_every_instance(tmp_path: Path) -> None:
    runtime = Runtime(state_dir=tmp_path / "state", policy=POLICY)
    try:
        files = []
        for name in ("one", "two"):
            snap = runtime.ensure_instance(fake_spec(tmp_path / name, api_key=KEY)).instance
            assert snap.pid is not None
            files.append(key_file_of(snap.pid))
        for path in files:
            assert_private(path)
    finally:
        runtime.close()

    for path in files:
        assert not path.exists()
        assert not path.parent.exists()


# -- logs -----------------------------------------------------------------------------


def test_the_key_never_reaches_a_log_across_a_whole_lifecycle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: ours, pykka's, httpx's
    folder = tmp_path / "fake"
    with SignalRecorder() as recorder:
        runtime = Runtime(state_dir=tmp_path / "state", policy=POLICY)
        try:
            resolution = runtime.resolve_endpoint(fake_spec(folder, api_key=KEY), "tests")
            iid, pid = resolution.instance.instance_id, resolution.instance.pid
            assert pid is not None
            url = resolution.endpoint.base_url + "/chat/completions"
            with httpx.Client(trust_env=False, timeout=5) as client:
                assert client.post(url, json=CHAT, headers=resolution.endpoint.headers).is_success
                assert client.post(url, json=CHAT).status_code == 401
            runtime.renew(resolution.lease.lease_ref)
            os.kill(pid, signal.SIGKILL)  # the exit report and the restart are logged too
            recorder.wait_for("instance_ready", iid, timeout=WAIT, count=2)
            runtime.release(resolution.lease.lease_ref)
            runtime.stop_instance(iid)
            records = list(recorder.records)
        finally:
            runtime.close()

    assert caplog.records, "nothing was logged: the check would pass vacuously"
    assert_hidden(caplog.text)
    for record in caplog.records:
        assert_hidden(record.getMessage())
        assert_hidden(repr(record.args))
    assert_no_key_in_files(tmp_path / "state")  # the server's own log, the ledger
    assert "listening on" in Path(runtime.instances()[0].log_path or "").read_text()
    for record in records:  # the signals' payloads, as a receiver might log them
        assert_hidden(repr(record))
        assert_hidden(str(record.payload))


# -- reprs and errors -------------------------------------------------------------------


def test_no_repr_or_str_of_anything_holding_the_key_shows_it(
    runtime: Runtime, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{FILE_KEY}\n")
    spec = fake_spec(
        tmp_path / "fake",
        api_key=KEY,
        api_key_file=str(keys),
        environment={"OPENAI_API_KEY": KEY},
    )
    plan = render_command(spec)
    resolution = runtime.resolve_endpoint(spec, "tests")
    iid = resolution.instance.instance_id

    things: list[Any] = [
        spec,
        spec.api_key,
        spec.to_mapping()["api_key"],
        plan,
        plan.private_files,
        resolution,
        resolution.endpoint,
        resolution.lease,
        resolution.instance,
        runtime.published_endpoint(iid),
        runtime.snapshot(iid),
        runtime.instances(),
        runtime.statistics(),
        runtime,
    ]
    for thing in things:
        assert_hidden(repr(thing))
        assert_hidden(str(thing))
    assert_hidden(plan.command_line())
    assert_hidden(" ".join(plan.display_argv()))
    # The one place the key is meant to be: the headers a caller sends.
    assert resolution.endpoint.headers == {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(TypeError):
        msgspec.json.encode(spec)  # a Secret refuses to be serialised


def spec_errors(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    model = folder / "model.gguf"
    model.write_bytes(b"GGUF")
    bad_key_file = folder / "bad-keys"
    bad_key_file.write_text(f"{KEY} and more\n")
    m = str(model)
    return [
        ("a key with a space", {"model": m, "api_key": f"{KEY} x"}),
        ("a key that is not text", {"model": m, "api_key": [KEY]}),
        ("another bad field", {"model": m, "api_key": KEY, "port": "8080"}),
        ("an unknown secret-looking field", {"model": m, "apikey": KEY}),
        ("the key in extra_args", {"model": m, "api_key": KEY, "extra_args": ["--api-key", KEY]}),
        ("the key in extra_args with =", {"model": m, "extra_args": [f"--api-key={KEY}"]}),
        ("a secret environment value", {"model": m, "environment": {"MY_TOKEN": [KEY]}}),
        ("a bad line in the key file", {"model": m, "api_key_file": str(bad_key_file)}),
    ]


def assert_error_hides_the_key(error: BaseException) -> None:
    assert_hidden(str(error))
    assert_hidden(repr(error))
    assert_hidden(repr(error.args))
    assert_hidden(repr(vars(error)))
    assert_hidden("".join(traceback.format_exception(error)))


def test_errors_about_a_spec_holding_the_key_never_show_it(tmp_path: Path) -> None:
    cases = spec_errors(tmp_path)
    for what, mapping in cases:
        with pytest.raises(BootSpecError) as caught:
            boot_spec(mapping)
        assert_error_hides_the_key(caught.value)
        assert caught.value.field, what


def test_errors_from_a_resolve_with_the_key_never_show_it(runtime: Runtime, tmp_path: Path) -> None:
    missing_model = {"model": str(tmp_path / "nope.gguf"), "api_key": KEY}
    missing_binary = {
        "model": str(fake_spec(tmp_path / "fake").model),
        "binary_path": str(tmp_path / "no-such-llama-server"),
        "api_key": KEY,
    }
    exits = fake_spec(
        tmp_path / "exits", {"exit_before_ready": "3", "exit_stderr": "boom"}, api_key=KEY
    )
    for spec in (missing_model, missing_binary, exits, {"model": "", "api_key": KEY}):
        with pytest.raises(LlamaActorsError) as caught:
            runtime.resolve_endpoint(spec, "tests")
        assert_error_hides_the_key(caught.value)
    with pytest.raises(ServerExitedError) as exited:
        runtime.resolve_endpoint(exits, "tests")
    assert_hidden(repr(exited.value.exit))


# -- exposure -------------------------------------------------------------------------

EXPOSED = "without an API key"


def test_binding_every_interface_without_a_key_logs_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="llama_actors")

    fake = start_fake(tmp_path, host="0.0.0.0")  # bound, never talked to
    fake.stop()

    warnings = [r for r in caplog.records if EXPOSED in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "0.0.0.0" in warnings[0].getMessage()
    assert "api_key" in warnings[0].getMessage()  # says what to do


def test_a_runtime_instance_on_a_non_loopback_address_without_a_key_is_warned_about(
    runtime: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="llama_actors")
    # A documentation address this host does not have: the bind fails, nothing is sent.
    spec = fake_spec(tmp_path / "fake", host="192.0.2.1")

    with pytest.raises(ServerExitedError):
        runtime.resolve_endpoint(spec, "tests")

    assert any(EXPOSED in r.getMessage() and "192.0.2.1" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("host", "fields"),
    [
        ("127.0.0.1", {}),
        ("::1", {}),
        ("localhost", {}),
        ("0.0.0.0", {"api_key": KEY}),
    ],
)
def test_no_exposure_warning_for_loopback_or_a_keyed_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, host: str, fields: dict[str, Any]
) -> None:
    caplog.set_level(logging.WARNING, logger="llama_actors")

    fake = start_fake(tmp_path, host=host, **fields)
    fake.stop()

    assert not [r for r in caplog.records if EXPOSED in r.getMessage()]


# -- the real llama-server ------------------------------------------------------------


@pytest.mark.real_server
def test_the_real_server_never_sees_the_key_in_argv_and_never_logs_it(
    tmp_path: Path, real_binary: str, gemma_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    spec = {
        "model": gemma_model,
        "binary_path": real_binary,
        "api_key": KEY,
        "ctx_size": 512,
        "threads": 2,
        "parallel": 1,
    }
    runtime = Runtime(state_dir=tmp_path / "state")
    try:
        resolution = runtime.resolve_endpoint(spec, "tests", timeout=120)
        pid = resolution.instance.pid
        assert pid is not None
        for proc in process_tree(pid):
            assert_key_not_in_proc(proc, KEY)
        key_file = key_file_of(pid)
        assert_private(key_file)
        url = resolution.endpoint.base_url + "/chat/completions"
        chat = {**CHAT, "max_tokens": 4}
        with httpx.Client(trust_env=False, timeout=60) as client:
            assert client.post(url, json=chat).status_code == 401
            answer = client.post(url, json=chat, headers=resolution.endpoint.headers)
            assert answer.status_code == 200, answer.text
        assert_hidden(repr(resolution))
        runtime.release(resolution.lease.lease_ref)
        runtime.stop_instance(resolution.instance.instance_id)
        assert not key_file.exists()
    finally:
        runtime.close()

    assert wait_gone([pid], timeout=WAIT) == []
    assert_hidden(caplog.text)
    assert_no_key_in_files(tmp_path / "state")  # the real server's whole log included

"""The process seam with small scripts standing in for llama-server."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec
import psutil
import pytest

from llama_actors import (
    BinaryNotFoundError,
    ModelFileError,
    PortInUseError,
    ServerExitedError,
    SpawnError,
    WaitTimeoutError,
    boot_spec,
)
from llama_actors._base.secret import Secret
from llama_actors._process import process as _process
from llama_actors._process.ledger import Ledger
from llama_actors._process.plan import PrivateFile
from llama_actors.lowlevel import LaunchPlan, ProcessExit, ServerProcess

from ._helpers import wait_gone

PlanFor = Callable[..., LaunchPlan]


@pytest.fixture
def plan_for(model_file: Path) -> PlanFor:
    """A launch plan whose "server" is any command: ``plan_for(argv, **spec fields)``."""

    def make(
        argv: list[str],
        *,
        private_files: tuple[PrivateFile, ...] = (),
        port_mode: str = "bind_zero",
        **fields: object,
    ) -> LaunchPlan:
        spec = boot_spec({"model": str(model_file), **fields})
        return LaunchPlan(
            name=spec.alias,
            binary_path=argv[0],
            binary_label=argv[0],
            argv=tuple(argv),
            env=dict(spec.environment),
            private_files=private_files,
            host=spec.host,
            port=spec.port if isinstance(spec.port, int) else None,
            port_mode=port_mode,  # type: ignore[arg-type]
            port_index=0,
            slots={},
            model=spec.model,
            has_key=bool(spec.server_keys),
            stop_timeout_s=spec.stop_timeout_s,
        )

    return make


class Lines:
    """An ``on_line`` listener that a test can wait on."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()

    def first(self, predicate: Callable[[str], bool], timeout: float = 10) -> str:
        with self._cond:
            found = self._cond.wait_for(
                lambda: next((line for line in self.lines if predicate(line)), None), timeout
            )
        assert found is not None, f"no such line in {self.lines}"
        return found


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def start(started: list[ServerProcess], plan: LaunchPlan, **kwargs: object) -> ServerProcess:
    process = ServerProcess.start(plan, **kwargs)  # type: ignore[arg-type]
    started.append(process)
    return process


# -- output -------------------------------------------------------------------------


def test_a_server_flooding_both_pipes_never_blocks_and_every_line_arrives(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    code = (
        "import sys\n"
        "for i in range(40000):\n"
        "    print('out', i)\n"
        "    print('err', i, file=sys.stderr)\n"
    )
    seen: list[str] = []
    process = start(started, plan_for(python(code)), on_line=seen.append)
    ended = process.wait(timeout=60)
    assert ended.status == "success"
    assert len(seen) == 80000
    assert "out 39999" in seen
    assert "err 39999" in seen


def test_a_last_line_without_a_newline_is_kept_at_exit(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    process = start(started, plan_for(["/bin/sh", "-c", "printf 'first\\nno newline at the end'"]))
    process.wait(timeout=10)
    assert process.tail(2) == ["first", "no newline at the end"]


def test_every_line_goes_to_the_log_file_too(
    plan_for: PlanFor, started: list[ServerProcess], tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "server.log"
    process = start(started, plan_for(["/bin/sh", "-c", "echo one; echo two >&2"]), log_path=log)
    process.wait(timeout=10)
    assert sorted(log.read_text().splitlines()) == ["one", "two"]


def test_a_chatty_server_log_is_rotated_so_it_cannot_fill_the_disk(
    plan_for: PlanFor, started: list[ServerProcess], tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "server.log"
    script = "i=0; while [ $i -lt 400 ]; do echo line-$i-padding-padding-padding; i=$((i+1)); done"
    process = start(
        started,
        plan_for(["/bin/sh", "-c", script]),
        log_path=log,
        log_max_bytes=2048,
        log_backups=2,
    )
    process.wait(timeout=10)
    files = sorted(p.name for p in log.parent.iterdir())
    assert files == ["server.log", "server.log.1", "server.log.2"]
    assert all(p.stat().st_size <= 2048 for p in log.parent.iterdir())
    assert log.read_text().splitlines()[-1] == "line-399-padding-padding-padding"
    assert process.tail(1) == ["line-399-padding-padding-padding"]


@pytest.mark.logs_errors(r"on_line callback of llama-server pid \d+ raised")
def test_a_line_callback_that_raises_does_not_stop_the_capture(
    plan_for: PlanFor, started: list[ServerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    def explode(line: str) -> None:
        raise RuntimeError(f"listener broke on {line}")

    process = start(started, plan_for(["/bin/sh", "-c", "echo a; echo b"]), on_line=explode)
    process.wait(timeout=10)
    assert process.tail() == ["a", "b"]
    assert "on_line callback" in caplog.text


# -- exits --------------------------------------------------------------------------


def test_an_exit_code_is_reported_with_the_output_tail(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    process = start(started, plan_for(["/bin/sh", "-c", "echo 'about to fail' >&2; exit 3"]))
    ended = process.wait(timeout=10)
    assert (ended.status, ended.code, ended.signal) == ("exit_code", 3, None)
    assert ended.tail == ("about to fail",)
    assert not ended.requested
    assert process.exit == ended
    assert "exited with code 3" in ended.describe()


def test_a_death_by_signal_is_reported_by_its_name(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    process = start(started, plan_for(["/bin/sh", "-c", "kill -KILL $$"]))
    ended = process.wait(timeout=10)
    assert (ended.status, ended.code, ended.signal) == ("signal", None, "SIGKILL")
    assert "killed by SIGKILL" in ended.describe()


def test_the_exit_callback_fires_as_soon_as_the_server_dies(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    reports: list[ProcessExit] = []
    fired = threading.Event()

    def on_exit(report: ProcessExit) -> None:
        reports.append(report)
        fired.set()

    process = start(started, plan_for(python("import signal; signal.pause()")), on_exit=on_exit)
    os.kill(process.pid, signal.SIGKILL)
    assert fired.wait(timeout=10)
    assert reports[0].signal == "SIGKILL"
    assert process.exit is reports[0]


def test_a_grandchild_dies_with_its_server_when_the_server_exits_on_its_own(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    process = start(started, plan_for(["/bin/sh", "-c", "sleep 300 & echo $!; exit 1"]))
    ended = process.wait(timeout=10)
    grandchild = int(ended.tail[0])
    assert wait_gone([grandchild], timeout=5) == []


def test_waiting_for_an_exit_that_does_not_come_raises_and_leaves_the_server_running(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    process = start(started, plan_for(python("import signal; signal.pause()")))
    with pytest.raises(WaitTimeoutError, match=r"still running after 0\.05s"):
        process.wait(timeout=0.05)
    assert process.running
    assert isinstance(WaitTimeoutError("x"), TimeoutError)


def test_waiting_for_a_port_from_a_server_that_exits_first_raises_with_its_exit(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    process = start(started, plan_for(["/bin/sh", "-c", "echo 'no port for you' >&2; exit 2"]))
    with pytest.raises(ServerExitedError, match="exited with code 2") as caught:
        process.wait_port(timeout=10)
    assert caught.value.exit.tail == ("no port for you",)


def test_the_port_is_read_from_the_listening_line(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    line = "main: server is listening on http://127.0.0.1:45678 - starting the main loop"
    process = start(started, plan_for(["/bin/sh", "-c", f"echo '{line}' >&2; sleep 300"]))
    assert process.wait_port(timeout=10) == 45678
    assert process.port == 45678


# -- stopping -----------------------------------------------------------------------


def test_stop_sends_sigterm_and_reports_a_requested_exit(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    script = "trap 'exit 0' TERM; echo trapped; sleep 300 & wait"
    lines = Lines()
    process = start(started, plan_for(["/bin/sh", "-c", script]), on_line=lines)
    lines.first(lambda line: line == "trapped")  # a SIGTERM before the trap kills the shell
    ended = process.stop(timeout=10)
    assert ended.requested
    assert ended.status == "success"


def test_a_server_ignoring_sigterm_is_killed_with_its_group_after_the_timeout(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    script = "trap '' TERM; sleep 300 & echo $!; wait"
    lines = Lines()
    process = start(started, plan_for(["/bin/sh", "-c", script]), on_line=lines)
    grandchild = int(lines.first(str.isdigit))
    ended = process.stop(timeout=0.2)
    assert (ended.status, ended.signal, ended.requested) == ("signal", "SIGKILL", True)
    assert wait_gone([grandchild], timeout=5) == []


def test_stop_is_idempotent_and_safe_from_many_threads_at_once(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    process = start(started, plan_for(python("import signal; signal.pause()")))
    results: list[ProcessExit] = []
    threads = [
        threading.Thread(target=lambda: results.append(process.stop(timeout=5))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert all(r is results[0] for r in results)
    assert process.stop() is results[0]


def test_stopping_a_server_that_already_exited_returns_how_it_ended(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    process = start(started, plan_for(["/bin/sh", "-c", "exit 4"]))
    first = process.wait(timeout=10)
    assert process.stop() is first
    assert not first.requested


# -- private files ------------------------------------------------------------------


def test_private_files_are_0600_while_the_server_runs_and_gone_after(
    plan_for: PlanFor, started: list[ServerProcess], tmp_path: Path
) -> None:
    seen = tmp_path / "seen"
    plan = plan_for(
        ["/bin/sh", "-c", f'ls -l "$0" > {seen}; cat "$0" >> {seen}; sleep 300'],
        private_files=(PrivateFile("api-key", Secret("sk-very-secret\n")),),
    )
    plan = msgspec.structs.replace(
        plan, argv=(*plan.argv, "<api-key>"), slots={len(plan.argv): "api-key"}
    )
    process = start(started, plan)
    folder = process.private_dir
    assert folder is not None
    key_file = Path(folder) / "api-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(folder).stat().st_mode) == 0o700
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    assert b"sk-very-secret" not in cmdline
    assert str(key_file).encode() in cmdline
    process.stop(timeout=5)
    assert not Path(folder).exists()


# -- refusing to start --------------------------------------------------------------


def test_a_missing_binary_is_refused_before_spawn_naming_its_path(plan_for: PlanFor) -> None:
    with pytest.raises(BinaryNotFoundError, match="/no/such/llama-server"):
        ServerProcess.start(plan_for(["/no/such/llama-server"]))


def test_a_binary_that_is_not_executable_is_refused_naming_its_path(
    plan_for: PlanFor, tmp_path: Path
) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    with pytest.raises(BinaryNotFoundError, match=r"llama-server.*is not executable"):
        ServerProcess.start(plan_for([str(binary)]))


def test_a_binary_the_kernel_cannot_run_is_a_spawn_error_naming_its_path(
    plan_for: PlanFor, tmp_path: Path
) -> None:
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"\x7fELF-but-not-really")
    binary.chmod(0o755)
    with pytest.raises(SpawnError, match=r"cannot start .*llama-server.*Exec format error"):
        ServerProcess.start(plan_for([str(binary)]))


def test_a_missing_model_is_refused_before_spawn_naming_its_path(
    plan_for: PlanFor, model_file: Path
) -> None:
    plan = plan_for(["/bin/true"])
    model_file.unlink()
    with pytest.raises(ModelFileError, match=re.escape(str(model_file))):
        ServerProcess.start(plan)


def test_a_model_path_that_is_a_folder_is_refused(plan_for: PlanFor, model_file: Path) -> None:
    plan = plan_for(["/bin/true"])
    model_file.unlink()
    model_file.mkdir()
    with pytest.raises(ModelFileError, match="not a regular file"):
        ServerProcess.start(plan)


# -- ports --------------------------------------------------------------------------


def test_an_explicit_port_held_by_a_plain_socket_fails_before_anything_is_spawned(
    plan_for: PlanFor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be spawned for a held port")

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        plan = plan_for(["/bin/true"], port=port, port_mode="fixed")
        monkeypatch.setattr(subprocess, "Popen", no_spawn)
        with pytest.raises(PortInUseError) as caught:
            ServerProcess.start(plan)
    error = caught.value
    assert error.port == port
    assert error.holder_pid == os.getpid()
    assert error.holder_name == psutil.Process().name()
    assert f"port {port} on 127.0.0.1 is already in use" in str(error)
    assert f"(pid {os.getpid()})" in str(error)


def test_a_bound_but_not_listening_socket_also_counts_as_held(plan_for: PlanFor) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port}"):
            ServerProcess.start(plan_for(["/bin/true"], port=port, port_mode="fixed"))


# -- the ledger ---------------------------------------------------------------------


def test_a_running_server_is_in_the_ledger_and_leaves_it_when_reaped(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    ledger = Ledger()
    process = start(started, plan_for(python("import signal; signal.pause()")))
    entries = [e for e in ledger.entries() if e.pid == process.pid]
    assert len(entries) == 1
    assert entries[0].owner_pid == os.getpid()
    assert entries[0].server_alive()
    process.stop(timeout=5)
    assert [e for e in ledger.entries() if e.pid == process.pid] == []


# -- failures and the reserved-port retry -------------------------------------------

BINDING_SERVER = """\
import signal, socket, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
sock = socket.socket()
try:
    sock.bind(("127.0.0.1", port))
except OSError:
    print(f"E srv  start: couldn't bind HTTP server socket, hostname: 127.0.0.1, port: {port}",
          file=sys.stderr, flush=True)
    sys.exit(1)
sock.listen()
print(f"I srv  llama_server: listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
signal.pause()
"""


def test_a_server_that_cannot_bind_reports_a_bind_failure_that_is_not_retryable(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        process = start(started, plan_for([*python(BINDING_SERVER), "--port", str(port)]))
        ended = process.wait(timeout=10)
    assert ended.failure == "bind_failure"
    assert ended.failure_line is not None
    assert f"port: {port}" in ended.failure_line
    assert not ended.retryable


def reserving_plan(plan_for: PlanFor) -> LaunchPlan:
    plan = plan_for([*python(BINDING_SERVER), "--port", "<port>"], port_mode="reserve")
    return msgspec.structs.replace(plan, slots={len(plan.argv) - 1: "port"})


def test_a_reserved_port_taken_before_the_server_binds_it_is_retried_once_on_another(
    plan_for: PlanFor, started: list[ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        ports = iter([taken])
        real_reserve = _process.reserve_port
        monkeypatch.setattr(
            _process, "reserve_port", lambda host: next(ports, None) or real_reserve(host)
        )
        lines = Lines()
        process = start(started, reserving_plan(plan_for), on_line=lines)
        lines.first(lambda line: "listening on" in line)
    assert process.port not in (None, taken)
    assert any(f"port: {taken}" in line for line in lines.lines)
    with socket.create_connection(("127.0.0.1", process.port), timeout=5):
        pass
    assert process.running


def test_a_reserved_port_is_retried_only_once(
    plan_for: PlanFor, started: list[ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        monkeypatch.setattr(_process, "reserve_port", lambda host: taken)
        process = start(started, reserving_plan(plan_for))
        ended = process.wait(timeout=10)
    assert ended.failure == "bind_failure"
    assert ended.status == "exit_code"


@pytest.mark.logs_errors(r"watching llama-server pid \d+ failed(?s:.*)bug in the watcher")
def test_a_broken_watcher_still_ends_the_server_and_reports_its_exit(
    plan_for: PlanFor, started: list[ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("bug in the watcher")

    monkeypatch.setattr(ServerProcess, "_take", broken)
    script = "echo line; sleep 300 & wait"
    process = start(started, plan_for(["/bin/sh", "-c", script]))
    ended = process.wait(timeout=10)
    assert (ended.status, ended.signal) == ("signal", "SIGKILL")


def test_a_log_path_that_cannot_be_written_is_a_spawn_error_naming_it(
    plan_for: PlanFor, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(SpawnError, match=r"not-a-folder.*check that the folder exists"):
        ServerProcess.start(plan_for(["/bin/true"]), log_path=blocker / "server.log")


def test_a_grandchild_that_left_the_group_holding_the_pipes_cannot_hang_the_exit(
    plan_for: PlanFor, started: list[ServerProcess]
) -> None:
    # setsid puts the sleeper in a session of its own, out of reach of the group kill,
    # while it keeps the server's stdout and stderr open.
    process = start(started, plan_for(["/bin/sh", "-c", "setsid sleep 300 & echo $!; exit 5"]))
    try:
        ended = process.wait(timeout=10)
        assert (ended.status, ended.code) == ("exit_code", 5)
    finally:
        escaped = int(process.tail(1)[0])
        os.kill(escaped, signal.SIGKILL)  # we started it; nothing else will end it

"""The process seam: start one llama-server from a launch plan, watch it, stop it.

Each server runs in its own session (so its process group is its own), with stdin
closed. One watcher thread per server reads stdout and stderr as they come, so a chatty
server never blocks on a full pipe, and learns of the exit from a pidfd the moment it
happens. The watcher SIGKILLs anything left in the group before it reaps the leader, so
the group id cannot have been reused when it is signalled, and a grandchild never
outlives its server. A lifeline guard (``_guard.py``) kills the servers if this Python
process dies, and the ledger (``_ledger.py``) lets a later owner reap what escaped.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ipaddress
import logging
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Literal

import msgspec

from llama_actors._exceptions import (
    BinaryNotFoundError,
    LlamaActorsError,
    ServerExitedError,
    SpawnError,
    WaitTimeoutError,
)
from llama_actors._process.failure import NON_RETRYABLE, FailureKind, FailureScanner
from llama_actors._process.ledger import Ledger, LedgerEntry, argv_digest, process_start_time
from llama_actors._process.lifeline import lifeline
from llama_actors._process.plan import LaunchPlan, check_model_file
from llama_actors._process.ports import check_port_free, parse_listening, reserve_port

__all__ = ["ExitStatus", "LineCallback", "ProcessExit", "ServerProcess"]

log = logging.getLogger("llama_actors.process")

ExitStatus = Literal["success", "exit_code", "signal"]
LineCallback = Callable[[str], None]
ExitCallback = Callable[["ProcessExit"], None]

TAIL_LINES = 200
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3
EXIT_TAIL_LINES = 40  # lines kept on a ProcessExit, enough to show why it ended
_READ_SIZE = 65536
_MAX_LINE = 64 * 1024
# After the leader exits, how long its pipes may stay open (a grandchild that left the
# group could hold them forever); then they are closed regardless.
_DRAIN_LIMIT = 1.0
# After SIGKILL, how long to wait for the kernel to finish the process.
_KILL_WAIT = 10.0


class ProcessExit(msgspec.Struct, frozen=True, kw_only=True):
    """How a server process ended.

    ``status`` is ``success`` (exit 0), ``exit_code`` (``code`` non-zero) or ``signal``
    (``signal`` names it, ``code`` is None). ``requested`` is True when :meth:`ServerProcess.stop`
    ended it. ``failure`` is what its log said went wrong, if anything recognisable, with
    ``failure_line`` the line that said it; ``tail`` is the last lines it printed.
    """

    pid: int
    status: ExitStatus
    code: int | None
    signal: str | None
    requested: bool
    failure: FailureKind | None
    failure_line: str | None
    tail: tuple[str, ...]
    runtime_s: float

    @property
    def retryable(self) -> bool:
        """False when a restart would fail the same way (see ``NON_RETRYABLE``)."""
        return self.failure not in NON_RETRYABLE

    def describe(self) -> str:
        """One line: how it ended and, when known, why."""
        if self.status == "success":
            how = "exited with code 0"
        elif self.status == "exit_code":
            how = f"exited with code {self.code}"
        else:
            how = f"was killed by {self.signal}"
        if self.requested:
            how += " after a stop request"
        if self.failure:
            how += f" ({self.failure}: {self.failure_line})"
        return f"llama-server pid {self.pid} {how}"


def _warn_if_exposed(plan: LaunchPlan) -> None:
    if plan.has_key or _is_loopback(plan.host):
        return
    log.warning(
        "llama-server for %s binds %s without an API key: anyone who can reach that "
        "address can use the model; set api_key or api_key_file, or bind 127.0.0.1",
        plan.name,
        plan.host,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it can be reached from elsewhere


def _exit_status(returncode: int) -> tuple[ExitStatus, int | None, str | None]:
    if returncode == 0:
        return "success", 0, None
    if returncode > 0:
        return "exit_code", returncode, None
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return "signal", None, name


# Servers still running, so that a normal interpreter exit stops them gracefully
# (SIGTERM first); the lifeline guard covers every other way this process can end.
_live: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for process in list(_live):
        with contextlib.suppress(Exception):
            process.stop()


class _Attempt:
    """One spawned child: the Popen and what its watcher collects."""

    def __init__(self, popen: subprocess.Popen[bytes], port: int | None, started: float) -> None:
        self.popen = popen
        self.port = port
        self.started = started
        self.scanner = FailureScanner()
        self.entry: LedgerEntry | None = None


class ServerProcess:
    """One running llama-server. Start it with :meth:`ServerProcess.start`.

    Every method is safe to call from any thread. ``stop`` is idempotent and never
    raises for a process that has already exited.
    """

    def __init__(
        self,
        plan: LaunchPlan,
        *,
        log_path: str | os.PathLike[str] | None,
        on_line: LineCallback | None,
        on_exit: ExitCallback | None,
        ledger: Ledger,
        tail_lines: int,
        log_rotation: tuple[int, int] = (LOG_MAX_BYTES, LOG_BACKUPS),
    ) -> None:
        self.plan = plan
        self._log_rotation = log_rotation
        self.log_path = Path(log_path) if log_path is not None else None
        self._on_line = on_line
        self._on_exit = on_exit
        self._ledger = ledger
        self._cond = threading.Condition()
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._attempt: _Attempt | None = None
        self._port: int | None = None
        self._exit: ProcessExit | None = None
        self._reaped = True
        self._stop_requested = False
        self._private_dir: str | None = None
        self._file_paths: dict[str, str] = {}
        self._log_file: RotatingFileHandler | None = None
        self._watcher: threading.Thread | None = None
        self._attempts = 0

    # -- starting -------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        plan: LaunchPlan,
        *,
        log_path: str | os.PathLike[str] | None = None,
        on_line: LineCallback | None = None,
        on_exit: ExitCallback | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        tail_lines: int = TAIL_LINES,
        log_max_bytes: int = LOG_MAX_BYTES,
        log_backups: int = LOG_BACKUPS,
    ) -> ServerProcess:
        """Spawn the server ``plan`` describes and return at once (no readiness wait).

        ``on_line`` gets every complete output line, ``on_exit`` the exit report; both
        run on the watcher thread, so they must only record or hand off. Output lines
        are appended to ``log_path``, rotated at ``log_max_bytes`` keeping
        ``log_backups`` older files (``.1`` is the newest). Raises
        :class:`BinaryNotFoundError`, :class:`ModelFileError`, :class:`PortInUseError`
        or :class:`SpawnError` before anything runs when the server cannot start.
        """
        binary = plan.argv[0]
        if not os.path.isfile(binary):
            raise BinaryNotFoundError(
                f"llama-server {binary!r} does not exist (any more); reinstall it or fix "
                "binary_path",
                searched=(binary,),
            )
        if not os.access(binary, os.X_OK):
            raise BinaryNotFoundError(
                f"llama-server {binary!r} is not executable; chmod +x it", searched=(binary,)
            )
        if plan.model is not None:
            check_model_file(plan.model)
        _warn_if_exposed(plan)
        if plan.port_mode == "fixed" and plan.port is not None:
            check_port_free(plan.host, plan.port)
        process = cls(
            plan,
            log_path=log_path,
            on_line=on_line,
            on_exit=on_exit,
            ledger=Ledger(state_dir),
            tail_lines=tail_lines,
            log_rotation=(log_max_bytes, log_backups),
        )
        try:
            process._open(log_path)
            attempt = process._spawn()
        except OSError as exc:
            process._cleanup_files()
            where = exc.filename or log_path or "the private-file folder"
            raise SpawnError(
                f"cannot prepare to start llama-server: {where}: {exc.strerror or exc}; "
                "check that the folder exists and is writable",
                str(where),
            ) from None
        except BaseException:
            process._cleanup_files()
            raise
        _live.add(process)
        process._watcher = threading.Thread(
            target=process._watch,
            args=(attempt,),
            name=f"llama-server-{attempt.popen.pid}",
            daemon=True,
        )
        process._watcher.start()
        return process

    def _open(self, log_path: str | os.PathLike[str] | None) -> None:
        if self.plan.private_files:
            self._private_dir = tempfile.mkdtemp(prefix="llama-actors-")
            self._file_paths = self.plan.write_private_files(self._private_dir)
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            max_bytes, backups = self._log_rotation
            handler = RotatingFileHandler(
                log_path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._log_file = handler

    def _spawn(self) -> _Attempt:
        """Start one child; called again (once) when a reserved port was taken."""
        plan = self.plan
        port: int | None
        if plan.port_mode == "fixed":
            port = plan.port
        elif plan.port_mode == "reserve":
            port = reserve_port(plan.host)
        else:
            port = None
        argv = plan.argv_for(self._file_paths, port)
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=plan.child_env(),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise SpawnError(
                f"cannot start {argv[0]!r}: {exc.strerror or exc}; check that it is a "
                "llama-server built for this machine",
                argv[0],
            ) from None
        self._attempts += 1
        attempt = _Attempt(popen, port, time.monotonic())
        attempt.entry = self._ledger_entry(popen.pid, argv, port)
        ledger_file = self._write_ledger(attempt.entry)
        lifeline.add(popen.pid, self._private_dir, str(ledger_file) if ledger_file else None)
        with self._cond:
            self._attempt = attempt
            self._reaped = False
            self._port = port
            if self._stop_requested:  # a stop arrived while a retry was spawning
                self._signal_group(signal.SIGTERM)
            self._cond.notify_all()
        return attempt

    def _ledger_entry(self, pid: int, argv: list[str], port: int | None) -> LedgerEntry | None:
        started = process_start_time(pid)
        owner_started = process_start_time(os.getpid())
        if started is None or owner_started is None:
            return None  # already gone: the watcher reports it
        return LedgerEntry(
            pid=pid,
            start_time=started,
            argv_digest=argv_digest(argv),
            owner_pid=os.getpid(),
            owner_start_time=owner_started,
            port=port,
            host=self.plan.host,
            private_dir=self._private_dir,
            log_path=str(self.log_path) if self.log_path else None,
            recorded_at=time.time(),
        )

    def _write_ledger(self, entry: LedgerEntry | None) -> Path | None:
        if entry is None:
            return None
        try:
            return self._ledger.record(entry)
        except OSError as exc:
            log.warning("cannot write the server ledger in %s: %s", self._ledger.path, exc)
            return None

    # -- what callers see -----------------------------------------------------------

    @property
    def pid(self) -> int:
        """The server's pid (its process group id too)."""
        attempt = self._attempt
        if attempt is None:
            raise LlamaActorsError("this ServerProcess was never started; use ServerProcess.start")
        return attempt.popen.pid

    @property
    def port(self) -> int | None:
        """The server's port: given or reserved at spawn, or read from its log."""
        return self._port

    @property
    def exit(self) -> ProcessExit | None:
        """How the server ended, or None while it runs."""
        return self._exit

    @property
    def running(self) -> bool:
        return self._exit is None

    @property
    def private_dir(self) -> str | None:
        """The 0700 folder of the server's private files (removed once it has exited)."""
        return self._private_dir

    def tail(self, n: int = 20) -> list[str]:
        """The last ``n`` lines the server printed (stdout and stderr interleaved)."""
        with self._cond:
            lines = list(self._tail)
        return lines[-n:] if n > 0 else []

    def wait_port(self, timeout: float | None) -> int:
        """Wait until the port is known and return it.

        A fixed or reserved port is known at once (the server may not listen yet); with
        ``--port 0`` it is known when the server logs ``listening on``, which current
        llama-server does only once its model is loaded. Readiness is the runtime's job.

        Raises :class:`ServerExitedError` if the server exits first and
        :class:`WaitTimeoutError` when ``timeout`` seconds pass (the server keeps running).
        """
        with self._cond:
            self._cond.wait_for(lambda: self._port is not None or self._exit is not None, timeout)
            if self._port is not None:
                return self._port
            if self._exit is not None:
                raise ServerExitedError(
                    f"{self._exit.describe()} before reporting a port", self._exit
                )
        raise WaitTimeoutError(
            f"llama-server pid {self.pid} reported no listening port within {timeout:g}s; "
            f"last output: {self._tail_text()}"
        )

    def wait(self, timeout: float | None) -> ProcessExit:
        """Wait for the server to exit and return how it ended.

        Raises :class:`WaitTimeoutError` when ``timeout`` seconds pass first; the server
        is left running.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._exit is not None, timeout)
            if self._exit is not None:
                return self._exit
        raise WaitTimeoutError(f"llama-server pid {self.pid} still running after {timeout:g}s")

    def wait_finished(self, timeout: float | None) -> bool:
        """Wait until the watcher thread is done with this server: exit reported and
        its bookkeeping (ledger, lifeline guard) finished. True if it is."""
        if self._watcher is None or self._watcher is threading.current_thread():
            return True
        self._watcher.join(timeout)
        return not self._watcher.is_alive()

    def stop(self, timeout: float | None = None) -> ProcessExit:
        """SIGTERM to the group, up to ``timeout`` seconds (default the spec's
        ``stop_timeout_ms``), then SIGKILL to the group; returns how it ended."""
        grace = self.plan.stop_timeout_s if timeout is None else timeout
        with self._cond:
            self._stop_requested = True
            self._signal_group(signal.SIGTERM)
            if (ended := self._cond.wait_for(lambda: self._exit, grace)) is not None:
                return ended
            log.warning(
                "llama-server pid %s ignored SIGTERM for %.1fs; sending SIGKILL", self.pid, grace
            )
            self._signal_group(signal.SIGKILL)
            if (ended := self._cond.wait_for(lambda: self._exit, _KILL_WAIT)) is not None:
                return ended
        raise LlamaActorsError(
            f"llama-server pid {self.pid} did not end within {_KILL_WAIT:g}s of SIGKILL "
            "(stuck in the kernel?); check it with `ps -o stat= -p PID`"
        )

    def terminate(self) -> None:
        """Send SIGTERM to the group and return at once (a stop that does not wait).

        The exit is reported as requested. Pair it with :meth:`kill` after a grace
        period; :meth:`stop` does both and waits.
        """
        with self._cond:
            self._stop_requested = True
            self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL to the group and return at once; the exit is reported as requested."""
        with self._cond:
            self._stop_requested = True
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        # Called with the condition held: the watcher reaps under it too, so an
        # unreaped leader (alive or zombie) keeps the group id ours while we signal.
        if self._reaped or self._attempt is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._attempt.popen.pid, sig)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._exit is None else self._exit.status
        pid = self._attempt.popen.pid if self._attempt else None
        return f"<ServerProcess pid={pid} port={self._port} {state}>"

    def _tail_text(self, n: int = 5) -> str:
        return " | ".join(self.tail(n)) or "(nothing)"

    # -- the watcher ----------------------------------------------------------------

    def _watch(self, attempt: _Attempt) -> None:
        while True:
            try:
                returncode = self._follow(attempt)
            except Exception:
                # A bug here must not leave a server nobody watches: end it and report.
                log.exception("watching llama-server pid %s failed; killing it", attempt.popen.pid)
                returncode = self._kill_and_reap(attempt)
            retry = self._should_retry(attempt)
            self._ledger.remove(attempt.popen.pid)
            if retry:
                lifeline.remove(attempt.popen.pid)
                log.info(
                    "reserved port %s was taken before the server bound it; retrying", attempt.port
                )
                try:
                    attempt = self._spawn()
                    continue
                except (LlamaActorsError, OSError) as exc:
                    log.warning("retry after a port clash failed: %s", exc)
            self._report(attempt, returncode)
            # After the report: closing the lifeline's guard (when this was the last
            # server) waits for it to exit, and nobody should wait for that.
            lifeline.remove(attempt.popen.pid)
            return

    def _should_retry(self, attempt: _Attempt) -> bool:
        return (
            self.plan.port_mode == "reserve"
            and attempt.scanner.kind == "bind_failure"
            and self._attempts < 2
            and not self._stop_requested
        )

    def _follow(self, attempt: _Attempt) -> int:
        """Read output until the child exits and its pipes close; reap it."""
        popen = attempt.popen
        if popen.stdout is None or popen.stderr is None:
            raise LlamaActorsError("the server was started without output pipes")
        partial: dict[int, bytes] = {}
        exited_at: float | None = None
        with selectors.DefaultSelector() as sel:
            for pipe in (popen.stdout, popen.stderr):
                sel.register(pipe.fileno(), selectors.EVENT_READ, "pipe")
                partial[pipe.fileno()] = b""
            exit_fd, exit_waiter = self._exit_notifier(popen.pid)
            sel.register(exit_fd, selectors.EVENT_READ, "exit")
            try:
                while True:
                    pipes_open = any(k.data == "pipe" for k in sel.get_map().values())
                    if exited_at is not None and not pipes_open:
                        break
                    wait = None
                    if exited_at is not None:
                        wait = exited_at + _DRAIN_LIMIT - time.monotonic()
                        if wait <= 0:
                            break
                    for key, _ in sel.select(wait):
                        if key.data == "exit":
                            sel.unregister(key.fd)
                            exited_at = time.monotonic()
                            self._kill_stragglers(popen.pid)
                            continue
                        chunk = os.read(key.fd, _READ_SIZE)
                        if chunk:
                            self._take(attempt, partial, key.fd, chunk)
                        else:
                            sel.unregister(key.fd)
                            self._flush(attempt, partial, key.fd)
            finally:
                for fd in list(partial):
                    self._flush(attempt, partial, fd)
                os.close(exit_fd)
                if exit_waiter is not None:
                    exit_waiter.join()
        with self._cond:
            returncode = popen.wait()
            self._reaped = True
        for pipe in (popen.stdout, popen.stderr):
            pipe.close()
        return returncode

    def _kill_and_reap(self, attempt: _Attempt) -> int:
        with self._cond:
            if not self._reaped:
                self._kill_stragglers(attempt.popen.pid)
            returncode = attempt.popen.wait()
            self._reaped = True
        for pipe in (attempt.popen.stdout, attempt.popen.stderr):
            if pipe is not None:
                pipe.close()
        return returncode

    @staticmethod
    def _exit_notifier(pid: int) -> tuple[int, threading.Thread | None]:
        """A file descriptor that becomes readable when ``pid`` exits, without reaping it.

        A pidfd where the kernel has them; otherwise a thread blocked in
        ``waitid(WNOWAIT)`` that writes to a pipe.
        """
        with contextlib.suppress(AttributeError, OSError):
            return os.pidfd_open(pid), None
        read_fd, write_fd = os.pipe()

        def wait_then_tell() -> None:
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            os.write(write_fd, b"x")
            os.close(write_fd)

        thread = threading.Thread(target=wait_then_tell, name=f"waitid-{pid}", daemon=True)
        thread.start()
        return read_fd, thread

    @staticmethod
    def _kill_stragglers(pgid: int) -> None:
        # The leader is a zombie until we reap it, so this group id is still ours.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def _take(self, attempt: _Attempt, partial: dict[int, bytes], fd: int, chunk: bytes) -> None:
        data = partial[fd] + chunk
        *lines, rest = data.split(b"\n")
        while len(rest) > _MAX_LINE:  # a line with no end in sight: cut it
            lines.append(rest[:_MAX_LINE])
            rest = rest[_MAX_LINE:]
        partial[fd] = rest
        for raw in lines:
            self._line(attempt, raw)

    def _flush(self, attempt: _Attempt, partial: dict[int, bytes], fd: int) -> None:
        rest = partial.pop(fd, b"")
        if rest:
            self._line(attempt, rest)

    def _line(self, attempt: _Attempt, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        attempt.scanner.feed(line)
        bound: int | None = None
        with self._cond:
            self._tail.append(line)
            if self._port is None and (bound := parse_listening(line)) is not None:
                self._port = bound
                self._cond.notify_all()
        if bound is not None:
            self._update_ledger_port(attempt, bound)
        if self._log_file is not None:
            try:
                self._write_log(self._log_file, line)
            except (OSError, ValueError) as exc:
                log.warning("cannot write %s: %s; no longer logging to it", self.log_path, exc)
                self._log_file = None
        if self._on_line is not None:
            try:
                self._on_line(line)
            except Exception:
                log.exception("on_line callback of llama-server pid %s raised", attempt.popen.pid)

    def _update_ledger_port(self, attempt: _Attempt, port: int) -> None:
        if attempt.entry is not None:
            attempt.entry = msgspec.structs.replace(attempt.entry, port=port)
            self._write_ledger(attempt.entry)

    def _report(self, attempt: _Attempt, returncode: int) -> None:
        status, code, signame = _exit_status(returncode)
        with self._cond:
            tail = tuple(self._tail)[-EXIT_TAIL_LINES:]
            report = ProcessExit(
                pid=attempt.popen.pid,
                status=status,
                code=code,
                signal=signame,
                requested=self._stop_requested,
                failure=attempt.scanner.kind,
                failure_line=attempt.scanner.evidence,
                tail=tail,
                runtime_s=round(time.monotonic() - attempt.started, 6),
            )
        self._cleanup_files()
        with self._cond:
            self._exit = report
            self._cond.notify_all()
        _live.discard(self)
        if report.requested:
            log.info("%s", report.describe())
        else:
            log.warning("%s", report.describe())
        if self._on_exit is not None:
            try:
                self._on_exit(report)
            except Exception:
                log.exception("on_exit callback of llama-server pid %s raised", report.pid)

    def _cleanup_files(self) -> None:
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None

    @staticmethod
    def _write_log(handler: RotatingFileHandler, line: str) -> None:
        # Not handler.emit(): its errors go to logging's handleError, and a full disk
        # must reach the caller, which then stops logging instead of spamming stderr.
        if handler.shouldRollover(logging.makeLogRecord({"msg": line})):
            handler.doRollover()
        stream = handler.stream
        if stream is None:  # closed by a failed rollover: treat like a write error
            raise ValueError("log file closed")
        stream.write(line + "\n")
        stream.flush()

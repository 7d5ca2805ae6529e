"""The owner's side of the lifeline guard (see ``guard.py``).

One guard process runs while this Python process owns at least one server. Servers are
registered right after spawn and removed after they are reaped; when the last one goes,
the pipe is closed and the guard exits, so an idle program keeps no helper process.
A guard that died is replaced and told about every live server again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

__all__ = ["Lifeline", "lifeline"]

log = logging.getLogger("llama_actors.process")

_GUARD = str(Path(__file__).with_name("guard.py"))
_GUARD_EXIT_WAIT = 2.0


class Lifeline:
    """Registers servers with a guard that kills them if this process dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._guard: subprocess.Popen[bytes] | None = None
        self._servers: dict[int, dict[str, object]] = {}

    @property
    def guard_pid(self) -> int | None:
        """The guard's pid while one runs (for tests and diagnostics)."""
        with self._lock:
            return self._guard.pid if self._guard is not None else None

    def add(self, pid: int, private_dir: str | None, ledger_file: str | None) -> None:
        message: dict[str, object] = {
            "op": "add",
            "pid": pid,
            "dir": private_dir or "",
            "ledger": ledger_file or "",
        }
        with self._lock:
            self._servers[pid] = message
            self._send(message)

    def remove(self, pid: int) -> None:
        with self._lock:
            if self._servers.pop(pid, None) is None:
                return
            if self._servers:
                self._send({"op": "remove", "pid": pid})
            else:
                self._close_guard()

    def _send(self, message: dict[str, object]) -> None:
        if self._guard is None:
            self._start_guard()  # it is told about every live server, this one included
            return
        try:
            _pipe(self._guard).write((json.dumps(message) + "\n").encode())
            _pipe(self._guard).flush()
        except (OSError, ValueError):
            # The guard died: start another and tell it about every live server.
            self._discard_guard()
            self._start_guard()

    def _start_guard(self) -> subprocess.Popen[bytes] | None:
        try:
            guard = subprocess.Popen(
                [sys.executable, "-I", "-S", _GUARD],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            log.warning(
                "cannot start the lifeline guard (%s): servers started now outlive this "
                "process if it is killed; `llama-actors reap` stops them later",
                exc,
            )
            return None
        self._guard = guard
        with contextlib.suppress(OSError, ValueError):
            for message in self._servers.values():
                _pipe(guard).write((json.dumps(message) + "\n").encode())
            _pipe(guard).flush()
        return guard

    def _discard_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            with contextlib.suppress(OSError):
                guard.kill()
            self._finish(guard)

    def _close_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            self._finish(guard)

    @staticmethod
    def _finish(guard: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            if guard.stdin is not None:
                guard.stdin.close()
        try:
            guard.wait(timeout=_GUARD_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            guard.kill()
            guard.wait()

    def _after_fork_in_child(self) -> None:
        # A forked child must not keep the parent's guard alive, nor manage its servers.
        self._lock = threading.Lock()
        guard, self._guard = self._guard, None
        self._servers = {}
        if guard is not None and guard.stdin is not None:
            with contextlib.suppress(OSError):
                guard.stdin.close()


def _pipe(guard: subprocess.Popen[bytes]) -> IO[bytes]:
    if guard.stdin is None:
        raise ValueError("the guard was started without a pipe")
    return guard.stdin


lifeline = Lifeline()
os.register_at_fork(after_in_child=lifeline._after_fork_in_child)

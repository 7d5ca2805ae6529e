"""Helpers shared by the example tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterable
from pathlib import Path

#: The ``fake_binary`` fixture: make(help_text, version_text, name) -> path of the program.
FakeBinary = Callable[..., Path]


def probe_calls(binary: Path) -> list[str]:
    """The arguments a fake binary was run with, one per run."""
    calls = binary.parent / "calls"
    return calls.read_text().split() if calls.exists() else []


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until every pid has exited (a zombie counts as exited); return those that
    are still running after ``timeout`` seconds. Event-driven through pidfds, so it
    also works for processes that are not our children."""
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    try:
        while fds and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)

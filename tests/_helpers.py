"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from llama_actors import BootSpec, InstancePolicy, RestartPolicy
from llama_actors.testing.fake import fake_boot_spec
from llama_actors.testing.fake_server import write_control

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


#: A policy for runtime tests on the fake server: quick restarts, quick verdicts. A probe
#: of the fake answers in milliseconds; its timeout and slow mark are a second, so a busy
#: machine never turns a probe that was merely late into a health change a test counts.
#: The restart window is far longer than the few seconds four crash cycles take.
FAST = InstancePolicy(
    restart=RestartPolicy(backoff_initial_ms=20, backoff_max_ms=200, max_restarts=3, window_s=120),
    probe_timeout_ms=1_000,
    slow_probe_ms=1_000,
    unavailable_after=2,
    wedged_restart_ms=None,
    drain_timeout_ms=2_000,
)
WAIT = 15.0


class Fake:
    """Specs for the fake server in one folder, and its control file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def spec(self, behaviour: dict[str, str] | None = None, **fields: Any) -> BootSpec:
        fields.setdefault("health_interval_ms", 100)
        fields.setdefault("readiness_interval_ms", 20)
        fields.setdefault("stop_timeout_ms", 2_000)
        return fake_boot_spec(self.folder, behaviour=behaviour, **fields)

    def set(self, **changes: Any) -> None:
        write_control(self.folder / "control.json", **changes)

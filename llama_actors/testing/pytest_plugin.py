"""A pytest plugin that fails any test leaving a child process of the test run behind.

Enable with ``-p llama_actors.testing.pytest_plugin`` (needs psutil). It only ever
looks at descendants of the pytest process itself, and kills only those it reports.
"""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest


def _descendants() -> dict[int, psutil.Process]:
    try:
        return {p.pid: p for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return {}


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(procs, timeout=5.0)


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid}"


@pytest.fixture(autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    """After each test, no child process that the test started may still be running."""
    before = set(_descendants())
    yield
    leftover = [p for pid, p in _descendants().items() if pid not in before]
    if not leftover:
        return
    # A process that is exiting right now gets a short grace period, never a sleep loop.
    _gone, alive = psutil.wait_procs(leftover, timeout=1.0)
    alive = _running(alive)
    if alive:
        described = "; ".join(_describe(p) for p in alive)
        _kill(alive)
        pytest.fail(f"the test left processes running (now killed): {described}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The whole run must end with no descendant of pytest still running."""
    alive = _running(list(_descendants().values()))
    if alive:
        described = "; ".join(_describe(p) for p in alive)
        _kill(alive)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nllama_actors: processes left behind by the test run (now killed): {described}")

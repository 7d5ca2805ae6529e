"""A pytest plugin that fails any test leaving a server or child process behind.

Enable with ``-p llama_actors.testing.pytest_plugin`` (needs psutil). It only ever
looks at descendants of the pytest process itself and at the servers in the run's own
ledger, and kills only those it reports. It also points ``LLAMA_ACTORS_STATE_DIR`` at a
folder of the run's own (unless already set), so tests never touch the user's state,
and offers the ``fake_llama`` fixture.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from llama_actors._ledger import Ledger, LedgerEntry
from llama_actors._state import ENV_STATE_DIR

if TYPE_CHECKING:
    from llama_actors.testing.fake import FakeLlama


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


_ACTOR_THREADS = ("Supervisor-", "LeaseBroker-", "BackendActor-", "HealthPoller-")


def _runtime_threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if t.name.startswith(_ACTOR_THREADS) or t.name == "llama-actors-scheduler"
    }


@pytest.fixture(autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    """After each test, no child process that the test started may still be running,
    and no runtime actor thread either (a Runtime that was not closed)."""
    before = set(_descendants())
    threads_before = _runtime_threads()
    yield
    open_threads = sorted(t.name for t in _runtime_threads() - threads_before if t.is_alive())
    leftover = [p for pid, p in _descendants().items() if pid not in before]
    if open_threads:
        from llama_actors._runtime import close_open_runtimes

        close_open_runtimes()
        pytest.fail(f"the test left a Runtime open (now closed); its threads: {open_threads}")
    if not leftover:
        return
    # A process that is exiting right now gets a short grace period, never a sleep loop.
    _gone, alive = psutil.wait_procs(leftover, timeout=1.0)
    alive = _running(alive)
    if alive:
        described = "; ".join(_describe(p) for p in alive)
        _kill(alive)
        pytest.fail(f"the test left processes running (now killed): {described}")


_own_state_dir: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _own_state_dir
    if not os.environ.get(ENV_STATE_DIR):
        _own_state_dir = tempfile.mkdtemp(prefix="llama-actors-test-state-")
        os.environ[ENV_STATE_DIR] = _own_state_dir


def _stray_servers() -> list[LedgerEntry]:
    """Live servers in the ledger that this run started (all of them, in a state
    folder the plugin made; else those this pytest process owns)."""
    ledger = Ledger(os.environ[ENV_STATE_DIR])
    return [
        e
        for e in ledger.entries()
        if e.server_alive() and (_own_state_dir is not None or e.owner_pid == os.getpid())
    ]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The whole run must end with no descendant of pytest, and no server in the run's
    ledger, still running (a server whose owner died is no longer our descendant)."""
    alive = _running(list(_descendants().values()))
    stray = _stray_servers()
    described = "; ".join(_describe(p) for p in alive)
    described += "".join(f"; ledger: server pid {e.pid} port {e.port}" for e in stray)
    if alive or stray:
        _kill(alive)
        for entry in stray:
            try:
                _kill([psutil.Process(entry.pid)])
            except psutil.Error:
                continue
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nllama_actors: processes left behind by the test run (now killed): {described}")
    if _own_state_dir is not None:
        shutil.rmtree(_own_state_dir, ignore_errors=True)


StartFake = Callable[..., "FakeLlama"]


@pytest.fixture
def fake_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartFake]:
    """Start fake llama-servers: ``fake_llama(behaviour={"load_seconds": "1"}, **spec)``.

    Each gets its own folder (model, control and argv files, log); all are stopped when
    the test ends. See ``llama_actors.testing.fake_server`` for the behaviours.
    """
    from llama_actors.testing.fake import start_fake

    started: list[FakeLlama] = []

    def start(**kwargs: Any) -> FakeLlama:
        folder: Path = tmp_path_factory.mktemp("fake-llama")
        fake = start_fake(folder, **kwargs)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop(timeout=2.0)

"""A pytest plugin that fails any test leaving a server or child process behind, or
during which the library swallowed an error.

Enable with ``-p llama_actors.testing.pytest_plugin`` (needs psutil). It

- marks the run: ``LLAMA_ACTORS_TEST_SESSION`` gets a token of this run, which every
  process a test starts inherits (its children, servers, and servers re-parented to
  init once their owner died), so it finds what a test left running wherever it went;
  it kills only processes carrying the token and descendants of pytest;
- points ``LLAMA_ACTORS_STATE_DIR`` and ``XDG_STATE_HOME`` at folders of the run's own,
  whatever they were, so no test touches the user's state, and fails a test that uses
  the default state folder all the same (unsetting ``LLAMA_ACTORS_STATE_DIR``);
- fails a test during which the library logs an error with a traceback (ERROR or above
  with exception info, on ``llama_actors`` or a logger below it, from any thread);
  ``@pytest.mark.logs_errors(PATTERN, ...)`` allows the ones a test causes on purpose;
- offers the ``fake_llama`` fixture.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from llama_actors._base.state import ENV_STATE_DIR
from llama_actors._process.ledger import Ledger, LedgerEntry, argv_digest

if TYPE_CHECKING:
    from llama_actors.testing.fake import FakeLlama

#: Holds this run's token (after those of any run that started this one), inherited by
#: every process the run starts.
ENV_TEST_SESSION = "LLAMA_ACTORS_TEST_SESSION"
ENV_XDG_STATE_HOME = "XDG_STATE_HOME"
_REDIRECTED = (ENV_STATE_DIR, ENV_XDG_STATE_HOME)
#: The logger whose errors (and those of every logger below it) fail a test.
LIBRARY_LOGGER = "llama_actors"
MARKER = (
    "logs_errors(*patterns): this test makes the library log an error with a traceback "
    "on purpose; each pattern (a regular expression, searched in 'LOGGER: MESSAGE' and the "
    "formatted exception) allows the records it matches, and any other such record still "
    "fails the test"
)


@dataclass
class _Run:
    """What the plugin keeps for one pytest run."""

    token: str
    root: Path  # the run's own folder: its state folder and its XDG state home
    saved_env: dict[str, str | None] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        """``$LLAMA_ACTORS_STATE_DIR`` for the run."""
        return self.root / "state"

    @property
    def xdg_state_home(self) -> Path:
        """``$XDG_STATE_HOME`` for the run."""
        return self.root / "xdg-state"

    @property
    def default_state_dir(self) -> Path:
        """Where the library goes without ``$LLAMA_ACTORS_STATE_DIR``: in a program run
        outside the tests, the user's own state folder. No test may use it."""
        return self.xdg_state_home / "llama_actors"


_RUN = pytest.StashKey[_Run]()


def _run(config: pytest.Config) -> _Run | None:
    return config.stash.get(_RUN, None)


# -- processes --------------------------------------------------------------------------


def _descendants() -> set[psutil.Process]:
    try:
        return set(psutil.Process().children(recursive=True))
    except psutil.Error:
        return set()


def _marked(token: str) -> set[psutil.Process]:
    """Every process whose environment carries ``token`` (zombies have none left)."""
    found = set()
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if token in proc.environ().get(ENV_TEST_SESSION, "").split():
                found.add(proc)
        except psutil.Error:
            continue
    return found


def _watched(run: _Run | None) -> set[psutil.Process]:
    """The processes this run answers for: pytest's descendants, and every process
    carrying the run's token wherever it was re-parented."""
    procs = _descendants()
    if run is not None:
        procs |= _marked(run.token)
    return procs


def _running(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
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


def _settle(leftover: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of ``leftover`` still running after a short grace period for processes
    that are exiting right now (a wait on their exit, never a sleep loop). While a
    :func:`~llama_actors.testing.ray.local_cluster` is open, Ray's own processes (its
    raylets, GCS and worker pool come and go with the cluster, which checks they end
    when it shuts down) are not a test's leftovers; servers its agents start are."""
    from llama_actors.testing import ray as local_ray

    candidates = list(leftover)
    if local_ray.open_clusters():
        candidates = [p for p in candidates if not local_ray.is_ray_process(p)]
    _gone, alive = psutil.wait_procs(candidates, timeout=1.0)
    return sorted(_running(alive), key=lambda p: p.pid)


_ACTOR_THREADS = (
    "Supervisor-",
    "LeaseBroker-",
    "BackendActor-",
    "HealthPoller-",
    "HostMonitor-",
    "HostedInstance-",
)


def _runtime_threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if t.name.startswith(_ACTOR_THREADS) or t.name == "llama-actors-scheduler"
    }


# -- the default state folder ------------------------------------------------------------


def _fingerprint(folders: Iterable[Path]) -> dict[str, int | None]:
    """The modification times of each folder and of its sub-folders (``servers``,
    ``logs``, ``up``, ...): a server's ledger entry or log, or a status file, added or
    removed anywhere in them changes one. None for a folder that does not exist."""
    out: dict[str, int | None] = {}
    for folder in folders:
        try:
            out[str(folder)] = folder.stat().st_mtime_ns
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        out[entry.path] = entry.stat(follow_symlinks=False).st_mtime_ns
        except OSError:
            out.setdefault(str(folder), None)
    return out


def _changed(before: dict[str, int | None], after: dict[str, int | None]) -> list[str]:
    return sorted(
        path for path in before.keys() | after.keys() if before.get(path) != after.get(path)
    )


# -- errors the library logged ----------------------------------------------------------


class LoggedErrors(logging.Handler):
    """Collects the records at ERROR or above that carry a traceback, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None and record.exc_info[0] is not None:
            self.records.append(record)

    @staticmethod
    def describe(record: logging.LogRecord) -> str:
        """``LOGGER: MESSAGE`` and the formatted exception."""
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: show it as given
            message = str(record.msg)
        text = f"{record.name}: {message}"
        if record.exc_info is not None:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        return text


def _allowed_patterns(item: pytest.Item) -> list[re.Pattern[str]]:
    patterns: list[re.Pattern[str]] = []
    for mark in item.iter_markers("logs_errors"):
        if not mark.args:
            pytest.fail(
                "@pytest.mark.logs_errors needs at least one pattern: the error the test "
                "causes on purpose (any other still fails it)",
                pytrace=False,
            )
        patterns += [re.compile(str(arg)) for arg in mark.args]
    return patterns


@pytest.fixture(autouse=True)
def _no_error_logged(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if the library logged an error with a traceback meanwhile (on any
    thread: actors, the scheduler and the signal emitter log and go on), unless the
    test's ``logs_errors`` marker allows it."""
    allowed = _allowed_patterns(request.node)
    handler = LoggedErrors()
    logger = logging.getLogger(LIBRARY_LOGGER)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    texts = [LoggedErrors.describe(record) for record in handler.records]
    unexpected = [t for t in texts if not any(p.search(t) for p in allowed)]
    if unexpected:
        shown = "\n\n".join(unexpected[:5])
        more = f"\n\n... and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        pytest.fail(
            f"the library logged {len(unexpected)} error(s) with a traceback during the test "
            "(a swallowed exception; if the test causes it on purpose, mark it "
            f"@pytest.mark.logs_errors(PATTERN)):\n\n{shown}{more}",
            pytrace=False,
        )


# -- after each test ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_process_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, no process that the test started may still be running (a child,
    or anything carrying the run's token, wherever it was re-parented), no runtime actor
    thread either (a Runtime that was not closed), and the default state folder must be
    as it was (unused)."""
    run = _run(request.config)
    before = _watched(run)
    threads_before = _runtime_threads()
    default_before = _fingerprint([run.default_state_dir]) if run is not None else {}
    yield
    problems = []
    open_threads = sorted(t.name for t in _runtime_threads() - threads_before if t.is_alive())
    if open_threads:
        from llama_actors._runtime.runtime import close_open_runtimes

        close_open_runtimes()
        problems.append(f"the test left a Runtime open (now closed); its threads: {open_threads}")
    alive = _settle(_watched(run) - before)
    if alive:
        described = "; ".join(_describe(p) for p in alive)
        _kill(alive)
        problems.append(f"the test left processes running (now killed): {described}")
    default_after = _fingerprint([run.default_state_dir]) if run is not None else {}
    if changed := _changed(default_before, default_after):
        problems.append(_used_the_default_state_dir(changed))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _used_the_default_state_dir(changed: list[str]) -> str:
    return (
        f"the test used the default state folder (changed: {', '.join(changed)}): a program "
        f"run that way outside the tests writes into the user's own; unset {ENV_STATE_DIR} "
        "falls back to it. Give the Runtime a state_dir, or leave the run's own in place"
    )


# -- the run ------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    saved = {name: os.environ.get(name) for name in (*_REDIRECTED, ENV_TEST_SESSION)}
    run = _Run(uuid.uuid4().hex, Path(tempfile.mkdtemp(prefix="llama-actors-test-")), saved)
    run.state_dir.mkdir()
    # Whatever they were: no test may touch the user's own state, not even one that
    # unsets LLAMA_ACTORS_STATE_DIR (the default under XDG_STATE_HOME is the run's too).
    os.environ[ENV_STATE_DIR] = str(run.state_dir)
    os.environ[ENV_XDG_STATE_HOME] = str(run.xdg_state_home)
    os.environ[ENV_TEST_SESSION] = " ".join(filter(None, (saved[ENV_TEST_SESSION], run.token)))
    config.stash[_RUN] = run


def pytest_unconfigure(config: pytest.Config) -> None:
    run = _run(config)
    if run is None:
        return
    for name, value in run.saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(run.root, ignore_errors=True)
    del config.stash[_RUN]


def _ledger_folders(session: pytest.Session, run: _Run) -> list[Path]:
    """The state folders of this run: its own, the default, and every one under
    pytest's base temporary folder (``tmp_path / "state"`` and the like)."""
    folders = [run.state_dir, run.default_state_dir]
    factory = getattr(session.config, "_tmp_path_factory", None)
    base = getattr(factory, "_basetemp", None)  # None: no test asked for a tmp_path
    if isinstance(base, Path):
        for top, dirs, _files in os.walk(base):
            depth = len(Path(top).relative_to(base).parts)
            if "servers" in dirs:
                folders.append(Path(top))
            if depth >= 3:
                dirs.clear()
    return folders


def _stray_servers(folders: Iterable[Path]) -> list[tuple[LedgerEntry, psutil.Process]]:
    """Live servers in the ledgers of this run's state folders: the pid still has the
    recorded start time and command line (a test may record entries of its own, of
    pytest itself even: those are no servers), and is not this process."""
    found = []
    for folder in folders:
        for entry in Ledger(folder).entries():
            if entry.pid == os.getpid() or not entry.server_alive():
                continue
            try:
                proc = psutil.Process(entry.pid)
                if argv_digest(proc.cmdline()) == entry.argv_digest:
                    found.append((entry, proc))
            except psutil.Error:
                continue
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The whole run must end with nothing it started still running: no descendant of
    pytest, no process carrying the run's token (servers re-parented to init, those of
    examples, doc blocks, the demo and ``llama-actors up`` included), no live server in
    any ledger of the run's state folders; and the default state folder unused."""
    run = _run(session.config)
    alive = _settle(_watched(run))
    stray = _stray_servers(_ledger_folders(session, run)) if run is not None else []
    stray = [(e, p) for e, p in stray if p not in alive]  # no mark: not ours to kill
    problems = []
    if alive:
        described = "; ".join(_describe(p) for p in alive)
        _kill(alive)
        problems.append(f"processes left behind by the test run (now killed): {described}")
    if stray:
        described = "; ".join(f"server pid {e.pid} port {e.port}" for e, _ in stray)
        problems.append(
            "servers left running in the run's ledgers, without the run's mark (so not "
            f"killed; started with an environment of their own?): {described}"
        )
    if run is not None and run.default_state_dir.exists():
        problems.append(_used_the_default_state_dir([str(run.default_state_dir)]))
    if problems:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("".join(f"\nllama_actors: {text}" for text in problems))


# -- fakes --------------------------------------------------------------------------------

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

"""The ledger of live servers, so a new owner can reap what a dead one left behind.

Each server this library starts has one small JSON file under ``STATE_DIR/servers``
from spawn until it is reaped: its pid and start time (so a reused pid is never
mistaken for it), its port, a hash of its argv, its owner's pid and start time, and its
private-file folder. The lifeline guard removes entries when it kills an owner's
servers; :meth:`Ledger.reap_leftovers` handles whatever escaped even that (the guard
itself killed, the machine's owner process frozen, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path

import msgspec
import psutil

from llama_actors._base.state import default_state_dir

__all__ = ["Ledger", "LedgerEntry", "argv_digest", "process_start_time"]

_REAP_GRACE = 2.0


def argv_digest(argv: Sequence[str]) -> str:
    """A digest of a command line, to recognise a server without storing its argv."""
    return hashlib.sha256("\0".join(argv).encode("utf-8", "surrogateescape")).hexdigest()


def process_start_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), or None if there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _same_process(pid: int, start_time: float) -> bool:
    started = process_start_time(pid)
    return started is not None and abs(started - start_time) < 0.05


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One server as the ledger knows it."""

    pid: int
    start_time: float
    argv_digest: str
    owner_pid: int
    owner_start_time: float
    port: int | None = None
    host: str | None = None
    private_dir: str | None = None
    log_path: str | None = None
    recorded_at: float = 0.0

    def server_alive(self) -> bool:
        """True while the pid still belongs to the server this entry recorded."""
        return _same_process(self.pid, self.start_time)

    def owner_alive(self) -> bool:
        return _same_process(self.owner_pid, self.owner_start_time)


class Ledger:
    """The ``servers`` folder of a state directory."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        base = Path(state_dir) if state_dir is not None else default_state_dir()
        self.path = base / "servers"

    def file_for(self, pid: int) -> Path:
        return self.path / f"{pid}.json"

    def record(self, entry: LedgerEntry) -> Path:
        """Write (or replace) ``entry`` atomically; returns its file."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.file_for(entry.pid)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".entry-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(msgspec.json.encode(entry))
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return target

    def remove(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            self.file_for(pid).unlink()

    def entries(self) -> list[LedgerEntry]:
        """Every readable entry; unreadable files are left alone."""
        out: list[LedgerEntry] = []
        try:
            files = sorted(self.path.glob("*.json"))
        except OSError:
            return out
        for file in files:
            try:
                out.append(msgspec.json.decode(file.read_bytes(), type=LedgerEntry))
            except (OSError, msgspec.DecodeError):
                continue
        return out

    def leftovers(self) -> list[LedgerEntry]:
        """Entries whose owner process is gone: servers nobody will stop."""
        return [e for e in self.entries() if not e.owner_alive()]

    def reap_leftovers(self, grace: float = _REAP_GRACE) -> list[LedgerEntry]:
        """Stop every server a dead owner left behind and forget its entry.

        A server is signalled only when its pid still has the recorded start time and
        its command line matches the recorded digest, so a reused pid is never hit.
        SIGTERM first, SIGKILL after ``grace`` seconds. Returns the entries that still
        had a live server.
        """
        victims: list[tuple[LedgerEntry, psutil.Process]] = []
        for entry in self.leftovers():
            proc = self._verified(entry)
            if proc is not None:
                with contextlib.suppress(OSError):
                    os.killpg(entry.pid, signal.SIGTERM)
                victims.append((entry, proc))
            else:
                self._forget(entry)
        _gone, alive = psutil.wait_procs([p for _, p in victims], timeout=grace)
        for proc in alive:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=grace)
        for entry, _ in victims:
            self._forget(entry)
        return [entry for entry, _ in victims]

    def _verified(self, entry: LedgerEntry) -> psutil.Process | None:
        if not entry.server_alive():
            return None
        try:
            proc = psutil.Process(entry.pid)
            if argv_digest(proc.cmdline()) != entry.argv_digest:
                return None
            if os.getpgid(entry.pid) != entry.pid:
                return None
        except (psutil.Error, OSError):
            return None
        return proc

    def _forget(self, entry: LedgerEntry) -> None:
        if entry.private_dir:
            shutil.rmtree(entry.private_dir, ignore_errors=True)
        self.remove(entry.pid)

"""No orphans: servers die with the Python process that owns them, however it dies,
and a new owner reaps from the ledger whatever a dead one left behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from llama_actors.lowlevel import Ledger

from ._helpers import wait_gone

OWNER = """\
import json, os, signal, sys
from llama_actors._process.lifeline import lifeline
from llama_actors.testing.fake import start_fake

folder, mode = sys.argv[1], sys.argv[2]
first = start_fake(folder + "/a", behaviour={"grandchild": "1"})
if mode == "guard-replaced":
    os.kill(lifeline.guard_pid, signal.SIGKILL)  # the next registration must replace it
second = start_fake(folder + "/b")
if mode == "no-guard":
    os.kill(lifeline.guard_pid, signal.SIGKILL)
servers = [first.process.pid, second.process.pid]
grandchild = next(
    int(line.rsplit(" ", 1)[1]) for line in first.process.tail(50) if "grandchild pid" in line
)
print(json.dumps({"owner": os.getpid(), "servers": servers, "grandchild": grandchild,
                  "guard": lifeline.guard_pid}), flush=True)
signal.pause()
"""


RunOwner = Callable[[str], dict[str, Any]]


def kill_owner(info: dict[str, Any]) -> None:
    """SIGKILL the owner process (our child) and reap it."""
    owner = psutil.Process(info["owner"])
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[RunOwner]:
    """Runs OWNER in a child Python; kills whatever it started at the end, by pid."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    procs: list[subprocess.Popen[str]] = []
    pids: list[int] = []

    def run(mode: str) -> dict[str, Any]:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the owner died before starting its servers"
        info: dict[str, Any] = json.loads(line)
        pids.extend([*info["servers"], info["grandchild"]])
        return info

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    for pid in pids:  # only if a test failed half-way: these are ours
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


def test_servers_and_their_grandchildren_die_within_a_second_of_their_owner_being_sigkilled(
    owner: RunOwner,
) -> None:
    info = owner("plain")
    assert all(psutil.Process(pid).ppid() == info["owner"] for pid in info["servers"])
    kill_owner(info)
    assert wait_gone([*info["servers"], info["grandchild"]], timeout=1.0) == []
    assert Ledger().entries() == []


def test_a_guard_that_died_is_replaced_and_still_protects_every_server(
    owner: RunOwner,
) -> None:
    info = owner("guard-replaced")
    assert info["guard"] is not None
    kill_owner(info)
    assert wait_gone([*info["servers"], info["grandchild"]], timeout=1.0) == []


def test_a_new_owner_reaps_servers_a_dead_owner_left_behind(
    owner: RunOwner,
) -> None:
    info = owner("no-guard")
    servers = info["servers"]
    kill_owner(info)
    # Without its guard, the dead owner's servers are still running: left behind.
    assert wait_gone(servers, timeout=0.2) == sorted(servers)
    ledger = Ledger()
    assert sorted(e.pid for e in ledger.leftovers()) == sorted(servers)

    reaped = ledger.reap_leftovers()

    assert sorted(e.pid for e in reaped) == sorted(servers)
    assert wait_gone([*servers, info["grandchild"]], timeout=5) == []
    assert ledger.entries() == []


def test_reaping_never_signals_a_process_that_reused_a_recorded_pid(tmp_path: Path) -> None:
    from llama_actors._process.ledger import LedgerEntry, argv_digest

    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ledger = Ledger(tmp_path)
        started = psutil.Process(bystander.pid).create_time()
        dead_owner: dict[str, Any] = {"owner_pid": 2**22 + 1, "owner_start_time": 1.0}
        ledger.record(  # same pid, another start time: the pid was reused
            LedgerEntry(pid=bystander.pid, start_time=started - 100, argv_digest="x", **dead_owner)
        )
        assert ledger.reap_leftovers() == []
        assert bystander.poll() is None
        ledger.record(  # right start time, another command line
            LedgerEntry(pid=bystander.pid, start_time=started, argv_digest="y", **dead_owner)
        )
        assert ledger.reap_leftovers() == []
        assert bystander.poll() is None
        assert ledger.entries() == []
        ledger.record(
            LedgerEntry(
                pid=bystander.pid,
                start_time=started,
                argv_digest=argv_digest(["sleep", "60"]),
                **dead_owner,
            )
        )
        assert [e.pid for e in ledger.reap_leftovers()] == [bystander.pid]
        assert wait_gone([bystander.pid], timeout=5) == []
    finally:
        if bystander.poll() is None:
            bystander.kill()
        bystander.wait()


def test_servers_of_a_live_owner_are_not_leftovers(tmp_path: Path) -> None:
    from llama_actors._process.ledger import LedgerEntry

    ledger = Ledger(tmp_path)
    me = psutil.Process()
    ledger.record(
        LedgerEntry(
            pid=me.pid,
            start_time=me.create_time(),
            argv_digest="x",
            owner_pid=me.pid,
            owner_start_time=me.create_time(),
        )
    )
    assert ledger.leftovers() == []
    assert ledger.reap_leftovers() == []
    assert len(ledger.entries()) == 1


def test_the_reap_command_lists_then_stops_what_a_dead_owner_left_behind(
    owner: RunOwner, capsys: pytest.CaptureFixture[str]
) -> None:
    from llama_actors._cli.main import main

    info = owner("no-guard")
    servers = info["servers"]
    kill_owner(info)

    assert main(["reap", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert all(f"left behind: pid {pid} port " in listed for pid in servers)
    assert wait_gone(servers, timeout=0.1) == sorted(servers)

    assert main(["reap"]) == 0
    reaped = capsys.readouterr().out
    assert all(f"pid {pid} port " in reaped and "stopped" in reaped for pid in servers)
    assert wait_gone([*servers, info["grandchild"]], timeout=5) == []
    assert main(["reap"]) == 0
    assert "no servers left behind" in capsys.readouterr().out


def test_servers_left_running_at_a_normal_interpreter_exit_get_a_graceful_stop(
    tmp_path: Path,
) -> None:
    script = (
        "import sys\n"
        "from llama_actors.testing.fake import start_fake\n"
        "fake = start_fake(sys.argv[1])\n"
        "print(fake.process.pid, flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    server = int(done.stdout.split()[0])
    assert wait_gone([server], timeout=5) == []
    log = (tmp_path / "server.log").read_text()
    assert "cleaning up before exit" in log  # SIGTERM, not the guard's SIGKILL

"""The lifeline guard: kills an owner's servers the moment the owner dies.

Run by path with the standard library only (``python -I -S guard.py``). Its stdin is
the read end of a pipe whose write end only the owning Python process holds, so EOF
on stdin means the owner is gone, however it died (SIGKILL included). The owner sends
one JSON object per line::

    {"op": "add", "pid": 123, "dir": "/tmp/llama-actors-x", "ledger": "/state/servers/123.json"}
    {"op": "remove", "pid": 123}

On EOF the guard SIGKILLs the process group of every server still registered (after
checking that the pid still belongs to the process it was told about), removes their
private files and ledger entries, and exits. ``PR_SET_PDEATHSIG`` cannot do this job:
it fires when the forking *thread* exits, and the owner's threads come and go.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys


def _start_ticks(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: the process start time, fixed for its life."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _reap(entry: dict[str, object]) -> None:
    pid = entry.get("pid")
    if isinstance(pid, int) and pid > 1:
        ticks = _start_ticks(pid)
        if ticks is not None and ticks == entry.get("ticks"):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
    folder = entry.get("dir")
    if isinstance(folder, str) and folder:
        shutil.rmtree(folder, ignore_errors=True)
    ledger = entry.get("ledger")
    if isinstance(ledger, str) and ledger:
        with contextlib.suppress(OSError):
            os.unlink(ledger)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    servers: dict[int, dict[str, object]] = {}
    for raw in sys.stdin.buffer:
        try:
            message = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(message, dict) or not isinstance(message.get("pid"), int):
            continue
        pid = message["pid"]
        if message.get("op") == "add":
            message["ticks"] = _start_ticks(pid)
            servers[pid] = message
        elif message.get("op") == "remove":
            servers.pop(pid, None)
    for entry in servers.values():
        _reap(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stop one thread of a process and only that one, with ptrace (Linux).

``kill -STOP`` stops a whole process; a llama-server whose decode loop is stuck still
answers ``/health`` from its HTTP threads. Stopping only the server's main thread (the
one that runs the decode loop) with ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT`` makes exactly
that shape. When the tracer goes away the thread is detached and runs on.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

_SEIZE = 0x4206
_INTERRUPT = 0x4207
_DETACH = 17
_WALL = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


def _ptrace(request: int, tid: int) -> None:
    if _libc.ptrace(request, tid, None, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"ptrace({request:#x}, {tid}): {os.strerror(errno)}")


@contextlib.contextmanager
def thread_stopped(tid: int) -> Iterator[None]:
    """Stop thread ``tid`` (a process's main thread has the process's pid) until the
    block ends. Call it from one thread: ptrace belongs to the thread that seized."""
    _ptrace(_SEIZE, tid)
    try:
        _ptrace(_INTERRUPT, tid)
        os.waitpid(tid, _WALL)  # until it is in its ptrace stop
        yield
    finally:
        _ptrace(_DETACH, tid)

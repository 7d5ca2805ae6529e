"""Choosing and checking TCP ports (CONTRACT §1.1).

``port = auto`` prefers ``--port 0``: the server binds a free port itself and logs it,
so no other program can take the port between our choice and its bind. Builds without
that get a port reserved here (bind to port 0, read it, close) and one retry on a bind
failure. An explicit port is checked before spawn so a held port fails fast, naming
the program that holds it.
"""

from __future__ import annotations

import contextlib
import errno
import re
import socket

import psutil

from llama_actors._exceptions import PortInUseError

__all__ = [
    "LISTENING_LINE",
    "check_port_free",
    "find_port_holder",
    "parse_listening",
    "reserve_port",
]

# llama-server logs "... listening on http://HOST:PORT ..." once its socket is bound.
LISTENING_LINE = re.compile(r"listening on https?://(\[[^\]]+\]|[^\s:/]+):(\d+)")


def parse_listening(line: str) -> int | None:
    """The port from a ``listening on http://HOST:PORT`` log line, else None."""
    match = LISTENING_LINE.search(line)
    if match is None:
        return None
    port = int(match.group(2))
    return port if 0 < port < 65536 else None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bindable_host(host: str) -> str:
    # A name such as "localhost" is checked on what it resolves to first.
    if host.replace(".", "").isdigit() or ":" in host:
        return host
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return host
    return str(infos[0][4][0]) if infos else host


def reserve_port(host: str) -> int:
    """A port that was free on ``host`` a moment ago (the OS chose it)."""
    addr = _bindable_host(host)
    with socket.socket(_family(addr), socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return int(sock.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUseError` when ``host:port`` cannot be bound right now.

    The test bind sets ``SO_REUSEADDR`` as llama-server does, so a port that only has
    connections in TIME_WAIT counts as free, while a bound or listening socket does not.
    """
    addr = _bindable_host(host)
    with socket.socket(_family(addr), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return  # not ours to judge (e.g. an address this host lacks): spawn decides
            pid, name = find_port_holder(port)
            raise PortInUseError(host, port, pid, name) from None


def find_port_holder(port: int) -> tuple[int | None, str | None]:
    """The pid and name of a process with a socket bound to ``port``, where visible."""
    with contextlib.suppress(psutil.Error, OSError):
        conns = psutil.net_connections(kind="inet")
        # Prefer a listener; a socket that is only bound has no remote address either.
        for conn in sorted(conns, key=lambda c: c.status != psutil.CONN_LISTEN):
            if conn.laddr and conn.laddr.port == port and not conn.raddr and conn.pid:
                try:
                    return conn.pid, psutil.Process(conn.pid).name()
                except psutil.Error:
                    return conn.pid, None
    return None, None

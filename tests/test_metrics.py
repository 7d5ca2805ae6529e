"""Prometheus metrics of a runtime, scraped over HTTP the way Prometheus would."""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llama_actors import (
    BootSpec,
    Capacity,
    InstancePolicy,
    LlamaActorsError,
    MemoryNeed,
    MemoryStatistics,
    Runtime,
    UsageError,
    signals,
)
from llama_actors._kernel.load import ServerLoad
from llama_actors._llama.backend import LlamaCppBackend
from llama_actors._runtime import backend as backend_actor
from llama_actors.metrics import MetricsServer, RuntimeMetrics
from llama_actors.testing.signals import SignalRecorder

from ._helpers import FAST, WAIT, Fake

STATES = ("starting", "ready", "stopping", "stopped", "failed")
HEALTHS = ("unknown", "healthy", "degraded", "unavailable")
LOAD_METRICS = (
    "llama_actors_instance_slots",
    "llama_actors_instance_slots_busy",
    "llama_actors_instance_requests_processing",
    "llama_actors_instance_requests_deferred",
    "llama_actors_instance_prompt_tokens_per_second",
    "llama_actors_instance_generation_tokens_per_second",
    "llama_actors_instance_kv_cache_tokens",
    "llama_actors_instance_kv_cache_ratio",
    "llama_actors_instance_saturated",
)
#: For instances whose load a test puts on the board: the poller never reads the server's,
#: so nothing overwrites it.
UNREAD = msgspec.structs.replace(FAST, load_interval_ms=None)
#: The fake's /slots and /metrics read ten times a second.
READ_OFTEN = msgspec.structs.replace(FAST, load_interval_ms=100)


class Scrape:
    """One scrape's samples, looked up by name and a subset of their labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def find(self, name: str, **labels: str) -> list[Any]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        found = self.find(name, **labels)
        assert len(found) == 1, f"{len(found)} samples {name} {labels} in:\n{self.text}"
        return float(found[0].value)

    def one_hot(self, name: str, label: str, iid: str) -> dict[str, float]:
        return {s.labels[label]: s.value for s in self.find(name, instance_id=iid)}


class Probes:
    """Counts ``probe_completed`` sends (not a transition, so SignalRecorder skips it)."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def __enter__(self) -> Probes:
        signals.probe_completed.connect(self._receive, weak=False)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signals.probe_completed.disconnect(self._receive)

    def _receive(self, _sender: str, **_: Any) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.count >= count, timeout):
                raise AssertionError(f"only {self.count} of {count} probes within {timeout:g}s")


@pytest.fixture
def metrics(runtime: Runtime) -> Iterator[RuntimeMetrics]:
    with RuntimeMetrics(runtime) as m:
        yield m


@pytest.fixture
def server(metrics: RuntimeMetrics) -> Iterator[MetricsServer]:
    with metrics.serve(port=0) as srv:
        yield srv


@pytest.fixture
def recorder(metrics: RuntimeMetrics) -> Iterator[SignalRecorder]:
    # Connected after the metrics' receivers, which blinker calls first: once the
    # recorder has seen a signal, the metrics have counted it.
    with SignalRecorder() as rec:
        yield rec


def scrape(server: MetricsServer) -> Scrape:
    answer = httpx.get(server.url, timeout=5, trust_env=False)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return Scrape(answer.text)


def test_a_scrape_shows_a_ready_healthy_instance_its_lease_and_its_time_to_ready(
    runtime: Runtime, fake: Fake, server: MetricsServer
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests")
    iid = resolution.instance.instance_id

    got = scrape(server)

    assert server.url.startswith("http://127.0.0.1:")
    assert got.one_hot("llama_actors_instance_state", "state", iid) == {
        s: float(s == "ready") for s in STATES
    }
    assert got.one_hot("llama_actors_instance_health", "health", iid) == {
        h: float(h == "healthy") for h in HEALTHS
    }
    key = resolution.instance.instance_key
    assert got.value("llama_actors_instance_leases", instance_id=iid, instance_key=key) == 1
    assert got.value("llama_actors_instance_restarts_total", instance_id=iid) == 0
    assert got.value("llama_actors_instance_uptime_seconds", instance_id=iid) >= 0
    assert got.value("llama_actors_time_to_ready_seconds_count", boot="first") == 1
    assert got.value("llama_actors_time_to_ready_seconds_count", boot="restart") == 0
    last_ready = got.value("llama_actors_instance_last_time_to_ready_seconds", instance_id=iid)
    assert got.value("llama_actors_time_to_ready_seconds_sum", boot="first") == last_ready > 0
    assert got.value("llama_actors_leases_granted_total") == 1


def test_releasing_a_lease_brings_leases_held_back_to_zero_and_counts_the_release(
    runtime: Runtime, fake: Fake, server: MetricsServer
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests")
    iid = resolution.instance.instance_id
    assert scrape(server).value("llama_actors_instance_leases", instance_id=iid) == 1

    runtime.release(resolution.lease.lease_ref)

    got = scrape(server)
    assert got.value("llama_actors_instance_leases", instance_id=iid) == 0
    assert got.value("llama_actors_leases_released_total", reason="released") == 1
    assert got.value("llama_actors_leases_released_total", reason="drained") == 0


def test_renewals_and_expiries_are_counted(
    runtime: Runtime, fake: Fake, server: MetricsServer, recorder: SignalRecorder
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests", ttl_ms=60_000)
    runtime.renew(resolution.lease.lease_ref, ttl_ms=50)
    recorder.wait_for("lease_expired", timeout=WAIT)

    got = scrape(server)

    assert got.value("llama_actors_leases_renewed_total") == 1
    assert got.value("llama_actors_leases_expired_total") == 1
    iid = resolution.instance.instance_id
    assert got.value("llama_actors_instance_leases", instance_id=iid) == 0


def test_every_health_probe_adds_to_the_probe_latency_histogram(
    runtime: Runtime, fake: Fake, server: MetricsServer, metrics: RuntimeMetrics
) -> None:
    iid = runtime.resolve_endpoint(fake.spec(), "tests").instance.instance_id
    with Probes() as probes:
        probes.wait_for(3, timeout=WAIT)

    got = scrape(server)

    healthy = got.value("llama_actors_probe_latency_seconds_count", verdict="healthy")
    assert healthy >= 3
    assert got.value("llama_actors_probe_latency_seconds_bucket", verdict="healthy", le="+Inf") == (
        healthy
    )
    assert got.value("llama_actors_probe_latency_seconds_sum", verdict="healthy") > 0
    assert 0 < got.value("llama_actors_instance_last_probe_latency_seconds", instance_id=iid) < 1


def test_degraded_health_shows_in_the_health_gauge_and_as_degraded_probes(
    runtime: Runtime, fake: Fake, server: MetricsServer, recorder: SignalRecorder
) -> None:
    iid = runtime.resolve_endpoint(fake.spec(), "tests").instance.instance_id

    fake.set(health="degraded")
    recorder.wait_for("health_changed", iid, new="degraded", timeout=WAIT)

    got = scrape(server)
    assert got.one_hot("llama_actors_instance_health", "health", iid) == {
        h: float(h == "degraded") for h in HEALTHS
    }
    assert got.value("llama_actors_instance_state", instance_id=iid, state="ready") == 1
    assert got.value("llama_actors_probe_latency_seconds_count", verdict="degraded") >= 1


def test_a_killed_and_restarted_server_counts_one_restart_and_a_restart_time_to_ready(
    runtime: Runtime, fake: Fake, server: MetricsServer, recorder: SignalRecorder
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests")
    iid, pid = resolution.instance.instance_id, resolution.instance.pid
    assert pid is not None

    os.kill(pid, signal.SIGKILL)
    recorder.wait_for("instance_ready", iid, timeout=WAIT, count=2)

    got = scrape(server)
    assert got.value("llama_actors_instance_restarts_total", instance_id=iid) == 1
    assert got.value("llama_actors_time_to_ready_seconds_count", boot="first") == 1
    assert got.value("llama_actors_time_to_ready_seconds_count", boot="restart") == 1
    assert got.value("llama_actors_instance_state", instance_id=iid, state="ready") == 1
    assert got.value("llama_actors_instance_leases", instance_id=iid) == 1


def test_a_stopped_instance_shows_stopped_and_disappears_once_the_runtime_forgets_it(
    runtime: Runtime, tmp_path: Path, server: MetricsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("llama_actors._runtime.supervisor.KEEP_FINISHED", 1)
    first = runtime.ensure_instance(Fake(tmp_path / "a").spec()).instance.instance_id
    runtime.stop_instance(first)
    assert scrape(server).value("llama_actors_instance_state", instance_id=first, state="stopped")

    second = runtime.ensure_instance(Fake(tmp_path / "b").spec()).instance.instance_id
    runtime.stop_instance(second)

    got = scrape(server)
    assert got.find("llama_actors_instance_state", instance_id=first) == []
    assert got.find("llama_actors_instance_last_time_to_ready_seconds", instance_id=first) == []
    assert got.value("llama_actors_instance_state", instance_id=second, state="stopped") == 1
    assert got.value("llama_actors_instance_uptime_seconds", instance_id=second) == 0


def test_metrics_count_only_the_instances_of_their_own_runtime(
    runtime: Runtime, tmp_path: Path, server: MetricsServer
) -> None:
    with Runtime(state_dir=tmp_path / "other-state", policy=FAST) as other:
        other.resolve_endpoint(Fake(tmp_path / "other").spec(), "tests")

        got = scrape(server)

    assert got.find("llama_actors_instance_state") == []
    assert got.value("llama_actors_leases_granted_total") == 0
    assert got.value("llama_actors_time_to_ready_seconds_count", boot="first") == 0


def test_closing_the_metrics_unregisters_them_and_disconnects_their_receivers(
    runtime: Runtime,
) -> None:
    before = len(signals.instance_ready.receivers)
    metrics = RuntimeMetrics(runtime)
    assert "llama_actors_leases_granted_total" in metrics.text()
    assert len(signals.instance_ready.receivers) == before + 1

    metrics.close()
    metrics.close()

    assert metrics.text() == ""
    assert len(signals.instance_ready.receivers) == before
    assert "closed" in repr(metrics)


def test_two_metrics_on_one_registry_need_two_namespaces(
    runtime: Runtime, metrics: RuntimeMetrics
) -> None:
    with pytest.raises(UsageError, match="another namespace or registry"):
        RuntimeMetrics(runtime, metrics.registry)

    with RuntimeMetrics(runtime, metrics.registry, namespace="second") as second:
        assert "second_instance_leases" in metrics.text()
        assert second.registry is metrics.registry


def test_a_namespace_that_is_not_a_prometheus_name_is_a_usage_error(runtime: Runtime) -> None:
    with pytest.raises(UsageError, match=r"namespace must be .* got 'llama-actors'"):
        RuntimeMetrics(runtime, namespace="llama-actors")


def test_serving_on_a_port_that_is_taken_says_which_and_what_to_do(
    metrics: RuntimeMetrics,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(UsageError, match=rf"127\.0\.0\.1:{port}: .*port 0 for any free one"):
            metrics.serve(port=port)


def test_without_prometheus_client_importing_the_module_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in sys.modules if n.split(".")[0] == "prometheus_client"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "llama_actors.metrics")

    with pytest.raises(LlamaActorsError) as caught:
        importlib.import_module("llama_actors.metrics")

    assert type(caught.value).__name__ == "MetricsUnavailableError"
    assert "pip install 'llama-actors[metrics]'" in str(caught.value)
    assert isinstance(caught.value, ImportError)


def test_buckets_that_do_not_increase_are_a_usage_error(runtime: Runtime) -> None:
    with pytest.raises(UsageError, match=r"time_to_ready_seconds buckets .* got \(5, 1\)"):
        RuntimeMetrics(runtime, time_to_ready_buckets=(5, 1))


# -- the server's load and the health changes ---------------------------------------------


def wait_for_load(runtime: Runtime, iid: str) -> ServerLoad:
    """The instance's first load reading. Nothing announces one (it changes no health):
    look at the snapshot again in a moment until it has one."""
    deadline = time.monotonic() + WAIT
    while (load := runtime.snapshot(iid).load) is None:
        assert time.monotonic() < deadline, f"no load reading of {iid} within {WAIT:g}s"
        threading.Event().wait(0.02)
    return load


def test_a_ready_instance_shows_every_load_figure_its_server_gives_and_whether_it_is_saturated(
    runtime: Runtime, fake: Fake, server: MetricsServer
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests", policy=UNREAD)
    iid, key = resolution.instance.instance_id, resolution.instance.instance_key
    load = ServerLoad(
        slots_total=4,
        slots_busy=4,
        requests_processing=4,
        requests_deferred=2,
        prompt_tokens_per_s=512.5,
        generation_tokens_per_s=48.25,
        kv_cache_tokens=900,
        kv_cache_ratio=0.375,
        read_at=1.0,
    )
    runtime._ctx.board.set_load(iid, load)

    got = scrape(server)

    assert {name: got.value(name, instance_id=iid, instance_key=key) for name in LOAD_METRICS} == {
        "llama_actors_instance_slots": 4,
        "llama_actors_instance_slots_busy": 4,
        "llama_actors_instance_requests_processing": 4,
        "llama_actors_instance_requests_deferred": 2,
        "llama_actors_instance_prompt_tokens_per_second": 512.5,
        "llama_actors_instance_generation_tokens_per_second": 48.25,
        "llama_actors_instance_kv_cache_tokens": 900,
        "llama_actors_instance_kv_cache_ratio": 0.375,
        "llama_actors_instance_saturated": 1,
    }

    runtime._ctx.board.set_load(iid, msgspec.structs.replace(load, slots_busy=3))
    assert scrape(server).value("llama_actors_instance_saturated", instance_id=iid) == 0


def test_a_figure_the_server_does_not_give_is_left_out_rather_than_shown_as_zero(
    runtime: Runtime, tmp_path: Path, server: MetricsServer
) -> None:
    # One server without --metrics (slot figures only); one whose load nobody read.
    slots_only = runtime.resolve_endpoint(
        Fake(tmp_path / "a").spec(), "tests", policy=UNREAD
    ).instance.instance_id
    unread = runtime.resolve_endpoint(
        Fake(tmp_path / "b").spec(), "tests", policy=UNREAD
    ).instance.instance_id
    runtime._ctx.board.set_load(
        slots_only,
        ServerLoad(slots_total=4, slots_busy=4, kv_cache_tokens=120, kv_cache_ratio=0.05),
    )

    got = scrape(server)

    shown = {s.name for s in got.samples if s.labels.get("instance_id") == slots_only}
    assert shown & set(LOAD_METRICS) == {
        "llama_actors_instance_slots",
        "llama_actors_instance_slots_busy",
        "llama_actors_instance_kv_cache_tokens",
        "llama_actors_instance_kv_cache_ratio",
    }  # all slots busy, but nobody knows whether requests wait: saturated is not shown
    assert got.value("llama_actors_instance_slots_busy", instance_id=slots_only) == 4
    unread_shown = {s.name for s in got.samples if s.labels.get("instance_id") == unread}
    assert unread_shown & set(LOAD_METRICS) == set()
    assert got.value("llama_actors_instance_state", instance_id=unread, state="ready") == 1


def test_an_instance_that_is_not_ready_shows_no_load_figures(
    runtime: Runtime, fake: Fake, server: MetricsServer
) -> None:
    iid = runtime.resolve_endpoint(fake.spec(), "tests", policy=UNREAD).instance.instance_id
    runtime._ctx.board.set_load(iid, ServerLoad(slots_total=2, slots_busy=1, requests_deferred=0))
    assert scrape(server).value("llama_actors_instance_slots", instance_id=iid) == 2

    runtime.stop_instance(iid)

    got = scrape(server)
    assert got.value("llama_actors_instance_state", instance_id=iid, state="stopped") == 1
    assert [s for s in got.samples if s.name in LOAD_METRICS] == []


def test_health_changes_are_counted_by_the_new_health_and_its_cause(
    runtime: Runtime, fake: Fake, server: MetricsServer, recorder: SignalRecorder
) -> None:
    before = scrape(server)
    # Every change the runtime makes is shown from the start, at zero.
    for health, cause in (
        ("healthy", "ready"),
        ("degraded", "saturated"),
        ("unavailable", "exited"),
    ):
        assert before.value("llama_actors_health_changes_total", health=health, cause=cause) == 0

    resolution = runtime.resolve_endpoint(fake.spec(), "tests")
    iid, pid = resolution.instance.instance_id, resolution.instance.pid
    assert pid is not None
    recorder.wait_for("health_changed", iid, new="healthy", timeout=WAIT)
    fake.set(health="degraded")
    recorder.wait_for("health_changed", iid, new="degraded", timeout=WAIT)
    fake.set(health="ok")
    recorder.wait_for("health_changed", iid, new="healthy", timeout=WAIT, count=2)
    os.kill(pid, signal.SIGKILL)
    recorder.wait_for("health_changed", iid, new="healthy", timeout=WAIT, count=3)
    runtime.release(resolution.lease.lease_ref)
    runtime.stop_instance(iid)
    recorder.wait_for("health_changed", iid, new="unavailable", timeout=WAIT, count=2)

    got = scrape(server)
    counted = {
        (s.labels["health"], s.labels["cause"]): s.value
        for s in got.find("llama_actors_health_changes_total")
        if s.value
    }
    assert counted == {
        ("healthy", "ready"): 2,  # ready, and ready again after the restart
        ("degraded", "probe"): 1,
        ("healthy", "probe"): 1,
        ("unavailable", "exited"): 1,
        ("unavailable", "stopped"): 1,
    }


def test_failures_reported_by_callers_count_as_health_changes_caused_by_callers(
    runtime: Runtime, fake: Fake, server: MetricsServer, recorder: SignalRecorder
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(), "tests")
    iid = resolution.instance.instance_id

    for _ in range(2):  # report_degraded_after
        runtime.report(resolution.lease.lease_ref, False, detail="timed out")
    recorder.wait_for("health_changed", iid, new="degraded", cause="callers", timeout=WAIT)

    got = scrape(server)
    assert got.value("llama_actors_health_changes_total", health="degraded", cause="callers") == 1
    assert got.value("llama_actors_instance_health", instance_id=iid, health="degraded") == 1


def test_a_saturated_server_shows_every_slot_busy_requests_deferred_and_saturation_as_the_cause(
    runtime: Runtime,
    fake: Fake,
    server: MetricsServer,
    recorder: SignalRecorder,
) -> None:
    iid = runtime.resolve_endpoint(fake.spec(), "tests", policy=READ_OFTEN).instance.instance_id

    fake.set(saturated=2)
    recorder.wait_for("health_changed", iid, new="degraded", cause="saturated", timeout=WAIT)

    got = scrape(server)
    slots = got.value("llama_actors_instance_slots", instance_id=iid)
    assert slots >= 1
    assert got.value("llama_actors_instance_slots_busy", instance_id=iid) == slots
    assert got.value("llama_actors_instance_requests_deferred", instance_id=iid) >= 2
    assert got.value("llama_actors_instance_saturated", instance_id=iid) == 1
    assert got.value("llama_actors_instance_health", instance_id=iid, health="degraded") == 1
    assert got.value("llama_actors_instance_kv_cache_tokens", instance_id=iid) > 0
    assert got.value("llama_actors_health_changes_total", health="degraded", cause="saturated") == 1

    fake.set(saturated=0)
    recorder.wait_for("health_changed", iid, new="healthy", cause="saturated", timeout=WAIT)

    got = scrape(server)
    assert got.value("llama_actors_instance_saturated", instance_id=iid) == 0
    assert got.value("llama_actors_instance_requests_deferred", instance_id=iid) == 0
    assert got.value("llama_actors_health_changes_total", health="healthy", cause="saturated") == 1


def test_without_metrics_on_the_server_only_the_slot_figures_are_shown(
    runtime: Runtime, fake: Fake, server: MetricsServer
) -> None:
    resolution = runtime.resolve_endpoint(fake.spec(metrics=False), "tests", policy=READ_OFTEN)
    iid = resolution.instance.instance_id
    assert "--metrics" not in json.loads((fake.folder / "argv.json").read_text())
    wait_for_load(runtime, iid)

    got = scrape(server)

    shown = {s.name for s in got.samples if s.labels.get("instance_id") == iid}
    assert shown & set(LOAD_METRICS) == {
        "llama_actors_instance_slots",
        "llama_actors_instance_slots_busy",
        "llama_actors_instance_kv_cache_tokens",
        "llama_actors_instance_kv_cache_ratio",
    }
    assert got.value("llama_actors_instance_slots_busy", instance_id=iid) == 0


def test_inference_probes_have_their_own_histogram_and_stay_out_of_the_health_probes_one(
    runtime: Runtime, fake: Fake, server: MetricsServer, recorder: SignalRecorder
) -> None:
    probing = InstancePolicy(wedged_restart_ms=None, inference_probe_interval_ms=100)
    iid = runtime.resolve_endpoint(fake.spec(), "tests", policy=probing).instance.instance_id
    recorder.wait_for("probe_completed", iid, kind="inference", count=3, timeout=WAIT)

    got = scrape(server)
    inference = len(recorder.find("probe_completed", iid, kind="inference"))
    health = len(recorder.find("probe_completed", iid, kind="health"))
    counted = got.value("llama_actors_inference_probe_latency_seconds_count", verdict="healthy")
    assert inference <= counted <= inference + 1  # a probe may end between the two reads
    assert got.value("llama_actors_inference_probe_latency_seconds_sum", verdict="healthy") > 0
    health_counted = got.value("llama_actors_probe_latency_seconds_count", verdict="healthy")
    assert health <= health_counted <= health + 1


# -- memory ---------------------------------------------------------------------------------

MIB = 1024 * 1024
#: The estimate each spec gets, by alias (instead of reading a GGUF header).
ESTIMATES = {
    "chat": MemoryNeed(ram_mib=40.0, shared_mib=230.0, shared_key="gemma.gguf", gpu_mib={0: 90.0}),
    "a": MemoryNeed(ram_mib=300.0),
    "b": MemoryNeed(ram_mib=300.0),
}
#: What the fake "allocates" while loading, in llama.cpp's buffer lines.
BUFFERS = "CPU_Mapped model 235.16; CPU KV 12; CPU compute 21.28; CUDA0 model 100"


@pytest.fixture
def declared(monkeypatch: pytest.MonkeyPatch) -> None:
    """Estimates by alias, and no resident memory read: what the fake reports (nothing,
    unless it is given buffers) is the measured figure."""

    def estimate(self: LlamaCppBackend, spec: BootSpec, gpus: object) -> MemoryNeed | None:
        return ESTIMATES.get(spec.alias)

    monkeypatch.setattr(LlamaCppBackend, "estimate_memory", estimate)
    monkeypatch.setattr(backend_actor, "_rss_mib", lambda pid: None)


def by_resource(got: Scrape, name: str, iid: str) -> dict[str, float]:
    return {s.labels["resource"]: s.value for s in got.find(name, instance_id=iid)}


@pytest.mark.usefixtures("declared")
def test_an_instance_exports_its_estimate_its_measured_memory_and_the_estimates_error(
    runtime: Runtime, fake: Fake, server: MetricsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_actor, "_rss_mib", lambda pid: 50.0)  # below the reported
    resolution = runtime.resolve_endpoint(fake.spec(alias="chat", behaviour={"buffers": BUFFERS}))
    iid, key = resolution.instance.instance_id, resolution.instance.instance_key
    memory = runtime.snapshot(iid).memory
    measured = memory.measured
    assert measured is not None
    assert (measured.ram_mib, measured.shared_mib, measured.gpu_mib) == (33.28, 235.16, {0: 100})
    assert (memory.rss_mib, memory.error_pct) == (50.0, -2.3)  # (360 - 368.44) / 368.44

    got = scrape(server)

    assert by_resource(got, "llama_actors_instance_memory_estimate_bytes", iid) == {
        "ram": 40 * MIB,
        "shared": 230 * MIB,
        "gpu0": 90 * MIB,
    }
    assert by_resource(got, "llama_actors_instance_memory_measured_bytes", iid) == {
        "ram": 33.28 * MIB,
        "shared": 235.16 * MIB,
        "gpu0": 100 * MIB,
    }
    assert got.value(
        "llama_actors_instance_resident_memory_bytes", instance_id=iid, instance_key=key
    ) == (50 * MIB)
    error = got.value("llama_actors_instance_memory_estimate_error_ratio", instance_id=iid)
    assert error == pytest.approx(memory.error_pct / 100)
    # Without a capacity nothing is capped, but what the instances hold is still shown.
    assert got.find("llama_actors_memory_capacity_bytes") == []
    assert got.find("llama_actors_memory_free_bytes") == []
    assert got.value("llama_actors_memory_used_bytes", resource="ram") == (268.44 * MIB)
    assert got.value("llama_actors_memory_used_bytes", resource="gpu0") == 100 * MIB

    runtime.release(resolution.lease.lease_ref)
    runtime.stop_instance(iid)

    gone = scrape(server)  # a stopped instance holds nothing: its memory series go
    assert {s.name for s in gone.samples if s.labels.get("instance_id") == iid} & {
        "llama_actors_instance_memory_estimate_bytes",
        "llama_actors_instance_memory_measured_bytes",
        "llama_actors_instance_resident_memory_bytes",
        "llama_actors_instance_memory_estimate_error_ratio",
    } == set()
    assert gone.value("llama_actors_memory_used_bytes", resource="ram") == 0


def test_an_instance_without_an_estimate_or_measured_figure_has_no_memory_series(
    runtime: Runtime, fake: Fake, server: MetricsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_actor, "_rss_mib", lambda pid: None)  # nothing measured either
    iid = runtime.resolve_endpoint(fake.spec()).instance.instance_id  # not GGUF: no estimate

    got = scrape(server)

    assert got.value("llama_actors_instance_state", instance_id=iid, state="ready") == 1
    assert [s for s in got.samples if "memory" in s.name and "instance_id" in s.labels] == []


def test_the_runtime_exports_its_capacity_use_free_memory_and_queue_as_statistics_say(
    runtime: Runtime, server: MetricsServer
) -> None:
    stats = MemoryStatistics(
        capacity={"ram": 1000.0, "gpu0": 8000.0},
        used={"ram": 1100.5, "gpu0": 1200.0},
        free={"ram": -100.5, "gpu0": 6800.0},  # a measured figure grew past the capacity
        queued=2,
    )
    runtime._ctx.board.set_memory_statistics(stats)
    assert runtime.statistics().memory == stats

    got = scrape(server)

    for name, figures in (
        ("llama_actors_memory_capacity_bytes", stats.capacity),
        ("llama_actors_memory_used_bytes", stats.used),
        ("llama_actors_memory_free_bytes", stats.free),
    ):
        assert {s.labels["resource"]: s.value for s in got.find(name)} == {
            resource: mib * MIB for resource, mib in figures.items()
        }
    assert got.value("llama_actors_memory_requests_queued") == 2


@pytest.mark.usefixtures("declared")
def test_an_eviction_is_counted_and_capacity_use_and_free_follow_admission(
    tmp_path: Path, fake: Fake
) -> None:
    with (
        Runtime(state_dir=tmp_path / "state", policy=FAST, capacity=Capacity(ram_mib=500)) as rt,
        RuntimeMetrics(rt) as metrics,
        SignalRecorder() as recorder,  # after the metrics' receivers: they count first
    ):
        assert Scrape(metrics.text()).value("llama_actors_instances_evicted_total") == 0
        first = rt.resolve_endpoint(Fake(tmp_path / "a").spec(alias="a"))
        rt.release(first.lease.lease_ref)  # idle: it may be evicted
        second = rt.resolve_endpoint(Fake(tmp_path / "b").spec(alias="b"))
        evicted = recorder.wait_for("instance_evicted", timeout=WAIT)
        assert evicted.instance_id == first.instance.instance_id

        got = Scrape(metrics.text())
        stats = rt.statistics().memory
        assert stats.evictions == 1
        assert got.value("llama_actors_instances_evicted_total") == stats.evictions
        assert got.value("llama_actors_memory_capacity_bytes", resource="ram") == 500 * MIB
        assert got.value("llama_actors_memory_used_bytes", resource="ram") == 300 * MIB
        assert got.value("llama_actors_memory_free_bytes", resource="ram") == 200 * MIB
        assert got.value("llama_actors_memory_requests_queued") == stats.queued == 0
        rt.release(second.lease.lease_ref)

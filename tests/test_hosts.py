"""A runtime with hosts, on in-process agents (LocalHosts): placement, keys, host loss,
failures and restarts on a host, per-host admission. The same head runs on Ray in
tests/test_ray_hosts.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

import llama_actors
from llama_actors import Capacity, HostLostError, NoHostError, Runtime, signals
from llama_actors.testing.fake import fake_boot_spec
from llama_actors.testing.hosts import LocalHosts
from tests._models import write_model

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def hosts(tmp_path: Path) -> LocalHosts:
    return LocalHosts(
        {"a": {"zone": "x"}, "b": {"zone": "y"}},
        state_dir=tmp_path / "hosts",
        check_interval_ms=200,
    )


@pytest.fixture
def runtime(tmp_path: Path, hosts: LocalHosts) -> Iterator[Runtime]:
    with Runtime(state_dir=tmp_path / "head", hosts=hosts) as rt:
        yield rt


def released(reason: str) -> tuple[threading.Event, list[float]]:
    """An event set when a lease ends with ``reason`` (and when it did)."""
    event, when = threading.Event(), []

    def receive(_sender: object, **kw: Any) -> None:
        if kw.get("reason") == reason:
            when.append(time.monotonic())
            event.set()

    signals.lease_released.connect(receive, weak=False)
    return event, when


def test_every_host_is_on_the_runtime_when_it_returns(runtime: Runtime) -> None:
    hosts = {h.host_id: h for h in runtime.hosts()}

    assert set(hosts) == {"a", "b"}
    assert hosts["a"].state == "up"
    assert hosts["a"].labels == {"zone": "x", "host": "a"}
    assert hosts["b"].address == "127.0.0.1"


def test_a_spec_with_host_labels_runs_on_the_host_that_has_them(
    runtime: Runtime, tmp_path: Path
) -> None:
    resolution = runtime.resolve_endpoint(fake_boot_spec(tmp_path, host_labels={"zone": "y"}))

    assert resolution.instance.host == "b"
    assert runtime.snapshot(resolution.instance.instance_id).host == "b"
    assert [h.instances for h in runtime.hosts()] == [0, 1]


def test_a_hosted_server_has_a_generated_key_in_its_headers_and_never_in_argv(
    runtime: Runtime, tmp_path: Path
) -> None:
    endpoint = runtime.resolve_endpoint(fake_boot_spec(tmp_path)).endpoint
    url = endpoint.base_url + "/chat/completions"

    key = endpoint.headers["Authorization"].removeprefix("Bearer ")
    assert len(key) >= 32
    assert httpx.post(url, json=CHAT, headers=endpoint.headers).status_code == 200
    assert httpx.post(url, json=CHAT).status_code == 401
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert key not in " ".join(argv)
    assert "--api-key-file" in argv
    assert key not in repr(endpoint)


def test_a_spec_with_its_own_key_keeps_it_on_a_host(runtime: Runtime, tmp_path: Path) -> None:
    endpoint = runtime.resolve_endpoint(fake_boot_spec(tmp_path, api_key="sk-mine")).endpoint

    assert endpoint.headers == {"Authorization": "Bearer sk-mine"}


def test_identical_specs_share_one_instance_on_one_host(runtime: Runtime, tmp_path: Path) -> None:
    first = runtime.resolve_endpoint(fake_boot_spec(tmp_path), owner_ref="one")
    second = runtime.resolve_endpoint(fake_boot_spec(tmp_path), owner_ref="two")

    assert second.instance.instance_id == first.instance.instance_id
    assert second.reused
    assert sum(h.instances for h in runtime.hosts()) == 1


def test_spread_puts_two_instances_on_two_hosts_and_pack_on_one(tmp_path: Path) -> None:
    for placement, expected in (("spread", {"a", "b"}), ("pack", {"a"})):
        local = LocalHosts(
            {"a": {}, "b": {}},
            state_dir=tmp_path / placement / "hosts",
            capacity=Capacity(ram_mib=10_000),
            placement=placement,  # type: ignore[arg-type]
        )
        folder = tmp_path / placement
        folder.mkdir()
        write_model(folder / "fake-model.gguf")
        with Runtime(state_dir=folder / "head", hosts=local) as rt:
            one = rt.resolve_endpoint(fake_boot_spec(folder, alias="one"))
            two = rt.resolve_endpoint(fake_boot_spec(folder, alias="two"))
            assert {one.instance.host, two.instance.host} == expected, placement


def test_a_spec_no_host_can_run_fails_at_once_naming_the_labels_and_the_hosts(
    runtime: Runtime, tmp_path: Path
) -> None:
    with pytest.raises(NoHostError) as caught:
        runtime.resolve_endpoint(fake_boot_spec(tmp_path, host_labels={"zone": "z"}), timeout=5)

    assert "zone=z" in str(caught.value)
    assert "a (host=a, zone=x" in str(caught.value)
    with pytest.raises(NoHostError, match="at least 1 GPU"):
        runtime.resolve_endpoint(fake_boot_spec(tmp_path, host_gpus=1), timeout=5)
    assert runtime.instances() == []


def test_an_instance_goes_to_the_host_where_it_fits(tmp_path: Path) -> None:
    write_model(tmp_path / "fake-model.gguf")
    local = LocalHosts(
        {"small": {}, "large": {}},
        state_dir=tmp_path / "hosts",
        capacity={"small": Capacity(ram_mib=1), "large": Capacity(ram_mib=10_000)},
    )
    with Runtime(state_dir=tmp_path / "head", hosts=local) as rt:
        resolution = rt.resolve_endpoint(fake_boot_spec(tmp_path))
        assert resolution.instance.host == "large"
        large = {h.host_id: h for h in rt.hosts()}["large"]
        assert large.used["ram"] > 0
        assert large.capacity == {"ram": 10_000.0}


def test_a_lost_host_ends_its_leases_and_the_next_resolve_lands_on_another(
    runtime: Runtime, hosts: LocalHosts, tmp_path: Path
) -> None:
    ended, when = released("host lost")
    failed = threading.Event()
    signals.instance_failed.connect(lambda *_a, **_k: failed.set(), weak=False)
    first = runtime.resolve_endpoint(fake_boot_spec(tmp_path, host_labels={"zone": "y"}))
    (pid,) = hosts.pids("b")

    cut_at = time.monotonic()
    hosts.cut("b")

    assert ended.wait(5), "the lease did not end"
    assert when[0] - cut_at < 3.0
    assert failed.wait(5)
    snap = runtime.snapshot(first.instance.instance_id)
    assert snap.state == "failed"
    assert snap.health == "unavailable"
    assert "host lost" in (snap.last_error or "")
    with pytest.raises(llama_actors.LeaseNotFoundError, match="host lost"):
        runtime.renew(first.lease)
    assert {h.host_id: h.state for h in runtime.hosts()} == {"a": "up", "b": "lost"}
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    again = runtime.resolve_endpoint(fake_boot_spec(tmp_path))
    assert again.instance.host == "a"


def test_a_caller_waiting_on_an_instance_whose_host_is_lost_gets_host_lost(
    runtime: Runtime, hosts: LocalHosts, tmp_path: Path
) -> None:
    spec = fake_boot_spec(tmp_path, behaviour={"load_seconds": "30"}, ready_timeout_ms=60_000)
    errors: list[BaseException] = []

    def resolve() -> None:
        try:
            runtime.resolve_endpoint(spec, timeout=20)
        except llama_actors.LlamaActorsError as exc:
            errors.append(exc)

    started = threading.Event()

    def receive(sender: object, **_kw: Any) -> None:
        if "@" not in str(sender):  # the head's signal, not its in-process agent's
            started.set()

    signals.instance_starting.connect(receive, weak=False)
    waiter = threading.Thread(target=resolve)
    waiter.start()
    assert started.wait(10), "the instance did not start on its host"
    hosts.cut(runtime.instances()[0].host)
    waiter.join(10)

    assert len(errors) == 1
    assert isinstance(errors[0], HostLostError)
    assert errors[0].reason == "host lost"


def test_a_start_that_fails_on_its_host_fails_the_caller_with_the_hosts_error(
    runtime: Runtime, tmp_path: Path
) -> None:
    spec = llama_actors.boot_spec(
        {**fake_boot_spec(tmp_path).to_mapping(), "model": str(tmp_path / "missing.gguf")}
    )

    with pytest.raises(llama_actors.ModelFileError, match=r"missing\.gguf"):
        runtime.resolve_endpoint(spec, timeout=20)
    (snap,) = runtime.instances()
    assert snap.state == "failed"


def test_a_server_that_exits_before_ready_on_a_host_reports_its_exit(
    runtime: Runtime, tmp_path: Path
) -> None:
    spec = fake_boot_spec(tmp_path, behaviour={"exit_before_ready": "3"})

    with pytest.raises(llama_actors.ServerExitedError) as caught:
        runtime.resolve_endpoint(spec, timeout=20)

    assert caught.value.exit.code == 3


def test_a_crash_on_a_host_is_restarted_there_and_the_head_sees_it(
    runtime: Runtime, tmp_path: Path
) -> None:
    restarted, ready_again = threading.Event(), threading.Event()
    signals.instance_restarting.connect(lambda *_a, **_k: restarted.set(), weak=False)
    # The fake counts every answered request, health probes too: it crashes soon.
    resolution = runtime.resolve_endpoint(fake_boot_spec(tmp_path, behaviour={"crash_after": "3"}))
    iid = resolution.instance.instance_id

    def ready(sender: object, **_kw: Any) -> None:
        if sender == iid and restarted.is_set():
            ready_again.set()

    signals.instance_ready.connect(ready, weak=False)

    assert restarted.wait(10)
    assert ready_again.wait(10)
    snap = runtime.snapshot(iid)
    assert snap.restart_count >= 1
    assert snap.host == resolution.instance.host


def test_stopping_a_hosted_instance_stops_its_server_on_the_host(
    runtime: Runtime, hosts: LocalHosts, tmp_path: Path
) -> None:
    resolution = runtime.resolve_endpoint(fake_boot_spec(tmp_path))
    (pid,) = hosts.pids(resolution.instance.host)
    runtime.release(resolution.lease)

    final = runtime.stop_instance(resolution.instance.instance_id)

    assert final.state == "stopped"
    psutil.wait_procs([psutil.Process(pid)], timeout=5) if psutil.pid_exists(pid) else None
    assert hosts.pids(resolution.instance.host) == []


def test_failures_callers_report_move_the_health_of_a_hosted_instance(
    runtime: Runtime, tmp_path: Path
) -> None:
    changed = threading.Event()
    policy = llama_actors.InstancePolicy(report_degraded_after=2)
    resolution = runtime.resolve_endpoint(fake_boot_spec(tmp_path), policy=policy)
    iid = resolution.instance.instance_id

    def receive(sender: object, **kw: Any) -> None:
        if sender == iid and kw.get("cause") == "callers":
            changed.set()

    signals.health_changed.connect(receive, weak=False)

    runtime.report(resolution.lease, False, detail="timed out")
    runtime.report(resolution.lease, False, detail="timed out")

    assert changed.wait(5)
    assert runtime.snapshot(resolution.instance.instance_id).health == "degraded"


def test_closing_the_runtime_stops_every_server_on_every_host(
    tmp_path: Path, hosts: LocalHosts
) -> None:
    rt = Runtime(state_dir=tmp_path / "head", hosts=hosts)
    rt.resolve_endpoint(fake_boot_spec(tmp_path, alias="one", host_labels={"zone": "x"}))
    rt.resolve_endpoint(fake_boot_spec(tmp_path, alias="two", host_labels={"zone": "y"}))
    pids = hosts.pids("a") + hosts.pids("b")

    rt.close()

    assert len(pids) == 2
    assert not [p for p in pids if psutil.pid_exists(p)]
    assert {s.state for s in rt.instances()} == {"stopped"}


def test_a_spec_with_host_labels_runs_on_a_runtime_without_hosts(tmp_path: Path) -> None:
    with Runtime(state_dir=tmp_path / "state") as rt:
        resolution = rt.resolve_endpoint(fake_boot_spec(tmp_path, host_labels={"zone": "x"}))
        assert resolution.instance.host == "local"
        assert rt.hosts() == []

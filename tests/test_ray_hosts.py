"""A runtime with hosts on a local Ray cluster (one per module: about 1 GB and 5-10 s):
placement by labels and by fit, servers on two hosts, a host removed hard, an agent
killed, the head killed, and the real llama-server chatting on a Ray host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from llama_actors import Capacity, Runtime, boot_spec, signals
from llama_actors.ray import RayHosts
from llama_actors.testing.fake import fake_boot_spec
from llama_actors.testing.ray import LocalCluster, local_cluster
from tests._models import write_model

pytestmark = pytest.mark.ray

CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster({"a": {"zone": "x"}, "b": {"zone": "y"}}) as running:
        yield running


def hosts_of(cluster: LocalCluster, tmp_path: Path, **options: Any) -> RayHosts:
    options.setdefault("capacity", Capacity())
    return RayHosts(address=cluster.address, state_dir=tmp_path / "hosts", **options)


@pytest.fixture
def runtime(cluster: LocalCluster, tmp_path: Path) -> Iterator[Runtime]:
    with Runtime(state_dir=tmp_path / "head", hosts=hosts_of(cluster, tmp_path)) as rt:
        yield rt


def gone(pids: list[int], timeout: float) -> list[int]:
    """Those of ``pids`` still running after ``timeout`` (waits on their exit)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_servers_run_on_the_hosts_their_labels_name_and_answer_on_the_published_endpoint(
    runtime: Runtime, tmp_path: Path
) -> None:
    x = runtime.resolve_endpoint(fake_boot_spec(tmp_path, alias="x", host_labels={"zone": "x"}))
    y = runtime.resolve_endpoint(fake_boot_spec(tmp_path, alias="y", host_labels={"zone": "y"}))

    assert (x.instance.host, y.instance.host) == ("a", "b")
    for resolution in (x, y):
        endpoint = resolution.endpoint
        answer = httpx.post(
            endpoint.base_url + "/chat/completions", json=CHAT, headers=endpoint.headers
        )
        assert answer.status_code == 200
        assert endpoint.base_url.startswith("http://127.0.0.1:")
    hosts = {h.host_id: h for h in runtime.hosts()}
    assert hosts["a"].labels == {"zone": "x", "host": "a"}
    assert hosts["a"].agent_pid != hosts["b"].agent_pid


def test_a_new_instance_goes_to_the_host_where_it_fits(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    write_model(tmp_path / "fake-model.gguf")
    capacity = {"a": Capacity(ram_mib=1), "b": Capacity(ram_mib=10_000)}
    with Runtime(
        state_dir=tmp_path / "head", hosts=hosts_of(cluster, tmp_path, capacity=capacity)
    ) as rt:
        resolution = rt.resolve_endpoint(fake_boot_spec(tmp_path))
        assert resolution.instance.host == "b"
        assert {h.host_id: h.capacity for h in rt.hosts()}["a"] == {"ram": 1.0}


def test_a_host_removed_hard_ends_its_leases_within_3s_and_leaves_nothing_behind(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster.add_host("c", {"zone": "z"})
    ended = threading.Event()
    when: list[float] = []

    def receive(_sender: object, **kw: Any) -> None:
        if kw.get("reason") == "host lost":
            when.append(time.monotonic())
            ended.set()

    signals.lease_released.connect(receive, weak=False)
    try:
        with Runtime(state_dir=tmp_path / "head", hosts=hosts_of(cluster, tmp_path)) as rt:
            lease = rt.resolve_endpoint(fake_boot_spec(tmp_path, host_labels={"host": "c"}))
            agent = {h.host_id: h for h in rt.hosts()}["c"].agent_pid
            server = lease.instance.pid
            assert agent is not None
            assert server is not None

            removed_at = time.monotonic()
            cluster.remove_host("c")

            assert ended.wait(10), "the lease on the removed host did not end"
            assert when[0] - removed_at <= 3.0
            assert {h.host_id: h.state for h in rt.hosts()}["c"] == "lost"
            again = rt.resolve_endpoint(fake_boot_spec(tmp_path))
            assert again.instance.host in ("a", "b")
            assert gone([server, agent], timeout=10) == []
    finally:
        signals.lease_released.disconnect(receive)


def test_an_agent_that_dies_takes_its_servers_with_it(runtime: Runtime, tmp_path: Path) -> None:
    lost = threading.Event()
    resolution = runtime.resolve_endpoint(fake_boot_spec(tmp_path, host_labels={"zone": "x"}))
    iid = resolution.instance.instance_id

    def receive(sender: object, **_kw: Any) -> None:
        if sender == iid:
            lost.set()

    signals.instance_failed.connect(receive, weak=False)
    agent = {h.host_id: h for h in runtime.hosts()}["a"].agent_pid
    assert agent is not None
    server = resolution.instance.pid
    assert server is not None

    os.kill(agent, signal.SIGKILL)

    assert gone([server], timeout=10) == [], "the server outlived its agent"
    assert lost.wait(10)
    assert runtime.snapshot(iid).state == "failed"


HEAD = """
import json, sys
from llama_actors import Capacity, Runtime
from llama_actors.ray import RayHosts
from llama_actors.testing.fake import fake_boot_spec
from llama_actors.testing.ray import loopback_only

loopback_only()
folder, address = sys.argv[1], sys.argv[2]
runtime = Runtime(state_dir=folder + "/head", hosts=RayHosts(address=address, capacity=Capacity()))
specs = [fake_boot_spec(folder, alias=n, host_labels={"host": n}) for n in ("a", "b")]
pids = [runtime.resolve_endpoint(spec).instance.pid for spec in specs]
pids += [h.agent_pid for h in runtime.hosts()]
print(json.dumps(pids), flush=True)
sys.stdin.read()
"""


def test_a_head_that_dies_takes_its_agents_and_their_servers_with_it(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", HEAD, str(tmp_path), cluster.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    ) as head:
        assert head.stdout is not None
        pids = json.loads(head.stdout.readline())
        assert len(pids) == 4
        assert sorted(gone(pids, timeout=0)) == sorted(pids)

        head.kill()
        head.wait(10)

        assert gone(pids, timeout=30) == [], "a server or agent outlived the head"


@pytest.mark.real_server
def test_the_real_llama_server_chats_on_a_ray_host(
    runtime: Runtime, real_binary: str, gemma_model: str
) -> None:
    spec = boot_spec(
        {
            "model": gemma_model,
            "binary_path": real_binary,
            "alias": "gemma",
            "ctx_size": 512,
            "parallel": 1,
            "host_labels": {"zone": "y"},
        }
    )
    resolution = runtime.resolve_endpoint(spec, "chat", timeout=120)
    endpoint = resolution.endpoint

    answer = httpx.post(
        endpoint.base_url + "/chat/completions", json=CHAT, headers=endpoint.headers, timeout=60
    )

    assert resolution.instance.host == "b"
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"].strip()
    assert httpx.post(endpoint.base_url + "/chat/completions", json=CHAT).status_code == 401

"""``llama-actors up`` with a ``[hosts]`` table, on a local Ray cluster of two hosts:
the backends run on the hosts, ``status`` shows where and shows each host, and a
SIGTERM stops every server there."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from llama_actors.testing.ray import LocalCluster, local_cluster

from .test_up import Up, fake_backend, status, write_config

pytestmark = pytest.mark.ray

#: What a subprocess needs to keep Ray's addresses on loopback (local_cluster sets it
#: in this process; it is given to `up` explicitly all the same).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # Only `up` (a subprocess) talks to the cluster: this process does not connect.
    with local_cluster({"a": {}, "b": {}}, connect=False) as running:
        yield running


def on_host(name: str, host: str) -> str:
    """A fake backend pinned to ``host`` by its ``host`` label."""
    return fake_backend(name).replace(
        f"[backends.{name}]\n", f'[backends.{name}]\nhost_labels = {{host = "{host}"}}\n'
    )


def published(state_dir: Path, count: int, timeout: float = 60.0) -> dict[str, Any]:
    """The status a running ``up`` publishes once ``count`` backends are ready and
    healthy. The file follows what ``up`` prints by one redraw and nothing announces a
    rewrite: each look is one run of ``status``."""
    deadline = time.monotonic() + timeout
    while True:
        done = status(state_dir, "--json")
        statuses = json.loads(done.stdout) if done.stdout.strip() else []
        if statuses:
            ready = [
                b
                for b in statuses[0]["backends"]
                if (b["state"], b["health"]) == ("ready", "healthy")
            ]
            if len(ready) >= count or time.monotonic() > deadline:
                return dict(statuses[0])
        elif time.monotonic() > deadline:
            raise AssertionError(f"no status published in {timeout:g}s: {done.stderr}")


def test_up_runs_the_backends_on_the_hosts_status_shows_both_and_sigterm_stops_them(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        on_host("chat", "a"),
        on_host("embed", "b"),
        f"[hosts]\naddress = {json.dumps(cluster.address)}\ncheck_interval_ms = 250\n"
        'state_dir = "hosts-state"\n'
        "[hosts.capacity]\n",  # nothing capped: the fake's model has no GGUF header
    )
    state = tmp_path / "state"
    up = Up(config, state, env=RAY_ENV)
    try:
        up.wait_for("health unknown -> healthy", count=2, timeout=60)
        shown = published(state, 2)

        backends = {b["name"]: b for b in shown["backends"]}
        assert {name: b["host"] for name, b in backends.items()} == {"chat": "a", "embed": "b"}
        assert {name: b["state"] for name, b in backends.items()} == {
            "chat": "ready",
            "embed": "ready",
        }
        hosts = {h["host_id"]: h for h in shown["hosts"]}
        assert {h: (s["state"], s["instances"]) for h, s in hosts.items()} == {
            "a": ("up", 1),
            "b": ("up", 1),
        }
        assert {s["address"] for s in hosts.values()} == {"127.0.0.1"}
        pids = [b["pid"] for b in backends.values()]
        assert all(psutil.pid_exists(pid) for pid in pids)
        assert "host a: up at 127.0.0.1 (not capped)" in up.output()
        assert "on host b (log: " in up.output()

        text = status(state).stdout
        assert "  hosts: 2 (2 up, 0 lost)\n" in text, text
        lines = [line.split() for line in text.splitlines()]
        title = lines.index(["hosts:", "2", "(2", "up,", "0", "lost)"])
        assert lines[title + 1] == ["host", "state", "address", "labels", "instances", "ram"]
        assert [line[:7] for line in lines[title + 2 : title + 4]] == [
            ["a", "up", "127.0.0.1", "-", "1", "not", "capped"],
            ["b", "up", "127.0.0.1", "-", "1", "not", "capped"],
        ]
        table = {line[0]: line for line in lines if line[:1] in (["chat"], ["embed"])}
        assert table["chat"][1:4] == ["ready", "healthy", "a"]
        assert table["embed"][1:4] == ["ready", "healthy", "b"]
        # The servers' logs are in the hosts' state folder beside the file.
        assert (tmp_path / "hosts-state" / "hosts").is_dir()

        up.process.terminate()
        assert up.finish(timeout=60) == 0, up.output()
        assert "stopped; nothing left running" in up.output()
        assert not any(psutil.pid_exists(pid) for pid in pids)
        assert list((state / "up").glob("*.json")) == []
    finally:
        up.kill()

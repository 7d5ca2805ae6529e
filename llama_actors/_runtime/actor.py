"""What every actor of a runtime does the same way.

A daemon thread (a forgotten Runtime must not hang interpreter exit) registered with
the runtime's Context, so closing the runtime can join it; and a message handler
whose bugs are logged with the message that caused them instead of killing the actor,
so the runtime keeps going. The test suite fails any test during which such an error
is logged, so "keeps going" never means "goes unnoticed".
"""

from __future__ import annotations

import logging
from typing import Any

import pykka

from llama_actors._runtime.context import Context
from llama_actors._runtime.messages import Message

__all__ = ["RuntimeActor"]

log = logging.getLogger("llama_actors.runtime")


class RuntimeActor(pykka.ThreadingActor):
    """Base of the runtime's actors: subclasses implement :meth:`handle`."""

    use_daemon_thread = True

    def __init__(self, *, context: Context) -> None:
        super().__init__()
        self.ctx = context

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def on_start(self) -> None:
        self.ctx.register_thread()

    def on_receive(self, message: Any) -> Any:
        try:
            self.handle(message)
        except Exception as exc:
            log.exception("%r: internal error handling %r", self, message)
            self.after_internal_error(exc)
        return None

    def handle(self, message: Message) -> None:
        """Act on one message (called on this actor's thread, one at a time)."""
        raise NotImplementedError

    def after_internal_error(self, exc: Exception) -> None:
        """Recover after :meth:`handle` raised ``exc`` (already logged); by default, nothing."""

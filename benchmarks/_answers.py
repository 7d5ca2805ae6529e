"""An actor that receives the answers to :meth:`Runtime.actor_face` requests, so a
benchmark can send many requests without waiting (pipelined), as code living in an
actor would, and then wait for each answer by its request id."""

from __future__ import annotations

import threading
import time
from typing import Any

import pykka

from llama_actors import ActorFace, Replied, Runtime

__all__ = ["Answers"]


class _Inbox(pykka.ThreadingActor):
    """Files every :class:`Replied` it is told under its request id."""

    use_daemon_thread = True

    def __init__(self, answers: Answers) -> None:
        super().__init__()
        self.answers = answers

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Replied):
            self.answers.put(message)
        return None


class Answers:
    """The replies to one runtime's :attr:`face`: send through it, wait with
    :meth:`get`; a context manager that stops its actor on exit."""

    def __init__(self, runtime: Runtime) -> None:
        self._cond = threading.Condition()
        self._replies: dict[str, Replied] = {}
        self._actor = _Inbox.start(self)
        self.face: ActorFace = runtime.actor_face(self._actor)

    def __enter__(self) -> Answers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._actor.stop()

    def put(self, reply: Replied) -> None:
        with self._cond:
            self._replies[reply.request_id] = reply
            self._cond.notify_all()

    def get(self, request_id: str, timeout: float = 60.0) -> Any:
        """The answer's value (its error raised) once it arrives."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while request_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer to {request_id} within {timeout:g}s")
                self._cond.wait(left)
            reply = self._replies.pop(request_id)
        if reply.error is not None:
            raise reply.error
        return reply.value

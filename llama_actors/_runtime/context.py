"""What every actor of one runtime shares, and how answers reach whoever asked."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pykka

from llama_actors._base.clock import TimerHandle, Timers
from llama_actors._kernel.health import ProbeGetter
from llama_actors._kernel.memory import Capacity, Gpu
from llama_actors._kernel.policy import InstancePolicy
from llama_actors._runtime.board import StatusBoard
from llama_actors._runtime.messages import Message, Replied

__all__ = ["Context", "deliver", "tell", "tell_later"]

log = logging.getLogger("llama_actors.runtime")


@dataclass(eq=False)
class Context:
    """The shared parts of one runtime: time, the board, the HTTP client, the folders,
    and the refs of the two singleton actors (set once they have started)."""

    timers: Timers
    board: StatusBoard
    client: ProbeGetter
    state_dir: Path
    rng: random.Random
    policy: InstancePolicy
    lease_ttl_ms: int
    capacity: Capacity | None = None
    #: The GPUs estimates place layers on: the capacity's, else what NVML found.
    gpus: tuple[Gpu, ...] = ()
    #: The capacity of each host, by host id (empty: the runtime has no hosts).
    host_capacity: dict[str, Capacity] = field(default_factory=dict)
    #: Whether the runtime runs its servers on hosts (``Runtime(hosts=...)``).
    hosted: bool = False
    supervisor: pykka.ActorRef[Any] | None = None
    broker: pykka.ActorRef[Any] | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    threads_lock: threading.Lock = field(default_factory=threading.Lock)

    def register_thread(self) -> None:
        """Record the calling actor's thread so closing the runtime can join it."""
        with self.threads_lock:
            self.threads.append(threading.current_thread())

    def log_path(self, instance_id: str) -> Path:
        return self.state_dir / "logs" / f"{instance_id}.log"


def tell(ref: pykka.ActorRef[Any] | None, message: Message) -> bool:
    """Tell ``message`` to ``ref``; False (and nothing raised) if it has stopped."""
    if ref is None:
        return False
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        return False
    return True


def tell_later(
    timers: Timers, delay_s: float, ref: pykka.ActorRef[Any] | None, message: Message
) -> TimerHandle:
    """Tell ``message`` to ``ref`` after ``delay_s`` seconds on ``timers``."""

    def fire() -> None:
        tell(ref, message)

    return timers.call_later(delay_s, fire)


def deliver(
    reply: Any, request_id: str, value: Any = None, error: BaseException | None = None
) -> None:
    """Answer a request: set a future, or tell an actor a :class:`Replied`."""
    if reply is None:
        return
    if isinstance(reply, pykka.ActorRef):
        tell(reply, Replied(request_id=request_id, value=value, error=error))
        return
    if isinstance(reply, pykka.Future):
        with contextlib.suppress(Exception):  # already set: a second answer is dropped
            if error is not None:
                reply.set_exception((type(error), error, error.__traceback__))
            else:
                reply.set(value)
        return
    log.error("cannot deliver an answer to %r", reply)

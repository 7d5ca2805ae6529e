"""The asyncio face of the runtime: every blocking call as a coroutine that never blocks
the event loop, and the runtime's signals as an async iterator.

.. code-block:: python

    async with AsyncRuntime() as runtime:
        resolution = await runtime.resolve_endpoint(spec, "my-service", timeout=60)
        ...
        await runtime.release(resolution.lease.lease_ref)

No call holds a thread while it waits. The runtime's actors answer a request by setting
a pykka future; the futures made here also complete an asyncio future on the caller's
loop (``loop.call_soon_threadsafe`` from the actor thread that answers), and that is what
the coroutine awaits. Two steps do use a worker thread of the loop's default executor,
briefly: checking a resolve or ensure request (the first request for a binary runs it
with ``--version`` and ``--help``) and :meth:`AsyncRuntime.close` (it joins the actor
threads).

Timeouts and cancellation behave as in :class:`~llama_actors.Runtime`: a caller whose
``timeout`` passes gets :class:`WaitTimeoutError`, and a caller whose task is cancelled
gets :class:`asyncio.CancelledError`. Either way the supervisor forgets the request, and
a lease granted to it in the meantime is released, so no lease leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Generic, Literal, TypeVar

import blinker
import pykka

from llama_actors._base.clock import Timers
from llama_actors._exceptions import LlamaActorsError, SignalOverflowError, UsageError
from llama_actors._kernel.backend import BackendSpec
from llama_actors._kernel.memory import Capacity
from llama_actors._kernel.policy import InstancePolicy
from llama_actors._kernel.types import (
    EndpointDescriptor,
    Ensured,
    Lease,
    Resolution,
    RuntimeSnapshot,
    RuntimeStatistics,
)
from llama_actors._runtime.calls import Call, Calls, LeaseLike
from llama_actors._runtime.requests import Consumer
from llama_actors._runtime.runtime import (
    DEFAULT_ASK_TIMEOUT,
    DEFAULT_LEASE_TTL_MS,
    DEFAULT_RESOLVE_TIMEOUT,
    HEALTH_SIGNALS,
    Runtime,
    healthy_or_raise,
)
from llama_actors._runtime.signals import ALL_SIGNALS, probe_completed

__all__ = [
    "AsyncRuntime",
    "SignalEvent",
    "SignalStream",
    "signal_stream",
]

log = logging.getLogger("llama_actors.aio")
T = TypeVar("T")

#: The default bound of a :class:`SignalStream`'s queue.
DEFAULT_STREAM_SIZE = 1000


class _LoopFuture(pykka.ThreadingFuture[T], Generic[T]):
    """A pykka future that also completes ``self.awaitable`` on an asyncio loop.

    The runtime answers through :func:`llama_actors._runtime.context.deliver`, which sets a
    pykka future on an actor thread. pykka futures have no completion callback, so this
    one forwards the answer itself, from the setting thread, with
    ``loop.call_soon_threadsafe``: the only loop call that is safe from another thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self.awaitable: asyncio.Future[T] = loop.create_future()

    def set(self, value: Any | None = None) -> None:
        super().set(value)  # raises queue.Full for a second answer: nothing is forwarded
        self._forward(value, None)

    def set_exception(self, exc_info: Any = None) -> None:
        if exc_info is None:
            exc_info = sys.exc_info()
        super().set_exception(exc_info)
        error = exc_info[1] if exc_info[1] is not None else exc_info[0]()
        self._forward(None, error)

    def _forward(self, value: Any, error: BaseException | None) -> None:
        # A closed loop has nobody left waiting for this answer.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_settle, self.awaitable, value, error)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the caller timed out or was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class AsyncRuntime:
    """:class:`~llama_actors.Runtime` for asyncio code: the same calls, awaitable.

    ``AsyncRuntime(**kwargs)`` makes a new Runtime with the same keyword arguments
    (``state_dir``, ``policy``, ``lease_ttl_ms``, ``ask_timeout``, ``timers``, ``rng``,
    ``capacity``) and
    closes it when its ``async with`` ends. :meth:`wrap` puts this face on a Runtime you
    already have; leaving ``async with`` then leaves it open for its owner to close
    (:meth:`close` closes it either way).
    """

    def __init__(
        self,
        *,
        state_dir: str | Path | None = None,
        policy: InstancePolicy | None = None,
        lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS,
        ask_timeout: float = DEFAULT_ASK_TIMEOUT,
        timers: Timers | None = None,
        rng: random.Random | None = None,
        capacity: Capacity | None = None,
    ) -> None:
        self._runtime = Runtime(
            state_dir=state_dir,
            policy=policy,
            lease_ttl_ms=lease_ttl_ms,
            ask_timeout=ask_timeout,
            timers=timers,
            rng=rng,
            capacity=capacity,
        )
        self._calls: Calls = self._runtime._calls
        self._owned = True

    @classmethod
    def wrap(cls, runtime: Runtime) -> AsyncRuntime:
        """The asyncio face of an existing ``runtime``; both faces can be used at once."""
        if not isinstance(runtime, Runtime):
            raise UsageError(
                f"AsyncRuntime.wrap() takes a llama_actors.Runtime (got {runtime!r}); "
                "to make a new one, call AsyncRuntime(**runtime_kwargs)"
            )
        face = cls.__new__(cls)
        face._runtime = runtime
        face._calls = runtime._calls
        face._owned = False
        return face

    @property
    def runtime(self) -> Runtime:
        """The synchronous Runtime behind this face."""
        return self._runtime

    async def __aenter__(self) -> AsyncRuntime:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owned:
            await self.close()

    def __repr__(self) -> str:
        return f"<AsyncRuntime of {self._runtime!r}>"

    # -- resolving ----------------------------------------------------------------------

    async def resolve_endpoint(
        self,
        spec: BackendSpec | Mapping[str, Any],
        consumer: Consumer | None = None,
        *,
        owner_ref: str | None = None,
        ttl_ms: int | None = None,
        renewable: bool = True,
        metadata: Mapping[str, Any] | None = None,
        policy: InstancePolicy | None = None,
        timeout: float = DEFAULT_RESOLVE_TIMEOUT,
        wait_for_memory: bool = True,
    ) -> Resolution:
        """:meth:`Runtime.resolve_endpoint`, awaitable: spawn or reuse the instance for
        ``spec``, wait until it is ready, and lease its endpoint to ``owner_ref``."""
        future: _LoopFuture[Resolution] = _LoopFuture(asyncio.get_running_loop())
        # Checking the request may probe the binary (a subprocess, once per build), so it
        # runs off the loop. It sends nothing: a task cancelled meanwhile leaves no trace.
        call = await asyncio.to_thread(
            self._calls.resolve,
            spec,
            consumer,
            owner_ref=owner_ref,
            ttl_ms=ttl_ms,
            renewable=renewable,
            metadata=metadata,
            policy=policy,
            timeout=timeout,
            reply=future,
            wait_for_memory=wait_for_memory,
        )
        resolution: Resolution = await self._wait(call, future)
        return resolution

    async def lease_instance(
        self,
        instance_id: str,
        consumer: Consumer | None = None,
        *,
        owner_ref: str | None = None,
        ttl_ms: int | None = None,
        renewable: bool = True,
        metadata: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_RESOLVE_TIMEOUT,
    ) -> Resolution:
        """:meth:`Runtime.lease_instance`, awaitable: lease a running instance by id,
        once it is ready."""
        future: _LoopFuture[Resolution] = _LoopFuture(asyncio.get_running_loop())
        # Checked on the loop: it reads the status board and probes nothing.
        call = self._calls.lease_instance(
            instance_id,
            consumer,
            owner_ref=owner_ref,
            ttl_ms=ttl_ms,
            renewable=renewable,
            metadata=metadata,
            timeout=timeout,
            reply=future,
        )
        resolution: Resolution = await self._wait(call, future)
        return resolution

    async def ensure_instance(
        self,
        spec: BackendSpec | Mapping[str, Any],
        *,
        policy: InstancePolicy | None = None,
        timeout: float = DEFAULT_RESOLVE_TIMEOUT,
        wait_for_memory: bool = True,
    ) -> Ensured:
        """:meth:`Runtime.ensure_instance`, awaitable: a ready instance, without a lease."""
        future: _LoopFuture[Ensured] = _LoopFuture(asyncio.get_running_loop())
        call = await asyncio.to_thread(
            self._calls.ensure,
            spec,
            policy=policy,
            timeout=timeout,
            reply=future,
            wait_for_memory=wait_for_memory,
        )
        ensured: Ensured = await self._wait(call, future)
        return ensured

    # -- leases -------------------------------------------------------------------------

    async def renew(self, lease_ref: LeaseLike, ttl_ms: int | None = None) -> Lease:
        """:meth:`Runtime.renew`, awaitable: extend a live lease to now + ``ttl_ms``."""
        future: _LoopFuture[Lease] = _LoopFuture(asyncio.get_running_loop())
        lease: Lease = await self._wait(self._calls.renew(lease_ref, ttl_ms, future), future)
        return lease

    async def release(self, lease_ref: LeaseLike) -> bool:
        """:meth:`Runtime.release`, awaitable: True if the lease was live, else False."""
        future: _LoopFuture[bool] = _LoopFuture(asyncio.get_running_loop())
        call = self._calls.release(lease_ref, future)
        if call is None:
            return False
        released: bool = await self._wait(call, future)
        return released

    async def report(
        self, lease: str | Lease | EndpointDescriptor, ok: bool, *, detail: str | None = None
    ) -> None:
        """:meth:`Runtime.report`, awaitable (it returns at once): say how a request on
        a leased endpoint went."""
        self._calls.report(lease, ok, detail)

    # -- looking (these answer at once) --------------------------------------------------

    def snapshot(self, instance_id: str) -> RuntimeSnapshot:
        """:meth:`Runtime.snapshot`: answers at once from the status board."""
        return self._runtime.snapshot(instance_id)

    def instances(self) -> list[RuntimeSnapshot]:
        """:meth:`Runtime.instances`: answers at once."""
        return self._runtime.instances()

    def statistics(self) -> RuntimeStatistics:
        """:meth:`Runtime.statistics`: answers at once."""
        return self._runtime.statistics()

    def published_endpoint(self, instance_id: str) -> EndpointDescriptor:
        """:meth:`Runtime.published_endpoint`: answers at once."""
        return self._runtime.published_endpoint(instance_id)

    async def wait_healthy(self, instance_id: str, timeout: float) -> RuntimeSnapshot:
        """:meth:`Runtime.wait_healthy`, awaitable: wait until the instance is ready and
        healthy. Raises :class:`InstanceFailedError` if it fails or stops first and
        :class:`WaitTimeoutError` when ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake(_sender: object, **_: object) -> None:  # on an actor thread: hand off
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(changed.set)

        for signal in HEALTH_SIGNALS:
            signal.connect(wake, sender=instance_id, weak=False)
        try:
            deadline = loop.time() + timeout
            while True:
                changed.clear()
                snap = self._runtime.snapshot(instance_id)
                if healthy_or_raise(snap, timeout, deadline - loop.time()):
                    return snap
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), max(0.0, deadline - loop.time()))
        finally:
            for signal in HEALTH_SIGNALS:
                signal.disconnect(wake)  # from every sender (see Runtime.wait_healthy)

    # -- stopping -----------------------------------------------------------------------

    async def stop_instance(
        self, instance_id: str, *, drain_timeout: float | None = None, timeout: float | None = None
    ) -> RuntimeSnapshot:
        """:meth:`Runtime.stop_instance`, awaitable: drain, then stop; the final snapshot."""
        future: _LoopFuture[RuntimeSnapshot] = _LoopFuture(asyncio.get_running_loop())
        call = self._calls.stop(
            instance_id, drain_timeout=drain_timeout, timeout=timeout, reply=future
        )
        snapshot: RuntimeSnapshot = await self._wait(call, future)
        return snapshot

    async def close(self, timeout: float = 60.0) -> None:
        """:meth:`Runtime.close`, awaitable: stop every instance and join every actor
        thread. The joining happens in a worker thread, so the loop keeps running."""
        await asyncio.to_thread(self._runtime.close, timeout)

    # -- internals ----------------------------------------------------------------------

    async def _wait(self, call: Call, future: _LoopFuture[Any]) -> Any:
        """Send ``call`` and await its answer, as :meth:`Calls.wait` blocks on it."""
        self._calls.send(call)
        try:
            done, _ = await asyncio.wait((future.awaitable,), timeout=call.timeout)
        except asyncio.CancelledError:
            future.awaitable.cancel()
            self._calls.abandon(call)
            raise
        if not done:
            future.awaitable.cancel()
            raise self._calls.timed_out(call) from None
        try:
            return future.awaitable.result()
        except LlamaActorsError as exc:
            # Raised again from here, so the traceback ends in the caller's frame.
            raise exc.with_traceback(None) from None


# -- signals as an async iterator ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignalEvent:
    """One signal the runtime sent: its name (``instance_ready``), the instance it is
    about, when (``at``, wall-clock seconds) and its other keywords (read-only)."""

    name: str
    instance_id: str
    at: float
    payload: Mapping[str, Any]


Overflow = Literal["drop_oldest", "error"]


class SignalStream:
    """The runtime's signals as an async iterator of :class:`SignalEvent`, in the order
    they were sent. Make one with :func:`signal_stream`; it receives only while in its
    ``async with`` and disconnects every receiver when that ends.

    The receivers run on the runtime's actor threads, and all they do is hand the event to
    the loop (``loop.call_soon_threadsafe``). Events wait in a queue of at most
    ``maxsize``. When it is full, ``overflow="drop_oldest"`` (the default) drops the oldest
    waiting event to make room and counts it in :attr:`dropped`, so a slow consumer sees
    the newest events and never slows the runtime; ``overflow="error"`` ends the iteration
    with :class:`SignalOverflowError` instead, after the events that did fit.
    """

    def __init__(
        self,
        names: tuple[str, ...],
        instance_id: str | None,
        maxsize: int,
        overflow: Overflow,
    ) -> None:
        known = {**ALL_SIGNALS, "probe_completed": probe_completed}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(
                f"unknown signal names {unknown}; use names from "
                f"llama_actors.signals.ALL_SIGNALS or 'probe_completed': {sorted(known)}"
            )
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize <= 0:
            raise UsageError(f"maxsize must be a positive number of events (got {maxsize!r})")
        if overflow not in ("drop_oldest", "error"):
            raise UsageError(f"overflow must be 'drop_oldest' or 'error' (got {overflow!r})")
        self.names = names or tuple(ALL_SIGNALS)
        self.instance_id = instance_id
        self.maxsize = maxsize
        self.overflow: Overflow = overflow
        #: Events dropped because the queue was full.
        self.dropped = 0
        self._signals = [known[n] for n in self.names]
        # None in the queue marks the end: close() puts it there to wake a waiting reader.
        self._queue: asyncio.Queue[SignalEvent | None] | None = None
        self._receivers: list[tuple[blinker.NamedSignal, Any]] = []
        self._open = False

    async def __aenter__(self) -> SignalStream:
        if self._receivers:
            raise UsageError("this signal stream is already open; make a new one per use")
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()  # bounded by _push, which knows the overflow policy
        self._open = True
        sender: Any = blinker.ANY if self.instance_id is None else self.instance_id
        for name, signal in zip(self.names, self._signals, strict=True):
            receiver = self._receiver(loop, name)
            signal.connect(receiver, sender=sender, weak=False)
            self._receivers.append((signal, receiver))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect every receiver. Events already queued can still be read, then the
        iteration ends."""
        if self._open and self._queue is not None:
            self._queue.put_nowait(None)
        self._open = False
        for signal, receiver in self._receivers:
            # From every sender: disconnect(fn, sender=...) would leave fn connected.
            signal.disconnect(receiver)
        self._receivers.clear()

    @property
    def connected(self) -> bool:
        """True while the stream's receivers are connected."""
        return bool(self._receivers)

    def _receiver(self, loop: asyncio.AbstractEventLoop, name: str) -> Any:
        def receive(sender: str, **payload: Any) -> None:  # on an actor thread: hand off
            payload.pop("instance_id", None)
            at = payload.pop("at", 0.0)
            event = SignalEvent(name, sender, at, MappingProxyType(payload))
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._push, event)

        return receive

    def _push(self, event: SignalEvent) -> None:  # on the loop
        queue = self._queue
        if queue is None or not self._open:
            return
        if self.overflow == "error" and self.dropped:
            self.dropped += 1  # after an overflow nothing more is queued: the reader stops
            return
        if queue.qsize() >= self.maxsize:
            self.dropped += 1
            if self.overflow == "error":
                return
            queue.get_nowait()
            if self.dropped == 1:
                log.warning(
                    "signal stream: its consumer is %d events behind; dropping the oldest",
                    self.maxsize,
                )
        queue.put_nowait(event)

    def __aiter__(self) -> AsyncIterator[SignalEvent]:
        return self

    async def __anext__(self) -> SignalEvent:
        queue = self._queue
        if queue is None:
            raise UsageError(
                "open the signal stream first: `async with signal_stream(...) as events:`"
            )
        if queue.empty():
            if self.overflow == "error" and self.dropped:
                raise SignalOverflowError(self.maxsize, self.dropped)
            if not self._open:
                raise StopAsyncIteration
        event = await queue.get()
        if event is None:
            raise StopAsyncIteration
        return event


def signal_stream(
    *names: str,
    instance_id: str | None = None,
    maxsize: int = DEFAULT_STREAM_SIZE,
    overflow: Overflow = "drop_oldest",
) -> SignalStream:
    """The runtime's signals as an async iterator, while in ``async with``::

        async with signal_stream("instance_ready", "health_changed") as events:
            async for event in events:
                print(event.name, event.instance_id, dict(event.payload))

    ``names`` picks signals (default: all of ``llama_actors.signals.ALL_SIGNALS``;
    ``probe_completed`` only when named), ``instance_id`` one instance. The iteration
    does not end on its own while the stream is open: ``break`` out of it, or bound it
    with ``asyncio.timeout()``. See :class:`SignalStream` for ``maxsize`` and
    ``overflow``.
    """
    return SignalStream(names, instance_id, maxsize, overflow)

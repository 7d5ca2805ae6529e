"""The runtime for code that lives in a pykka actor (:meth:`Runtime.actor_face`).

The same requests as :class:`~llama_actors.Runtime`, built and checked the same way in
the calling actor's own thread (bad input raises there, at once), sent the same way,
but never waited for: each call returns its request id, and the answer is told to
the actor named at construction as a :class:`~llama_actors.Replied` with that id
(``value`` or ``error`` set). Because a request is checked in the calling thread, the
first request for a llama-server binary runs its ``--version``/``--help`` probe there,
once per build.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pykka

from llama_actors._kernel.backend import BackendSpec
from llama_actors._kernel.policy import InstancePolicy
from llama_actors._kernel.types import EndpointDescriptor, Lease
from llama_actors._runtime.calls import Call, Calls, LeaseLike, lease_ref_of
from llama_actors._runtime.context import deliver
from llama_actors._runtime.requests import Consumer

__all__ = ["ActorFace"]


class ActorFace:
    """Requests whose answers are told to an actor; see the module docstring."""

    def __init__(self, calls: Calls, reply_to: pykka.ActorRef[Any] | pykka.Future[Any]) -> None:
        self._calls = calls
        self.reply_to = reply_to

    def __repr__(self) -> str:
        return f"<ActorFace replying to {self.reply_to!r}>"

    def resolve_endpoint(
        self,
        spec: BackendSpec | Mapping[str, Any],
        consumer: Consumer | None = None,
        *,
        owner_ref: str | None = None,
        ttl_ms: int | None = None,
        renewable: bool = True,
        metadata: Mapping[str, Any] | None = None,
        policy: InstancePolicy | None = None,
        wait_for_memory: bool = True,
    ) -> str:
        """Start a resolve; the :class:`~llama_actors.Resolution` (or the error) is
        told to ``reply_to``. Returns the request id the answer carries. A resolve
        waiting for memory waits until there is room (no timeout here: cancel it to
        stop waiting), unless ``wait_for_memory`` is False."""
        return self._send(
            self._calls.resolve(
                spec,
                consumer,
                owner_ref=owner_ref,
                ttl_ms=ttl_ms,
                renewable=renewable,
                metadata=metadata,
                policy=policy,
                timeout=0.0,
                reply=self.reply_to,
                wait_for_memory=wait_for_memory,
            )
        )

    def lease_instance(
        self,
        instance_id: str,
        consumer: Consumer | None = None,
        *,
        owner_ref: str | None = None,
        ttl_ms: int | None = None,
        renewable: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Lease a running instance by id (:meth:`Runtime.lease_instance`); the
        :class:`~llama_actors.Resolution` (or the error) is told to ``reply_to`` once
        it is ready. Returns the request id the answer carries."""
        return self._send(
            self._calls.lease_instance(
                instance_id,
                consumer,
                owner_ref=owner_ref,
                ttl_ms=ttl_ms,
                renewable=renewable,
                metadata=metadata,
                timeout=0.0,
                reply=self.reply_to,
            )
        )

    def ensure_instance(
        self,
        spec: BackendSpec | Mapping[str, Any],
        *,
        policy: InstancePolicy | None = None,
        wait_for_memory: bool = True,
    ) -> str:
        """Like :meth:`resolve_endpoint` without a lease; the answer is an
        :class:`~llama_actors.Ensured`."""
        return self._send(
            self._calls.ensure(
                spec,
                policy=policy,
                timeout=0.0,
                reply=self.reply_to,
                wait_for_memory=wait_for_memory,
            )
        )

    def renew(self, lease_ref: LeaseLike, ttl_ms: int | None = None) -> str:
        """Renew a lease; the new :class:`~llama_actors.Lease` or the error is told to
        ``reply_to`` (request id: the lease ref)."""
        return self._send(self._calls.renew(lease_ref, ttl_ms, self.reply_to))

    def release(self, lease_ref: LeaseLike) -> str:
        """Release a lease (idempotent); ``reply_to`` is told True or False."""
        call = self._calls.release(lease_ref, self.reply_to)
        if call is None:  # the runtime is closed: every lease has ended
            ref = lease_ref if isinstance(lease_ref, str) else lease_ref_of(lease_ref)
            deliver(self.reply_to, ref, value=False)
            return ref
        return self._send(call)

    def report(
        self, lease: str | Lease | EndpointDescriptor, ok: bool, *, detail: str | None = None
    ) -> None:
        """:meth:`Runtime.report`: say how a request on a leased endpoint went (nothing
        is told back)."""
        self._calls.report(lease, ok, detail)

    def stop_instance(self, instance_id: str, *, drain_timeout: float | None = None) -> str:
        """Drain and stop an instance; ``reply_to`` is told its final snapshot
        (request id: the instance id)."""
        return self._send(
            self._calls.stop(
                instance_id, drain_timeout=drain_timeout, timeout=None, reply=self.reply_to
            )
        )

    def _send(self, call: Call) -> str:
        self._calls.send(call)
        return call.request_id

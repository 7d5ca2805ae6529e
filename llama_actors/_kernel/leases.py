"""The lease table: the pure bookkeeping behind the LeaseBroker actor.

Time comes from a clock passed in, so TTLs are tested without waiting. A lease that
ended is remembered (bounded) with how it ended, so renewing it says "expired" or
"released" instead of "unknown".
"""

from __future__ import annotations

import heapq
import itertools
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from llama_actors._base.units import seconds
from llama_actors._exceptions import (
    LeaseExpiredError,
    LeaseNotFoundError,
    LeaseNotRenewableError,
    NotReadyError,
    UsageError,
)
from llama_actors._kernel.types import Lease

__all__ = ["EndReason", "LeaseTable"]

EndReason = str  # "released" | "expired" | "instance stopped" | "drained"
_REMEMBER_ENDED = 10_000


class LeaseTable:
    """Live leases by ref, per-instance counts and one expiry heap."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._live: dict[str, Lease] = {}
        self._by_instance: dict[str, set[str]] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._ended: OrderedDict[str, tuple[str, EndReason]] = OrderedDict()
        self._closed: dict[str, str] = {}

    # -- queries ----------------------------------------------------------------------

    def get(self, lease_ref: str) -> Lease | None:
        return self._live.get(lease_ref)

    def count(self, instance_id: str) -> int:
        return len(self._by_instance.get(instance_id, ()))

    def leases_of(self, instance_id: str) -> list[Lease]:
        return [self._live[r] for r in sorted(self._by_instance.get(instance_id, ()))]

    def live(self) -> list[Lease]:
        return list(self._live.values())

    def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` of a live lease (stale heap entries dropped)."""
        while self._heap:
            when, _, ref = self._heap[0]
            lease = self._live.get(ref)
            if lease is not None and lease.expires_at == when:
                return when
            heapq.heappop(self._heap)
        return None

    def ended(self, lease_ref: str) -> EndReason | None:
        entry = self._ended.get(lease_ref)
        return entry[1] if entry else None

    # -- changes ----------------------------------------------------------------------

    def close_instance(self, instance_id: str, why: str) -> None:
        """Refuse new grants for ``instance_id`` (draining or stopped)."""
        self._closed[instance_id] = why

    def open_instance(self, instance_id: str) -> None:
        self._closed.pop(instance_id, None)

    def grant(
        self,
        instance_id: str,
        owner_ref: str | None,
        ttl_ms: int,
        *,
        renewable: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ) -> Lease:
        if ttl_ms <= 0:
            raise _bad_ttl(ttl_ms)
        if (why := self._closed.get(instance_id)) is not None:
            raise NotReadyError(
                f"instance {instance_id} takes no new leases: it is {why}; resolve again "
                "once it has stopped to get a fresh instance",
                instance_id=instance_id,
            )
        now = self._clock()
        lease = Lease(
            lease_ref=f"lease-{secrets.token_hex(8)}",
            instance_id=instance_id,
            owner_ref=owner_ref,
            ttl_ms=ttl_ms,
            renewable=renewable,
            granted_at=now,
            expires_at=now + seconds(ttl_ms),
            metadata=dict(metadata or {}),
        )
        self._put(lease)
        return lease

    def renew(
        self, lease_ref: str, ttl_ms: int | None = None, *, now: float | None = None
    ) -> Lease:
        """Extend a live lease to ``now + ttl`` (its own TTL when ``ttl_ms`` is None).

        ``now`` (the clock's by default) lets a caller renew at the moment it last
        called :meth:`expire_due`, so a lease that is not expired then is live here."""
        now = self._clock() if now is None else now
        lease = self._live_or_raise(lease_ref, now)
        if not lease.renewable:
            raise LeaseNotRenewableError(
                f"lease {lease_ref} was granted with renewable=False, so it cannot be renewed; "
                "it stays live until its TTL runs out or it is released. For more time, take "
                "a new lease before then (resolve_endpoint or lease_instance)",
                lease_ref=lease_ref,
            )
        ttl = lease.ttl_ms if ttl_ms is None else ttl_ms
        if ttl <= 0:
            raise _bad_ttl(ttl)
        renewed = msgspec.structs.replace(lease, ttl_ms=ttl, expires_at=now + seconds(ttl))
        self._put(renewed)
        return renewed

    def release(self, lease_ref: str) -> Lease | None:
        """End a lease; None when it had already ended or never existed (idempotent)."""
        return self._end(lease_ref, "released")

    def expire_due(self, now: float | None = None) -> list[Lease]:
        """End every lease whose ``expires_at`` is not after ``now`` (the clock's by
        default), earliest first."""
        now = self._clock() if now is None else now
        expired: list[Lease] = []
        while (when := self.next_expiry()) is not None and when <= now:
            _, _, ref = heapq.heappop(self._heap)
            if (lease := self._end(ref, "expired")) is not None:
                expired.append(lease)
        return expired

    def end_instance(self, instance_id: str, reason: EndReason) -> list[Lease]:
        """End every lease on ``instance_id`` (it stopped, or a drain ran out)."""
        return [
            lease
            for ref in sorted(self._by_instance.get(instance_id, set()).copy())
            if (lease := self._end(ref, reason)) is not None
        ]

    def forget_instance(self, instance_id: str) -> None:
        self._closed.pop(instance_id, None)
        self._by_instance.pop(instance_id, None)

    # -- internals --------------------------------------------------------------------

    def _live_or_raise(self, lease_ref: str, now: float) -> Lease:
        lease = self._live.get(lease_ref)
        if lease is not None and lease.expires_at > now:
            return lease
        # Past its TTL but not yet swept: it stays in the table, so the next
        # expire_due() ends it (and the broker signals that); here it is just too late.
        reason = "expired" if lease is not None else self.ended(lease_ref)
        if reason == "expired":
            raise LeaseExpiredError(
                f"lease {lease_ref} expired; renew before its TTL runs out, or resolve again",
                lease_ref=lease_ref,
            )
        if reason is not None:
            raise LeaseNotFoundError(
                f"lease {lease_ref} has ended ({reason}); resolve again for a new one",
                lease_ref=lease_ref,
            )
        raise LeaseNotFoundError(
            f"no lease {lease_ref!r} in this runtime; use the lease_ref of a Resolution",
            lease_ref=lease_ref,
        )

    def _put(self, lease: Lease) -> None:
        self._live[lease.lease_ref] = lease
        self._by_instance.setdefault(lease.instance_id, set()).add(lease.lease_ref)
        heapq.heappush(self._heap, (lease.expires_at, next(self._seq), lease.lease_ref))

    def _end(self, lease_ref: str, reason: EndReason) -> Lease | None:
        lease = self._live.pop(lease_ref, None)
        if lease is None:
            return None
        refs = self._by_instance.get(lease.instance_id)
        if refs is not None:
            refs.discard(lease_ref)
        self._ended[lease_ref] = (lease.instance_id, reason)
        while len(self._ended) > _REMEMBER_ENDED:
            self._ended.popitem(last=False)
        return lease


def _bad_ttl(ttl_ms: int) -> UsageError:
    return UsageError(f"ttl_ms must be a positive number of milliseconds (got {ttl_ms!r})")

"""Admission: whether a new instance fits a host's capacity, and what to evict so it
does (CONTRACT §11). Pure: the supervisor gives it the instances and their state, it
answers; it never looks at a clock or an actor.

The rules: what an instance holds counts from the moment it is admitted until its
process is gone. A resolve that does not fit evicts instances that hold no lease and
that nobody waits on, least recently used first, and only those whose memory is on
a resource that is short. If evicting every such instance would still not make room,
it waits (or fails at once when asked to). A need larger than the whole capacity
never fits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from llama_actors._kernel.memory import Capacity, MemoryNeed, resources_of

__all__ = ["Admission", "Holder", "Verdict"]

#: Slack for float sums: a figure this close to its cap still fits.
_EPSILON = 1e-6


@dataclass(frozen=True)
class Holder:
    """One admitted instance as admission sees it: what it holds, whether it may be
    evicted (no lease, nobody waiting on it, not already going) and when it was last
    used (for least recently used first)."""

    instance_id: str
    need: MemoryNeed
    state: str = "ready"
    leases: int = 0
    evictable: bool = False
    last_used: float = 0.0


@dataclass(frozen=True)
class Verdict:
    """What admission says of a need: ``fits`` now; fits once ``evict`` are gone;
    ``wait`` until something is released; ``never`` (larger than the capacity).
    ``free`` and ``short`` are per resource, in MiB, before any eviction."""

    kind: Literal["fits", "evict", "wait", "never"]
    need: MemoryNeed
    free: dict[str, float]
    short: dict[str, float]
    evict: tuple[str, ...] = ()
    holders: tuple[Holder, ...] = field(default=())


class Admission:
    """The memory ledger of one host: who holds what, against its :class:`Capacity`."""

    def __init__(self, capacity: Capacity | None = None) -> None:
        self.capacity = capacity or Capacity()
        self.held: dict[str, MemoryNeed] = {}

    # -- the ledger -------------------------------------------------------------------

    def hold(self, instance_id: str, need: MemoryNeed) -> None:
        """``instance_id`` is admitted with ``need`` (or its figure changed: a measured
        one replaces the estimate)."""
        self.held[instance_id] = need

    def release(self, instance_id: str) -> None:
        """Its process is gone: what it held is free again."""
        self.held.pop(instance_id, None)

    def used(self, *, without: Iterable[str] = ()) -> dict[str, float]:
        """What the admitted instances hold, per resource (shared pages once per file)."""
        skip = set(without)
        return resources_of(need for iid, need in self.held.items() if iid not in skip)

    def free(self) -> dict[str, float]:
        """What is left of each capped resource (negative when a measured figure grew
        past the capacity)."""
        used = self.used()
        return {r: limit - used.get(r, 0.0) for r, limit in self.capacity.limits().items()}

    def over(self) -> dict[str, float]:
        """Resources whose use is past their cap, and by how much."""
        return {r: -left for r, left in self.free().items() if left < -_EPSILON}

    # -- deciding ---------------------------------------------------------------------

    def check(self, need: MemoryNeed, holders: Sequence[Holder]) -> Verdict:
        """Whether ``need`` fits; ``holders`` describe the admitted instances (those not
        listed count as not evictable)."""
        free = self.free()
        short = self._short(need)
        if self._too_big(need):
            return Verdict("never", need, free, short, holders=tuple(holders))
        if not short:
            return Verdict("fits", need, free, {}, holders=tuple(holders))
        evict = self._victims(need, holders)
        if evict is None:
            return Verdict("wait", need, free, short, holders=tuple(holders))
        return Verdict("evict", need, free, short, evict=evict, holders=tuple(holders))

    def relieve(self, holders: Sequence[Holder]) -> tuple[str, ...]:
        """The evictable instances to stop, least recently used first, so that what is
        held is back within the capacity after a measured figure grew past it (as
        many as help, even if they are not enough)."""
        chosen: list[str] = []
        for holder in _lru(holders):
            over = self._short(None, chosen)
            if not over:
                break
            if self._helps(holder.need, over):
                chosen.append(holder.instance_id)
        return tuple(chosen)

    def _victims(self, need: MemoryNeed, holders: Sequence[Holder]) -> tuple[str, ...] | None:
        chosen: list[str] = []
        for holder in _lru(holders):
            if holder.instance_id not in self.held:
                continue
            short = self._short(need, chosen)
            if not short:
                break
            if self._helps(self.held[holder.instance_id], short):
                chosen.append(holder.instance_id)
        if self._short(need, chosen):
            return None
        return tuple(chosen)

    def _short(self, need: MemoryNeed | None, without: Iterable[str] = ()) -> dict[str, float]:
        """Per capped resource, how much is missing for ``need`` on top of what the
        instances not in ``without`` hold (``need`` None: how far they are past the
        caps). Shared pages of a file one of them maps already cost nothing more."""
        skip = set(without)
        kept = [n for iid, n in self.held.items() if iid not in skip]
        after = resources_of(kept, extra=need)
        limits = self.capacity.limits()
        short: dict[str, float] = {}
        for resource, limit in limits.items():
            missing = after.get(resource, 0.0) - limit
            if missing > _EPSILON:
                short[resource] = missing
        if need is not None and self.capacity.gpus is not None:
            for index, mib in need.gpu_mib.items():
                if f"gpu{index}" not in limits and mib > 0:
                    short[f"gpu{index}"] = mib  # a GPU the capacity does not have
        return short

    def _too_big(self, need: MemoryNeed) -> bool:
        alone = resources_of([need])
        for resource, mib in alone.items():
            limit = self.capacity.limit(resource)
            if limit is not None and mib - limit > _EPSILON:
                return True
        return False

    @staticmethod
    def _helps(need: MemoryNeed, short: dict[str, float]) -> bool:
        alone = resources_of([need])
        return any(alone.get(resource, 0.0) > 0 for resource in short)


def _lru(holders: Sequence[Holder]) -> list[Holder]:
    return sorted((h for h in holders if h.evictable), key=lambda h: (h.last_used, h.instance_id))

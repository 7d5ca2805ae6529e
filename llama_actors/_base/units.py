"""Durations: the public API (specs, policies, TTLs) speaks milliseconds, as the
contract does; inside the library every duration is in seconds, as the clock is.
This is the one place that converts."""

from __future__ import annotations

from typing import overload

__all__ = ["InSeconds", "InSecondsOrNone", "seconds"]


def seconds(ms: float) -> float:
    """``ms`` milliseconds in seconds."""
    return ms / 1000


class InSeconds:
    """A read-only attribute: the millisecond field ``ms_field`` of its owner, in seconds."""

    def __init__(self, ms_field: str) -> None:
        self.ms_field = ms_field

    @overload
    def __get__(self, obj: None, owner: type) -> InSeconds: ...
    @overload
    def __get__(self, obj: object, owner: type) -> float: ...
    def __get__(self, obj: object | None, owner: type) -> InSeconds | float:
        if obj is None:
            return self
        ms: float = getattr(obj, self.ms_field)
        return seconds(ms)


class InSecondsOrNone:
    """Like :class:`InSeconds`, for a millisecond field that may be None (None stays None)."""

    def __init__(self, ms_field: str) -> None:
        self.ms_field = ms_field

    @overload
    def __get__(self, obj: None, owner: type) -> InSecondsOrNone: ...
    @overload
    def __get__(self, obj: object, owner: type) -> float | None: ...
    def __get__(self, obj: object | None, owner: type) -> InSecondsOrNone | float | None:
        if obj is None:
            return self
        ms: float | None = getattr(obj, self.ms_field)
        return None if ms is None else seconds(ms)

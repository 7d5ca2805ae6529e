"""Durations: the public API (specs, policies, TTLs) speaks milliseconds, as the
contract does; inside the library every duration is in seconds, as the clock is.
This is the one place that converts."""

from __future__ import annotations

__all__ = ["seconds"]


def seconds(ms: float) -> float:
    """``ms`` milliseconds in seconds."""
    return ms / 1000

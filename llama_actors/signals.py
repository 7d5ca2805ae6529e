"""The runtime's blinker signals (see :mod:`llama_actors._signals` for each payload)."""

from llama_actors._signals import (
    ALL_SIGNALS,
    health_changed,
    instance_draining,
    instance_failed,
    instance_ready,
    instance_restarting,
    instance_starting,
    instance_stopped,
    lease_expired,
    lease_granted,
    lease_released,
    lease_renewed,
    signals,
)

__all__ = [
    "ALL_SIGNALS",
    "health_changed",
    "instance_draining",
    "instance_failed",
    "instance_ready",
    "instance_restarting",
    "instance_starting",
    "instance_stopped",
    "lease_expired",
    "lease_granted",
    "lease_released",
    "lease_renewed",
    "signals",
]

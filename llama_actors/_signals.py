"""The runtime's blinker signals, in the library's own namespace.

Every signal is sent with the instance id string as sender, so a receiver can
subscribe to one instance (``instance_ready.connect(fn, sender="chat-1a2b3c")``) or
to all. Every send carries ``instance_id`` and ``at`` (wall-clock seconds) plus the
keywords listed below. Receivers run on the sending actor's thread: they should only
record or hand off (put on a queue, set an event, tell an actor). A receiver that
raises is logged and the others still run.

===================  ==============================================================
signal               extra keywords
===================  ==============================================================
instance_starting    ``attempt`` (0 for the first spawn), ``pid``
instance_ready       ``endpoint`` (published descriptor), ``pid``, ``port``,
                     ``elapsed_s`` (spawn to ready)
health_changed       ``old``, ``new``, ``reason``
instance_restarting  ``attempt``, ``delay_s``, ``reason``
instance_draining    ``lease_refs``, ``reason`` (sent only when leases are held)
instance_failed      ``reason``, ``exit`` (ProcessExit or None)
instance_stopped     ``reason``, ``exit`` (ProcessExit or None)
lease_granted        ``lease``
lease_renewed        ``lease``
lease_released       ``lease``, ``reason`` (``released``, ``drained``,
                     ``instance stopped``)
lease_expired        ``lease``
===================  ==============================================================
"""

from __future__ import annotations

import logging
import time
from typing import Any

import blinker

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

log = logging.getLogger("llama_actors.signals")

#: The namespace holding every llama_actors signal.
signals = blinker.Namespace()

instance_starting = signals.signal("instance-starting", doc="a server process was spawned")
instance_ready = signals.signal("instance-ready", doc="an endpoint was published")
health_changed = signals.signal("health-changed", doc="an instance's health changed")
instance_restarting = signals.signal(
    "instance-restarting", doc="a crashed instance will be restarted after a delay"
)
instance_draining = signals.signal(
    "instance-draining", doc="an instance is stopping: it takes no new leases; release yours"
)
instance_failed = signals.signal("instance-failed", doc="supervision gave up on an instance")
instance_stopped = signals.signal("instance-stopped", doc="an instance stopped for good")
lease_granted = signals.signal("lease-granted", doc="a lease was granted")
lease_renewed = signals.signal("lease-renewed", doc="a lease was renewed")
lease_released = signals.signal("lease-released", doc="a lease ended before its TTL")
lease_expired = signals.signal("lease-expired", doc="a lease's TTL ran out")

#: Every signal, by name.
ALL_SIGNALS: dict[str, blinker.NamedSignal] = {
    s.name.replace("-", "_"): s
    for s in (
        instance_starting,
        instance_ready,
        health_changed,
        instance_restarting,
        instance_draining,
        instance_failed,
        instance_stopped,
        lease_granted,
        lease_renewed,
        lease_released,
        lease_expired,
    )
}


def emit(signal: blinker.NamedSignal, instance_id: str, **payload: Any) -> None:
    """Send ``signal`` from ``instance_id`` to each receiver; one that raises is logged
    and does not stop the others or the sending actor."""
    if not signal.receivers:
        return
    payload.setdefault("at", time.time())
    for receiver in signal.receivers_for(instance_id):
        try:
            receiver(instance_id, instance_id=instance_id, **payload)
        except Exception:
            log.exception("a receiver of %s raised; the runtime goes on", signal.name)

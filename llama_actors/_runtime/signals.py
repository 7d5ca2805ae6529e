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
health_changed       ``old``, ``new``, ``reason``, ``cause`` (``ready``, ``probe``,
                     ``inference``, ``saturated``, ``callers``, ``exited``,
                     ``stopped``, ``failed``: saturation is not sickness),
                     ``load`` (the last :class:`ServerLoad` reading, or None)
instance_restarting  ``attempt``, ``delay_s``, ``reason``
instance_draining    ``lease_refs``, ``reason`` (sent only when leases are held)
instance_failed      ``reason``, ``exit`` (ProcessExit or None)
instance_stopped     ``reason``, ``exit`` (ProcessExit or None)
instance_evicted     ``reason``, ``held`` (its MemoryNeed), ``for_alias`` (the spec
                     that needed the room), ``need`` (that spec's MemoryNeed)
lease_granted        ``lease``
lease_renewed        ``lease``
lease_released       ``lease``, ``reason`` (``released``, ``drained``,
                     ``instance stopped``, ``instance failed``, ``host lost``)
lease_expired        ``lease``
===================  ==============================================================

Each send is also one line on the ``llama_actors.transitions`` logger, with the
instance id and the reason: INFO for the ordinary path, WARNING for restarts and
health loss, ERROR when supervision gives up.

``probe_completed`` is not a transition: it is sent after every health probe and
every inference probe (with ``latency_s``, ``verdict``, ``kind``: ``health`` or
``inference``, and ``reason``) for metrics, is not logged and is not in
:data:`ALL_SIGNALS`.
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
    "instance_evicted",
    "instance_failed",
    "instance_ready",
    "instance_restarting",
    "instance_starting",
    "instance_stopped",
    "lease_expired",
    "lease_granted",
    "lease_released",
    "lease_renewed",
    "probe_completed",
    "signals",
]

log = logging.getLogger("llama_actors.signals")
transitions_log = logging.getLogger("llama_actors.transitions")

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
instance_evicted = signals.signal(
    "instance-evicted", doc="an idle instance is stopped to make room for another (admission)"
)
lease_granted = signals.signal("lease-granted", doc="a lease was granted")
lease_renewed = signals.signal("lease-renewed", doc="a lease was renewed")
lease_released = signals.signal("lease-released", doc="a lease ended before its TTL")
lease_expired = signals.signal("lease-expired", doc="a lease's TTL ran out")

probe_completed = signals.signal(
    "probe-completed", doc="a probe finished (latency_s, verdict, kind); for metrics"
)

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
        instance_evicted,
        lease_granted,
        lease_renewed,
        lease_released,
        lease_expired,
    )
}


def emit(signal: blinker.NamedSignal, instance_id: str, **payload: Any) -> None:
    """Log the transition, then send ``signal`` from ``instance_id`` to each receiver;
    one that raises is logged and does not stop the others or the sending actor."""
    if signal is not probe_completed:
        _log_transition(signal.name, instance_id, payload)
    if not signal.receivers:
        return
    payload.setdefault("at", time.time())
    for receiver in signal.receivers_for(instance_id):
        try:
            receiver(instance_id, instance_id=instance_id, **payload)
        except Exception:
            log.exception("a receiver of %s raised; the runtime goes on", signal.name)


def _log_transition(name: str, iid: str, p: dict[str, Any]) -> None:
    level = _LEVELS.get(name, logging.INFO)
    if name == "health-changed" and (
        p.get("new") == "healthy" or str(p.get("reason", "")).startswith("stopped")
    ):
        level = logging.INFO  # recovery, or the end of a stop somebody asked for
    if not transitions_log.isEnabledFor(level):
        return
    transitions_log.log(level, "%s", describe(name, iid, p))


_LEVELS = {
    "instance-restarting": logging.WARNING,
    "instance-failed": logging.ERROR,
    "health-changed": logging.WARNING,
}


def describe(name: str, iid: str, p: dict[str, Any]) -> str:
    """One line for a transition: what happened to which instance, and why."""
    lease = p.get("lease")
    ref = getattr(lease, "lease_ref", "?")
    owner = getattr(lease, "owner_ref", "?")
    match name:
        case "instance-starting":
            return f"instance {iid}: starting (attempt {p.get('attempt')}, pid {p.get('pid')})"
        case "instance-ready":
            return (
                f"instance {iid}: ready on port {p.get('port')} (pid {p.get('pid')}, "
                f"{p.get('elapsed_s', 0):.3f}s after spawn)"
            )
        case "health-changed":
            return f"instance {iid}: health {p.get('old')} -> {p.get('new')} ({p.get('reason')})"
        case "instance-restarting":
            return (
                f"instance {iid}: restarting in {p.get('delay_s', 0):.2f}s, attempt "
                f"{p.get('attempt')} ({p.get('reason')})"
            )
        case "instance-draining":
            refs = p.get("lease_refs", ())
            return f"instance {iid}: draining {len(refs)} lease(s) ({p.get('reason')})"
        case "instance-failed":
            return f"instance {iid}: failed ({p.get('reason')})"
        case "instance-stopped":
            return f"instance {iid}: stopped ({p.get('reason')})"
        case "instance-evicted":
            return f"instance {iid}: evicted ({p.get('reason')})"
        case "lease-granted":
            ttl = getattr(lease, "ttl_ms", "?")
            return f"lease {ref} on {iid}: granted to {owner} for {ttl} ms"
        case "lease-renewed":
            return f"lease {ref} on {iid}: renewed by {owner}"
        case "lease-released":
            return f"lease {ref} on {iid}: released ({p.get('reason')})"
        case "lease-expired":
            return f"lease {ref} on {iid}: expired (owner {owner} did not renew)"
        case _:
            return f"instance {iid}: {name}"

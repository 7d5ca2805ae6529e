"""Record the runtime's signals and wait for them, for tests and examples.

.. code-block:: python

    with SignalRecorder() as signals:
        resolution = runtime.resolve_endpoint(spec, "me")
        iid = resolution.instance.instance_id
        signals.wait_for("health_changed", iid, new="degraded", timeout=5)

Waits use a condition variable, never sleeps, and raise ``AssertionError`` naming what
was recorded when the timeout passes.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import msgspec

from llama_actors._runtime.signals import ALL_SIGNALS, probe_completed

#: What a recorder can listen to: every transition, and ``probe_completed``.
_KNOWN = {**ALL_SIGNALS, "probe_completed": probe_completed}

__all__ = ["Record", "SignalRecorder"]


class Record(msgspec.Struct, frozen=True):
    """One received signal: its name (``instance_ready``), instance id and payload."""

    name: str
    instance_id: str
    payload: dict[str, Any]

    def matches(self, name: str, instance_id: str | None, fields: dict[str, Any]) -> bool:
        if self.name != name or (instance_id is not None and self.instance_id != instance_id):
            return False
        return all(self.payload.get(k) == v for k, v in fields.items())


class SignalRecorder:
    """Connects to every llama_actors signal (or those named) while in its ``with``:
    the transitions and ``probe_completed`` (one per probe)."""

    def __init__(self, *names: str) -> None:
        unknown = [n for n in names if n not in _KNOWN]
        if unknown:
            raise ValueError(f"unknown signals {unknown}; known: {sorted(_KNOWN)}")
        self._names = names or tuple(_KNOWN)
        self._cond = threading.Condition()
        self.records: list[Record] = []
        self._receivers: list[tuple[Any, Any]] = []

    def __enter__(self) -> SignalRecorder:
        for name in self._names:

            def receive(sender: str, _name: str = name, **payload: Any) -> None:
                payload.pop("instance_id", None)
                with self._cond:
                    self.records.append(Record(_name, sender, payload))
                    self._cond.notify_all()

            _KNOWN[name].connect(receive, weak=False)
            self._receivers.append((_KNOWN[name], receive))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self._receivers.clear()

    def names(self, instance_id: str | None = None) -> list[str]:
        """The names received so far, in order (for one instance, or all)."""
        with self._cond:
            return [r.name for r in self.records if instance_id in (None, r.instance_id)]

    def find(self, name: str, instance_id: str | None = None, **fields: Any) -> list[Record]:
        with self._cond:
            return [r for r in self.records if r.matches(name, instance_id, fields)]

    def wait_for(
        self,
        name: str,
        instance_id: str | None = None,
        *,
        timeout: float,
        count: int = 1,
        **fields: Any,
    ) -> Record:
        """Wait until ``count`` matching signals arrived; return the last of them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [r for r in self.records if r.matches(name, instance_id, fields)]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(r.name, r.instance_id) for r in self.records]
                    raise AssertionError(
                        f"no {count}x {name} {fields or ''} for {instance_id or 'any instance'} "
                        f"within {timeout:g}s; recorded: {seen}"
                    )
                self._cond.wait(remaining)

"""HealthPoller: one per instance. While the instance is ready it has the instance's
backend make three kinds of probe, each on its own schedule, with the runtime's probe
client (a fresh connection each time) and a timeout:

- ``health``: ``/health`` every ``health_interval_ms`` (CONTRACT §5);
- ``load``: ``/slots`` and ``/metrics`` every ``load_interval_ms``; the figures go to
  the status board, and every slot busy with requests deferred makes the instance
  ``degraded`` with the cause ``saturated`` (CONTRACT §10);
- ``inference``: real work every ``inference_probe_interval_ms`` (off by default). The
  slot reading comes first: ``/slots`` is answered by the loop that decodes, so a
  server that does not answer it within the probe's timeout has a stuck decode loop
  (a failure). While every slot is busy with callers' work the probe is not sent (it
  would only queue), and a probe that timed out while they all became busy is not
  judged: either leaves the health as it was, and saturation shows instead.

A :class:`HealthTracker` turns what they see into one state, and the poller tells its
BackendActor when that changes, once per change. The BackendActor owns the published
health (it also weighs what callers report); the poller only observes.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import pykka

from llama_actors._base.clock import TimerHandle
from llama_actors._kernel.backend import Backend, BackendSpec
from llama_actors._kernel.health import HealthTracker, Observation, Transition
from llama_actors._kernel.load import LoadReader, ServerLoad
from llama_actors._kernel.policy import InstancePolicy
from llama_actors._runtime.actor import RuntimeActor
from llama_actors._runtime.context import Context, tell, tell_later
from llama_actors._runtime.messages import (
    HealthReport,
    Message,
    Pause,
    Paused,
    ProbeTick,
    Watch,
)
from llama_actors._runtime.signals import emit, probe_completed

__all__ = ["HealthPoller"]

log = logging.getLogger("llama_actors.runtime")
Kind = Literal["health", "load", "inference"]


class HealthPoller(RuntimeActor):
    """Probes one instance while it is ready; see the module docstring."""

    def __init__(
        self,
        *,
        instance_id: str,
        owner: pykka.ActorRef[Any],
        backend: Backend,
        spec: BackendSpec,
        policy: InstancePolicy,
        context: Context,
    ) -> None:
        super().__init__(context=context)
        self.instance_id = instance_id
        self.owner = owner
        self.backend = backend
        self.spec = spec
        self.policy = policy
        self.generation: int | None = None
        self.port: int | None = None
        self.watching = False
        self.tracker = HealthTracker(policy.unavailable_after)
        self.reader: LoadReader | None = None
        self.last_latency_s: float | None = None
        self._next: dict[Kind, TimerHandle] = {}

    def __repr__(self) -> str:
        return f"<HealthPoller of {self.instance_id}>"

    def on_stop(self) -> None:
        self._cancel()

    def after_internal_error(self, exc: Exception) -> None:
        for kind in ("health", "load", "inference"):
            self._schedule(kind)  # keep polling

    def handle(self, message: Message) -> None:
        match message:
            case Watch(generation=gen, port=port):
                self._cancel()
                self.generation, self.port, self.watching = gen, port, True
                self.tracker = HealthTracker(self.policy.unavailable_after)
                self.reader = None
                policy = self.policy
                if policy.load_interval_s is not None or policy.inference_probe_interval_s:
                    self.reader = self.backend.load_reader(self.spec, port)
                self._schedule("health")
                self._schedule("load", 0.0)
                self._schedule("inference")
            case Pause(generation=gen, ack=ack):
                if gen == self.generation:
                    self.generation = None
                    self._cancel()
                if ack:  # this actor runs one probe at a time: none is in flight now
                    tell(self.owner, Paused(generation=gen))
            case ProbeTick(generation=gen, kind=kind):
                if gen is not None and gen == self.generation and self.watching:
                    self._run(gen, kind)
            case _:
                log.warning("health poller of %s: unexpected %r", self.instance_id, message)

    def _run(self, gen: int, kind: Kind) -> None:
        started = self.ctx.timers.now()
        self._next.pop(kind, None)
        delay: float | None
        if kind == "health":
            obs = self.backend.probe_health(
                self.ctx.client,
                self.spec,
                self.port,
                timeout_s=self.policy.probe_timeout_s,
                slow_s=self.policy.slow_probe_s,
            )
            self.last_latency_s = obs.latency_s
            self._completed(obs)
            self._report(gen, self.tracker.observe(obs))
            delay = self.spec.health_interval_s
        elif kind == "load":
            self._read_load(gen, self.policy.probe_timeout_s)
            delay = self.policy.load_interval_s
        else:
            judged = self._probe_inference(gen)
            delay = self.policy.inference_probe_interval_s
            if judged is not None:
                self._completed(judged)
                self._report(gen, self.tracker.observe(judged))
                if delay is not None and judged.verdict == "failure":
                    delay = min(delay, self.spec.health_interval_s)  # confirm it soon
        if delay is not None:
            elapsed = self.ctx.timers.now() - started
            self._schedule(kind, max(0.0, delay - elapsed))

    def _read_load(self, gen: int, timeout_s: float, *, slots: bool = False) -> ServerLoad | None:
        reader = self.reader
        if reader is None:
            return None
        now = self.ctx.timers.now()
        load = reader.read(self.ctx.client, timeout_s=timeout_s, now=now, slots=slots)
        self.ctx.board.set_load(self.instance_id, load)
        if load is None:
            self.reader = None  # it offers neither /slots nor /metrics: stop asking
            self._report(gen, self.tracker.observe_load(None))
        elif load.error is None:
            why = f"saturated: {load.describe()}" if load.saturated else None
            self._report(gen, self.tracker.observe_load(why))
        return load

    def _probe_inference(self, gen: int) -> Observation | None:
        """One inference probe, judged against the slots: None when it cannot be
        judged (every slot is busy with callers' work, so a probe would only measure
        the queue in front of it)."""
        timeout = self.policy.inference_probe_timeout_s
        seen = self._slots_verdict(gen, timeout)
        if seen == "busy":
            return None
        if isinstance(seen, Observation):
            return seen
        client, spec, port = self.ctx.client, self.spec, self.port
        obs = self.backend.probe_inference(client, spec, port, timeout_s=timeout)
        if obs.verdict == "failure" and obs.latency_s >= timeout:
            # Timed out: behind callers' work (not judged), or in a server that takes
            # no work at all (a failure).
            after = self._slots_verdict(gen, self.policy.probe_timeout_s)
            if after == "busy" or (isinstance(after, Observation) and after.verdict != "failure"):
                log.debug("instance %s: inference probe queued behind callers", self.instance_id)
                return None
        return obs

    def _slots_verdict(self, gen: int, timeout_s: float) -> Observation | Literal["busy"] | None:
        """What ``/slots`` shows of the decode loop: a failure when it does not answer
        (the loop that serves it is stuck), a pass when callers' tasks advanced since
        the last reading (real work, seen without adding any), ``busy`` when every slot
        is taken and nothing advanced, None otherwise (or without ``/slots``)."""
        reader = self.reader
        if reader is None or not reader.slots_offered:
            return None
        load = self._read_load(gen, timeout_s, slots=True)
        if reader.timed_out:
            error = load.error if load is not None else "no answer"
            reason = f"inference probe: the decode loop did not answer ({error})"
            return Observation("failure", reason, timeout_s, kind="inference")
        if load is None or load.error is not None:
            return None
        if reader.advanced > 0:
            reason = (
                f"callers' requests advanced {reader.advanced} tokens since the last reading: "
                "the decode loop works (no probe sent)"
            )
            return Observation("healthy", reason, kind="inference")
        return "busy" if load.all_slots_busy else None

    def _completed(self, obs: Observation) -> None:
        payload = {
            "latency_s": obs.latency_s,
            "verdict": obs.verdict,
            "kind": obs.kind,
            "reason": obs.reason,
        }
        emit(probe_completed, self.instance_id, **payload)

    def _report(self, gen: int, change: Transition | None) -> None:
        if change is not None:
            message = HealthReport(
                generation=gen, new=change.new, reason=change.reason, cause=change.cause
            )
            tell(self.owner, message)

    def _schedule(self, kind: Kind, delay: float | None = None) -> None:
        if self.generation is None:
            return
        if delay is None:
            delay = {
                "health": self.spec.health_interval_s,
                "load": self.policy.load_interval_s,
                "inference": self.policy.inference_probe_interval_s,
            }[kind]
        if delay is None or (kind == "load" and self.reader is None):
            return
        if kind == "load" and self.policy.load_interval_s is None:
            return
        if (handle := self._next.get(kind)) is not None:
            handle.cancel()
        self._next[kind] = tell_later(
            self.ctx.timers,
            delay,
            self.actor_ref,
            ProbeTick(generation=self.generation, kind=kind),
        )

    def _cancel(self) -> None:
        for handle in self._next.values():
            handle.cancel()
        self._next.clear()

"""HealthPoller: one per instance. Has the instance's backend probe it every
``health_interval_ms`` with the runtime's probe client (a fresh connection each time)
and a short timeout (``/health``, classified as CONTRACT §5 says, for the built-in
backends) and tells its BackendActor when the state changes, once per change. The
BackendActor owns the published health; the poller only observes.
"""

from __future__ import annotations

import logging
from typing import Any

import pykka

from llama_actors._base.clock import TimerHandle
from llama_actors._kernel.backend import Backend, BackendSpec
from llama_actors._kernel.health import HealthTracker
from llama_actors._kernel.policy import InstancePolicy
from llama_actors._runtime.actor import RuntimeActor
from llama_actors._runtime.context import Context, tell, tell_later
from llama_actors._runtime.messages import HealthReport, Message, Pause, ProbeTick, Watch
from llama_actors._runtime.signals import emit, probe_completed

__all__ = ["HealthPoller"]

log = logging.getLogger("llama_actors.runtime")


class HealthPoller(RuntimeActor):
    """Polls one instance's health while it is ready; see the module docstring."""

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
        self.last_latency_s: float | None = None
        self._next: TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<HealthPoller of {self.instance_id}>"

    def on_stop(self) -> None:
        if self._next is not None:
            self._next.cancel()

    def after_internal_error(self, exc: Exception) -> None:
        self._schedule()  # keep polling

    def handle(self, message: Message) -> None:
        match message:
            case Watch(generation=gen, port=port):
                self.generation, self.port, self.watching = gen, port, True
                self.tracker = HealthTracker(self.policy.unavailable_after)
                self._schedule()
            case Pause(generation=gen):
                if gen == self.generation:
                    self.generation = None
                    if self._next is not None:
                        self._next.cancel()
            case ProbeTick(generation=gen):
                if gen is not None and gen == self.generation:
                    self._probe(gen)
            case _:
                log.warning("health poller of %s: unexpected %r", self.instance_id, message)

    def _probe(self, gen: int) -> None:
        if not self.watching:
            return
        started = self.ctx.timers.now()
        obs = self.backend.probe_health(
            self.ctx.client,
            self.spec,
            self.port,
            timeout_s=self.policy.probe_timeout_s,
            slow_s=self.policy.slow_probe_s,
        )
        self.last_latency_s = obs.latency_s
        emit(probe_completed, self.instance_id, latency_s=obs.latency_s, verdict=obs.verdict)
        if (change := self.tracker.observe(obs)) is not None:
            tell(self.owner, HealthReport(generation=gen, new=change.new, reason=change.reason))
        elapsed = self.ctx.timers.now() - started
        self._schedule(max(0.0, self.spec.health_interval_s - elapsed))

    def _schedule(self, delay: float | None = None) -> None:
        if self.generation is None:
            return
        if self._next is not None:
            self._next.cancel()
        wait = self.spec.health_interval_s if delay is None else delay
        self._next = tell_later(
            self.ctx.timers, wait, self.actor_ref, ProbeTick(generation=self.generation)
        )

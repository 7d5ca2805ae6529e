"""BackendActor: one per instance. Owns the server process (when its backend launches
one) and the instance's state machine ``starting -> ready -> stopping -> stopped``
(``failed`` when it gives up).

It never blocks its thread longer than one probe timeout: readiness is a series of
scheduled ticks, a stop is SIGTERM now and a scheduled SIGKILL later, and the process
seam's callbacks only hand messages to this actor. What is specific to a kind of server
(probes, the endpoint, what an exit means) it asks the instance's backend. An instance
whose backend launches nothing (``attach``) has no process: it is probed until ready,
its health follows its probes, and stopping it only forgets it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pykka

from llama_actors._base.clock import TimerHandle
from llama_actors._exceptions import (
    InstanceFailedError,
    LlamaActorsError,
    PortInUseError,
    ReadinessTimeoutError,
    ServerExitedError,
)
from llama_actors._kernel.backend import Backend, BackendSpec, host_port
from llama_actors._kernel.health import HealthCause, worse
from llama_actors._kernel.memory import BufferLog, MemoryNeed, error_pct, with_resident
from llama_actors._kernel.outcomes import OutcomeWindow
from llama_actors._kernel.policy import InstancePolicy, RestartTracker
from llama_actors._kernel.readiness import StallDeadline
from llama_actors._kernel.types import EndpointDescriptor, Health, InstanceMemory, InstanceState
from llama_actors._process.plan import LaunchPlan
from llama_actors._process.process import ProcessExit, ServerProcess
from llama_actors._runtime.actor import RuntimeActor
from llama_actors._runtime.context import Context, tell, tell_later
from llama_actors._runtime.messages import (
    Boot,
    HealthReport,
    InstanceFailed,
    InstanceReady,
    InstanceStopped,
    KillDeadline,
    MemoryMeasured,
    Message,
    OutcomeReported,
    OutcomeWindowCheck,
    Pause,
    Paused,
    PortKnown,
    ProcessExited,
    ReadinessTick,
    Respawn,
    SigtermDue,
    StopInstance,
    Watch,
    WedgeCheck,
)
from llama_actors._runtime.signals import (
    emit,
    health_changed,
    instance_failed,
    instance_ready,
    instance_restarting,
    instance_starting,
    instance_stopped,
)

__all__ = ["BackendActor"]

log = logging.getLogger("llama_actors.runtime")
_KILL_GRACE_S = 5.0
_PHASES = {"refused": "connecting", "loading": "loading", "not_ready": "waiting", "ready": "ready"}


class BackendActor(RuntimeActor):
    """Runs one instance of any backend; see the module docstring."""

    def __init__(
        self,
        *,
        instance_id: str,
        backend: Backend,
        spec: BackendSpec,
        plan: LaunchPlan | None,
        policy: InstancePolicy,
        context: Context,
        estimate: MemoryNeed | None = None,
    ) -> None:
        super().__init__(context=context)
        self.instance_id = instance_id
        self.estimate = estimate
        self._buffers = BufferLog()
        self.backend = backend
        self.spec = spec
        self.policy = policy
        self.state: InstanceState = "starting"
        self.health: Health = "unknown"
        self.process: ServerProcess | None = None
        self.generation = 0
        self.ever_ready = False
        self.endpoint: EndpointDescriptor | None = None
        self.stop_reason: str | None = None
        self.fail_reason: str | None = None
        self.kill_reason: str | None = None
        self.restarts = RestartTracker(policy.restart, context.rng)
        self.plan = plan  # rendered in the caller's thread (None: nothing to launch)
        self._last_port: int | None = None
        self._pinned = False  # this spawn asked for _last_port instead of any free port
        self._ended = False  # _stopped has run
        self._deadline: StallDeadline | None = None
        self._last_output = 0.0
        self._last_probe = "no probe yet"
        self._phase: str | None = None
        self._spawned_at = 0.0
        self._tick: TimerHandle | None = None
        self._kill: TimerHandle | None = None
        self._respawn_token = 0
        self._wedge_token = 0
        self._poller: pykka.ActorRef[Any] | None = None
        # What the poller's probes say, and what callers report: the published
        # health is the worse of the two (CONTRACT §10).
        self._probed: tuple[Health, str, HealthCause] = ("healthy", "ready", "ready")
        self.outcomes = OutcomeWindow(
            policy.report_window_s, policy.report_degraded_after, policy.report_unavailable_after
        )
        self._outcome_token = 0
        self._sigterm_pending = False  # waiting for the poller to say Paused
        self._sigterm_token = 0
        self._cause: HealthCause = "ready"  # of the published health

    # -- pykka hooks ------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<BackendActor of {self.instance_id}>"

    def on_stop(self) -> None:
        self._cleanup()

    def on_failure(self, *_exc_info: object) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        for handle in (self._tick, self._kill):
            if handle is not None:
                handle.cancel()
        if self._poller is not None:
            self._poller.stop(block=False)
            self._poller = None
        if self.process is not None and self.process.exit is None:
            log.warning(
                "instance %s: actor stopping with its server alive; killing it", self.instance_id
            )
            self.process.kill()
        if self.process is not None and self.process.exit is not None:
            # Its watcher reports the exit before it closes the lifeline guard (a few
            # ms); closing the runtime joins this thread, so it joins that one.
            self.process.wait_finished(_KILL_GRACE_S)

    def after_internal_error(self, exc: Exception) -> None:
        # A bug here must not leave a server unsupervised.
        self._give_up(f"internal error: {type(exc).__name__}: {exc}", exc)

    def handle(self, message: Message) -> None:
        match message:
            case Boot():
                self._spawn(attempt=0)
            case ReadinessTick(generation=gen) | PortKnown(generation=gen):
                if gen == self.generation:
                    self._readiness_tick()
            case ProcessExited(generation=gen, exit=report):
                if gen == self.generation:
                    self._exited(report)
            case HealthReport(generation=gen, new=new, reason=reason, cause=cause):
                if gen == self.generation and self.state == "ready":
                    self._probed = (new, reason, cause)
                    self._publish_health()
            case OutcomeReported(ok=ok, detail=detail):
                if self.state == "ready":
                    self.outcomes.record(ok, detail, self.ctx.timers.now())
                    self._publish_health()
            case OutcomeWindowCheck(token=token):
                if token == self._outcome_token and self.state == "ready":
                    self._publish_health()
            case WedgeCheck(generation=gen, token=token):
                if gen == self.generation and token == self._wedge_token:
                    self._wedge_check()
            case Respawn(token=token):
                if token == self._respawn_token and self.state == "starting":
                    self._spawn(attempt=self.restarts.total)
            case Paused(generation=gen) | SigtermDue(generation=gen):
                token = getattr(message, "token", self._sigterm_token)
                if (
                    gen == self.generation
                    and self._sigterm_pending
                    and token == self._sigterm_token
                ):
                    self._sigterm()
            case StopInstance(reason=reason):
                self._begin_stop(reason)
            case KillDeadline(generation=gen):
                if (
                    gen == self.generation
                    and self.process is not None
                    and self.process.exit is None
                ):
                    log.warning(
                        "instance %s: server pid %s ignored SIGTERM; sending SIGKILL",
                        self.instance_id,
                        self.process.pid,
                    )
                    self.process.kill()
            case _:
                log.warning("instance %s: unexpected message %r", self.instance_id, message)

    # -- spawning and readiness -----------------------------------------------------------

    def _spawn(self, attempt: int) -> None:
        self.generation += 1
        self._sigterm_pending = False
        self.kill_reason = None
        pid: int | None = None
        if self.plan is not None:
            try:
                self.process = self._start(self.generation, self.plan)
            except LlamaActorsError as exc:
                self._give_up(str(exc), exc)
                return
            pid = self.process.pid
        now = self.ctx.timers.now()
        self._spawned_at = now
        self._last_output = now
        self._deadline = StallDeadline(now, self.spec.ready_timeout_s, self.policy.ready_ceiling_s)
        self._last_probe = "no probe yet"
        phase = "spawned" if self.plan is not None else "connecting"
        self.state, self._phase = "starting", phase
        self.ctx.board.starting(self.instance_id, pid=pid, phase=phase)
        emit(instance_starting, self.instance_id, attempt=attempt, pid=pid)
        self._schedule_tick(self.spec.readiness_interval_s)

    def _start(self, gen: int, plan: LaunchPlan) -> ServerProcess:
        me = self.actor_ref
        self._pinned = False
        timers = self.ctx.timers

        buffers = self._buffers = BufferLog()

        def on_line(line: str) -> None:
            self._last_output = timers.now()  # progress: read by the next readiness tick
            if "listening on" in line:
                tell(me, PortKnown(generation=gen))
            elif "buffer size" in line:
                buffers.feed(line)  # read by this actor once the server is ready

        def on_exit(report: ProcessExit) -> None:
            tell(me, ProcessExited(generation=gen, exit=report))

        kwargs: dict[str, Any] = {
            "log_path": self.ctx.log_path(self.instance_id),
            "on_line": on_line,
            "on_exit": on_exit,
            "state_dir": self.ctx.state_dir,
            "log_max_bytes": self.policy.log_max_bytes,
            "log_backups": self.policy.log_backups,
        }
        if self._last_port is not None and plan.port_mode != "fixed":
            # A restart keeps the port its lease holders know, when it is still free.
            try:
                process = ServerProcess.start(plan.with_port(self._last_port), **kwargs)
                self._pinned = True
                return process
            except PortInUseError:
                log.info(
                    "instance %s: port %s is taken; restarting on a new port",
                    self.instance_id,
                    self._last_port,
                )
        return ServerProcess.start(plan, **kwargs)

    def _schedule_tick(self, delay: float) -> None:
        if self._tick is not None:
            self._tick.cancel()
        self._tick = tell_later(
            self.ctx.timers, delay, self.actor_ref, ReadinessTick(generation=self.generation)
        )

    def _readiness_tick(self) -> None:
        process, deadline = self.process, self._deadline
        if self.state != "starting" or deadline is None:
            return
        if self.plan is not None and (process is None or process.exit is not None):
            return
        deadline.progress(self._last_output)
        port = process.port if process is not None else None
        if process is None or port is not None:
            probe = self.backend.probe_ready(
                self.ctx.client, self.spec, port, timeout_s=self.policy.probe_timeout_s
            )
            if probe.result == "ready":
                self._ready(port)
                return
            if probe.result == "loading":
                deadline.progress(self.ctx.timers.now())
            self._last_probe = probe.detail
            self._set_phase(_PHASES[probe.result])
        else:
            self._last_probe = "port not known yet (the server logs it once its model is loaded)"
            if self._last_output > self._spawned_at:
                self._set_phase("loading")  # its log is moving: it is loading the model
        why = deadline.expired(self.ctx.timers.now())
        if why is None:
            self._schedule_tick(self.spec.readiness_interval_s)
            return
        tail = tuple(process.tail(20)) if process is not None else ()
        last = f"last output: {_tail(process)}" if process is not None else "nothing launched"
        message = (
            f"instance {self.instance_id} ({self.spec.alias}) is not ready: {why}; last probe: "
            f"{self._last_probe}; {last}. Raise ready_timeout_ms if it takes longer"
            + (" to load silently" if process is not None else " to come up")
        )
        error = ReadinessTimeoutError(message, instance_id=self.instance_id, tail=tail)
        self.kill_reason = why
        if self.ever_ready and process is not None:
            # A restart that does not come up counts as another crash.
            self._terminate()
        else:
            self._give_up(message, error)

    def _ready(self, port: int | None) -> None:
        if self.plan is not None and self.process is None:
            return
        self._last_port = port
        first = not self.ever_ready
        self.ever_ready = True
        self.endpoint = self.backend.endpoint(
            self.spec, instance_id=self.instance_id, port=port, plan=self.plan
        )
        pid = self.process.pid if self.process is not None else None
        bound = host_port(self.endpoint.source_runtime_ref)[1]
        now = self.ctx.timers.now()
        self.state = "ready"
        self.ctx.board.ready(
            self.instance_id,
            port=bound,
            pid=pid,
            endpoint=self.endpoint,
        )
        emit(
            instance_ready,
            self.instance_id,
            endpoint=self.endpoint,
            pid=pid,
            port=bound,
            elapsed_s=round(now - self._spawned_at, 6),
        )
        self._measure_memory(pid)
        self.outcomes.clear()
        self._probed = ("healthy", "ready" if first else "ready again after a restart", "ready")
        self._publish_health()
        tell(
            self.ctx.supervisor, InstanceReady(instance_id=self.instance_id, endpoint=self.endpoint)
        )
        # The poller (a new thread the first time) starts after the waiters are served.
        if self._poller is None:
            from llama_actors._runtime.poller import HealthPoller

            self._poller = HealthPoller.start(
                instance_id=self.instance_id,
                owner=self.actor_ref,
                backend=self.backend,
                spec=self.spec,
                policy=self.policy,
                context=self.ctx,
            )
        tell(self._poller, Watch(generation=self.generation, port=port))

    def _measure_memory(self, pid: int | None) -> None:
        """What the server reported of its buffers, raised to its resident memory,
        replaces the estimate (board and admission); the estimate's error is logged."""
        if pid is None:
            return
        rss = _rss_mib(pid)
        key = self.estimate.shared_key if self.estimate is not None else None
        measured = with_resident(self._buffers.need(shared_key=key), rss, estimate=self.estimate)
        if measured is None:
            return
        error = error_pct(self.estimate, measured)
        self.ctx.board.set_memory(
            self.instance_id,
            InstanceMemory(estimate=self.estimate, measured=measured, rss_mib=rss, error_pct=error),
        )
        tell(self.ctx.supervisor, MemoryMeasured(instance_id=self.instance_id, measured=measured))
        log.info(
            "instance %s: memory %s (%s; resident %s MiB); estimate %s (error %s)",
            self.instance_id,
            measured.describe(),
            "reported by the server" if measured.source == "reported" else measured.source,
            f"{rss:.0f}" if rss is not None else "?",
            self.estimate.describe() if self.estimate is not None else "none",
            f"{error:+.1f}%" if error is not None else "n/a",
        )

    # -- after ready --------------------------------------------------------------------

    def _publish_health(self) -> None:
        """Publish the worse of what the probes say and what callers report, and look
        again when the oldest reported failure leaves its window."""
        new, reason, cause = self._probed
        now = self.ctx.timers.now()
        callers = self.outcomes.verdict(now)
        if callers is not None and worse(callers[0], new):
            new, reason, cause = callers[0], callers[1], "callers"
        elif self._cause == "callers" and new != self.health:
            reason, cause = f"{self.outcomes.cleared}; the probes say: {reason}", "callers"
        self._set_health(new, reason, cause)
        self._outcome_token += 1
        expiry = self.outcomes.next_expiry()
        if expiry is not None:
            tell_later(
                self.ctx.timers,
                max(0.0, expiry - now),
                self.actor_ref,
                OutcomeWindowCheck(token=self._outcome_token),
            )

    def _set_health(self, new: Health, reason: str, cause: HealthCause) -> None:
        if new == self.health:
            return
        old, self.health, self._cause = self.health, new, cause
        self.ctx.board.set_health(self.instance_id, new, reason, cause)
        load = self.ctx.board.load(self.instance_id)
        emit(
            health_changed,
            self.instance_id,
            old=old,
            new=new,
            reason=reason,
            cause=cause,
            load=load,
        )
        wedged_s = self.policy.wedged_restart_s
        launched = self.process is not None
        if new == "unavailable" and self.state == "ready" and wedged_s is not None and launched:
            self._wedge_token += 1
            tell_later(
                self.ctx.timers,
                wedged_s,
                self.actor_ref,
                WedgeCheck(generation=self.generation, token=self._wedge_token),
            )
        elif new != "unavailable":
            self._wedge_token += 1

    def _wedge_check(self) -> None:
        wedged_s = self.policy.wedged_restart_s
        if self.state != "ready" or self.health != "unavailable" or self.process is None:
            return
        self.kill_reason = (
            f"unavailable for {wedged_s or 0:g}s with the process alive "
            "(wedged); killed to restart it"
        )
        log.warning("instance %s: %s", self.instance_id, self.kill_reason)
        self.process.kill()

    def _exited(self, report: ProcessExit) -> None:
        if self._kill is not None:
            self._kill.cancel()
        tell(self._poller, Pause(generation=self.generation))
        self.ctx.board.process_gone(self.instance_id)
        if self.stop_reason is not None:
            self._stopped(report)
            return
        if self.state == "failed":
            return
        verdict = self.backend.classify_exit(report)
        why = self.kill_reason or verdict.reason
        if not self.ever_ready:
            message = (
                f"instance {self.instance_id} ({self.spec.alias}): {verdict.reason} before it "
                f"was ready; last output: {' | '.join(report.tail[-5:]) or '(nothing)'}"
            )
            self._give_up(message, ServerExitedError(message, report), report)
            return
        self._set_health("unavailable", f"process exited: {why}", "exited")
        if self._pinned and verdict.failure == "bind_failure":
            # Another program took the old port between our check and the server's bind:
            # the next attempt takes any free port, so this one is worth retrying.
            log.info(
                "instance %s: its old port was taken; restarting on a new port", self.instance_id
            )
            self._last_port = None
        elif not verdict.retryable:
            message = (
                f"instance {self.instance_id}: {verdict.reason}; {verdict.failure or 'this exit'} "
                "is not retryable, so it is not restarted"
            )
            self._give_up(message, ServerExitedError(message, report), report)
            return
        decision = self.restarts.decide(self.ctx.timers.now())
        if not decision.restart:
            message = f"instance {self.instance_id}: {decision.reason}; last exit: {why}"
            error = InstanceFailedError(
                message, instance_id=self.instance_id, reason=decision.reason, exit=report
            )
            self._give_up(message, error, report)
            return
        self._respawn_token += 1
        self.state, self._phase = "starting", "backoff"
        self.ctx.board.backing_off(
            self.instance_id, restart_count=self.restarts.total, last_error=why
        )
        emit(
            instance_restarting,
            self.instance_id,
            attempt=decision.attempt,
            delay_s=decision.delay_s,
            reason=why,
        )
        tell_later(
            self.ctx.timers, decision.delay_s, self.actor_ref, Respawn(token=self._respawn_token)
        )

    # -- stopping and giving up -----------------------------------------------------------

    def _begin_stop(self, reason: str) -> None:
        if self.stop_reason is not None or self.state == "stopped":
            return
        self.stop_reason = reason
        self._respawn_token += 1
        if self._tick is not None:
            self._tick.cancel()
        if self.state != "failed":
            self.state = "stopping"
            self.ctx.board.stopping(self.instance_id)
        if self.process is not None and self.process.exit is None:
            self._terminate()
        else:
            self._stopped(self.process.exit if self.process is not None else None)

    def _terminate(self) -> None:
        """SIGTERM, once the poller has no probe in flight: llama-server stops its task
        loop first on SIGTERM, so a /metrics or /slots read in flight is answered by
        nobody and holds the exit until the read times out (measured: a stop right
        after the first load reading took 2.1 s instead of 0.15). The wait is bounded
        by one probe timeout."""
        if self.process is None or self.plan is None:
            return
        if self._sigterm_pending:
            return
        gen = self.generation
        if tell(self._poller, Pause(generation=gen, ack=True)):
            self._sigterm_pending = True
            self._sigterm_token += 1
            due = SigtermDue(generation=gen, token=self._sigterm_token)
            tell_later(self.ctx.timers, self.policy.probe_timeout_s, self.actor_ref, due)
            return
        self._sigterm()

    def _sigterm(self) -> None:
        self._sigterm_pending = False
        self._sigterm_token += 1
        if self.process is None or self.plan is None or self.process.exit is not None:
            return
        self.process.terminate()
        if self._kill is not None:
            self._kill.cancel()
        grace = self.plan.stop_timeout_s
        self._kill = tell_later(
            self.ctx.timers, grace, self.actor_ref, KillDeadline(generation=self.generation)
        )

    def _stopped(self, report: ProcessExit | None) -> None:
        # Once only: a stop that found the process already gone ends here, and the exit
        # report of that process may still be on its way.
        if self._ended:
            return
        self._ended = True
        if self.state != "failed":
            reason = self.stop_reason or "stopped"
            self.state = "stopped"
            self.ctx.board.stopped(self.instance_id)
            if self.health not in ("unknown", "unavailable"):
                self._set_health("unavailable", f"stopped: {reason}", "stopped")
            emit(instance_stopped, self.instance_id, reason=reason, exit=report)
        tell(self.ctx.supervisor, InstanceStopped(instance_id=self.instance_id))

    def _give_up(
        self, reason: str, error: BaseException, report: ProcessExit | None = None
    ) -> None:
        if self.state == "failed":
            return
        self.fail_reason = reason
        self._respawn_token += 1
        if self._tick is not None:
            self._tick.cancel()
        self.state = "failed"
        self.ctx.board.failed(self.instance_id, last_error=reason)
        if self.health not in ("unknown", "unavailable"):
            self._set_health("unavailable", reason, "failed")
        if self.process is not None and self.process.exit is None:
            self._terminate()
        emit(instance_failed, self.instance_id, reason=reason, exit=report)
        tell(self.ctx.supervisor, InstanceFailed(instance_id=self.instance_id, error=error))

    def _set_phase(self, phase: str) -> None:
        if phase != self._phase:
            self._phase = phase
            self.ctx.board.set_phase(self.instance_id, phase)


def _rss_mib(pid: int) -> float | None:
    """The resident memory of ``pid`` and its children (a launcher may sit between),
    in MiB; None once it is gone."""
    import psutil

    try:
        process = psutil.Process(pid)
        rss = process.memory_info().rss
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                rss += child.memory_info().rss
    except psutil.Error:
        return None
    return round(rss / (1024 * 1024), 2)


def _tail(process: ServerProcess) -> str:
    return " | ".join(process.tail(5)) or "(nothing)"

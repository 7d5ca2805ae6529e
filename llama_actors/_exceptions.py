"""The one exception tree of llama_actors.

Every error a user can hit derives from :class:`LlamaActorsError` and says what was
wrong, with which value (secrets masked), and what to do about it::

    LlamaActorsError
    ├── BootSpecError            a boot spec or config file field is invalid
    ├── ManifestError            a consumer manifest given as a mapping is malformed
    ├── PortNotBoundError        a URL was asked of an ``auto`` port before it was bound
    ├── BinaryError              the llama-server binary cannot be used
    │   ├── BinaryNotFoundError  no binary where we looked
    │   ├── BinaryProbeError     `--version` / `--help` failed or made no sense
    │   └── UnsupportedFlagError the binary does not accept a flag the spec needs
    ├── ModelFileError           the model file is missing or unreadable
    ├── IncompatibleError        a consumer manifest does not match the backend
    ├── SpawnError               the operating system refused to start the server
    ├── PortInUseError           an explicit port is held by another program
    ├── ServerExitedError        the server exited while something waited on it
    ├── ReadinessTimeoutError    a server stopped showing progress before it was ready
    ├── InsufficientMemoryError  an instance does not fit the runtime's capacity
    ├── InstanceError            about one instance of a runtime (``instance_id``)
    │   ├── InstanceNotFoundError  no instance with that id in this runtime
    │   ├── NotReadyError          not ready, or draining, so it cannot serve this call
    │   └── InstanceFailedError    supervision gave up on it (``reason`` says why)
    │       └── HostLostError        the host it ran on was lost (``host_id``)
    ├── HostError                about the runtime's hosts (``host_id`` when one is meant)
    │   └── NoHostError            no host that is up may run the spec (labels, GPUs)
    ├── LeaseError               about one lease (``lease_ref``)
    │   ├── LeaseNotFoundError     unknown, released, or ended with its instance
    │   ├── LeaseExpiredError      its TTL ran out before it was renewed
    │   └── LeaseNotRenewableError it was granted with ``renewable=False``
    ├── RuntimeClosedError       the runtime was closed
    ├── SignalOverflowError      a signal stream's consumer fell too far behind
    ├── MetricsUnavailableError  prometheus-client is missing (also an ``ImportError``)
    ├── OpenAIUnavailableError   openai is missing (also an ``ImportError``)
    ├── RayUnavailableError      ray is missing, for llama_actors.ray (also an ``ImportError``)
    ├── UsageError               a call got a value it cannot use (also a ``ValueError``)
    └── WaitTimeoutError         a wait ran out of time (also a ``TimeoutError``)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llama_actors._kernel.manifest import CompatibilityResult
    from llama_actors._process.process import ProcessExit

__all__ = [
    "BinaryError",
    "BinaryNotFoundError",
    "BinaryProbeError",
    "BootSpecError",
    "HostError",
    "HostLostError",
    "IncompatibleError",
    "InstanceError",
    "InstanceFailedError",
    "InstanceNotFoundError",
    "InsufficientMemoryError",
    "LeaseError",
    "LeaseExpiredError",
    "LeaseNotFoundError",
    "LeaseNotRenewableError",
    "LlamaActorsError",
    "ManifestError",
    "MetricsUnavailableError",
    "ModelFileError",
    "NoHostError",
    "NotReadyError",
    "OpenAIUnavailableError",
    "PortInUseError",
    "PortNotBoundError",
    "RayUnavailableError",
    "ReadinessTimeoutError",
    "RuntimeClosedError",
    "ServerExitedError",
    "SignalOverflowError",
    "SpawnError",
    "UnsupportedFlagError",
    "UsageError",
    "WaitTimeoutError",
]


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class LlamaActorsError(Exception):
    """Base class of every error raised on purpose by llama_actors."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields (instance_id, need, ...) survive pickling, so an error
        # raised on a host reaches the head whole.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class BootSpecError(LlamaActorsError):
    """A boot spec field is invalid.

    ``field`` is the dotted path of the field (``port``, ``environment.FOO`` or, from a
    config file, ``backends.chat.port``), ``value`` the offending value with secrets
    masked, ``reason`` one line saying what is wrong and what to do, and ``source`` the
    file it came from, when it came from one.
    """

    def __init__(self, field: str, value: Any, reason: str, *, source: str | None = None) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.field}: {self.reason} (got {_short_repr(self.value)})"

    def located(self, prefix: str, source: str | None = None) -> BootSpecError:
        """Return the same error with its field path under ``prefix`` and its source file."""
        field = f"{prefix}.{self.field}" if prefix and self.field else prefix or self.field
        return BootSpecError(field, self.value, self.reason, source=source or self.source)


class ManifestError(LlamaActorsError):
    """A consumer manifest given as a mapping has a field of the wrong shape."""


class PortNotBoundError(LlamaActorsError):
    """A URL was asked of a spec whose port is ``auto`` before a port was bound."""


class BinaryError(LlamaActorsError):
    """The llama-server binary cannot be used as the spec asks."""


class BinaryNotFoundError(BinaryError):
    """No llama-server binary was found; ``searched`` lists where we looked, in order."""

    def __init__(self, message: str, searched: tuple[str, ...] = ()) -> None:
        self.searched = searched
        super().__init__(message)


class BinaryProbeError(BinaryError):
    """Running the binary with ``--version`` or ``--help`` failed or gave no flag list."""

    def __init__(self, message: str, path: str) -> None:
        self.path = path
        super().__init__(message)


class UnsupportedFlagError(BinaryError):
    """The binary does not accept a flag (or a form of it) that the spec would render."""

    def __init__(self, flag: str, build: str, reason: str) -> None:
        self.flag = flag
        self.build = build
        self.reason = reason
        super().__init__(f"{flag}: {reason} (binary: {build})")


class ModelFileError(LlamaActorsError):
    """The spec's model file is missing or unreadable; ``path`` names it."""

    def __init__(self, message: str, path: str) -> None:
        self.path = path
        super().__init__(message)


class IncompatibleError(LlamaActorsError):
    """A consumer cannot use the backend; ``result`` is the failed compatibility check."""

    def __init__(self, result: CompatibilityResult) -> None:
        self.result = result
        super().__init__(f"incompatible: {result.reason}: {result.detail}")


class SpawnError(LlamaActorsError):
    """The operating system refused to start the server; ``path`` names what it ran."""

    def __init__(self, message: str, path: str) -> None:
        self.path = path
        super().__init__(message)


class PortInUseError(LlamaActorsError):
    """An explicit port is already held by a program that is not this instance.

    ``holder_pid`` and ``holder_name`` name that program when they can be found.
    """

    def __init__(
        self, host: str, port: int, holder_pid: int | None = None, holder_name: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.holder_pid = holder_pid
        self.holder_name = holder_name
        holder = ""
        if holder_pid is not None:
            holder = f" by {holder_name or 'a process'} (pid {holder_pid})"
        super().__init__(
            f"port {port} on {host} is already in use{holder}; stop that program, "
            "choose another port, or set port = 'auto'"
        )


class ServerExitedError(LlamaActorsError):
    """The server exited while a caller waited on it; ``exit`` is how it ended."""

    def __init__(self, message: str, exit: ProcessExit) -> None:
        self.exit = exit
        super().__init__(message)


class ReadinessTimeoutError(LlamaActorsError):
    """A server did not become ready: no load progress for the stall deadline (the
    spec's ``ready_timeout_ms``) or past the hard ceiling. ``tail`` is its last output."""

    def __init__(self, message: str, *, instance_id: str, tail: tuple[str, ...] = ()) -> None:
        self.instance_id = instance_id
        self.tail = tail
        super().__init__(message)


class InsufficientMemoryError(LlamaActorsError):
    """A new instance does not fit the runtime's capacity, even after evicting every
    instance nobody holds: ``need`` is its figure (a ``MemoryNeed``), ``free`` what
    each capped resource has left, ``holders`` the instances holding the rest (id,
    state, lease count, figure), ``waited_s`` how long it waited for room (0: it
    failed at once, because it can never fit or because it was asked not to wait)."""

    def __init__(
        self,
        message: str,
        *,
        need: Any,
        free: dict[str, float],
        holders: tuple[Any, ...] = (),
        waited_s: float = 0.0,
    ) -> None:
        self.need = need
        self.free = free
        self.holders = holders
        self.waited_s = waited_s
        super().__init__(message)


class InstanceError(LlamaActorsError):
    """Something about one instance of a runtime; ``instance_id`` names it."""

    def __init__(self, message: str, *, instance_id: str) -> None:
        self.instance_id = instance_id
        super().__init__(message)


class InstanceNotFoundError(InstanceError):
    """No instance with that id in this runtime (never started, or forgotten)."""


class NotReadyError(InstanceError):
    """The instance exists but cannot serve this call now (starting, draining, stopped)."""


class InstanceFailedError(InstanceError):
    """Supervision gave up on the instance; ``reason`` says why (and ``exit`` how its
    server last ended, when it did)."""

    def __init__(
        self, message: str, *, instance_id: str, reason: str, exit: ProcessExit | None = None
    ) -> None:
        self.reason = reason
        self.exit = exit
        super().__init__(message, instance_id=instance_id)


class HostLostError(InstanceFailedError):
    """The host the instance ran on stopped answering the head's checks; its leases
    ended with reason ``host lost``, and a new resolve places the spec on another host."""

    def __init__(self, message: str, *, instance_id: str, host_id: str) -> None:
        self.host_id = host_id
        super().__init__(message, instance_id=instance_id, reason="host lost")


class HostError(LlamaActorsError):
    """Something about the runtime's hosts; ``host_id`` names one when one is meant."""

    def __init__(self, message: str, *, host_id: str | None = None) -> None:
        self.host_id = host_id
        super().__init__(message)


class NoHostError(HostError):
    """No host that is up may run the spec: none has its ``host_labels`` and
    ``host_gpus``, or every host is lost."""


class LeaseError(LlamaActorsError):
    """Something about one lease; ``lease_ref`` names it."""

    def __init__(self, message: str, *, lease_ref: str) -> None:
        self.lease_ref = lease_ref
        super().__init__(message)


class LeaseNotFoundError(LeaseError):
    """No live lease with that ref: unknown, released, or ended with its instance."""


class LeaseExpiredError(LeaseError):
    """The lease's TTL ran out before it was renewed; it is gone."""


class LeaseNotRenewableError(LeaseError):
    """A renew of a lease granted with ``renewable=False``; the lease itself stays live."""


class RuntimeClosedError(LlamaActorsError):
    """The runtime was closed; make a new one."""


class SignalOverflowError(LlamaActorsError):
    """A :class:`SignalStream` with ``overflow="error"`` filled up: its consumer fell
    behind by ``maxsize`` events and ``dropped`` events were lost."""

    def __init__(self, maxsize: int, dropped: int) -> None:
        self.maxsize = maxsize
        self.dropped = dropped
        super().__init__(
            f"the signal stream fell {maxsize} events behind and dropped {dropped}; consume "
            "faster, pass a larger maxsize, or overflow='drop_oldest' to keep the newest"
        )


class MetricsUnavailableError(LlamaActorsError, ImportError):
    """``prometheus-client`` is not installed, so :mod:`llama_actors.metrics` cannot work."""


class OpenAIUnavailableError(LlamaActorsError, ImportError):
    """The ``openai`` package is not installed, so :func:`llama_actors.clients.openai_client`
    (and its async twin) cannot build a client; ``pip install openai``."""


class RayUnavailableError(LlamaActorsError, ImportError):
    """The ``ray`` package is not installed, so :mod:`llama_actors.ray` cannot reach
    hosts; ``pip install 'llama-actors[ray]'``."""


class UsageError(LlamaActorsError, ValueError):
    """A call was given a value it cannot use, such as a TTL of zero."""


class WaitTimeoutError(LlamaActorsError, TimeoutError):
    """A wait ran out of time; nothing was stopped or killed because of it."""


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

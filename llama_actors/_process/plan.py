"""The launch plan: everything the process seam needs to start one server, decided
before anything starts. A backend renders it once; the seam reads nothing else.

``argv`` is final except at the positions in ``slots``: a private file's path, or the
port when ``port_mode`` is ``reserve`` (the seam picks it at spawn). With ``bind_zero``
the server binds a free port itself and logs it.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import msgspec

from llama_actors._base.secret import Secret, mask_argv, mask_mapping
from llama_actors._exceptions import LlamaActorsError, ModelFileError, UsageError

__all__ = ["PORT_SLOT", "PORT_TOKEN", "LaunchPlan", "PortMode", "PrivateFile", "check_model_file"]

PortMode = Literal["fixed", "bind_zero", "reserve"]
PORT_SLOT = "port"
#: Where the port goes in the argv given to :meth:`LaunchPlan.simple`.
PORT_TOKEN = "{port}"  # noqa: S105 - a placeholder, not a secret


class PrivateFile(msgspec.Struct, frozen=True):
    """A file the plan needs at spawn, holding a secret; written 0600, removed at stop."""

    name: str
    content: Secret
    mode: int = 0o600


class LaunchPlan(msgspec.Struct, frozen=True, kw_only=True):
    """One server's command, environment, private files and port, ready to spawn.

    ``name`` labels the server in messages; ``host`` and ``port`` (for a fixed port) are
    what the seam checks and records; ``port_index`` is where the port value sits in
    ``argv``; ``model`` is checked to be a readable file at spawn; ``has_key`` says the
    server requires a key (binding beyond loopback without one logs a warning);
    ``stop_timeout_s`` is the SIGTERM grace before SIGKILL.
    """

    name: str
    binary_path: str
    binary_label: str
    argv: tuple[str, ...]
    env: dict[str, str]
    private_files: tuple[PrivateFile, ...]
    host: str
    port: int | None
    port_mode: PortMode
    port_index: int
    slots: dict[int, str]
    model: str | None
    has_key: bool
    stop_timeout_s: float

    @classmethod
    def simple(
        cls,
        argv: Sequence[str],
        *,
        name: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        stop_timeout_s: float = 5.0,
    ) -> LaunchPlan:
        """A plan for a server of your own backend: ``argv`` holds the token ``{port}``
        where the port goes. With ``port`` None the process seam reserves a free port on
        ``host`` at spawn (and retries once if another program takes it first)."""
        if not argv:
            raise UsageError("a launch plan needs an argv: the program and its arguments")
        args = [str(a) for a in argv]
        if args.count(PORT_TOKEN) != 1:
            raise UsageError(
                f"argv must hold the token {PORT_TOKEN!r} once, where the port goes "
                f"(got {mask_argv(args)!r})"
            )
        index = args.index(PORT_TOKEN)
        slots: dict[int, str] = {}
        if port is None:
            slots[index] = PORT_SLOT
        else:
            args[index] = str(port)
        return cls(
            name=name,
            binary_path=args[0],
            binary_label=os.path.basename(args[0]),
            argv=tuple(args),
            env=dict(env or {}),
            private_files=(),
            host=host,
            port=port,
            port_mode="reserve" if port is None else "fixed",
            port_index=index,
            slots=slots,
            model=None,
            has_key=False,
            stop_timeout_s=stop_timeout_s,
        )

    def with_port(self, port: int) -> LaunchPlan:
        """This plan pinned to ``port`` (a restart that keeps the port its holders know)."""
        argv = list(self.argv)
        argv[self.port_index] = str(port)
        slots = {i: name for i, name in self.slots.items() if name != PORT_SLOT}
        return msgspec.structs.replace(
            self, argv=tuple(argv), slots=slots, port=port, port_mode="fixed"
        )

    def display_argv(self) -> list[str]:
        """The argv with slots shown as ``<name>`` and secret values masked."""
        argv = list(self.argv)
        for index, name in self.slots.items():
            argv[index] = f"<{name}>"
        return mask_argv(argv)

    def command_line(self) -> str:
        """A shell-quoted, masked command line, for people to read."""
        return shlex.join(self.display_argv())

    def child_env(self, parent: Mapping[str, str] | None = None) -> dict[str, str]:
        """The child's environment: the parent's plus the plan's ``env``.

        The parent's ``LLAMA_ARG_*`` variables are left out: llama-server reads them as
        flags, and a server must be what its spec says, not what the caller's shell
        happens to hold. Set them in the spec's ``environment`` to pass them on.
        """
        source = os.environ if parent is None else parent
        env = {k: v for k, v in source.items() if not k.startswith("LLAMA_ARG_")}
        env.update(self.env)
        return env

    def argv_for(self, file_paths: Mapping[str, str], port: int | None = None) -> list[str]:
        """The concrete argv once the private files are written and the port is known."""
        argv = list(self.argv)
        for index, name in self.slots.items():
            if name == PORT_SLOT:
                if port is None:
                    raise LlamaActorsError("this plan reserves its port at spawn: pass port=")
                argv[index] = str(port)
            else:
                argv[index] = file_paths[name]
        return argv

    def write_private_files(self, directory: str | os.PathLike[str]) -> dict[str, str]:
        """Write each private file into ``directory`` with mode 0600; name -> path."""
        paths: dict[str, str] = {}
        for item in self.private_files:
            path = Path(directory) / item.name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, item.mode)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(item.content.reveal())
            paths[item.name] = str(path)
        return paths

    def __repr__(self) -> str:
        return (
            f"LaunchPlan(argv={self.display_argv()!r}, env={mask_mapping(self.env)!r}, "
            f"private_files={[f.name for f in self.private_files]!r}, "
            f"port_mode={self.port_mode!r}, binary={self.binary_label!r})"
        )


def check_model_file(path: str) -> None:
    """Raise :class:`ModelFileError` unless ``path`` is a readable regular file."""
    if not os.path.exists(path):
        raise ModelFileError(f"model {path!r} does not exist; fix the path or fetch the file", path)
    if not os.path.isfile(path):
        raise ModelFileError(f"model {path!r} is not a regular file; point it at a GGUF file", path)
    if not os.access(path, os.R_OK):
        raise ModelFileError(f"model {path!r} is not readable by this user; fix its mode", path)

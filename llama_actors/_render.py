"""Rendering a boot spec into the command line the probed binary accepts.

``render_command`` is a dry run: it starts nothing and writes nothing. The launch plan
it returns holds the argv in CONTRACT §2 order, the environment overlay, and the
private files (the API key file) that the process seam writes, mode 0600, at spawn.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

from llama_actors._binary import ServerBinary, locate_binary, probe_binary
from llama_actors._boot_spec import MANAGED_FLAGS, BootSpec
from llama_actors._exceptions import LlamaActorsError, ModelFileError, UnsupportedFlagError
from llama_actors._secret import Secret, mask_argv, mask_mapping

__all__ = ["LaunchPlan", "PrivateFile", "check_model_file", "render_command"]

PortMode = Literal["fixed", "bind_zero", "reserve"]
API_KEY_FILE = "api-key"
PORT_SLOT = "port"
_FLAG_TOKEN = re.compile(r"^--?[A-Za-z]")


class PrivateFile(msgspec.Struct, frozen=True):
    """A file the plan needs at spawn, holding a secret; written 0600, removed at stop."""

    name: str
    content: Secret
    mode: int = 0o600


class LaunchPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Everything needed to start one llama-server, decided before anything starts.

    ``argv`` is final except at the positions in ``slots``: a private file's path, or
    the port when ``port_mode`` is ``reserve`` (the library picks it at spawn). With
    ``bind_zero`` the server binds a free port itself and logs it.
    """

    spec: BootSpec
    binary: ServerBinary
    argv: tuple[str, ...]
    env: dict[str, str]
    private_files: tuple[PrivateFile, ...]
    port_mode: PortMode
    slots: dict[int, str]

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
        """The child's environment: the parent's plus the spec's ``environment``.

        The parent's ``LLAMA_ARG_*`` variables are left out: llama-server reads them as
        flags, and a server must be what its spec says, not what the caller's shell
        happens to hold. Set them in ``environment`` to pass them on deliberately.
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
            f"port_mode={self.port_mode!r}, binary={self.binary.label!r})"
        )


def render_command(
    spec: BootSpec, binary: ServerBinary | str | os.PathLike[str] | None = None
) -> LaunchPlan:
    """Render ``spec`` for ``binary`` (probed if a path; located if None).

    Raises :class:`UnsupportedFlagError` naming the flag and the build when the binary
    cannot take something the spec needs; never produces an argv the binary rejects.
    """
    if not isinstance(binary, ServerBinary):
        path = locate_binary(spec.binary_path) if binary is None else os.fspath(binary)
        binary = probe_binary(path, launcher_args=spec.launcher_args, environment=spec.environment)
    return _Renderer(spec, binary).plan()


def check_model_file(path: str) -> None:
    """Raise :class:`ModelFileError` unless ``path`` is a readable regular file."""
    if not os.path.exists(path):
        raise ModelFileError(f"model {path!r} does not exist; fix the path or fetch the file", path)
    if not os.path.isfile(path):
        raise ModelFileError(f"model {path!r} is not a regular file; point it at a GGUF file", path)
    if not os.access(path, os.R_OK):
        raise ModelFileError(f"model {path!r} is not readable by this user; fix its mode", path)


class _Renderer:
    def __init__(self, spec: BootSpec, binary: ServerBinary) -> None:
        self.spec = spec
        self.binary = binary
        self.argv: list[str] = [binary.path, *spec.launcher_args]
        self.slots: dict[int, str] = {}
        self.files: list[PrivateFile] = []

    def unsupported(self, flag: str, reason: str) -> UnsupportedFlagError:
        return UnsupportedFlagError(flag, self.binary.label, reason)

    def name_for(self, field: str) -> str:
        """The name of ``field``'s flag this binary knows, preferring the long one."""
        names = [n for n in MANAGED_FLAGS[field] if not n.startswith("--no-")]
        candidates = sorted(names, key=lambda n: not n.startswith("--"))  # long names first
        for name in candidates:
            if self.binary.supports(name):
                return name
        preferred = candidates[0]
        raise self.unsupported(
            preferred, f"this llama-server has no {preferred} (needed for {field}); upgrade it"
        )

    def add(self, field: str, value: str | None = None, *, slot: str | None = None) -> None:
        self.argv.append(self.name_for(field))
        if slot is not None:
            self.slots[len(self.argv)] = slot
            self.argv.append(f"<{slot}>")
        elif value is not None:
            self.argv.append(value)

    def optional_int(self, field: str, value: int | None) -> None:
        if value is not None:
            self.add(field, str(value))

    def plan(self) -> LaunchPlan:
        spec = self.spec
        self.add("model", spec.model)
        self.add("alias", spec.alias)
        self.add("host", spec.host)
        port_mode = self.port()
        self.optional_int("ctx_size", spec.ctx_size)
        self.gpu_layers()
        self.optional_int("threads", spec.threads)
        self.optional_int("threads_batch", spec.threads_batch)
        self.optional_int("parallel", spec.parallel)
        self.flash_attn()
        if spec.embeddings:
            self.add("embeddings")
        self.api_key()
        if spec.api_prefix:
            self.add("api_prefix", spec.api_prefix)
        self.optional_int("timeout_seconds", spec.timeout_seconds)
        self.optional_int("threads_http", spec.threads_http)
        self.pooling()
        self.extra_args()
        return LaunchPlan(
            spec=spec,
            binary=self.binary,
            argv=tuple(self.argv),
            env=dict(spec.environment),
            private_files=tuple(self.files),
            port_mode=port_mode,
            slots=self.slots,
        )

    def port(self) -> PortMode:
        port = self.spec.port
        if port != "auto":
            self.add("port", str(port))
            return "fixed"
        if self.binary.port_zero:
            self.add("port", "0")
            return "bind_zero"
        self.add("port", slot=PORT_SLOT)
        return "reserve"

    def gpu_layers(self) -> None:
        value = self.spec.gpu_layers
        if isinstance(value, int) or self.binary.gpu_layers_words:
            self.add("gpu_layers", str(value))
        elif value == "all":
            raise self.unsupported(
                "--gpu-layers",
                "this llama-server takes only a number of layers, not 'all'; "
                "set gpu_layers to a number or upgrade llama-server",
            )
        # 'auto' on a numbers-only build: leave the flag out, the server decides.

    def flash_attn(self) -> None:
        value = self.spec.flash_attn
        form = self.binary.flash_attn_form
        if form == "value":
            self.add("flash_attn", value)
        elif form == "switch":
            if value == "on":
                self.add("flash_attn")
            # 'off' and 'auto': the bare-switch builds default to off; render nothing.
        elif value == "on":
            raise self.unsupported("--flash-attn", "this llama-server has no flash attention flag")

    def api_key(self) -> None:
        keys = self.spec.server_keys
        if not keys:
            return
        if not self.binary.supports("--api-key-file"):
            raise self.unsupported(
                "--api-key-file",
                "this llama-server cannot read keys from a file, and llama_actors never "
                "puts a key in argv; upgrade llama-server",
            )
        content = "".join(k.reveal() + "\n" for k in keys)
        self.files.append(PrivateFile(API_KEY_FILE, Secret(content)))
        self.add("api_key_file", slot=API_KEY_FILE)

    def pooling(self) -> None:
        value = self.spec.pooling
        if value is None:
            return
        known = self.binary.pooling_values
        if known and value not in known:
            raise self.unsupported(
                "--pooling", f"this llama-server accepts {sorted(known)}, not {value!r}"
            )
        self.add("pooling", value)

    def extra_args(self) -> None:
        for arg in self.spec.extra_args:
            flag = arg.split("=", 1)[0]
            if _FLAG_TOKEN.match(flag) and not self.binary.supports(flag):
                raise self.unsupported(
                    flag, "extra_args has a flag this llama-server does not accept"
                )
            self.argv.append(arg)

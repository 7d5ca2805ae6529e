"""Rendering a boot spec into the launch plan the probed binary accepts.

``render_command`` is a dry run: it starts nothing and writes nothing. The launch plan
it returns holds the argv in CONTRACT §2 order, the environment overlay, and the
private files (the API key file) that the process seam writes, mode 0600, at spawn.
"""

from __future__ import annotations

import os
import re
import threading

from llama_actors._base.secret import Secret
from llama_actors._exceptions import UnsupportedFlagError
from llama_actors._llama.binary import ServerBinary, forget_probes, locate_binary, probe_binary
from llama_actors._llama.boot_spec import DEFAULT_LOG_VERBOSITY, MANAGED_FLAGS, BootSpec
from llama_actors._process.plan import PORT_SLOT, LaunchPlan, PortMode, PrivateFile

__all__ = ["clear_probe_cache", "plan_for", "render_command"]

API_KEY_FILE = "api-key"
_FLAG_TOKEN = re.compile(r"^--?[A-Za-z]")


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


def plan_for(spec: BootSpec) -> LaunchPlan:
    """``render_command(spec)``, remembered per identity: a spec of one identity renders
    the same for the same binary, and rendering costs more than a warm resolve. (The
    stop timeout is in the plan but not in the identity, so it is in the key too.)"""
    key = (spec.instance_key, spec.stop_timeout_ms)
    with _plans_lock:
        plan = _plans.get(key)
    if plan is None:
        plan = render_command(spec)  # the first render for a binary probes it
        with _plans_lock:
            _plans[key] = plan
            while len(_plans) > _PLANS_MAX:
                del _plans[next(iter(_plans))]
    return plan


def clear_probe_cache() -> None:
    """Forget every probed binary and every remembered plan (the next render probes
    again): call it after replacing a llama-server binary in place."""
    forget_probes()
    with _plans_lock:
        _plans.clear()


_plans: dict[tuple[str, int], LaunchPlan] = {}  # oldest first
_plans_lock = threading.Lock()
_PLANS_MAX = 1024


class _Renderer:
    def __init__(self, spec: BootSpec, binary: ServerBinary) -> None:
        self.spec = spec
        self.binary = binary
        self.argv: list[str] = [binary.path, *spec.launcher_args]
        self.slots: dict[int, str] = {}
        self.files: list[PrivateFile] = []
        self.port_index = 0

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
        self.slots_endpoint()
        self.metrics_endpoint()
        if spec.cache_type_k is not None:
            self.add("cache_type_k", spec.cache_type_k)
        if spec.cache_type_v is not None:
            self.add("cache_type_v", spec.cache_type_v)
        if spec.tensor_split is not None:
            self.add("tensor_split", ",".join(f"{share:g}" for share in spec.tensor_split))
        self.log_verbosity()
        self.extra_args()
        return LaunchPlan(
            name=spec.alias,
            binary_path=self.binary.path,
            binary_label=self.binary.label,
            argv=tuple(self.argv),
            env=dict(spec.environment),
            private_files=tuple(self.files),
            host=spec.host,
            port=spec.port if isinstance(spec.port, int) else None,
            port_mode=port_mode,
            port_index=self.port_index,
            slots=self.slots,
            model=spec.model,
            has_key=bool(spec.server_keys),
            stop_timeout_s=spec.stop_timeout_s,
        )

    def port(self) -> PortMode:
        port = self.spec.port
        self.port_index = len(self.argv) + 1  # the value after the flag
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

    def slots_endpoint(self) -> None:
        """``/slots`` on (``--slots``) where the build has the flag, unless the spec
        says false (``--no-slots``); true requires it."""
        value = self.spec.slots
        if value is False:
            if self.binary.supports("--no-slots"):
                self.argv.append("--no-slots")
            return
        if self.binary.supports("--slots"):
            self.argv.append("--slots")
        elif value is True:
            raise self.unsupported("--slots", "this llama-server has no /slots endpoint")

    def metrics_endpoint(self) -> None:
        """``--metrics`` where the build has it, unless the spec says false; true
        requires it. The runtime reads ``/metrics`` for requests deferred and tokens/s."""
        value = self.spec.metrics
        if value is False:
            return
        if self.binary.supports("--metrics"):
            self.argv.append("--metrics")
        elif value is True:
            raise self.unsupported("--metrics", "this llama-server has no /metrics endpoint")

    def log_verbosity(self) -> None:
        """``--verbosity N``; left out, 4 where the build has the flag: the level at which
        llama-server logs its buffer sizes, which become the instance's measured memory."""
        value = self.spec.log_verbosity
        if value is not None:
            self.add("log_verbosity", str(value))
        elif any(self.binary.supports(name) for name in MANAGED_FLAGS["log_verbosity"]):
            self.add("log_verbosity", str(DEFAULT_LOG_VERBOSITY))

    def extra_args(self) -> None:
        for arg in self.spec.extra_args:
            flag = arg.split("=", 1)[0]
            if _FLAG_TOKEN.match(flag) and not self.binary.supports(flag):
                raise self.unsupported(
                    flag, "extra_args has a flag this llama-server does not accept"
                )
            self.argv.append(arg)

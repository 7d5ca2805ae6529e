"""Boot specs: the validated, frozen description of one llama-server instance.

``boot_spec(mapping)`` is the only way in. It normalises every field of CONTRACT §1,
rejects unknown keys by name, and raises nothing but :class:`BootSpecError`, whatever
the input.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import posixpath
import re
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar

import msgspec

from llama_actors._base.secret import (
    MASK,
    Secret,
    bearer_headers,
    key_to_publish,
    looks_secret,
    mask_argv,
    mask_mapping,
)
from llama_actors._base.units import InSeconds
from llama_actors._exceptions import BootSpecError, PortNotBoundError
from llama_actors._kernel.types import EndpointUrls

__all__ = [
    "CACHE_TYPES",
    "DEFAULTS",
    "IDENTITY_EXCLUDED",
    "MANAGED_FLAGS",
    "BootSpec",
    "EndpointUrls",
    "boot_spec",
]

Port = int | Literal["auto"]
GpuLayers = int | Literal["auto", "all"]
FlashAttn = Literal["on", "off", "auto"]
Pooling = Literal["none", "mean", "cls", "last", "rank"]
CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]

POOLING_VALUES: tuple[str, ...] = ("none", "mean", "cls", "last", "rank")
CACHE_TYPES: tuple[str, ...] = (
    "f32",
    "f16",
    "bf16",
    "q8_0",
    "q4_0",
    "q4_1",
    "iq4_nl",
    "q5_0",
    "q5_1",
)
#: llama-server's log verbosity when a spec leaves ``log_verbosity`` out: 4 is the level
#: at which it prints its buffer sizes, the figure that replaces the memory estimate.
DEFAULT_LOG_VERBOSITY = 4
FLASH_ATTN_VALUES: tuple[str, ...] = ("on", "off", "auto")
EXECUTION_SURFACES: tuple[str, ...] = ("local_subprocess",)

INT_MAX = 2**31 - 1  # llama-server parses its integer flags as C ints
API_KEY_FILE_LIMIT = 64 * 1024

DEFAULTS: Mapping[str, int] = {
    # The stall deadline: readiness fails when the server shows no load progress for
    # this long (CONTRACT §4). It is not a fixed deadline from spawn.
    "ready_timeout_ms": 30_000,
    "readiness_interval_ms": 100,
    "health_interval_ms": 1_000,
    "stop_timeout_ms": 5_000,
}

TIMING_FIELDS: tuple[str, ...] = tuple(DEFAULTS)
IDENTITY_EXCLUDED: frozenset[str] = frozenset({"metadata", *TIMING_FIELDS})

# Every llama-server flag the library renders itself, with its aliases, keyed by the
# boot spec field that controls it. extra_args may not repeat any of them.
MANAGED_FLAGS: Mapping[str, tuple[str, ...]] = {
    "model": ("-m", "--model"),
    "alias": ("-a", "--alias"),
    "host": ("--host",),
    "port": ("--port",),
    "ctx_size": ("-c", "--ctx-size"),
    "gpu_layers": ("-ngl", "--gpu-layers", "--n-gpu-layers"),
    "threads": ("-t", "--threads"),
    "threads_batch": ("-tb", "--threads-batch"),
    "parallel": ("-np", "--parallel"),
    "flash_attn": ("-fa", "--flash-attn", "--no-flash-attn"),
    "embeddings": ("--embedding", "--embeddings"),
    "api_key": ("--api-key",),
    "api_key_file": ("--api-key-file",),
    "api_prefix": ("--api-prefix",),
    "timeout_seconds": ("-to", "--timeout"),
    "threads_http": ("--threads-http",),
    "pooling": ("--pooling",),
    "slots": ("--slots", "--no-slots"),
    "metrics": ("--metrics",),
    "cache_type_k": ("-ctk", "--cache-type-k"),
    "cache_type_v": ("-ctv", "--cache-type-v"),
    "tensor_split": ("-ts", "--tensor-split"),
    "log_verbosity": ("-lv", "--verbosity", "--log-verbosity"),
}
_FLAG_OWNER: Mapping[str, str] = {
    flag: field for field, flags in MANAGED_FLAGS.items() for flag in flags
}


class BootSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A normalised llama-server boot spec. Build it with :func:`boot_spec`.

    Sequences are tuples so the spec cannot change under a running instance. Secrets
    (``api_key``, keys read from ``api_key_file``) are :class:`Secret` values: masked in
    every repr and refused by msgspec encoders.
    """

    model: str
    binary_path: str | None = None
    launcher_args: tuple[str, ...] = ()
    alias: str
    model_identity: str
    host: str = "127.0.0.1"
    port: Port = "auto"
    api_prefix: str = ""
    ctx_size: int | None = None
    threads: int | None = None
    threads_batch: int | None = None
    parallel: int | None = None
    timeout_seconds: int | None = None
    threads_http: int | None = None
    gpu_layers: GpuLayers = "auto"
    flash_attn: FlashAttn = "auto"
    embeddings: bool = False
    pooling: Pooling | None = None
    slots: bool | None = None
    metrics: bool | None = None
    cache_type_k: CacheType | None = None
    cache_type_v: CacheType | None = None
    tensor_split: tuple[float, ...] | None = None
    log_verbosity: int | None = None
    api_key: Secret | None = None
    api_key_file: str | None = None
    file_keys: tuple[Secret, ...] = ()
    ready_timeout_ms: int = DEFAULTS["ready_timeout_ms"]
    readiness_interval_ms: int = DEFAULTS["readiness_interval_ms"]
    health_interval_ms: int = DEFAULTS["health_interval_ms"]
    stop_timeout_ms: int = DEFAULTS["stop_timeout_ms"]
    execution_surface: Literal["local_subprocess"] = "local_subprocess"
    environment: dict[str, str] = {}
    extra_args: tuple[str, ...] = ()
    host_labels: dict[str, str] = {}
    host_gpus: int = 0
    metadata: dict[str, Any] = {}

    def __repr__(self) -> str:
        parts = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name == "environment":
                value = mask_mapping(value)
            elif name in ("extra_args", "launcher_args"):
                value = tuple(mask_argv(value))
            parts.append(f"{name}={value!r}")
        return f"BootSpec({', '.join(parts)})"

    # -- durations in seconds, the library's inner unit (see _base.units) ------------
    ready_timeout_s = InSeconds("ready_timeout_ms")
    readiness_interval_s = InSeconds("readiness_interval_ms")
    health_interval_s = InSeconds("health_interval_ms")
    stop_timeout_s = InSeconds("stop_timeout_ms")

    @property
    def backend(self) -> str:
        """The backend that serves it: always ``llama_cpp`` (a spec's default)."""
        return "llama_cpp"

    # -- keys ---------------------------------------------------------------------

    @property
    def published_key(self) -> Secret | None:
        """The key callers send: ``api_key`` when set, else the first key of the file."""
        return key_to_publish(self.api_key, self.file_keys)

    @property
    def server_keys(self) -> tuple[Secret, ...]:
        """Every key the server accepts: ``api_key`` and then the file's keys."""
        keys = (self.api_key,) if self.api_key is not None else ()
        return keys + tuple(k for k in self.file_keys if k not in keys)

    @property
    def headers(self) -> dict[str, str]:
        """Headers a caller sends: a bearer token when a key is known, else none."""
        return bearer_headers(self.published_key)

    # -- urls ---------------------------------------------------------------------

    def urls(self, bound_port: int | None = None) -> EndpointUrls:
        """The URLs on ``bound_port``, or on the spec's own port when it is fixed."""
        port = bound_port if bound_port is not None else self.port
        if port == "auto":
            raise PortNotBoundError(
                "port is 'auto': the URLs are known once the server has bound a port; "
                "pass bound_port, or ask the running instance for its endpoint"
            )
        return EndpointUrls.build(self.host, port, self.api_prefix)

    @property
    def root_url(self) -> str:
        return self.urls().root_url

    @property
    def base_url(self) -> str:
        return self.urls().base_url

    @property
    def health_url(self) -> str:
        return self.urls().health_url

    # -- identity -----------------------------------------------------------------

    @property
    def instance_key(self) -> str:
        """A stable hash of every field that changes which server this is.

        Metadata and the four timing fields are left out, so two specs that differ only
        there share one instance. Keys enter as digests, never as text.
        """
        key = _keys.get(self)
        if key is None:
            key = self._compute_instance_key()
            _keys.put(self, key)
        return key

    def _compute_instance_key(self) -> str:
        canonical: dict[str, Any] = {}
        for name in self.__struct_fields__:
            if name in IDENTITY_EXCLUDED:
                continue
            value = getattr(self, name)
            if isinstance(value, Secret):
                value = _digest(value.reveal())
            elif name == "file_keys":
                value = [_digest(k.reveal()) for k in value]
            canonical[name] = value
        encoded = msgspec.json.encode(canonical, order="sorted")
        return hashlib.sha256(b"llama_actors.instance.v1\0" + encoded).hexdigest()[:32]

    def to_mapping(self) -> dict[str, Any]:
        """A plain mapping that :func:`boot_spec` turns back into an equal spec.

        ``api_key`` stays a :class:`Secret`; keys read from ``api_key_file`` are left out
        and read again from the file.
        """
        out: dict[str, Any] = {}
        for name in self.__struct_fields__:
            if name == "file_keys":
                continue
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[name] = value
        return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# -- the normaliser -----------------------------------------------------------------

_Normaliser = Callable[[Any, str], Any]
_HOSTNAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_ENV_NAME = re.compile(r"^[^=\x00]+$")


def _fail(field: str, value: Any, reason: str) -> BootSpecError:
    return BootSpecError(field, value, reason)


def _text(value: Any, field: str, *, what: str = "a non-empty string") -> str:
    if not isinstance(value, str):
        raise _fail(field, value, f"must be {what}, not {type(value).__name__}")
    if "\x00" in value:
        raise _fail(field, value, "must not contain a NUL character")
    if not value.strip():
        raise _fail(field, value, f"must be {what}")
    return value


def _strings(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise _fail(field, value, "must be a list of strings, e.g. ['--flag', 'value']")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _fail(f"{field}[{i}]", item, f"must be a string, not {type(item).__name__}")
        if "\x00" in item:
            raise _fail(f"{field}[{i}]", item, "must not contain a NUL character")
        out.append(item)
    return tuple(out)


def _positive_int(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, value, f"must be a whole number > 0, not {type(value).__name__}")
    if not 0 < value <= INT_MAX:
        raise _fail(field, value, f"must be between 1 and {INT_MAX}")
    return value


def _timing(value: Any, field: str) -> int:
    if value is None:
        return DEFAULTS[field]
    result = _positive_int(value, field)
    return DEFAULTS[field] if result is None else result


def _binary_path(value: Any, field: str) -> str | None:
    return None if value is None else _text(value, field, what="a path or a command name")


def _model(value: Any, field: str) -> str:
    if value is None:
        raise _fail(field, value, "is required: the path of the GGUF model file to serve")
    return _text(value, field, what="the path of a GGUF model file")


def _name(value: Any, field: str) -> str:
    text = _text(value, field).strip()
    if "," in text:
        raise _fail(field, value, "must not contain ',' (llama-server splits names on commas)")
    return text


def _host(value: Any, field: str) -> str:
    text = _text(value, field, what="a host name or IP address")
    host = text.strip()
    if host.endswith(".sock"):
        raise _fail(field, value, "unsupported host: UNIX sockets are not supported, use an IP")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _fail(field, value, "is not a valid IPv6 address") from None
    if not _HOSTNAME.match(host):
        raise _fail(field, value, "must be one host name or IP address, e.g. '127.0.0.1'")
    return host.lower()


def _port(value: Any, field: str) -> Port:
    if value is None or value == "auto" or (type(value) is int and value == 0):
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        raise _fail(field, value, "must be an integer, not a string: write 8080, not '8080'")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, value, "must be an integer from 1 to 65535, or 'auto'")
    if not 1 <= value <= 65535:
        raise _fail(field, value, "must be from 1 to 65535, or 'auto' (0 means 'auto')")
    return value


def _api_prefix(value: Any, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(
            field, value, f"must be a URL path such as '/llama', not {type(value).__name__}"
        )
    if any(c in value for c in "?#%\\") or any(c.isspace() or not c.isprintable() for c in value):
        raise _fail(field, value, "must be a plain URL path such as '/llama'")
    return re.sub(r"/+", "/", "/" + value).rstrip("/")


def _gpu_layers(value: Any, field: str) -> GpuLayers:
    if value is None:
        return "auto"
    if value in ("auto", "all") and isinstance(value, str):
        return value  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT_MAX:
        raise _fail(field, value, "must be a whole number of layers >= 0, 'auto' or 'all'")
    return value


def _flash_attn(value: Any, field: str) -> FlashAttn:
    if value is None:
        return "auto"
    if value is True:
        return "on"
    if value is False:
        return "off"
    if isinstance(value, str) and value in FLASH_ATTN_VALUES:
        return value  # type: ignore[return-value]
    raise _fail(field, value, "must be 'on', 'off', 'auto', true or false")


def _embeddings(value: Any, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _fail(field, value, "must be true or false")
    return value


def _pooling(value: Any, field: str) -> Pooling | None:
    if value is None:
        return None
    if isinstance(value, str) and value in POOLING_VALUES:
        return value  # type: ignore[return-value]
    raise _fail(field, value, f"must be one of {', '.join(POOLING_VALUES)}")


def _optional_bool(value: Any, field: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise _fail(field, value, "must be true, false, or left out (on where the build can)")


def _cache_type(value: Any, field: str) -> CacheType | None:
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in CACHE_TYPES:
        return value.lower()  # type: ignore[return-value]
    raise _fail(
        field, value, f"must be one of {', '.join(CACHE_TYPES)} (llama-server's default is f16)"
    )


def _tensor_split(value: Any, field: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise _fail(field, value, "must be a list of proportions, one per GPU, e.g. [3, 1]")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int | float) or not 0 <= item < 1e9:
            raise _fail(f"{field}[{i}]", item, "must be a number >= 0 (a proportion of the model)")
        out.append(float(item))
    if not any(out):
        raise _fail(field, value, "must give at least one GPU a proportion above 0")
    return tuple(out)


def _log_verbosity(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10:
        raise _fail(
            field,
            value,
            "must be a whole number from 0 to 10, or left out "
            f"({DEFAULT_LOG_VERBOSITY}: llama-server then logs its buffer sizes)",
        )
    return value


def _check_key(key: str, field: str, masked: Any) -> str:
    """A key must survive a one-key-per-line file and an HTTP header unchanged."""
    if not key:
        raise _fail(field, masked, "must not be empty")
    if any(c.isspace() or not c.isprintable() or ord(c) > 126 for c in key):
        raise _fail(field, masked, "must be printable ASCII without spaces or line breaks")
    if key.startswith("#"):
        raise _fail(field, masked, "must not start with '#' (llama-server reads it as a comment)")
    return key


def _api_key(value: Any, field: str) -> Secret | None:
    if value is None:
        return None
    if isinstance(value, Secret):
        value = value.reveal()
    if not isinstance(value, str):
        raise _fail(field, MASK, f"must be a string, not {type(value).__name__}")
    return Secret(_check_key(value.strip(), field, MASK))


def _read_key_file(path: str, field: str) -> tuple[Secret, ...]:
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise _fail(field, path, "is not a regular file; point it at a file of API keys")
        with open(path, "rb") as handle:
            raw = handle.read(API_KEY_FILE_LIMIT + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise _fail(
            field, path, f"cannot be read ({reason}); check the path and permissions"
        ) from None
    if len(raw) > API_KEY_FILE_LIMIT:
        raise _fail(field, path, f"is larger than {API_KEY_FILE_LIMIT} bytes; is it a key file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(field, path, "is not UTF-8 text") from None
    keys: list[Secret] = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(Secret(_check_key(key, f"{field}:{number}", MASK)))
    if not keys:
        raise _fail(field, path, "holds no key: it is empty after trimming and dropping # comments")
    return tuple(keys)


def _api_key_file(value: Any, field: str) -> str | None:
    return None if value is None else _text(value, field, what="the path of a file of API keys")


def _execution_surface(value: Any, field: str) -> Literal["local_subprocess"]:
    if value is None or value == "local_subprocess":
        return "local_subprocess"
    raise _fail(field, value, "unsupported execution surface: only 'local_subprocess' is supported")


def _env_value(value: Any, field: str, masked: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if "\x00" in value:
            raise _fail(field, masked, "must not contain a NUL character")
        return value
    raise _fail(field, masked, f"must be a string, number or boolean, not {type(value).__name__}")


def _environment(value: Any, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(field, value, "must be a table of NAME = value")
    out: dict[str, str] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise _fail(f"{field}.{name}", name, "is not a valid environment variable name")
        masked = MASK if looks_secret(name) else item
        out[name] = _env_value(item, f"{field}.{name}", masked)
    return out


def _host_labels(value: Any, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(field, value, "must be a table of label = value, such as {zone = 'a'}")
    out: dict[str, str] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not name or not isinstance(item, str):
            raise _fail(f"{field}.{name}", item, "labels are non-empty names with string values")
        out[name] = item
    return out


def _host_gpus(value: Any, field: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(field, value, "must be a whole number of GPUs, 0 or more")
    return value


def _metadata(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(field, value, "must be a table")
    return dict(value)


def _extra_args(value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    args = _strings(value, field)
    for i, arg in enumerate(args):
        flag = arg.split("=", 1)[0]
        owner = _FLAG_OWNER.get(flag)
        if owner == "api_key":
            raise _fail(f"{field}[{i}]", MASK, "would put the API key in argv; set api_key instead")
        if owner is not None:
            raise _fail(
                f"{field}[{i}]", arg, f"repeats {flag}, which the spec renders; set {owner} instead"
            )
    return args


_NORMALISERS: Mapping[str, _Normaliser] = {
    "model": _model,
    "binary_path": _binary_path,
    "launcher_args": lambda v, f: () if v is None else _strings(v, f),
    "alias": lambda v, f: None if v is None else _name(v, f),
    "model_identity": lambda v, f: None if v is None else _name(v, f),
    "host": lambda v, f: "127.0.0.1" if v is None else _host(v, f),
    "port": _port,
    "api_prefix": _api_prefix,
    "ctx_size": _positive_int,
    "threads": _positive_int,
    "threads_batch": _positive_int,
    "parallel": _positive_int,
    "timeout_seconds": _positive_int,
    "threads_http": _positive_int,
    "gpu_layers": _gpu_layers,
    "flash_attn": _flash_attn,
    "embeddings": _embeddings,
    "pooling": _pooling,
    "slots": _optional_bool,
    "metrics": _optional_bool,
    "cache_type_k": _cache_type,
    "cache_type_v": _cache_type,
    "tensor_split": _tensor_split,
    "log_verbosity": _log_verbosity,
    "api_key": _api_key,
    "api_key_file": _api_key_file,
    **dict.fromkeys(TIMING_FIELDS, _timing),
    "execution_surface": _execution_surface,
    "environment": _environment,
    "extra_args": _extra_args,
    "host_labels": _host_labels,
    "host_gpus": _host_gpus,
    "metadata": _metadata,
}

FIELDS: tuple[str, ...] = tuple(_NORMALISERS)


def _default_alias(model: str) -> str:
    name = posixpath.basename(model.rstrip("/"))
    stem, _ext = posixpath.splitext(name)
    alias = (stem or name).strip()
    if not alias or "," in alias:
        raise _fail("alias", None, f"cannot be derived from model {model!r}; set alias explicitly")
    return alias


def boot_spec(spec: Mapping[str, Any] | BootSpec) -> BootSpec:
    """Normalise and validate ``spec`` into a frozen :class:`BootSpec`.

    Accepts a mapping with string keys (a parsed TOML table, for instance) or a
    ``BootSpec``, which is validated again (unless this function made it and it reads
    no key file: then it is returned as it is). Unknown keys are rejected by name. Raises
    :class:`BootSpecError`, and nothing else, naming the field, the value (secrets
    masked) and what to do.
    """
    if isinstance(spec, BootSpec):
        if _validated.get(spec) is not None:
            return spec  # made by this function: validating it again gives an equal spec
        spec = spec.to_mapping()
    if not isinstance(spec, Mapping):
        raise _fail("spec", type(spec).__name__, "a boot spec must be a mapping of field = value")
    raw: dict[str, Any] = {}
    for key, value in spec.items():
        if not isinstance(key, str):
            raise _fail(repr(key), key, "field names must be strings")
        if key == "backend":
            if value not in (None, "llama_cpp"):
                raise _fail(
                    key,
                    value,
                    "boot_spec() builds llama_cpp specs; pass a spec of another backend to "
                    "the Runtime as a mapping, or validate it with llama_actors.validate_spec()",
                )
            continue
        if key not in _NORMALISERS:
            raise _fail(key, MASK if looks_secret(key) else value, _unknown_reason(key))
        raw[key] = value
    values = {name: norm(raw.get(name), name) for name, norm in _NORMALISERS.items()}
    if values["api_key_file"] is not None:
        values["file_keys"] = _read_key_file(values["api_key_file"], "api_key_file")
    if values["alias"] is None:
        values["alias"] = _default_alias(values["model"])
    if values["model_identity"] is None:
        values["model_identity"] = values["alias"]
    result = BootSpec(**values)
    if result.api_key_file is None:  # a key file is read again each time: keys rotate
        _validated.put(result, True)
    return result


_V = TypeVar("_V")


class _ByIdentity(Generic[_V]):
    """A small memo keyed by the identity of frozen specs, oldest dropped first.

    It holds each spec it knows, so an id is never reused while its entry lives.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[BootSpec, _V]] = {}

    def get(self, spec: BootSpec) -> _V | None:
        entry = self._entries.get(id(spec))
        return entry[1] if entry is not None and entry[0] is spec else None

    def put(self, spec: BootSpec, value: _V) -> None:
        with self._lock:
            self._entries[id(spec)] = (spec, value)
            while len(self._entries) > self._size:
                del self._entries[next(iter(self._entries))]


_keys: _ByIdentity[str] = _ByIdentity(1024)
_validated: _ByIdentity[bool] = _ByIdentity(1024)


def _unknown_reason(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key.replace("-", "_"), FIELDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(FIELDS)}"
    return f"unknown field {key!r}{hint}"

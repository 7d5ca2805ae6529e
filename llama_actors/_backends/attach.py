"""The ``attach`` backend: an OpenAI-compatible server someone else runs (systemd, a
container, another machine), given by its root URL (CONTRACT §9).

It gets what a spawned instance gets except the process: readiness by probing,
health, signals, leases and drain. Stopping it forgets it and signals nothing; it is
never restarted; its management mode is ``externally_managed``, so a consumer that
accepts only managed instances is refused it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec

from llama_actors._base.secret import MASK, Secret, bearer_headers, key_to_publish, looks_secret
from llama_actors._base.units import InSeconds
from llama_actors._exceptions import BootSpecError
from llama_actors._kernel.backend import BackendBase, BackendSpec
from llama_actors._kernel.manifest import BackendManifest
from llama_actors._kernel.types import EndpointUrls
from llama_actors._llama.boot_spec import (
    DEFAULTS,
    _api_key,
    _api_key_file,
    _api_prefix,
    _host,
    _metadata,
    _name,
    _read_key_file,
    _timing,
)
from llama_actors._process.plan import LaunchPlan

__all__ = ["ATTACH", "AttachBackend", "AttachSpec", "attach_spec"]

#: The attach backend's registered name.
ATTACH = "attach"
EXTERNALLY_MANAGED = "externally_managed"
PROTOCOLS: tuple[str, ...] = ("openai_chat_completions", "openai_embeddings")
DEFAULT_CAPABILITIES: Mapping[str, bool | str] = {
    "streaming": True,
    "tool_calling": "unknown",
    "embeddings": "unknown",
}


class AttachSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A validated spec of a server someone else runs. Build it with :func:`attach_spec`
    (or pass the mapping to the Runtime): ``{"backend": "attach", "url": ...}``.

    ``url`` is the server's root URL as given; ``api_prefix`` is its path, so the
    published ``base_url`` is ``url + "/v1"``, as for a spawned server. Keys are
    :class:`Secret` values, masked in every repr.
    """

    url: str
    host: str
    port: int
    api_prefix: str = ""
    alias: str
    model_identity: str
    api_key: Secret | None = None
    api_key_file: str | None = None
    file_keys: tuple[Secret, ...] = ()
    capabilities: dict[str, bool | str] = {}
    protocols: tuple[str, ...] = ("openai_chat_completions",)
    ready_timeout_ms: int = DEFAULTS["ready_timeout_ms"]
    readiness_interval_ms: int = DEFAULTS["readiness_interval_ms"]
    health_interval_ms: int = DEFAULTS["health_interval_ms"]
    metadata: dict[str, Any] = {}

    ready_timeout_s = InSeconds("ready_timeout_ms")
    readiness_interval_s = InSeconds("readiness_interval_ms")
    health_interval_s = InSeconds("health_interval_ms")

    @property
    def backend(self) -> str:
        return ATTACH

    @property
    def headers(self) -> dict[str, str]:
        """What callers send: the key (``api_key``, else the file's first) as a bearer."""
        return bearer_headers(key_to_publish(self.api_key, self.file_keys))

    def urls(self, bound_port: int | None = None) -> EndpointUrls:
        """The server's URLs (its port is the URL's; ``bound_port`` is ignored)."""
        return EndpointUrls.build(self.host, self.port, self.api_prefix)

    @property
    def instance_key(self) -> str:
        """Which server this is: its URL, names, keys (as digests) and declarations.
        Metadata and timings are left out, as for a boot spec."""
        canonical = {
            "host": self.host,
            "port": self.port,
            "api_prefix": self.api_prefix,
            "alias": self.alias,
            "model_identity": self.model_identity,
            "keys": [_digest(k.reveal()) for k in self._keys()],
            "capabilities": self.capabilities,
            "protocols": list(self.protocols),
        }
        encoded = msgspec.json.encode(canonical, order="sorted")
        return hashlib.sha256(b"llama_actors.attach.v1\0" + encoded).hexdigest()[:32]

    def _keys(self) -> tuple[Secret, ...]:
        keys = (self.api_key,) if self.api_key is not None else ()
        return keys + self.file_keys


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _fail(field: str, value: Any, reason: str) -> BootSpecError:
    return BootSpecError(field, value, reason)


def _url(value: Any) -> tuple[str, str, int, str]:
    if value is None:
        raise _fail(
            "url",
            value,
            "is required: the root URL of the running server, e.g. 'http://127.0.0.1:8080'",
        )
    if not isinstance(value, str) or not value.strip():
        raise _fail("url", value, "must be a URL such as 'http://127.0.0.1:8080'")
    text = value.strip()
    parts = urlsplit(text)
    if parts.scheme != "http":
        raise _fail(
            "url",
            value,
            "must be an http:// URL: the probes speak plain HTTP (attach to the server's own "
            "http address, or put a plain-HTTP proxy beside it)",
        )
    if parts.username or parts.password:
        raise _fail("url", MASK, "must not hold credentials; set api_key or api_key_file")
    if parts.query or parts.fragment:
        raise _fail("url", value, "must not have a query or fragment: give the root URL")
    try:
        port = parts.port
    except ValueError:
        raise _fail("url", value, "has an invalid port") from None
    if parts.hostname is None:
        raise _fail("url", value, "names no host; write e.g. 'http://127.0.0.1:8080'")
    host = _host(parts.hostname, "url")
    prefix = _api_prefix(parts.path, "url")
    if prefix.endswith("/v1"):
        raise _fail(
            "url",
            value,
            "is the root URL without /v1 (the endpoint adds /v1 to it, as for a spawned server)",
        )
    return text.rstrip("/"), host, port if port is not None else 80, prefix


def _capabilities(value: Any) -> dict[str, bool | str]:
    if value is None:
        return dict(DEFAULT_CAPABILITIES)
    if not isinstance(value, Mapping):
        raise _fail("capabilities", value, "must be a table such as {embeddings = true}")
    out = dict(DEFAULT_CAPABILITIES)
    for name, item in value.items():
        if not isinstance(name, str) or not isinstance(item, bool | str):
            raise _fail(f"capabilities.{name}", item, "must be true, false or a string")
        out[name] = item
    return out


def _protocols(value: Any, capabilities: Mapping[str, bool | str]) -> tuple[str, ...]:
    if value is None:
        chat = ("openai_chat_completions",)
        return (*chat, "openai_embeddings") if capabilities.get("embeddings") is True else chat
    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise _fail("protocols", value, f"must be a non-empty list from {list(PROTOCOLS)}")
    for item in value:
        if item not in PROTOCOLS:
            raise _fail("protocols", item, f"is not one of {list(PROTOCOLS)}")
    return tuple(dict.fromkeys(value))


_FIELDS = (
    "backend",
    "url",
    "alias",
    "model_identity",
    "api_key",
    "api_key_file",
    "capabilities",
    "protocols",
    "ready_timeout_ms",
    "readiness_interval_ms",
    "health_interval_ms",
    "metadata",
)


def attach_spec(data: Mapping[str, Any] | AttachSpec) -> AttachSpec:
    """Validate a mapping into an :class:`AttachSpec`; raises :class:`BootSpecError`
    naming the field, and nothing else."""
    if isinstance(data, AttachSpec):
        return data  # frozen, and only this function makes one with checked fields
    if not isinstance(data, Mapping):
        raise _fail("spec", type(data).__name__, "an attach spec must be a mapping")
    for key in data:
        if key not in _FIELDS:
            import difflib

            close = difflib.get_close_matches(str(key), _FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(_FIELDS)}"
            shown = MASK if isinstance(key, str) and looks_secret(key) else data[key]
            raise _fail(str(key), shown, f"unknown field of an attach spec{hint}")
    url, host, port, prefix = _url(data.get("url"))
    alias = data.get("alias")
    alias = f"{host}:{port}" if alias is None else _name(alias, "alias")
    identity = data.get("model_identity")
    identity = alias if identity is None else _name(identity, "model_identity")
    key_file = _api_key_file(data.get("api_key_file"), "api_key_file")
    capabilities = _capabilities(data.get("capabilities"))
    return AttachSpec(
        url=url,
        host=host,
        port=port,
        api_prefix=prefix,
        alias=alias,
        model_identity=identity,
        api_key=_api_key(data.get("api_key"), "api_key"),
        api_key_file=key_file,
        file_keys=_read_key_file(key_file, "api_key_file") if key_file is not None else (),
        capabilities=capabilities,
        protocols=_protocols(data.get("protocols"), capabilities),
        ready_timeout_ms=_timing(data.get("ready_timeout_ms"), "ready_timeout_ms"),
        readiness_interval_ms=_timing(data.get("readiness_interval_ms"), "readiness_interval_ms"),
        health_interval_ms=_timing(data.get("health_interval_ms"), "health_interval_ms"),
        metadata=_metadata(data.get("metadata"), "metadata"),
    )


class AttachBackend(BackendBase):
    """A running server, attached by URL: probed and leased, never launched, signalled
    or restarted."""

    name = ATTACH
    launches = False

    def spec(self, data: Mapping[str, Any] | BackendSpec) -> AttachSpec:
        if isinstance(data, AttachSpec | Mapping):
            return attach_spec(data)
        raise _fail("spec", type(data).__name__, "the attach backend takes a mapping")

    def manifest(self, spec: BackendSpec | None = None) -> BackendManifest:
        attach = spec if isinstance(spec, AttachSpec) else None
        return BackendManifest(
            backend=ATTACH,
            runtime_kind="service",
            management_modes=(EXTERNALLY_MANAGED,),
            startup_kind="attach_existing_service",
            protocols=attach.protocols if attach else ("openai_chat_completions",),
            capabilities=dict(attach.capabilities if attach else DEFAULT_CAPABILITIES),
            supported_surfaces=("external",),
            resource_profile={"scheduler": "external", "placement": "external", "gpu": "unknown"},
        )

    def launch(self, spec: BackendSpec) -> None:
        """Nothing to launch: the server runs already."""
        return

    def endpoint_metadata(
        self, spec: BackendSpec, plan: LaunchPlan | None, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """Where the server is: its URL as given, and that it runs elsewhere."""
        attach = spec if isinstance(spec, AttachSpec) else None
        return {
            **metadata,
            "url": attach.url if attach else spec.urls().root_url,
            "api_prefix": attach.api_prefix if attach else "",
            "execution_surface": "external",
        }

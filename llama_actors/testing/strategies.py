"""Hypothesis strategies for llama_actors' contract types, for this and other projects.

Needs ``hypothesis`` (a test dependency, not a runtime one)::

    from hypothesis import given
    from llama_actors.testing import strategies as st_la

    @given(st_la.boot_specs())
    def test_my_code_accepts_any_spec(spec): ...

Generated specs never name an ``api_key_file`` (that needs a real file on disk).
"""

from __future__ import annotations

import string
from typing import Any

from hypothesis import strategies as st

from llama_actors._kernel.manifest import BackendManifest, ConsumerManifest
from llama_actors._llama.backend import llama_manifest
from llama_actors._llama.boot_spec import (
    CACHE_TYPES,
    FIELDS,
    FLASH_ATTN_VALUES,
    INT_MAX,
    POOLING_VALUES,
    BootSpec,
    boot_spec,
)

__all__ = [
    "IDENTITY_FIELD_VALUES",
    "backend_manifests",
    "boot_specs",
    "capability_values",
    "consumer_manifests",
    "field_values",
    "json_like",
    "spec_like_mappings",
    "valid_spec_mappings",
]

_SAFE_TEXT = st.text(
    alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=16
).filter(lambda s: s.strip(". ") != "")
_PATHS = st.builds(
    lambda parts, ext: "/" + "/".join(parts) + ext,
    st.lists(_SAFE_TEXT, min_size=1, max_size=3),
    st.sampled_from([".gguf", ".bin", ""]),
).filter(lambda p: p.rstrip("/").rsplit("/", 1)[-1].split(".")[0] != "")
_POSITIVE = st.integers(min_value=1, max_value=INT_MAX)
_ARG = st.text(alphabet=string.ascii_letters + string.digits + "=._/", min_size=1, max_size=12)
_KEY = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=24)
_HOSTS = st.one_of(
    st.sampled_from(["127.0.0.1", "localhost", "0.0.0.0", "::1", "fe80::1", "10.0.0.7"]),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
_ENV_NAMES = st.text(alphabet=string.ascii_uppercase + "_", min_size=1, max_size=10)
_ENV_VALUES = st.one_of(
    st.text(alphabet=string.printable, max_size=12),
    st.integers(),
    st.booleans(),
    st.floats(allow_nan=False),
)

#: For each field that is part of an instance's identity, a strategy of valid values.
IDENTITY_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": _PATHS,
    "binary_path": st.one_of(st.none(), _PATHS),
    "launcher_args": st.lists(_ARG, max_size=3),
    "alias": _SAFE_TEXT,
    "model_identity": _SAFE_TEXT,
    "host": _HOSTS,
    "port": st.one_of(st.just("auto"), st.integers(min_value=1, max_value=65535)),
    "api_prefix": st.one_of(st.just(""), _SAFE_TEXT.map(lambda s: "/" + s)),
    "ctx_size": st.one_of(st.none(), _POSITIVE),
    "threads": st.one_of(st.none(), _POSITIVE),
    "threads_batch": st.one_of(st.none(), _POSITIVE),
    "parallel": st.one_of(st.none(), _POSITIVE),
    "timeout_seconds": st.one_of(st.none(), _POSITIVE),
    "threads_http": st.one_of(st.none(), _POSITIVE),
    "gpu_layers": st.one_of(
        st.sampled_from(["auto", "all"]), st.integers(min_value=0, max_value=INT_MAX)
    ),
    "flash_attn": st.sampled_from(FLASH_ATTN_VALUES),
    "embeddings": st.booleans(),
    "pooling": st.one_of(st.none(), st.sampled_from(POOLING_VALUES)),
    "slots": st.one_of(st.none(), st.booleans()),
    "metrics": st.one_of(st.none(), st.booleans()),
    "cache_type_k": st.one_of(st.none(), st.sampled_from(CACHE_TYPES)),
    "cache_type_v": st.one_of(st.none(), st.sampled_from(CACHE_TYPES)),
    "tensor_split": st.one_of(
        st.none(),
        st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=4),
    ),
    "log_verbosity": st.one_of(st.none(), st.integers(min_value=0, max_value=10)),
    "api_key": st.one_of(st.none(), _KEY),
    "environment": st.dictionaries(_ENV_NAMES, _ENV_VALUES, max_size=3),
    "extra_args": st.lists(
        st.sampled_from(["--no-webui", "--jinja", "--seed", "42", "--webui"]), max_size=3
    ),
}

_OTHER_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "ready_timeout_ms": st.one_of(st.none(), _POSITIVE),
    "readiness_interval_ms": st.one_of(st.none(), _POSITIVE),
    "health_interval_ms": st.one_of(st.none(), _POSITIVE),
    "stop_timeout_ms": st.one_of(st.none(), _POSITIVE),
    "execution_surface": st.just("local_subprocess"),
    "metadata": st.dictionaries(_SAFE_TEXT, st.integers() | st.text(max_size=8), max_size=3),
}


def field_values(name: str) -> st.SearchStrategy[Any]:
    """Valid values of one boot spec field (not ``api_key_file``)."""
    return {**IDENTITY_FIELD_VALUES, **_OTHER_FIELD_VALUES}[name]


@st.composite
def valid_spec_mappings(draw: st.DrawFn) -> dict[str, Any]:
    """Mappings that :func:`llama_actors.boot_spec` accepts: a model plus any other fields."""
    names = sorted(set(IDENTITY_FIELD_VALUES) | set(_OTHER_FIELD_VALUES))
    chosen = draw(st.sets(st.sampled_from(names)))
    mapping = {name: draw(field_values(name)) for name in chosen}
    mapping.setdefault("model", draw(_PATHS))
    if mapping["model"] is None:
        mapping["model"] = draw(_PATHS)
    return mapping


def boot_specs() -> st.SearchStrategy[BootSpec]:
    """Valid, normalised boot specs."""
    return valid_spec_mappings().map(boot_spec)


def json_like(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Anything a JSON or TOML document could hold."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**64), max_value=2**64),
        st.floats(),
        st.text(max_size=20),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=max_leaves,
    )


def spec_like_mappings() -> st.SearchStrategy[dict[str, Any]]:
    """Mappings shaped like boot specs with arbitrary values and some unknown keys."""
    keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12))
    return st.dictionaries(keys, json_like(), max_size=8)


def capability_values() -> st.SearchStrategy[bool | str]:
    return st.one_of(st.booleans(), st.sampled_from(["unknown", "partial", "native"]))


_RUNTIME_KINDS = ["service", "library", "task"]
_MODES = ["managed", "external", "attached"]
_PROTOCOLS = ["openai_chat_completions", "openai_embeddings", "anthropic_messages"]
_CAPABILITIES = ["streaming", "tool_calling", "embeddings", "vision"]


def consumer_manifests() -> st.SearchStrategy[ConsumerManifest]:
    """Consumer manifests over a small vocabulary, so matches and misses both occur."""
    return st.builds(
        ConsumerManifest,
        consumer=_SAFE_TEXT,
        accepted_runtime_kinds=st.lists(st.sampled_from(_RUNTIME_KINDS), unique=True).map(tuple),
        accepted_management_modes=st.lists(st.sampled_from(_MODES), unique=True).map(tuple),
        accepted_protocols=st.lists(st.sampled_from(_PROTOCOLS), unique=True).map(tuple),
        required_capabilities=st.dictionaries(st.sampled_from(_CAPABILITIES), capability_values()),
        optional_capabilities=st.dictionaries(st.sampled_from(_CAPABILITIES), capability_values()),
        constraints=st.dictionaries(
            st.just("startup_kind"), st.sampled_from(["spawned", "attached"])
        ),
    )


def backend_manifests() -> st.SearchStrategy[BackendManifest]:
    """The llama manifest, with and without embeddings."""
    return st.builds(
        lambda emb: llama_manifest(boot_spec({"model": "/m.gguf", "embeddings": emb})),
        st.booleans(),
    )

"""Config files: one or more named backends, each a boot spec, in TOML.

.. code-block:: toml

    [backends.chat]
    model = "models/gemma.gguf"   # relative paths are relative to this file;
                                  # ${NAME} in a path is an environment variable
    ctx_size = 4096

    [backends.chat.policy]        # optional: InstancePolicy fields
    idle_shutdown_ms = 300000     # false (TOML has no null) means None: never

    [backends.chat.policy.restart]  # optional: RestartPolicy fields
    max_restarts = 3

    [capacity]                    # optional: the memory the runtime may use (MiB)
    ram_mib = 8000                # or detect = true (headroom_mib = 1024)
    gpus = [{index = 0, mib = 22000, name = "RTX 4090"}]

    [hosts]                       # optional: run the servers on a Ray cluster's hosts
    address = "auto"              # given to ray.init: "auto" or "HEAD:6379"
    placement = "spread"          # or "pack" (the least free RAM that still fits)
    check_interval_ms = 1000      # the head checks each host this often (>= 100)
    lost_after_misses = 2         # unanswered checks in a row before a host is lost
    state_dir = "/var/lib/llama"  # each host's folder for logs and its server ledger

    [hosts.capacity]              # optional: what EVERY host may hold, the keys of
    ram_mib = 16000               # [capacity] but detect; an empty table caps nothing

With ``[hosts]`` the servers run on the hosts (``RayHosts``; :meth:`HostsConfig.ray_hosts`
builds it, and ray is imported only when the runtime connects). ``[hosts.capacity]``
comes in one of two shapes, told apart by its values: capacity keys (one capacity for
every host, as above), or only tables, one per host id (a host not listed measures
what it has free)::

    [hosts.capacity.gpu-box]      # the host whose id (node label ``host``) is gpu-box
    ram_mib = 64000
    gpus = [{index = 0, mib = 22000}]

    [hosts.capacity.small]
    ram_mib = 8000

``detect`` is refused there: it would measure this machine, not the hosts; leave the
host out and its agent measures what that host has free.

Errors are :class:`BootSpecError` with ``source`` set to the file and ``field`` the full
path, such as ``backends.chat.port`` or ``hosts.capacity.gpu-box.ram_mib``.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from llama_actors._backends.registry import validate_spec
from llama_actors._exceptions import BootSpecError
from llama_actors._kernel.backend import BackendSpec
from llama_actors._kernel.memory import Capacity, Gpu
from llama_actors._kernel.placement import PlacementPolicy
from llama_actors._kernel.policy import InstancePolicy, RestartPolicy

if TYPE_CHECKING:
    from llama_actors._hosts.ray_hosts import RayHosts

__all__ = [
    "Config",
    "HostsConfig",
    "load_config",
    "parse_config",
    "read_config_file",
    "validate_config",
    "validate_config_file",
]

_BACKEND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PATH_FIELDS = ("model", "api_key_file")


class HostsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The ``[hosts]`` table, validated: the keywords of
    :class:`~llama_actors.ray.RayHosts`. ``state_dir`` is absolute once read from a
    file; ``capacity`` is one :class:`Capacity` for every host, one per host id, or
    None (each host measures what it has free)."""

    address: str = "auto"
    placement: PlacementPolicy = "spread"
    check_interval_ms: int = 1000
    lost_after_misses: int = 2
    state_dir: str | None = None
    capacity: Capacity | dict[str, Capacity] | None = None

    def ray_hosts(self) -> RayHosts:
        """The :class:`~llama_actors.ray.RayHosts` these settings describe (it imports
        ray only when a runtime connects to it)."""
        from llama_actors._hosts.ray_hosts import RayHosts

        return RayHosts(
            self.address,
            placement=self.placement,
            check_interval_ms=self.check_interval_ms,
            lost_after_misses=self.lost_after_misses,
            capacity=self.capacity,
            state_dir=self.state_dir,
        )


class Config(msgspec.Struct, frozen=True):
    """A parsed config file: its path (if any), its backends by name in file order, the
    policy of each backend that has a ``policy`` table, the runtime's memory
    ``capacity`` from the ``[capacity]`` table (None without one; ``detect = true`` is
    sized from what the machine has free when the file is read), and the ``[hosts]``
    to run the servers on (None without one: they run on this machine)."""

    source: str | None
    backends: dict[str, BackendSpec]
    policies: dict[str, InstancePolicy] = msgspec.field(default_factory=dict)
    capacity: Capacity | None = None
    hosts: HostsConfig | None = None

    def policy(self, name: str) -> InstancePolicy | None:
        """The backend's own policy, or None when the file gives it none."""
        self.backend(name)
        return self.policies.get(name)

    def backend(self, name: str) -> BackendSpec:
        try:
            return self.backends[name]
        except KeyError:
            raise BootSpecError(
                f"backends.{name}",
                name,
                f"no such backend; the file has {', '.join(self.backends) or 'none'}",
                source=self.source,
            ) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; the first invalid field raises."""
    source = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(source))
    return _config(_validate(read_config_file(source), source, base_dir), source)


def validate_config_file(
    path: str | os.PathLike[str],
) -> tuple[dict[str, BackendSpec], list[BootSpecError]]:
    """Read a TOML config file and validate every backend, collecting all the errors.

    A file that cannot be read or parsed still raises :class:`BootSpecError`.
    """
    source = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(source))
    return validate_config(read_config_file(source), source=source, base_dir=base_dir)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file, turning read and syntax errors into :class:`BootSpecError`."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise BootSpecError(
            "", source, f"cannot read config file ({exc.strerror or exc})", source=source
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise BootSpecError("", source, f"is not valid TOML: {exc}", source=source) from None
    except UnicodeDecodeError:
        raise BootSpecError("", source, "is not UTF-8 text", source=source) from None


def parse_config(
    data: Mapping[str, Any], *, source: str | None = None, base_dir: str | None = None
) -> Config:
    """Validate an already parsed config mapping; relative paths resolve against ``base_dir``."""
    return _config(_validate(data, source, base_dir), source)


def validate_config(
    data: Mapping[str, Any], *, source: str | None = None, base_dir: str | None = None
) -> tuple[dict[str, BackendSpec], list[BootSpecError]]:
    """Validate every backend (and the ``[capacity]`` and ``[hosts]`` tables); return the
    valid specs and an error for each invalid one."""
    validated = _validate(data, source, base_dir)
    return validated.specs, validated.errors


class _Validated(NamedTuple):
    specs: dict[str, BackendSpec]
    policies: dict[str, InstancePolicy]
    capacity: Capacity | None
    hosts: HostsConfig | None
    errors: list[BootSpecError]


def _config(validated: _Validated, source: str | None) -> Config:
    """The :class:`Config`, or the first error."""
    if validated.errors:
        raise validated.errors[0]
    return Config(
        source=source,
        backends=validated.specs,
        policies=validated.policies,
        capacity=validated.capacity,
        hosts=validated.hosts,
    )


def _validate(data: Mapping[str, Any], source: str | None, base_dir: str | None) -> _Validated:
    errors: list[BootSpecError] = [
        BootSpecError(
            str(key),
            data[key],
            "unknown top-level key; put backends under [backends.NAME], the runtime's "
            "memory under [capacity] and the hosts to run them on under [hosts]",
            source=source,
        )
        for key in data
        if key not in ("backends", "capacity", "hosts")
    ]
    capacity = None
    if "capacity" in data:
        try:
            capacity = _capacity(data["capacity"])
        except BootSpecError as exc:
            errors.append(exc.located("capacity", source))
    hosts = None
    if "hosts" in data:
        host_errors: list[BootSpecError] = []
        hosts = _hosts(data["hosts"], base_dir, host_errors)
        errors += [exc.located("hosts", source) for exc in host_errors]
    backends = data.get("backends")
    if not isinstance(backends, Mapping) or not backends:
        errors.append(
            BootSpecError(
                "backends",
                backends,
                "the file needs at least one [backends.NAME] table",
                source=source,
            )
        )
        return _Validated({}, {}, capacity, hosts, errors)
    specs: dict[str, BackendSpec] = {}
    policies: dict[str, InstancePolicy] = {}
    for name, table in backends.items():
        prefix = f"backends.{name}"
        if not isinstance(name, str) or not _BACKEND_NAME.match(name):
            reason = "backend names are letters, digits, '_', '-' and '.'"
            errors.append(BootSpecError(prefix, name, reason, source=source))
        elif not isinstance(table, Mapping):
            reason = "must be a table of boot spec fields"
            errors.append(BootSpecError(prefix, table, reason, source=source))
        else:
            fields = dict(table)
            policy = fields.pop("policy", None)
            try:
                specs[name] = validate_spec(_resolve_paths(fields, base_dir))
            except BootSpecError as exc:
                errors.append(exc.located(prefix, source))
            if policy is not None:
                try:
                    policies[name] = _policy(policy)
                except BootSpecError as exc:
                    errors.append(exc.located(f"{prefix}.policy", source))
    return _Validated(specs, policies, capacity, hosts, errors)


_CAPACITY_KEYS = ("ram_mib", "gpus", "detect", "headroom_mib")
_HOST_CAPACITY_KEYS = ("ram_mib", "gpus")
_GPU_KEYS = ("index", "mib", "name")
_CAPACITY_HINT = "ram_mib = N (MiB of RAM), gpus = [{index = 0, mib = N}] or detect = true"


def _capacity(table: Any, *, host: str | None = None) -> Capacity:
    """A :class:`Capacity` from the ``[capacity]`` table; errors name the key under it.

    ``detect = true`` sizes it from what the machine has free now, less ``headroom_mib``;
    ``gpus`` then lists the GPUs with their free MiB instead of asking NVML.

    With ``host`` (a ``[hosts.capacity]`` table: ``"*"`` for every host, else the host
    id), ``detect`` and ``headroom_mib`` are refused (they would measure this machine)
    and an empty table caps nothing: ``Capacity()``."""
    where = "[capacity]" if host is None else "[hosts.capacity]"
    if not isinstance(table, Mapping):
        raise BootSpecError("", table, f"must be a table: {where} with {_CAPACITY_HINT}")
    for key in table:
        if key not in _CAPACITY_KEYS:
            known = _CAPACITY_KEYS if host is None else _HOST_CAPACITY_KEYS
            raise BootSpecError(
                str(key), table[key], f"unknown capacity key; known: {', '.join(known)}"
            )
        if host is not None and key not in _HOST_CAPACITY_KEYS:
            raise BootSpecError(
                str(key),
                table[key],
                "would measure this machine, not the hosts; remove it, and leave the host "
                "out of [hosts.capacity] for its agent to measure what that host has free",
            )
    if host is not None:
        gpus = _gpus(table["gpus"]) if "gpus" in table else None
        ram = _mib("ram_mib", table["ram_mib"], zero=False) if "ram_mib" in table else None
        if host == "*":
            return Capacity(ram_mib=ram, gpus=gpus)
        return Capacity(ram_mib=ram, gpus=gpus, host=host)
    detect = table.get("detect", False)
    if not isinstance(detect, bool):
        raise BootSpecError(
            "detect",
            detect,
            "must be true (size the capacity from what the machine has free) or false",
        )
    gpus = _gpus(table["gpus"]) if "gpus" in table else None
    if detect:
        if "ram_mib" in table:
            raise BootSpecError(
                "ram_mib",
                table["ram_mib"],
                "cannot be given with detect = true, which measures the free RAM; "
                "remove one of the two",
            )
        headroom = _mib("headroom_mib", table.get("headroom_mib", 1024.0), zero=True)
        return Capacity.detect(headroom_mib=headroom, gpus=gpus)
    if "headroom_mib" in table:
        raise BootSpecError(
            "headroom_mib",
            table["headroom_mib"],
            "is used only with detect = true; add detect = true or remove it",
        )
    ram = _mib("ram_mib", table["ram_mib"], zero=False) if "ram_mib" in table else None
    if ram is None and gpus is None:
        raise BootSpecError("", dict(table), f"needs {_CAPACITY_HINT}")
    return Capacity(ram_mib=ram, gpus=gpus)


def _gpus(value: Any) -> tuple[Gpu, ...]:
    if not isinstance(value, list) or not all(isinstance(g, Mapping) for g in value):
        raise BootSpecError(
            "gpus",
            value,
            'must be an array of tables such as [{index = 0, mib = 22000, name = "RTX 4090"}]',
        )
    gpus: list[Gpu] = []
    for position, table in enumerate(value):
        where = f"gpus[{position}]"
        for key in table:
            if key not in _GPU_KEYS:
                raise BootSpecError(
                    f"{where}.{key}",
                    table[key],
                    f"unknown GPU key; known: {', '.join(_GPU_KEYS)}",
                )
        for key in ("index", "mib"):
            if key not in table:
                raise BootSpecError(
                    where, dict(table), f"needs {key}: each GPU is {{index = N, mib = N}}"
                )
        index = table["index"]
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise BootSpecError(
                f"{where}.index", index, "must be the device number llama.cpp uses: 0, 1, ..."
            )
        if any(g.index == index for g in gpus):
            raise BootSpecError(
                f"{where}.index", index, "repeats the index of an earlier GPU; give each once"
            )
        name = table.get("name", "")
        if not isinstance(name, str):
            raise BootSpecError(f"{where}.name", name, 'must be a string, such as "RTX 4090"')
        mib = _mib(f"{where}.mib", table["mib"], zero=True)
        gpus.append(Gpu(index=index, mib=mib, name=name))
    return tuple(gpus)


def _mib(field: str, value: Any, *, zero: bool) -> float:
    """``value`` as MiB: a finite number above 0 (or at least 0 when ``zero``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        least = "0 or more" if zero else "above 0"
        raise BootSpecError(field, value, f"must be a number of MiB, {least}, such as 8000")
    return float(value)


_HOSTS_KEYS = (
    "address",
    "placement",
    "check_interval_ms",
    "lost_after_misses",
    "state_dir",
    "capacity",
)


def _hosts(table: Any, base_dir: str | None, errors: list[BootSpecError]) -> HostsConfig | None:
    """The ``[hosts]`` table as :class:`HostsConfig`; each bad key adds an error naming
    it (under ``hosts``) to ``errors``, and then the result is None."""
    if not isinstance(table, Mapping):
        errors.append(
            BootSpecError("", table, 'must be a table: [hosts] with address = "auto" or more')
        )
        return None
    found = len(errors)
    for key in table:
        if key not in _HOSTS_KEYS:
            errors.append(
                BootSpecError(
                    str(key), table[key], f"unknown hosts key; known: {', '.join(_HOSTS_KEYS)}"
                )
            )
    fields: dict[str, Any] = {}
    address = table.get("address", "auto")
    if not isinstance(address, str) or not address.strip():
        errors.append(
            BootSpecError(
                "address",
                address,
                'must be the Ray cluster\'s address: "auto" (the cluster this machine '
                'belongs to) or "HEAD:6379"',
            )
        )
    fields["address"] = address
    placement = table.get("placement", "spread")
    if placement not in ("spread", "pack"):
        errors.append(
            BootSpecError(
                "placement",
                placement,
                'must be "spread" (the host with the most free RAM) or "pack" (the least '
                "that still fits)",
            )
        )
    fields["placement"] = placement
    interval = table.get("check_interval_ms", 1000)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 100:
        errors.append(
            BootSpecError(
                "check_interval_ms",
                interval,
                "must be a whole number of milliseconds, 100 or more, such as 1000",
            )
        )
    fields["check_interval_ms"] = interval
    misses = table.get("lost_after_misses", 2)
    if isinstance(misses, bool) or not isinstance(misses, int) or misses < 1:
        errors.append(
            BootSpecError(
                "lost_after_misses",
                misses,
                "must be a whole number of checks, 1 or more, such as 2",
            )
        )
    fields["lost_after_misses"] = misses
    if "state_dir" in table:
        fields["state_dir"] = _state_dir(table["state_dir"], base_dir, errors)
    if "capacity" in table:
        fields["capacity"] = _host_capacity(table["capacity"], errors)
    if len(errors) > found:
        return None
    return HostsConfig(**fields)


def _state_dir(value: Any, base_dir: str | None, errors: list[BootSpecError]) -> str | None:
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        errors.append(
            BootSpecError(
                "state_dir",
                value,
                'must be a folder path, such as "/var/lib/llama_actors" (relative: to this file)',
            )
        )
        return None
    try:
        path = _expand({"state_dir": value}, ("state_dir",))["state_dir"]
    except BootSpecError as exc:
        errors.append(exc)
        return None
    if base_dir is None:
        return str(path)
    return os.path.join(base_dir, os.path.expanduser(path))


def _host_capacity(
    table: Any, errors: list[BootSpecError]
) -> Capacity | dict[str, Capacity] | None:
    """One capacity for every host (capacity keys), or one per host id (only tables)."""
    if not isinstance(table, Mapping):
        errors.append(
            BootSpecError(
                "capacity",
                table,
                "must be a table: [hosts.capacity] with ram_mib = N or gpus = [...] for "
                "every host, or [hosts.capacity.HOST] tables, one per host id",
            )
        )
        return None
    per_host = [key for key, value in table.items() if isinstance(value, Mapping)]
    if not per_host:
        try:
            return _capacity(table, host="*")
        except BootSpecError as exc:
            errors.append(exc.located("capacity"))
            return None
    if len(per_host) < len(table):
        key = next(k for k, v in table.items() if not isinstance(v, Mapping))
        errors.append(
            BootSpecError(
                f"capacity.{key}",
                table[key],
                "mixes a key of one capacity for every host with [hosts.capacity.HOST] "
                f"tables ({', '.join(per_host)}); give either one capacity for every "
                "host or one table per host",
            )
        )
        return None
    capacities: dict[str, Capacity] = {}
    for host_id, host_table in table.items():
        try:
            capacities[host_id] = _capacity(host_table, host=host_id)
        except BootSpecError as exc:
            errors.append(exc.located(f"capacity.{host_id}"))
    return capacities


_OPTIONAL_POLICY_FIELDS = (
    "idle_shutdown_ms",
    "wedged_restart_ms",
    "inference_probe_interval_ms",
    "load_interval_ms",
    "report_degraded_after",
    "report_unavailable_after",
)


def _policy(table: Any) -> InstancePolicy:
    """An :class:`InstancePolicy` from a TOML table; errors name the field."""
    if not isinstance(table, Mapping):
        raise BootSpecError("", table, "must be a table of InstancePolicy fields")
    _check_keys(table, InstancePolicy, "")
    restart = table.get("restart")
    if restart is not None:
        if not isinstance(restart, Mapping):
            raise BootSpecError("restart", restart, "must be a table of RestartPolicy fields")
        _check_keys(restart, RestartPolicy, "restart.")
    fields = dict(table)
    for name in _OPTIONAL_POLICY_FIELDS:
        if fields.get(name) is False:  # TOML has no null: false turns the feature off
            fields[name] = None
    try:
        return msgspec.convert(fields, InstancePolicy)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        field = where.rstrip("`").lstrip(".")
        value: Any = table
        for part in field.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        raise BootSpecError(field, value, message.rstrip(".").lower()) from None


def _check_keys(table: Mapping[str, Any], struct: type[msgspec.Struct], prefix: str) -> None:
    known = struct.__struct_fields__
    for key in table:
        if key not in known:
            raise BootSpecError(
                f"{prefix}{key}",
                table[key],
                f"unknown {struct.__name__} field; known: {', '.join(known)}",
            )


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(
    table: Mapping[str, Any], fields: tuple[str, ...] = (*_PATH_FIELDS, "binary_path")
) -> dict[str, Any]:
    """Replace ``${NAME}`` in path ``fields`` with the environment variable's value."""
    out = dict(table)
    for field in fields:
        value = out.get(field)
        if not isinstance(value, str) or "${" not in value:
            continue
        missing = [m for m in _VARIABLE.findall(value) if m not in os.environ]
        if missing:
            raise BootSpecError(
                field,
                value,
                f"environment variable {missing[0]} is not set; set it or write the path",
            )
        out[field] = _VARIABLE.sub(lambda m: os.environ[m.group(1)], value)
    return out


def _resolve_paths(table: Mapping[str, Any], base_dir: str | None) -> dict[str, Any]:
    out = _expand(table)
    if base_dir is None:
        return out
    for field in _PATH_FIELDS:
        value = out.get(field)
        if isinstance(value, str) and value.strip() and "\x00" not in value:
            out[field] = os.path.join(base_dir, os.path.expanduser(value))
    binary = out.get("binary_path")
    if isinstance(binary, str) and os.sep in binary and "\x00" not in binary:
        out["binary_path"] = os.path.join(base_dir, os.path.expanduser(binary))
    return out

"""Config files: named backends in TOML, with errors that name file and field path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from llama_actors import BootSpecError, Capacity, Gpu, load_config, parse_config
from llama_actors._cli.config import HostsConfig, validate_config_file


def write(tmp_path: Path, text: str, name: str = "backends.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_backend_table_becomes_a_boot_spec_in_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [backends.chat]
        model = "/models/chat.gguf"
        ctx_size = 4096

        [backends.embed]
        model = "/models/embed.gguf"
        embeddings = true
        pooling = "mean"
        """,
    )
    config = load_config(path)
    assert list(config.backends) == ["chat", "embed"]
    assert config.backend("chat").ctx_size == 4096
    assert config.backend("embed").embeddings is True
    assert config.source == str(path)


def test_relative_paths_are_relative_to_the_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "keys").write_text("sk-1\n")
    path = write(
        tmp_path,
        """
        [backends.chat]
        model = "models/chat.gguf"
        api_key_file = "keys"
        binary_path = "bin/llama-server"
        """,
    )
    monkeypatch.chdir("/")
    spec = load_config(path).backend("chat")
    assert spec.model == str(tmp_path / "models/chat.gguf")
    assert spec.api_key_file == str(tmp_path / "keys")
    assert spec.binary_path == str(tmp_path / "bin/llama-server")
    assert spec.alias == "chat"


def test_a_bare_binary_name_stays_a_name_to_look_up_on_path(tmp_path: Path) -> None:
    path = write(tmp_path, '[backends.a]\nmodel = "/m.gguf"\nbinary_path = "llama-server"\n')
    assert load_config(path).backend("a").binary_path == "llama-server"


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ('[backends.chat]\nmodel = "/m.gguf"\nport = "8080"\n', "backends.chat.port", "integer"),
        ("[backends.chat]\nctx_size = 1\n", "backends.chat.model", "required"),
        (
            '[backends.chat]\nmodel = "/m.gguf"\n[backends.chat.environment]\nFOO = []\n',
            "backends.chat.environment.FOO",
            "string, number or boolean",
        ),
        ('[backends.chat]\nmodel = "/m.gguf"\nturbo = true\n', "backends.chat.turbo", "unknown"),
        ('[server]\nmodel = "/m.gguf"\n', "server", "top-level"),
        ("title = 'nothing else'\n", "title", "top-level"),
        ("", "backends", "at least one"),
        ("[backends]\n", "backends", "at least one"),
        ("backends = 3\n", "backends", "at least one"),
        ('[backends."bad name"]\nmodel = "/m.gguf"\n', "backends.bad name", "names"),
        ("[backends]\nchat = 3\n", "backends.chat", "table"),
    ],
)
def test_a_bad_file_names_the_file_and_the_full_field_path(
    tmp_path: Path, text: str, field: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(BootSpecError, match=message) as caught:
        load_config(path)
    assert caught.value.field == field
    assert caught.value.source == str(path)
    assert str(caught.value).startswith(f"{path}: {field}: ")


def test_invalid_toml_reports_the_file_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[backends.chat]\nmodel = "unterminated\n')
    with pytest.raises(BootSpecError, match=r"not valid TOML.*line 2") as caught:
        load_config(path)
    assert caught.value.source == str(path)


def test_a_missing_file_is_a_boot_spec_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(BootSpecError, match="cannot read config file") as caught:
        load_config(tmp_path / "absent.toml")
    assert str(tmp_path / "absent.toml") in str(caught.value)


def test_asking_for_a_backend_the_file_lacks_lists_the_ones_it_has() -> None:
    config = parse_config({"backends": {"chat": {"model": "/m.gguf"}}}, source="x.toml")
    with pytest.raises(BootSpecError, match="the file has chat") as caught:
        config.backend("embed")
    assert caught.value.field == "backends.embed"


def test_a_policy_table_gives_a_backend_its_own_restart_and_idle_policy(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [backends.chat]
        model = "/models/chat.gguf"

        [backends.chat.policy]
        idle_shutdown_ms = 300000
        unavailable_after = 2

        [backends.chat.policy.restart]
        max_restarts = 3
        backoff_initial_ms = 250

        [backends.embed]
        model = "/models/embed.gguf"
        """,
    )
    config = load_config(path)
    chat = config.policy("chat")
    assert chat is not None
    assert chat.idle_shutdown_ms == 300_000
    assert chat.unavailable_after == 2
    assert (chat.restart.max_restarts, chat.restart.backoff_initial_ms) == (3, 250)
    assert chat.restart.window_s == 60.0  # unnamed fields keep their defaults
    assert config.policy("embed") is None  # the runtime's default policy applies
    assert "policy" not in config.backend("chat").to_mapping()


@pytest.mark.parametrize(
    ("table", "field", "says"),
    [
        (
            "[backends.chat.policy]\nidle_shutdown = 5",
            "backends.chat.policy.idle_shutdown",
            "unknown InstancePolicy field",
        ),
        (
            "[backends.chat.policy.restart]\nmax_restarts = 'x'",
            "backends.chat.policy.restart.max_restarts",
            "expected `int`, got `str`",
        ),
        (
            "[backends.chat.policy.restart]\njitter = 2.0",
            "backends.chat.policy.restart.jitter",
            "must be in [0, 1)",
        ),
        ("[backends.chat]\npolicy = 3", "backends.chat.policy", "must be a table"),
    ],
)
def test_a_bad_policy_field_is_an_error_naming_file_and_field(
    tmp_path: Path, table: str, field: str, says: str
) -> None:
    text = '[backends.chat]\nmodel = "/m.gguf"\n' + table
    if table.startswith("[backends.chat]\n"):
        text = '[backends.chat]\nmodel = "/m.gguf"\n' + table.split("\n", 1)[1]
    path = write(tmp_path, text)
    with pytest.raises(BootSpecError) as caught:
        load_config(path)
    assert caught.value.field == field
    assert caught.value.source == str(path)
    assert says in str(caught.value)


def test_a_path_may_name_an_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELS", "/srv/models")
    path = write(tmp_path, '[backends.chat]\nmodel = "${MODELS}/chat.gguf"\n')
    assert load_config(path).backend("chat").model == "/srv/models/chat.gguf"


def test_an_unset_variable_in_a_path_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_MODELS", raising=False)
    path = write(tmp_path, '[backends.chat]\nmodel = "${NO_SUCH_MODELS}/chat.gguf"\n')
    with pytest.raises(BootSpecError) as caught:
        load_config(path)
    assert caught.value.field == "backends.chat.model"
    assert "NO_SUCH_MODELS is not set" in str(caught.value)


def test_false_turns_an_optional_policy_feature_off_since_toml_has_no_null(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        '[backends.chat]\nmodel = "/m.gguf"\n[backends.chat.policy]\nwedged_restart_ms = false\n',
    )
    policy = load_config(path).policy("chat")
    assert policy is not None
    assert policy.wedged_restart_ms is None


# -- the runtime's memory: the [capacity] table ---------------------------------------------

BACKEND = '[backends.chat]\nmodel = "/m.gguf"\n'


def test_a_capacity_table_caps_the_runtimes_ram_and_gpus(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BACKEND
        + """
        [capacity]
        ram_mib = 8000
        gpus = [{index = 0, mib = 22000, name = "RTX 4090"}, {index = 1, mib = 0}]
        """,
    )
    assert load_config(path).capacity == Capacity(
        ram_mib=8000, gpus=(Gpu(index=0, mib=22000, name="RTX 4090"), Gpu(index=1, mib=0))
    )
    assert load_config(write(tmp_path, BACKEND, name="plain.toml")).capacity is None


def test_detect_sizes_the_capacity_from_what_is_free_less_the_headroom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        psutil, "virtual_memory", lambda: SimpleNamespace(available=8192 * 1024 * 1024)
    )
    path = write(
        tmp_path,
        BACKEND + "[capacity]\ndetect = true\nheadroom_mib = 512\n"
        # A GPU NVML does not see is listed with what it has free.
        "gpus = [{index = 0, mib = 4096}]\n",
    )
    assert load_config(path).capacity == Capacity(ram_mib=7680, gpus=(Gpu(index=0, mib=3584),))
    default = write(tmp_path, BACKEND + "[capacity]\ndetect = true\ngpus = []\n", name="d.toml")
    assert load_config(default).capacity == Capacity(ram_mib=8192 - 1024, gpus=())


@pytest.mark.parametrize(
    ("table", "field", "says"),
    [
        ("ram = 8000", "capacity.ram", "unknown capacity key; known: ram_mib, gpus"),
        ("ram_mib = '8000'", "capacity.ram_mib", "must be a number of MiB, above 0"),
        ("ram_mib = 0", "capacity.ram_mib", "must be a number of MiB, above 0"),
        ("ram_mib = inf", "capacity.ram_mib", "must be a number of MiB"),
        ("", "capacity", "needs ram_mib = N (MiB of RAM), gpus = [{index = 0, mib = N}]"),
        ("detect = 'yes'", "capacity.detect", "must be true"),
        ("detect = true\nram_mib = 8000", "capacity.ram_mib", "cannot be given with detect"),
        ("detect = true\nheadroom_mib = -1", "capacity.headroom_mib", "0 or more"),
        ("ram_mib = 8000\nheadroom_mib = 512", "capacity.headroom_mib", "only with detect"),
        ("gpus = 22000", "capacity.gpus", "must be an array of tables such as"),
        ("gpus = [{index = 0}]", "capacity.gpus[0]", "needs mib"),
        ("gpus = [{index = -1, mib = 1}]", "capacity.gpus[0].index", "the device number"),
        (
            "gpus = [{index = 0, mib = 1}, {index = 0, mib = 2}]",
            "capacity.gpus[1].index",
            "repeats",
        ),
        ("gpus = [{index = 0, mib = -5}]", "capacity.gpus[0].mib", "0 or more"),
        ("gpus = [{index = 0, mib = 5, vram = 2}]", "capacity.gpus[0].vram", "unknown GPU key"),
        ("gpus = [{index = 0, mib = 5, name = 3}]", "capacity.gpus[0].name", "must be a string"),
    ],
)
def test_a_bad_capacity_table_is_an_error_naming_file_and_key(
    tmp_path: Path, table: str, field: str, says: str
) -> None:
    path = write(tmp_path, BACKEND + "[capacity]\n" + table + "\n")
    with pytest.raises(BootSpecError) as caught:
        load_config(path)
    assert caught.value.field == field
    assert caught.value.source == str(path)
    assert says in str(caught.value)
    assert str(caught.value).startswith(f"{path}: {field}: ")


def test_a_capacity_that_is_not_a_table_and_the_backends_are_all_reported_by_check(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, 'capacity = 8000\n[backends.chat]\nmodel = "/m.gguf"\nport = -1\n')
    specs, errors = validate_config_file(path)
    assert specs == {}
    assert [e.field for e in errors] == ["capacity", "backends.chat.port"]
    assert "must be a table: [capacity] with ram_mib = N" in str(errors[0])


# -- the hosts to run the servers on: the [hosts] table -------------------------------------


def test_a_hosts_table_gives_the_ray_hosts_settings_with_the_state_folder_beside_the_file(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        BACKEND
        + """
        [hosts]
        address = "127.0.0.1:6379"
        placement = "pack"
        check_interval_ms = 250
        lost_after_misses = 3
        state_dir = "hosts-state"

        [hosts.capacity]
        ram_mib = 16000
        gpus = [{index = 0, mib = 22000}]
        """,
    )
    hosts = load_config(path).hosts
    assert hosts == HostsConfig(
        address="127.0.0.1:6379",
        placement="pack",
        check_interval_ms=250,
        lost_after_misses=3,
        state_dir=str(tmp_path / "hosts-state"),
        capacity=Capacity(ram_mib=16000, gpus=(Gpu(index=0, mib=22000),)),
    )
    ray_hosts = hosts.ray_hosts()
    assert (ray_hosts.address, ray_hosts.placement) == ("127.0.0.1:6379", "pack")
    assert (ray_hosts.check_interval_ms, ray_hosts.lost_after_misses) == (250, 3)
    assert ray_hosts.state_dir == str(tmp_path / "hosts-state")
    assert ray_hosts.capacity == hosts.capacity


def test_without_a_hosts_table_the_servers_run_here_and_an_empty_one_takes_the_defaults(
    tmp_path: Path,
) -> None:
    assert load_config(write(tmp_path, BACKEND)).hosts is None
    hosts = load_config(write(tmp_path, BACKEND + "[hosts]\n", name="h.toml")).hosts
    assert hosts == HostsConfig()
    assert (hosts.address, hosts.placement, hosts.capacity, hosts.state_dir) == (
        "auto",
        "spread",
        None,  # each host's agent measures what its host has free
        None,
    )


def test_an_empty_hosts_capacity_caps_nothing_on_any_host(tmp_path: Path) -> None:
    path = write(tmp_path, BACKEND + "[hosts]\n[hosts.capacity]\n")
    hosts = load_config(path).hosts
    assert hosts is not None
    assert hosts.capacity == Capacity()
    assert hosts.capacity.limits() == {}


def test_hosts_capacity_tables_give_each_named_host_its_own_capacity(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BACKEND
        + """
        [hosts.capacity.gpu-box]
        ram_mib = 64000
        gpus = [{index = 0, mib = 22000, name = "RTX 4090"}]

        [hosts.capacity.small]
        ram_mib = 8000
        """,
    )
    hosts = load_config(path).hosts
    assert hosts is not None
    assert hosts.capacity == {
        "gpu-box": Capacity(
            ram_mib=64000, gpus=(Gpu(index=0, mib=22000, name="RTX 4090"),), host="gpu-box"
        ),
        "small": Capacity(ram_mib=8000, host="small"),
    }
    assert hosts.ray_hosts()._capacity_of("small") == Capacity(ram_mib=8000, host="small")
    assert hosts.ray_hosts()._capacity_of("other") is None  # it measures what it has free


@pytest.mark.parametrize(
    ("table", "field", "says"),
    [
        ("adress = 'auto'", "hosts.adress", "unknown hosts key; known: address, placement"),
        ("address = 6379", "hosts.address", "must be the Ray cluster's address"),
        ("address = ''", "hosts.address", 'must be the Ray cluster\'s address: "auto"'),
        ("placement = 'random'", "hosts.placement", 'must be "spread"'),
        ("check_interval_ms = 50", "hosts.check_interval_ms", "100 or more"),
        ("check_interval_ms = 500.5", "hosts.check_interval_ms", "whole number"),
        ("check_interval_ms = true", "hosts.check_interval_ms", "whole number"),
        ("lost_after_misses = 0", "hosts.lost_after_misses", "1 or more"),
        ("lost_after_misses = '2'", "hosts.lost_after_misses", "whole number"),
        ("state_dir = 3", "hosts.state_dir", "must be a folder path"),
        ("state_dir = ''", "hosts.state_dir", "must be a folder path"),
        ("state_dir = '${NO_SUCH_STATE}/x'", "hosts.state_dir", "NO_SUCH_STATE is not set"),
        ("capacity = 8000", "hosts.capacity", "must be a table: [hosts.capacity]"),
        ("[hosts.capacity]\nram = 1", "hosts.capacity.ram", "unknown capacity key; known: ram_mib"),
        ("[hosts.capacity]\nram_mib = 0", "hosts.capacity.ram_mib", "above 0"),
        ("[hosts.capacity]\ndetect = true", "hosts.capacity.detect", "would measure this machine"),
        (
            "[hosts.capacity]\nheadroom_mib = 5",
            "hosts.capacity.headroom_mib",
            "would measure this machine",
        ),
        ("[hosts.capacity]\ngpus = [{index = 0}]", "hosts.capacity.gpus[0]", "needs mib"),
        ("[hosts.capacity.a]\nram_mib = -1", "hosts.capacity.a.ram_mib", "above 0"),
        ("[hosts.capacity.a]\nturbo = 1", "hosts.capacity.a.turbo", "unknown capacity key"),
        (
            "[hosts.capacity]\nram_mib = 100\n[hosts.capacity.a]\nram_mib = 50",
            "hosts.capacity.ram_mib",
            "mixes a key of one capacity for every host with [hosts.capacity.HOST] tables (a)",
        ),
    ],
)
def test_a_bad_hosts_table_is_an_error_naming_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, field: str, says: str
) -> None:
    monkeypatch.delenv("NO_SUCH_STATE", raising=False)
    header = "" if table.startswith("[hosts.") else "[hosts]\n"
    path = write(tmp_path, BACKEND + header + table + "\n")
    with pytest.raises(BootSpecError) as caught:
        load_config(path)
    assert caught.value.field == field
    assert caught.value.source == str(path)
    assert says in str(caught.value)
    assert str(caught.value).startswith(f"{path}: {field}: ")


def test_every_bad_hosts_key_is_reported_by_check_with_the_backends(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "hosts = 3\n" + BACKEND,
        name="not-a-table.toml",
    )
    assert [e.field for e in validate_config_file(path)[1]] == ["hosts"]
    path = write(
        tmp_path,
        BACKEND
        + "port = -1\n[hosts]\nplacement = 'x'\nlost_after_misses = 0\nzone = 'eu'\n"
        + "[hosts.capacity.a]\nram_mib = 'lots'\n[hosts.capacity.b]\nram_mib = 0\n",
    )
    specs, errors = validate_config_file(path)
    assert specs == {}
    assert sorted(e.field for e in errors) == [
        "backends.chat.port",
        "hosts.capacity.a.ram_mib",
        "hosts.capacity.b.ram_mib",
        "hosts.lost_after_misses",
        "hosts.placement",
        "hosts.zone",
    ]
    assert all(e.source == str(path) for e in errors)


def test_reading_a_hosts_table_and_building_its_ray_hosts_never_imports_ray(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, BACKEND + "[hosts]\naddress = '127.0.0.1:1'\n[hosts.capacity]\n")
    script = (
        "import sys\n"
        "from llama_actors import load_config\n"
        f"hosts = load_config({str(path)!r}).hosts.ray_hosts()\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "print(hosts)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "RayHosts(address='127.0.0.1:1', placement='spread')"

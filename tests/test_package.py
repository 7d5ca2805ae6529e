"""The package's shape: its public names, its one error tree, and its layers."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import llama_actors
import llama_actors.clients
import llama_actors.lowlevel
import llama_actors.testing.contract
from llama_actors import _exceptions

PACKAGE = Path(llama_actors.__file__).parent

#: What a service author uses. Adding a name here is a decision about the public API.
PUBLIC = {
    "ActorFace", "AsyncRuntime", "AttachSpec", "Backend", "BackendBase", "BackendManifest",
    "BackendSpec", "BootSpec", "Capacity", "CompatibilityResult", "Config", "ConsumerManifest",
    "EndpointDescriptor", "Ensured", "ExitVerdict", "Gpu", "Health", "HostStatus", "InstanceMemory",
    "InstancePolicy", "InstanceState", "Lease", "MemoryNeed", "MemoryStatistics", "Replied",
    "Resolution", "RestartPolicy", "Runtime", "RuntimeSnapshot", "RuntimeStatistics", "ServerLoad",
    "SignalEvent", "SignalStream", "attach_spec", "backend_manifest", "backends", "boot_spec",
    "compatibility", "load_config", "lowlevel", "parse_config", "register_backend", "signal_stream",
    "signals", "unregister_backend", "validate_spec",
}  # fmt: skip
#: The plumbing, documented in llama_actors.lowlevel.
LOWLEVEL = {
    "NON_RETRYABLE", "Admission", "BufferLog", "EndpointUrls", "FailureKind", "FlagInfo",
    "HealthTracker", "LaunchPlan", "Holder", "Ledger", "LedgerEntry", "LlamaCppBackend",
    "LoadReader", "ManualTimers", "Observation", "OutcomeWindow", "PrivateFile", "ProbeGetter",
    "ProcessExit", "ReadyProbe", "RestartDecision", "RestartTracker", "Scheduler", "Secret",
    "ServerBinary", "ServerProcess", "Supervisor", "TimerHandle", "Timers", "Verdict",
    "check_model_file", "classify_line", "clear_probe_cache", "default_state_dir", "detect_gpus",
    "llama_manifest", "locate_binary", "parse_buffer_line", "parse_help", "parse_version",
    "probe_binary", "parse_metrics", "parse_slots", "probe_health", "probe_inference",
    "probe_ready", "render_command",
}  # fmt: skip
ERRORS = set(_exceptions.__all__)


def test_the_top_level_lists_exactly_the_public_names_and_every_error() -> None:
    assert set(llama_actors.__all__) == PUBLIC | ERRORS
    assert len(llama_actors.__all__) == len(set(llama_actors.__all__))


def test_lowlevel_lists_exactly_the_plumbing() -> None:
    assert set(llama_actors.lowlevel.__all__) == LOWLEVEL
    assert not LOWLEVEL & set(llama_actors.__all__)


@pytest.mark.parametrize(
    "module",
    [llama_actors, llama_actors.lowlevel, llama_actors.clients, llama_actors.testing.contract],
    ids=lambda m: m.__name__,
)
def test_every_exported_name_exists_and_has_a_docstring_of_its_own(module: ModuleType) -> None:
    undocumented = [name for name in module.__all__ if not _documented(module, name)]
    assert undocumented == []


def _documented(module: ModuleType, name: str) -> bool:
    obj = getattr(module, name)
    if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj):
        return bool(inspect.getdoc(obj)) and inspect.getdoc(obj) != inspect.getdoc(type(obj))
    # A constant or a type alias: documented by a ``#:`` comment above its assignment.
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(rf"{name}(: [^=]+)? = ", line):
                return i > 0 and lines[i - 1].lstrip().startswith("#:")
    return False


def test_a_constant_without_a_doc_comment_counts_as_undocumented() -> None:
    fake = ModuleType("fake")
    fake.UNDOCUMENTED_CONSTANT_FOR_THIS_TEST = 1  # type: ignore[attr-defined]
    fake.Runtime = llama_actors.Runtime  # type: ignore[attr-defined]

    assert not _documented(fake, "UNDOCUMENTED_CONSTANT_FOR_THIS_TEST")
    assert _documented(fake, "Runtime")


# -- the error tree ---------------------------------------------------------------------


def drawn_tree(docstring: str) -> dict[str, str | None]:
    """Each class drawn in an error-tree docstring -> its drawn parent (None at the root)."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in docstring.splitlines():
        match = re.match(r"^(\s*)(?:[│ ]*[├└]── )?([A-Z]\w*Error)\b", line)
        if match is None:
            continue
        depth = line.index(match.group(2))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[match.group(2)] = stack[-1][1] if stack else None
        stack.append((depth, match.group(2)))
    return parents


def real_tree() -> dict[str, str | None]:
    """Each error class of the library -> its parent within the library."""
    tree: dict[str, str | None] = {}
    for name in _exceptions.__all__:
        cls = getattr(_exceptions, name)
        bases = [b.__name__ for b in cls.__bases__ if issubclass(b, llama_actors.LlamaActorsError)]
        tree[name] = bases[0] if bases else None
    return tree


def test_the_error_tree_drawn_in_the_docstring_is_the_class_tree() -> None:
    assert drawn_tree(_exceptions.__doc__ or "") == real_tree()


def test_a_drawing_that_misplaces_a_class_does_not_match() -> None:
    wrong = (_exceptions.__doc__ or "").replace(
        "    │   ├── BinaryNotFoundError", "    ├── BinaryNotFoundError"
    )
    assert wrong != _exceptions.__doc__
    assert drawn_tree(wrong) != real_tree()
    assert drawn_tree((_exceptions.__doc__ or "").replace("UsageError", "Usage")) != real_tree()


def test_every_error_class_the_library_defines_lives_in_the_one_tree() -> None:
    outside = [
        f"{cls.__module__}.{cls.__name__}"
        for module in _all_modules()
        for cls in vars(module).values()
        if inspect.isclass(cls)
        and issubclass(cls, BaseException)
        and cls.__module__ == module.__name__
        and module.__name__ != "llama_actors._exceptions"
        and not module.__name__.startswith("llama_actors.testing.fake_server")
    ]
    assert outside == []


def _all_modules() -> list[ModuleType]:
    modules: list[ModuleType] = [llama_actors]
    for info in pkgutil.walk_packages(llama_actors.__path__, "llama_actors."):
        if info.name.endswith("__main__"):
            continue
        modules.append(importlib.import_module(info.name))
    return modules


# -- layers -----------------------------------------------------------------------------

#: Each private layer's rank: a module may import its own layer and the ones below.
LAYERS = {"_exceptions": 0, "_base": 0, "_process": 1, "_kernel": 2, "_llama": 3, "_backends": 4}
LAYERS |= {"_runtime": 5, "_hosts": 6, "_cli": 7}
PUBLIC_RANK = 8  # llama_actors, lowlevel, signals, metrics, clients, testing


def rank(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "llama_actors":
        return -1  # not ours
    return LAYERS.get(parts[1], PUBLIC_RANK) if len(parts) > 1 else PUBLIC_RANK


def upward_imports(module: str, source: str) -> list[str]:
    """The imports in ``source`` (of ``module``) that reach a higher layer, outside
    ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(source)
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for inner in node.body for n in ast.walk(inner)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            if rank(target) > rank(module) and rank(module) < PUBLIC_RANK:
                found.append(f"{module} imports {target}")
                break
    return found


def test_imports_only_go_down_the_layers() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found += upward_imports(module.removesuffix(".__init__"), path.read_text())
    assert found == []


def test_an_import_that_goes_up_a_layer_is_found() -> None:
    source = "from llama_actors._runtime.board import StatusBoard\n"
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    " + source

    assert upward_imports("llama_actors._process.process", source) != []
    assert upward_imports("llama_actors._process.process", typing_only) == []
    assert upward_imports("llama_actors._cli.up", source) == []

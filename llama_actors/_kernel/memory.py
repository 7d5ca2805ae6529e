"""Memory of instances and capacity of hosts (CONTRACT §11): the values admission works on.

Every figure is in MiB. An instance's :class:`MemoryNeed` has three parts:

- ``ram_mib``: private RAM (KV cache, compute buffers, repacked or copied weights);
- ``shared_mib``: RAM holding the model file's pages mapped read-only. Every server
  that maps the same file shares those pages in the page cache, so admission counts
  them once per file (``shared_key``) however many instances map it;
- ``gpu_mib``: memory on each GPU, by index.

It starts as an estimate (``source="estimate"``, from the GGUF header and the spec) and
is replaced once the server is ready by what the server reported (its buffer-size log
lines, ``"reported"``) or, where it reported nothing, by its resident memory
(``"resident"``). :func:`parse_buffer_line` reads llama.cpp's lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import msgspec

__all__ = [
    "BufferLog",
    "Capacity",
    "Gpu",
    "MemoryNeed",
    "MemorySource",
    "detect_gpus",
    "parse_buffer_line",
    "resources_of",
]

MemorySource = Literal["estimate", "reported", "resident"]
_MIB = 1024 * 1024


class MemoryNeed(msgspec.Struct, frozen=True, kw_only=True):
    """What one instance holds or will hold, in MiB (see the module docstring)."""

    ram_mib: float = 0.0
    shared_mib: float = 0.0
    shared_key: str | None = None
    gpu_mib: dict[int, float] = {}
    parts: dict[str, float] = {}
    source: MemorySource = "estimate"

    @property
    def total_ram_mib(self) -> float:
        """Private and shared RAM together: what this instance maps if it is alone."""
        return self.ram_mib + self.shared_mib

    def describe(self) -> str:
        """``"312 MiB RAM (235 shared)"``, with each GPU's figure after it."""
        text = f"{self.total_ram_mib:.0f} MiB RAM"
        if self.shared_mib:
            text += f" ({self.shared_mib:.0f} shared)"
        for index, mib in sorted(self.gpu_mib.items()):
            text += f", {mib:.0f} MiB on GPU {index}"
        return text


def resources_of(
    needs: Iterable[MemoryNeed], *, extra: MemoryNeed | None = None
) -> dict[str, float]:
    """What ``needs`` (and ``extra``) hold together, per resource (``ram``, ``gpu0``...):
    private figures add up, shared pages count once per ``shared_key``."""
    used: dict[str, float] = {"ram": 0.0}
    shared: dict[str, float] = {}
    for need in [*needs, *([extra] if extra is not None else [])]:
        used["ram"] += need.ram_mib
        if need.shared_mib:
            key = need.shared_key or f"unshared-{id(need)}"
            shared[key] = max(shared.get(key, 0.0), need.shared_mib)
        for index, mib in need.gpu_mib.items():
            used[f"gpu{index}"] = used.get(f"gpu{index}", 0.0) + mib
    used["ram"] += sum(shared.values())
    return used


class Gpu(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU of a host: its index (as llama.cpp numbers devices) and the MiB a
    runtime may use on it."""

    index: int
    mib: float
    name: str = ""


class Capacity(msgspec.Struct, frozen=True, kw_only=True):
    """What a runtime may use on one host, per resource.

    ``ram_mib`` caps RAM (None: RAM is not limited). ``gpus`` lists the GPUs and what
    may be used on each; None leaves GPU memory unlimited (and the estimate then
    places layers on the GPUs NVML finds), an empty tuple says the host has none.
    ``host`` names the host the capacity belongs to (``local`` on one machine).
    :meth:`detect` sizes one from what the machine has free.
    """

    ram_mib: float | None = None
    gpus: tuple[Gpu, ...] | None = None
    host: str = "local"

    def __post_init__(self) -> None:
        from llama_actors._exceptions import UsageError

        if self.ram_mib is not None and (
            isinstance(self.ram_mib, bool)
            or not isinstance(self.ram_mib, int | float)
            or self.ram_mib <= 0
        ):
            raise UsageError(
                f"Capacity(ram_mib={self.ram_mib!r}): give a positive number of MiB, or None "
                "to leave RAM unlimited"
            )
        if self.gpus is not None:
            seen: set[int] = set()
            for gpu in self.gpus:
                if not isinstance(gpu, Gpu):
                    raise UsageError(
                        f"Capacity(gpus=...): {gpu!r} is not a Gpu; give Gpu(index=0, mib=...)"
                    )
                if gpu.index in seen or gpu.index < 0 or gpu.mib < 0:
                    raise UsageError(
                        f"Capacity(gpus=...): {gpu!r} repeats an index or has a negative figure"
                    )
                seen.add(gpu.index)

    def limits(self) -> dict[str, float]:
        """The capped resources: ``ram`` and ``gpuN``; a resource not listed is free."""
        limits: dict[str, float] = {}
        if self.ram_mib is not None:
            limits["ram"] = float(self.ram_mib)
        for gpu in self.gpus or ():
            limits[f"gpu{gpu.index}"] = float(gpu.mib)
        return limits

    def limit(self, resource: str) -> float | None:
        """The cap of ``resource``; None when it is not limited. With ``gpus`` given, a
        GPU not among them has a cap of 0."""
        if resource == "ram":
            return None if self.ram_mib is None else float(self.ram_mib)
        if self.gpus is None:
            return None
        return self.limits().get(resource, 0.0)

    def describe(self) -> str:
        parts = ["RAM unlimited" if self.ram_mib is None else f"{self.ram_mib:.0f} MiB RAM"]
        for gpu in self.gpus or ():
            parts.append(f"{gpu.mib:.0f} MiB on GPU {gpu.index}")
        return ", ".join(parts)

    @classmethod
    def detect(
        cls,
        *,
        headroom_mib: float = 1024.0,
        gpus: Sequence[Gpu] | None = None,
        host: str = "local",
    ) -> Capacity:
        """What this machine has free now, less ``headroom_mib`` of RAM (and of each
        GPU) left for everything else: RAM from psutil, GPUs from NVML
        (``llama_actors[gpu]``) unless ``gpus`` is given (tests inject an inventory)."""
        import psutil

        available = psutil.virtual_memory().available / _MIB
        found = detect_gpus() if gpus is None else list(gpus)
        return cls(
            ram_mib=max(1.0, available - headroom_mib),
            gpus=tuple(
                Gpu(index=g.index, mib=max(0.0, g.mib - headroom_mib), name=g.name) for g in found
            ),
            host=host,
        )


def detect_gpus() -> list[Gpu]:
    """Each NVIDIA GPU's free memory through NVML (``nvidia-ml-py``); an empty list
    when the package, the driver or a GPU is missing."""
    try:
        import pynvml  # nvidia-ml-py installs this module
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append(
                Gpu(
                    index=index,
                    mib=float(info.free) / _MIB,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                )
            )
        return found
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()


# -- what a llama.cpp server reports -------------------------------------------------------

#: ``load_tensors:   CPU_Mapped model buffer size =   235.16 MiB``,
#: ``llama_kv_cache:        CPU KV buffer size =    12.00 MiB``,
#: ``sched_reserve:        CPU compute buffer size =    21.28 MiB``,
#: ``llama_context:        CPU  output buffer size =     2.00 MiB``.
_BUFFER = re.compile(
    r"\b(?P<device>[A-Za-z][A-Za-z0-9_]*)\s+(?P<kind>model|KV|compute|output|RS)"
    r" buffer size =\s*(?P<mib>[0-9.]+) MiB"
)
#: Device names of GPU backends with the device index at the end (``CUDA0``, ``ROCm1``).
_GPU = re.compile(r"^(?:CUDA|ROCm|HIP|Vulkan|SYCL|MUSA|CANN|Metal|OpenCL)(?P<index>\d+)$")
_KINDS = {"model": "weights", "KV": "kv", "RS": "kv", "compute": "compute", "output": "output"}


def parse_buffer_line(line: str) -> tuple[str, str, float] | None:
    """``(device, part, mib)`` from one of llama.cpp's buffer-size log lines, else None.
    ``part`` is ``weights``, ``kv``, ``compute`` or ``output``."""
    match = _BUFFER.search(line)
    if match is None:
        return None
    return match["device"], _KINDS[match["kind"]], float(match["mib"])


class BufferLog:
    """Collects a server's buffer-size lines as it loads; :meth:`need` turns them into
    a reported :class:`MemoryNeed`. Weights in a ``*_Mapped`` buffer are the model
    file's pages (shared); every other host buffer is private RAM."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, float]] = []

    def feed(self, line: str) -> bool:
        """Read ``line``; True if it was a buffer-size line."""
        found = parse_buffer_line(line)
        if found is not None:
            self.lines.append(found)
        return found is not None

    def clear(self) -> None:
        self.lines.clear()

    def __bool__(self) -> bool:
        return bool(self.lines)

    def need(self, *, shared_key: str | None) -> MemoryNeed | None:
        """The reported figures, or None when the server printed none."""
        if not self.lines:
            return None
        ram = shared = 0.0
        gpu: dict[int, float] = {}
        parts: dict[str, float] = {}
        for device, part, mib in self.lines:
            parts[part] = parts.get(part, 0.0) + mib
            gpu_match = _GPU.match(device)
            if gpu_match is not None:
                index = int(gpu_match["index"])
                gpu[index] = gpu.get(index, 0.0) + mib
            elif part == "weights" and device.endswith("_Mapped") and shared_key is not None:
                shared += mib
            else:
                ram += mib
        return MemoryNeed(
            ram_mib=round(ram, 2),
            shared_mib=round(shared, 2),
            shared_key=shared_key if shared else None,
            gpu_mib={k: round(v, 2) for k, v in gpu.items()},
            parts={k: round(v, 2) for k, v in parts.items()},
            source="reported",
        )


def with_resident(
    need: MemoryNeed | None, rss_mib: float | None, *, estimate: MemoryNeed | None
) -> MemoryNeed | None:
    """The measured figure once a server is ready: what it reported, with its private
    RAM raised to what its resident memory shows beyond the shared model pages (a
    prompt cache or a build that reports nothing shows up there). With no report,
    the resident memory alone, the shared pages taken from ``estimate``."""
    if rss_mib is None:
        return need
    if need is None:
        if estimate is None:
            return MemoryNeed(ram_mib=round(rss_mib, 2), source="resident")
        shared = min(estimate.shared_mib, rss_mib)
        return MemoryNeed(
            ram_mib=round(rss_mib - shared, 2),
            shared_mib=round(shared, 2),
            shared_key=estimate.shared_key if shared else None,
            gpu_mib=dict(estimate.gpu_mib),
            parts={"resident": round(rss_mib, 2)},
            source="resident",
        )
    beyond = rss_mib - need.shared_mib
    if beyond <= need.ram_mib:
        return need
    return msgspec.structs.replace(need, ram_mib=round(beyond, 2))


def error_pct(estimate: MemoryNeed | None, measured: MemoryNeed | None) -> float | None:
    """How far the estimate was from the measured figure, in percent of the measured
    total (RAM and GPUs together); positive when the estimate was larger."""
    if estimate is None or measured is None:
        return None
    est = estimate.total_ram_mib + sum(estimate.gpu_mib.values())
    got = measured.total_ram_mib + sum(measured.gpu_mib.values())
    if got <= 0:
        return None
    return round(100.0 * (est - got) / got, 1)


def need_from_mapping(data: Mapping[str, float]) -> MemoryNeed:
    """A need from ``{"ram": ..., "gpu0": ...}`` (tests and declared sizes)."""
    gpus = {int(k[3:]): float(v) for k, v in data.items() if k.startswith("gpu")}
    return MemoryNeed(ram_mib=float(data.get("ram", 0.0)), gpu_mib=gpus)

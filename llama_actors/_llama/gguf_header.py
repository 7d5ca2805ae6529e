"""What the memory estimate needs from a GGUF model file, read with ``gguf``, llama.cpp's
own reader (the ``memory`` extra).

``gguf.GGUFReader`` reads every element of every array field one by one: on gemma 3
270M (a 262,144-token vocabulary) that took 12.5 s here. :class:`_HeaderReader` keeps
the reader and changes one thing: an array is read as one slice (numbers) or skipped
over by its length prefixes (strings), 0.05 s for the same file. Everything else
(the header, the value types, the tensor table, the sizes of quantised types) is the
reader's. The facts are remembered per file (path, size, modification time).
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Any

from llama_actors._exceptions import ModelFileError, UsageError

__all__ = ["ModelFacts", "forget_models", "read_model"]


@dataclass(frozen=True)
class TensorFacts:
    """One tensor: its name, quantisation type name (``Q4_K``), dimensions and bytes."""

    name: str
    type_name: str
    n_dims: int
    n_bytes: int


@dataclass(frozen=True)
class ModelFacts:
    """The header facts of one GGUF file that memory depends on.

    Per-layer lists have ``n_layer`` entries. ``shared_key`` names the file's pages
    (real path, size, modification time): instances mapping the same key share them.
    """

    path: str
    shared_key: str
    file_bytes: int
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_ff: tuple[int, ...]
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_k: int
    head_v: int
    n_swa: int
    swa_layers: tuple[bool, ...]
    ssm_state_bytes: int
    tensors: tuple[TensorFacts, ...]

    def layer_of(self, tensor: TensorFacts) -> int | None:
        """The layer a tensor belongs to (``blk.N.*``); ``n_layer`` for the output
        layer (``output.*``, ``output_norm.*``); None for the input (``token_embd``...)."""
        name = tensor.name
        if name.startswith("blk."):
            index = name.split(".", 2)[1]
            return int(index) if index.isdigit() else None
        if name.startswith(("output.", "output_norm.")):
            return self.n_layer
        return None


def read_model(path: str) -> ModelFacts:
    """The header facts of the GGUF file at ``path`` (remembered per file).

    Raises :class:`ModelFileError` when the file is missing or not a GGUF model this
    reader understands, :class:`UsageError` when the ``gguf`` package is missing.
    """
    try:
        real = os.path.realpath(path)
        info = os.stat(real)
    except OSError as exc:
        raise ModelFileError(
            f"model {path!r} cannot be read ({exc.strerror}); fix the path", path
        ) from None
    key = f"{real}:{info.st_size}:{info.st_mtime_ns}"
    with _lock:
        facts = _cache.get(key)
    if facts is None:
        facts = _read(path, real, key, info.st_size)
        with _lock:
            _cache[key] = facts
            while len(_cache) > _CACHE_MAX:
                del _cache[next(iter(_cache))]
    return facts


def forget_models() -> None:
    """Forget every file read (the next estimate reads the header again)."""
    with _lock:
        _cache.clear()


_cache: dict[str, ModelFacts] = {}
_lock = threading.Lock()
_CACHE_MAX = 64

#: Sliding-window layer patterns llama.cpp sets per architecture when the file does not
#: carry one: with pattern P, layer i uses the window unless i % P == P - 1.
_SWA_PATTERNS = {
    "gemma2": 2,
    "gemma3": 6,
    "gemma3n": 5,
    "gemma-embedding": 6,
    "cohere2": 4,
    "gpt-oss": 2,
    "exaone4": 4,
}


def _read(path: str, real: str, key: str, size: int) -> ModelFacts:
    try:
        import gguf  # noqa: F401 - the memory extra
    except ImportError:
        raise UsageError(
            "reading a model's memory needs the gguf package: pip install 'llama-actors[memory]'"
        ) from None
    try:
        reader = _reader_class()(real)
    except Exception as exc:  # whatever a third-party parser raises on a file it cannot read
        raise ModelFileError(
            f"model {path!r} is not a GGUF file llama_actors can read ({exc}); its memory "
            "cannot be estimated, and a runtime with a capacity admits only what it can "
            "estimate: check it is a llama.cpp model",
            path,
        ) from None
    fields = _Fields(reader, path)
    arch = fields.text("general.architecture")
    n_layer = fields.integer(f"{arch}.block_count")
    n_embd = fields.integer(f"{arch}.embedding_length")
    n_head = fields.per_layer(f"{arch}.attention.head_count", n_layer, default=0)
    n_head_kv = fields.per_layer(f"{arch}.attention.head_count_kv", n_layer, default=None)
    if n_head_kv is None:
        n_head_kv = n_head
    first_head = max(n_head) if n_head else 0
    head_k = fields.integer(f"{arch}.attention.key_length", n_embd // first_head or 1)
    head_v = fields.integer(f"{arch}.attention.value_length", head_k)
    n_swa = fields.integer(f"{arch}.attention.sliding_window", 0)
    tokens = fields.count("tokenizer.ggml.tokens")
    return ModelFacts(
        path=path,
        shared_key=key,
        file_bytes=size,
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=fields.integer(f"{arch}.vocab_size", tokens),
        n_ctx_train=fields.integer(f"{arch}.context_length", 4096),
        n_ff=fields.per_layer(f"{arch}.feed_forward_length", n_layer, default=0) or (0,),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_k=head_k,
        head_v=head_v,
        n_swa=n_swa,
        swa_layers=_swa_layers(fields, arch, n_layer, n_swa),
        ssm_state_bytes=_ssm_state_bytes(fields, arch),
        tensors=tuple(
            TensorFacts(
                name=str(t.name),
                type_name=t.tensor_type.name,
                n_dims=len(t.shape),
                n_bytes=int(t.n_bytes),
            )
            for t in reader.tensors
        ),
    )


def _swa_layers(fields: _Fields, arch: str, n_layer: int, n_swa: int) -> tuple[bool, ...]:
    if n_swa <= 0:
        return (False,) * n_layer
    pattern = fields.raw(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == n_layer:
        return tuple(bool(v) for v in pattern)
    period = int(pattern) if isinstance(pattern, int) else _SWA_PATTERNS.get(arch)
    if not period:
        return (False,) * n_layer  # not known: every layer full, the larger estimate
    return tuple(i % period < period - 1 for i in range(n_layer))


def _ssm_state_bytes(fields: _Fields, arch: str) -> int:
    """Bytes of one sequence's recurrent state in one layer (0 without SSM layers)."""
    state = fields.integer(f"{arch}.ssm.state_size", 0)
    inner = fields.integer(f"{arch}.ssm.inner_size", 0)
    if not state or not inner:
        return 0
    conv = fields.integer(f"{arch}.ssm.conv_kernel", 4)
    groups = fields.integer(f"{arch}.ssm.group_count", 1)
    return 4 * (inner * state + (conv - 1) * (inner + 2 * groups * state))


def _skipped(field: Any) -> bool:
    """An array of strings, which the reader skipped over (its data is its length)."""
    return len(field.types) == 2 and field.types[1].name == "STRING"


class _Fields:
    """Typed access to a reader's fields, with errors that name the key."""

    def __init__(self, reader: Any, path: str) -> None:
        self.reader = reader
        self.path = path

    def raw(self, key: str) -> Any:
        field = self.reader.fields.get(key)
        if field is None or _skipped(field):
            return None
        values = [field.parts[i] for i in field.data]
        if len(field.types) > 1:  # an array of numbers: one slice
            return [v.item() for part in values for v in part]
        value = values[0]
        if field.types[0].name == "STRING":
            return bytes(value).decode("utf-8", "replace")
        return value[0].item()

    def text(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str) or not value:
            raise self._missing(key)
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.raw(key)
        if isinstance(value, list):
            value = max(value) if value else None
        if isinstance(value, bool | int):
            return int(value)
        if default is None:
            raise self._missing(key)
        return default

    def per_layer(self, key: str, n_layer: int, *, default: int | None) -> Any:
        value = self.raw(key)
        if isinstance(value, list) and len(value) == n_layer:
            return tuple(int(v) for v in value)
        if isinstance(value, int):
            return (value,) * n_layer
        return None if default is None else (default,) * n_layer

    def count(self, key: str) -> int:
        """The length of an array of strings (the vocabulary)."""
        field = self.reader.fields.get(key)
        if field is None or not _skipped(field):
            return 0
        return int(field.parts[field.data[0]][0])

    def _missing(self, key: str) -> ModelFileError:
        return ModelFileError(
            f"model {self.path!r} has no usable {key!r} in its GGUF header; its memory cannot "
            "be estimated: check it is a complete llama.cpp model",
            self.path,
        )


_reader: type | None = None


def _reader_class() -> type:
    """``gguf.GGUFReader`` with arrays read in one piece (see the module docstring)."""
    global _reader
    if _reader is not None:
        return _reader
    import numpy as np
    from gguf import GGUFReader, GGUFValueType

    class _HeaderReader(GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
            if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            offs = orig_offs
            raw_itype = self._get(offs, np.uint32)
            alen = self._get(offs + 4, np.uint64)
            offs += 12
            itype = GGUFValueType(int(raw_itype[0]))
            count = int(alen[0])
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:
                data = self._get(offs, nptype, count)
                size = offs + int(data.nbytes) - orig_offs
                return size, [raw_itype, alen, data], [2], [GGUFValueType.ARRAY, itype]
            if itype == GGUFValueType.STRING:
                swapped = self.byte_order == "S"
                little = (sys.byteorder == "little") != swapped
                length = struct.Struct("<Q" if little else ">Q").unpack_from
                buffer = memoryview(self.data.data)
                for _ in range(count):
                    offs += 8 + length(buffer, offs)[0]
                return offs - orig_offs, [raw_itype, alen], [1], [GGUFValueType.ARRAY, itype]
            return super()._get_field_parts(orig_offs, raw_type)

    _reader = _HeaderReader
    return _reader

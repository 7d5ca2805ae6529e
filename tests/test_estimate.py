"""The memory estimate before a server starts (CONTRACT §11), on GGUF files written by
``gguf``'s own writer: what the header says and what the spec asks for, figure by figure
as llama.cpp sizes its buffers. The estimate against a real server's own figures is in
tests/test_memory_real.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader

from llama_actors import Gpu, MemoryNeed, ModelFileError, boot_spec
from llama_actors._kernel.memory import resources_of
from llama_actors._llama.estimate import estimate_memory
from llama_actors._llama.gguf_header import read_model

from ._models import Q4_K_BLOCK, TINY, write_model

MIB = 1024 * 1024
EMBD = TINY["n_vocab"] * TINY["n_embd"] * 2  # token_embd, F16
LAYER = TINY["n_embd"] * 4 + 4 * Q4_K_BLOCK  # a norm (F32) and a Q4_K matrix
REPACK = 4 * Q4_K_BLOCK  # the Q4_K matrix copied again by the CPU backend
NORM = TINY["n_embd"] * 4  # output_norm
CELL = 2 * TINY["head"] * TINY["n_head_kv"] * 2  # K and V of one token in one layer, f16
#: The graph buffer of a 512-token micro-batch: activations, then the f16 mask over 1024 cells.
ACTIVATIONS = 4 * 512 * (3 * TINY["n_ff"] + 3 * TINY["n_head"] * TINY["head"] + TINY["n_embd"])
COMPUTE = ACTIVATIONS + 2 * 1024 * 512


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_model(tmp_path_factory.mktemp("model") / "tiny.gguf"))


def estimate(model: str, gpus: tuple[Gpu, ...] = (), **fields: Any) -> MemoryNeed:
    return estimate_memory(boot_spec({"model": model, **fields}), gpus)


def mib(n_bytes: float) -> float:
    return round(n_bytes / MIB, 2)


def test_weights_come_from_the_headers_tensor_table_as_shared_pages_plus_the_repacked_copies(
    model: str,
) -> None:
    need = estimate(model, ctx_size=1024, parallel=1)
    assert need.source == "estimate"
    assert need.shared_mib == mib(EMBD + 6 * LAYER + NORM)
    assert need.shared_key is not None
    assert need.parts["weights"] == pytest.approx(
        (EMBD + 6 * LAYER + NORM + 6 * REPACK) / MIB, abs=0.01
    )
    assert need.gpu_mib == {}


def test_two_aliases_of_one_file_share_its_pages_once_in_what_admission_counts(
    model: str,
) -> None:
    first = estimate(model, alias="one", ctx_size=1024, parallel=1)
    second = estimate(model, alias="two", ctx_size=1024, parallel=1)
    assert first.shared_key == second.shared_key
    together = resources_of([first, second])["ram"]
    assert together == pytest.approx(first.shared_mib + first.ram_mib + second.ram_mib)


def test_the_kv_cache_follows_context_slots_sliding_windows_and_cache_types(model: str) -> None:
    # gemma 3's pattern: layers 0-4 slide over a 128-token window, layer 5 sees everything.
    # With explicit slots each has its own stream; a window stream keeps window + ubatch
    # (512) cells, padded to 256; the full layer keeps the whole context.
    assert estimate(model, ctx_size=1024, parallel=1).parts["kv"] == mib((5 * 768 + 1024) * CELL)
    # parallel auto: 4 slots in one unified cache, the window is 4 * 128 + 512.
    assert estimate(model, ctx_size=1024).parts["kv"] == mib(6 * 1024 * CELL)
    # Two streams of 512 cells: each window stream is cut to its stream.
    assert estimate(model, ctx_size=1024, parallel=2).parts["kv"] == mib(
        (5 * 2 * 512 + 1024) * CELL
    )
    # No ctx_size: the model's training context (2048).
    assert estimate(model, parallel=1).parts["kv"] == mib((5 * 768 + 2048) * CELL)
    # q8_0 keys: 34 bytes per 32 values instead of 2 bytes per value.
    q8_cell = TINY["head"] * 34 // 32 + TINY["head"] * 2
    assert estimate(model, ctx_size=1024, parallel=1, cache_type_k="q8_0").parts["kv"] == mib(
        (5 * 768 + 1024) * q8_cell
    )
    full = estimate(model, ctx_size=1024, parallel=1, extra_args=["--swa-full"])
    assert full.parts["kv"] == mib(6 * 1024 * CELL)
    smaller_batch = estimate(model, ctx_size=1024, parallel=1, extra_args=["-ub", "128"])
    assert smaller_batch.parts["kv"] == mib((5 * 256 + 1024) * CELL)


def test_a_model_without_sliding_windows_keeps_the_whole_context_in_every_layer(
    tmp_path: Path,
) -> None:
    plain = str(write_model(tmp_path / "plain.gguf", arch="llama", swa=False))
    assert estimate(plain, ctx_size=1024, parallel=1).parts["kv"] == mib(6 * 1024 * CELL)


def test_compute_output_and_the_process_itself_are_counted_in_private_ram(model: str) -> None:
    need = estimate(model, ctx_size=1024, parallel=1)
    assert need.parts["compute"] == mib(COMPUTE)
    scores = 4 * TINY["n_head"] * 1024 * 512  # without flash attention
    assert estimate(model, ctx_size=1024, parallel=1, flash_attn="off").parts["compute"] == mib(
        COMPUTE + scores
    )
    assert need.parts["output"] == mib(TINY["n_vocab"] * 4)
    assert estimate(model, ctx_size=1024, parallel=3).parts["output"] == mib(
        3 * TINY["n_vocab"] * 4
    )
    assert need.parts["runtime"] == mib(16 * MIB + 128 * TINY["n_vocab"])
    private = sum(v for k, v in need.parts.items() if k != "weights") + mib(6 * REPACK)
    assert need.ram_mib == pytest.approx(private, abs=0.02)


def test_gpu_layers_are_the_last_ones_split_across_gpus_by_their_memory_or_tensor_split(
    model: str,
) -> None:
    two = (Gpu(index=0, mib=8000), Gpu(index=1, mib=8000))
    need = estimate(model, two, ctx_size=1024, parallel=1, gpu_layers=3)
    # Layers 3 and 4 on GPU 0, layer 5 on GPU 1; each GPU holds a compute buffer.
    gpu0 = 2 * LAYER + 2 * 768 * CELL
    gpu1 = LAYER + 1024 * CELL
    assert need.gpu_mib[0] == pytest.approx(mib(gpu0 + COMPUTE), abs=0.01)
    assert need.gpu_mib[1] == pytest.approx(mib(gpu1 + COMPUTE), abs=0.01)
    # The rest stays mapped in RAM, and only the CPU's layers are repacked.
    assert need.shared_mib == mib(EMBD + 3 * LAYER + NORM)
    assert need.parts["weights"] == pytest.approx(
        (EMBD + 6 * LAYER + NORM + 3 * REPACK) / MIB, abs=0.01
    )

    only_first = estimate(model, two, ctx_size=1024, parallel=1, gpu_layers=3, tensor_split=[1, 0])
    assert set(only_first.gpu_mib) == {0}
    weighted = estimate(model, (Gpu(index=0, mib=1000), Gpu(index=1, mib=3000)), gpu_layers=4)
    assert weighted.gpu_mib[1] > weighted.gpu_mib[0]


def test_offloading_every_layer_puts_the_output_on_a_gpu_with_a_copy_of_tied_embeddings(
    model: str,
) -> None:
    gpu = (Gpu(index=0, mib=8000),)
    need = estimate(model, gpu, ctx_size=1024, parallel=1, gpu_layers="all")
    assert need.shared_mib == mib(EMBD)  # the input embedding never leaves RAM
    weights_on_gpu = 6 * LAYER + NORM + EMBD  # the output layer reads the tied embedding
    kv = (5 * 768 + 1024) * CELL
    assert need.gpu_mib[0] == pytest.approx(mib(weights_on_gpu + kv + COMPUTE), abs=0.01)
    # gpu_layers auto offloads everything where there are GPUs, nothing where there are none.
    assert estimate(model, gpu, ctx_size=1024, parallel=1).gpu_mib == need.gpu_mib
    assert estimate(model, (), gpu_layers="all").gpu_mib == {}


def test_no_mmap_makes_the_weights_private_and_no_kv_offload_keeps_the_cache_in_ram(
    model: str,
) -> None:
    copied = estimate(model, ctx_size=1024, parallel=1, extra_args=["--no-mmap"])
    assert copied.shared_mib == 0
    assert copied.shared_key is None
    mapped = estimate(model, ctx_size=1024, parallel=1)
    assert copied.ram_mib == pytest.approx(mapped.ram_mib + mapped.shared_mib, abs=0.02)
    gpu = (Gpu(index=0, mib=8000),)
    kept = estimate(model, gpu, ctx_size=1024, parallel=1, extra_args=["--no-kv-offload"])
    offloaded = estimate(model, gpu, ctx_size=1024, parallel=1)
    kv = mib((5 * 768 + 1024) * CELL)
    assert kept.gpu_mib[0] == pytest.approx(offloaded.gpu_mib[0] - kv, abs=0.02)


def test_a_file_that_is_not_a_gguf_model_is_a_model_file_error_that_names_it(
    tmp_path: Path,
) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF fake model for tests\n")
    with pytest.raises(ModelFileError, match=r"junk\.gguf.*not a GGUF file") as caught:
        estimate(str(junk))
    assert caught.value.path == str(junk)
    with pytest.raises(ModelFileError, match=r"missing\.gguf.*cannot be read"):
        estimate(str(tmp_path / "missing.gguf"))


def test_the_header_reader_reads_what_ggufs_own_reader_reads(model: str) -> None:
    ours = read_model(model)
    theirs = GGUFReader(model)
    assert [(t.name, t.n_bytes) for t in ours.tensors] == [
        (t.name, int(t.n_bytes)) for t in theirs.tensors
    ]
    assert ours.n_layer == theirs.fields["gemma3.block_count"].contents() == TINY["n_layer"]
    assert ours.n_vocab == len(theirs.fields["tokenizer.ggml.tokens"].contents())
    assert ours.n_swa == theirs.fields["gemma3.attention.sliding_window"].contents()
    assert ours.swa_layers == (True, True, True, True, True, False)
    assert read_model(model) is ours  # remembered per file


def test_a_rewritten_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "changing.gguf"
    write_model(path, n_layer=2)
    assert read_model(str(path)).n_layer == 2
    write_model(path, n_layer=4, n_vocab=1001)  # another size: another key
    assert read_model(str(path)).n_layer == 4

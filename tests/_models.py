"""Small GGUF model files written with ``gguf``'s own writer: real headers (the estimate
reads them as it reads any model), tensors of known sizes, no weights worth running."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

#: The shape of the tiny model: gemma 3's layout (sliding windows on five layers of six,
#: one KV head), small enough to write in milliseconds.
TINY = {
    "n_layer": 6,
    "n_embd": 64,
    "n_ff": 128,
    "n_head": 2,
    "n_head_kv": 1,
    "head": 32,
    "n_ctx_train": 2048,
    "n_swa": 128,
    "n_vocab": 1000,
}
#: Bytes of one Q4_K block of 256 weights.
Q4_K_BLOCK = 144


def write_model(
    path: Path, *, arch: str = "gemma3", swa: bool = True, tied: bool = True, **shape: int
) -> Path:
    """A GGUF file of ``arch`` with ``TINY``'s shape (``shape`` overrides): per layer an
    F32 norm of ``n_embd`` and a Q4_K matrix of 256 x 4 weights (576 bytes, repacked on
    CPU); an F16 token embedding of ``n_vocab`` x ``n_embd``; an F32 output matrix
    unless ``tied``."""
    s = {**TINY, **shape}
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(s["n_layer"])
    writer.add_embedding_length(s["n_embd"])
    writer.add_feed_forward_length(s["n_ff"])
    writer.add_head_count(s["n_head"])
    writer.add_head_count_kv(s["n_head_kv"])
    writer.add_key_length(s["head"])
    writer.add_value_length(s["head"])
    writer.add_context_length(s["n_ctx_train"])
    if swa:
        writer.add_sliding_window(s["n_swa"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(s["n_vocab"])])
    writer.add_token_scores([0.0] * s["n_vocab"])
    writer.add_tensor("token_embd.weight", np.zeros((s["n_vocab"], s["n_embd"]), dtype=np.float16))
    for layer in range(s["n_layer"]):
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.zeros(s["n_embd"], dtype=np.float32))
        writer.add_tensor(
            f"blk.{layer}.ffn_up.weight",
            np.zeros((4, Q4_K_BLOCK), dtype=np.uint8),
            raw_dtype=GGMLQuantizationType.Q4_K,
        )
    writer.add_tensor("output_norm.weight", np.zeros(s["n_embd"], dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((s["n_vocab"], s["n_embd"]), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

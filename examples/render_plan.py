"""Validate a boot spec, check a consumer against the llama.cpp backend, and show the
command llama_actors would run for the llama-server installed here (a dry run).

    python examples/render_plan.py [MODEL.gguf]
"""

from __future__ import annotations

import sys

import llama_actors


def main(model: str) -> int:
    try:
        spec = llama_actors.boot_spec({"model": model, "ctx_size": 2048, "api_key": "sk-demo"})
    except llama_actors.BootSpecError as exc:
        print(f"bad spec: {exc}", file=sys.stderr)
        return 2

    consumer = llama_actors.ConsumerManifest(
        consumer="example-service", required_capabilities={"streaming": True}
    )
    result = llama_actors.compatibility(consumer, llama_actors.lowlevel.llama_manifest(spec))
    print(f"compatible: {result.compatible} via {result.protocol} ({result.management_mode})")

    try:
        plan = llama_actors.lowlevel.render_command(spec)
    except llama_actors.LlamaActorsError as exc:
        print(f"cannot render for this machine: {exc}", file=sys.stderr)
        return 1
    print(f"binary:   {plan.binary_label}")
    print(f"command:  {plan.command_line()}")
    print(f"port:     {plan.port_mode}")
    print(f"identity: {spec.instance_key}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "models/gemma.gguf"))

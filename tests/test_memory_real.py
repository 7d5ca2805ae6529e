"""Memory admission on the real llama-server with gemma 3 270M (CONTRACT §11): the
estimate before the start, the figure the server reports once ready, and evictions
under a capacity that holds two instances, never of a leased one.

The capacity is sized from one calibration start of the same spec: its measured figure
(what llama-server reported, raised to its resident memory) and its estimate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llama_actors import (
    BootSpec,
    Capacity,
    InsufficientMemoryError,
    MemoryNeed,
    Runtime,
    boot_spec,
)
from llama_actors.testing.signals import SignalRecorder

pytestmark = pytest.mark.real_server

WAIT = 120.0


def gemma(model: str, binary: str, alias: str, **fields: object) -> BootSpec:
    return boot_spec(
        {
            "model": model,
            "binary_path": binary,
            "alias": alias,
            "ctx_size": 1024,
            "parallel": 1,
            "threads": 1,
            **fields,
        }
    )


@pytest.fixture(scope="module")
def calibration(
    tmp_path_factory: pytest.TempPathFactory, gemma_model: str, real_binary: str
) -> tuple[MemoryNeed, MemoryNeed]:
    """The estimate and the measured figure of one gemma instance of the test's shape."""
    state = tmp_path_factory.mktemp("calibrate")
    with Runtime(state_dir=state) as rt:
        ensured = rt.ensure_instance(gemma(gemma_model, real_binary, "calibrate"), timeout=WAIT)
        memory = rt.snapshot(ensured.instance.instance_id).memory
    assert memory.estimate is not None
    assert memory.measured is not None
    return memory.estimate, memory.measured


def test_the_measured_figure_comes_from_the_servers_buffer_lines_and_shares_the_weights(
    calibration: tuple[MemoryNeed, MemoryNeed],
) -> None:
    estimate, measured = calibration
    assert measured.source == "reported"
    assert measured.shared_key == estimate.shared_key
    assert measured.shared_key is not None
    # The mapped weights are the file's pages: the estimate reads them from the header.
    assert measured.shared_mib == pytest.approx(estimate.shared_mib, rel=0.02)
    assert measured.parts["kv"] == pytest.approx(estimate.parts["kv"], rel=0.01)
    print(f"estimate {estimate.describe()} {estimate.parts}")
    print(f"measured {measured.describe()} {measured.parts}")


@pytest.fixture
def two_fit(tmp_path: Path, calibration: tuple[MemoryNeed, MemoryNeed]) -> Iterator[Runtime]:
    """A runtime whose capacity holds two gemma instances of the test's shape and half
    of a third one's estimate: a third never fits beside two."""
    estimate, measured = calibration
    cap = measured.shared_mib + 2 * measured.ram_mib + estimate.ram_mib / 2
    with Runtime(state_dir=tmp_path / "state", capacity=Capacity(ram_mib=cap)) as rt:
        yield rt


def chat(resolution: object) -> str:
    endpoint = resolution.endpoint  # type: ignore[attr-defined]
    response = httpx.post(
        f"{endpoint.base_url}/chat/completions",
        headers=endpoint.headers,
        json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4},
        timeout=60,
    )
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


def test_new_identities_evict_idle_instances_least_recently_used_first_never_a_leased_one(
    two_fit: Runtime, gemma_model: str, real_binary: str, recorder: SignalRecorder
) -> None:
    rt = two_fit
    first = rt.resolve_endpoint(gemma(gemma_model, real_binary, "first"), timeout=WAIT)
    second = rt.resolve_endpoint(gemma(gemma_model, real_binary, "second"), timeout=WAIT)
    rt.release(second.lease.lease_ref)  # first keeps its lease, and is the older one
    third = rt.resolve_endpoint(gemma(gemma_model, real_binary, "third"), timeout=WAIT)

    evicted = [r.instance_id for r in recorder.find("instance_evicted")]
    assert evicted == [second.instance.instance_id]
    assert rt.snapshot(first.instance.instance_id).state == "ready"
    assert chat(first)  # the leased one served throughout

    # With every instance leased, a fourth identity cannot be admitted: nothing is
    # evicted, and asked not to wait it fails naming the holders.
    with pytest.raises(InsufficientMemoryError) as caught:
        rt.resolve_endpoint(
            gemma(gemma_model, real_binary, "fourth", ctx_size=2048),
            timeout=WAIT,
            wait_for_memory=False,
        )
    assert first.instance.instance_id in str(caught.value)
    assert third.instance.instance_id in str(caught.value)

    rt.release(first.lease.lease_ref)
    fourth = rt.resolve_endpoint(
        gemma(gemma_model, real_binary, "fourth", ctx_size=2048), timeout=WAIT
    )
    evicted = [r.instance_id for r in recorder.find("instance_evicted")]
    assert evicted == [second.instance.instance_id, first.instance.instance_id]
    assert rt.snapshot(third.instance.instance_id).state == "ready"
    assert chat(third)
    assert chat(fourth)
    stats = rt.statistics().memory
    assert stats.used["ram"] <= stats.capacity["ram"]
    assert stats.evictions == 2
    for resolution in (third, fourth):
        rt.release(resolution.lease.lease_ref)

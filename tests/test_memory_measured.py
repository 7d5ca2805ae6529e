"""From estimate to measured figure in a Runtime, on the fake server serving a real (tiny)
GGUF file: the estimate read from its header before the start, the buffer sizes the
server logs replacing it once ready, the estimate's error logged and shown, and what a
runtime does with a model it cannot estimate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from llama_actors import (
    BootSpec,
    Capacity,
    Gpu,
    ModelFileError,
    Runtime,
)
from llama_actors._runtime import backend as backend_actor
from llama_actors.testing.fake import fake_spec
from llama_actors.testing.signals import SignalRecorder

from ._helpers import FAST, WAIT
from ._models import write_model

#: What the fake logs at verbosity 4, in llama.cpp's lines.
BUFFERS = "CPU_Mapped model 0.13; CPU_REPACK model 0.01; CPU KV 0.59; CPU compute 2.25"


def spec(model: Path, *, buffers: str = BUFFERS, **fields: Any) -> BootSpec:
    fields.setdefault("readiness_interval_ms", 20)
    fields.setdefault("stop_timeout_ms", 2_000)
    return fake_spec(
        model,
        ctx_size=1024,
        parallel=1,
        environment={"FAKE_LLAMA_BUFFERS": buffers},
        **fields,
    )


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "tiny.gguf")


@pytest.fixture
def no_resident(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake's own resident memory (a Python process) would raise the figure: leave it
    out, so the measured figure is exactly what the server reported."""
    monkeypatch.setattr(backend_actor, "_rss_mib", lambda pid: None)


@pytest.mark.usefixtures("no_resident")
def test_the_estimate_from_the_header_is_replaced_by_the_buffers_the_server_reports_once_ready(
    tmp_path: Path, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llama_actors")
    with Runtime(state_dir=tmp_path / "state", policy=FAST) as rt:
        ensured = rt.ensure_instance(spec(model), timeout=WAIT)
        memory = rt.snapshot(ensured.instance.instance_id).memory
    assert memory.estimate is not None
    assert memory.estimate.source == "estimate"
    assert memory.estimate.shared_mib == pytest.approx(0.13, abs=0.01)
    measured = memory.measured
    assert measured is not None
    assert measured.source == "reported"
    assert measured.shared_mib == pytest.approx(0.13)
    assert measured.shared_key == memory.estimate.shared_key
    assert measured.ram_mib == pytest.approx(0.01 + 0.59 + 2.25)
    assert measured.parts == pytest.approx({"weights": 0.14, "kv": 0.59, "compute": 2.25})
    assert memory.held == measured
    # The estimate also counts the process itself (16 MiB and more): it was larger.
    assert memory.error_pct is not None
    assert memory.error_pct > 0
    logged = [r.getMessage() for r in caplog.records if "estimate" in r.getMessage()]
    assert len(logged) == 1
    assert ensured.instance.instance_id in logged[0]
    assert f"error {memory.error_pct:+.1f}%" in logged[0]


def test_at_the_servers_default_verbosity_the_resident_memory_is_the_measured_figure(
    tmp_path: Path, model: Path
) -> None:
    with Runtime(state_dir=tmp_path / "state", policy=FAST) as rt:
        ensured = rt.ensure_instance(spec(model, log_verbosity=3), timeout=WAIT)
        memory = rt.snapshot(ensured.instance.instance_id).memory
    assert memory.measured is not None
    assert memory.measured.source == "resident"
    assert memory.rss_mib is not None
    assert memory.measured.total_ram_mib == pytest.approx(memory.rss_mib, abs=0.01)


def test_a_runtime_with_a_capacity_refuses_a_model_it_cannot_estimate_and_starts_nothing(
    tmp_path: Path,
) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF fake model for tests\n")
    with Runtime(state_dir=tmp_path / "state", capacity=Capacity(ram_mib=4000)) as rt:
        with pytest.raises(ModelFileError, match=r"junk\.gguf.*admits only what it can estimate"):
            rt.resolve_endpoint(spec(junk), timeout=WAIT)
        assert rt.instances() == []


def test_without_a_capacity_a_model_that_cannot_be_estimated_still_starts(
    tmp_path: Path,
) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF fake model for tests\n")
    with Runtime(state_dir=tmp_path / "state", policy=FAST) as rt:
        ensured = rt.ensure_instance(spec(junk), timeout=WAIT)
        memory = rt.snapshot(ensured.instance.instance_id).memory
    assert memory.estimate is None
    assert memory.measured is not None  # what the server reported is still read
    assert memory.error_pct is None


def test_an_injected_gpu_inventory_caps_gpu_memory_and_evicts_for_it_not_for_ram(
    tmp_path: Path, model: Path
) -> None:
    # Every layer of the tiny model offloaded: about 3 MiB on GPU 0 per instance, so a GPU
    # of 5 MiB holds one; RAM is not limited.
    # The fake reports buffers on CUDA0 the way a CUDA build would.
    capacity = Capacity(gpus=(Gpu(index=0, mib=5.0, name="injected"),))
    on_gpu = "CPU_Mapped model 0.12; CUDA0 model 0.14; CUDA0 KV 0.59; CUDA0 compute 2.25"
    recorder = SignalRecorder("instance_evicted")
    with recorder, Runtime(state_dir=tmp_path / "state", policy=FAST, capacity=capacity) as rt:
        first = rt.resolve_endpoint(
            spec(model, alias="one", gpu_layers="all", buffers=on_gpu), timeout=WAIT
        )
        estimate = rt.snapshot(first.instance.instance_id).memory.estimate
        assert estimate is not None
        assert 2.5 < estimate.gpu_mib[0] < 5.0
        rt.release(first.lease.lease_ref)
        second = rt.resolve_endpoint(
            spec(model, alias="two", gpu_layers="all", buffers=on_gpu), timeout=WAIT
        )
        evicted = recorder.find("instance_evicted")
        assert [r.instance_id for r in evicted] == [first.instance.instance_id]
        assert "GPU 0" in evicted[0].payload["reason"]
        # On the CPU, the same model does not touch the GPU's budget.
        third = rt.resolve_endpoint(spec(model, alias="three", gpu_layers=0), timeout=WAIT)
        assert rt.snapshot(second.instance.instance_id).state == "ready"
        assert rt.statistics().memory.used["gpu0"] == pytest.approx(0.14 + 0.59 + 2.25)
        for resolution in (second, third):
            rt.release(resolution.lease.lease_ref)

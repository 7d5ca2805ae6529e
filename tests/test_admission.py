"""Admission's decisions, on the pure ledger: what fits, what is evicted for what, what
waits, and what never fits (CONTRACT §11)."""

from __future__ import annotations

import pytest

from llama_actors import Capacity, Gpu, MemoryNeed, UsageError
from llama_actors._kernel.memory import error_pct, with_resident
from llama_actors.lowlevel import Admission, BufferLog, Holder


def ram(mib: float, *, shared: float = 0.0, key: str | None = None) -> MemoryNeed:
    return MemoryNeed(ram_mib=mib, shared_mib=shared, shared_key=key if shared else None)


def ledger(capacity: Capacity, **held: MemoryNeed) -> Admission:
    admission = Admission(capacity)
    for iid, need in held.items():
        admission.hold(iid, need)
    return admission


def idle(iid: str, admission: Admission, last_used: float) -> Holder:
    return Holder(iid, admission.held[iid], evictable=True, last_used=last_used)


def leased(iid: str, admission: Admission, last_used: float = 0.0) -> Holder:
    return Holder(iid, admission.held[iid], leases=1, evictable=False, last_used=last_used)


def test_a_need_within_what_is_free_fits_without_evicting_anything() -> None:
    admission = ledger(Capacity(ram_mib=1000), a=ram(300))
    verdict = admission.check(ram(600), [idle("a", admission, 1.0)])
    assert verdict.kind == "fits"
    assert verdict.evict == ()


def test_the_least_recently_used_idle_instance_is_evicted_first_and_only_as_many_as_needed() -> (
    None
):
    admission = ledger(Capacity(ram_mib=1000), a=ram(300), b=ram(300), c=ram(300))
    holders = [idle("a", admission, 5.0), idle("b", admission, 1.0), idle("c", admission, 3.0)]
    verdict = admission.check(ram(300), holders)
    assert verdict.kind == "evict"
    assert verdict.evict == ("b",)
    verdict = admission.check(ram(600), holders)
    assert verdict.evict == ("b", "c")


def test_a_leased_instance_is_never_chosen_even_when_it_is_the_least_recently_used() -> None:
    admission = ledger(Capacity(ram_mib=1000), a=ram(500), b=ram(400))
    verdict = admission.check(ram(400), [leased("a", admission, 0.0), idle("b", admission, 9.0)])
    assert verdict.kind == "evict"
    assert verdict.evict == ("b",)


def test_when_evicting_every_idle_instance_is_not_enough_the_request_waits_and_evicts_none() -> (
    None
):
    admission = ledger(Capacity(ram_mib=1000), a=ram(500), b=ram(300))
    verdict = admission.check(ram(600), [leased("a", admission), idle("b", admission, 1.0)])
    assert verdict.kind == "wait"
    assert verdict.evict == ()
    assert verdict.short == {"ram": pytest.approx(400.0)}
    assert verdict.free == {"ram": pytest.approx(200.0)}


def test_a_need_larger_than_the_whole_capacity_never_fits() -> None:
    admission = Admission(Capacity(ram_mib=1000))
    assert admission.check(ram(1001), []).kind == "never"
    gpus = Admission(Capacity(ram_mib=1000, gpus=(Gpu(index=0, mib=8000),)))
    on_gpu1 = MemoryNeed(ram_mib=10, gpu_mib={1: 100})
    assert gpus.check(on_gpu1, []).kind == "never"  # the capacity has no GPU 1


def test_shared_model_pages_count_once_per_file() -> None:
    weights = ram(100, shared=600, key="gemma.gguf")
    admission = ledger(Capacity(ram_mib=1000), a=weights)
    assert admission.used() == {"ram": pytest.approx(700.0)}
    # A second instance mapping the same file adds only its private memory.
    assert admission.check(ram(100, shared=600, key="gemma.gguf"), []).kind == "fits"
    # Another file's pages are its own.
    other = ram(100, shared=600, key="other.gguf")
    assert admission.check(other, [idle("a", admission, 0.0)]).evict == ("a",)


def test_evicting_one_of_two_instances_that_share_a_file_frees_only_its_private_memory() -> None:
    admission = ledger(
        Capacity(ram_mib=1000),
        a=ram(100, shared=600, key="m"),
        b=ram(100, shared=600, key="m"),
    )
    holders = [idle("a", admission, 1.0), idle("b", admission, 2.0)]
    assert admission.used() == {"ram": pytest.approx(800.0)}
    # 400 needed, 200 free: evicting a frees 100 (the pages stay for b); b must go too.
    verdict = admission.check(ram(400), holders)
    assert verdict.evict == ("a", "b")


def test_only_instances_on_a_short_resource_are_evicted() -> None:
    capacity = Capacity(ram_mib=10_000, gpus=(Gpu(index=0, mib=1000), Gpu(index=1, mib=1000)))
    admission = ledger(
        capacity,
        on0=MemoryNeed(ram_mib=10, gpu_mib={0: 800}),
        on1=MemoryNeed(ram_mib=10, gpu_mib={1: 800}),
    )
    holders = [idle("on0", admission, 1.0), idle("on1", admission, 0.0)]
    verdict = admission.check(MemoryNeed(ram_mib=10, gpu_mib={0: 500}), holders)
    assert verdict.evict == ("on0",)  # on1 is older but frees nothing on GPU 0


def test_a_measured_figure_that_grew_past_the_capacity_is_relieved_by_idle_instances_only() -> None:
    admission = ledger(Capacity(ram_mib=1000), a=ram(400), b=ram(300), c=ram(200))
    admission.hold("a", ram(700))  # measured: larger than its estimate
    assert admission.over() == {"ram": pytest.approx(200.0)}
    holders = [leased("a", admission), idle("b", admission, 2.0), idle("c", admission, 1.0)]
    assert admission.relieve(holders) == ("c",)
    admission.release("c")
    assert admission.over() == {}


def test_a_capacity_refuses_values_it_cannot_use_with_a_message_naming_them() -> None:
    with pytest.raises(UsageError, match="ram_mib=-5"):
        Capacity(ram_mib=-5)
    with pytest.raises(UsageError, match="repeats an index"):
        Capacity(gpus=(Gpu(index=0, mib=1), Gpu(index=0, mib=2)))
    with pytest.raises(UsageError, match="is not a Gpu"):
        Capacity(gpus=({"index": 0},))  # type: ignore[arg-type]


def test_detect_sizes_a_capacity_from_what_is_free_and_takes_an_injected_gpu_inventory() -> None:
    capacity = Capacity.detect(headroom_mib=512, gpus=[Gpu(index=0, mib=24_000, name="L4")])
    assert capacity.ram_mib is not None
    assert capacity.ram_mib > 0
    assert capacity.gpus == (Gpu(index=0, mib=23_488, name="L4"),)
    assert Capacity.detect(gpus=[]).gpus == ()


# -- what a server reports ------------------------------------------------------------------

#: llama-server's own lines (gemma 3 270M, -c 4096 --parallel 2, --verbosity 4), verbatim.
REPORTED = """\
0.01.731.588 I load_tensors:   CPU_Mapped model buffer size =   235.16 MiB
0.01.731.609 I load_tensors:   CPU_REPACK model buffer size =    12.66 MiB
0.01.758.037 I llama_context:        CPU  output buffer size =     2.00 MiB
0.01.758.203 I llama_kv_cache:        CPU KV buffer size =    12.00 MiB
0.01.768.637 I llama_kv_cache: size =   12.00 MiB (  2048 cells,   3 layers,  2/2 seqs), K (f16):    6.00 MiB, V (f16):    6.00 MiB
0.01.768.837 I llama_kv_cache:        CPU KV buffer size =    30.00 MiB
0.01.797.930 I sched_reserve:        CPU compute buffer size =    21.28 MiB
0.01.877.835 I srv    load_model: prompt cache is enabled, size limit: 8192 MiB
"""  # noqa: E501


def test_the_servers_buffer_lines_become_a_reported_figure_with_the_mapped_weights_shared() -> None:
    log = BufferLog()
    fed = [log.feed(line) for line in REPORTED.splitlines()]
    assert fed.count(True) == 6  # the KV summary and the prompt cache limit are not buffers
    need = log.need(shared_key="gemma:1")
    assert need is not None
    assert need.source == "reported"
    assert need.shared_mib == pytest.approx(235.16)
    assert need.ram_mib == pytest.approx(12.66 + 2.0 + 12.0 + 30.0 + 21.28)
    assert need.parts == pytest.approx(
        {"weights": 247.82, "output": 2.0, "kv": 42.0, "compute": 21.28}
    )
    assert BufferLog().need(shared_key=None) is None


def test_gpu_buffers_count_on_their_gpu_and_pinned_host_buffers_in_ram() -> None:
    log = BufferLog()
    log.feed("load_tensors:        CUDA0 model buffer size =  4000.00 MiB")
    log.feed("load_tensors:        CUDA1 model buffer size =  1000.50 MiB")
    log.feed("load_tensors:   CPU_Mapped model buffer size =   300.00 MiB")
    log.feed("llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB")
    log.feed("llama_context:  CUDA_Host  output buffer size =     1.00 MiB")
    need = log.need(shared_key="m")
    assert need is not None
    assert need.gpu_mib == {0: 4512.0, 1: 1000.5}
    assert need.shared_mib == 300.0
    assert need.ram_mib == 1.0


def test_resident_memory_raises_reported_private_ram_and_stands_in_when_nothing_is_reported() -> (
    None
):
    reported = MemoryNeed(ram_mib=80, shared_mib=235, shared_key="m", source="reported")
    assert with_resident(reported, 300.0, estimate=None) == reported  # 300 - 235 < 80
    grown = with_resident(reported, 400.0, estimate=None)
    assert grown is not None
    assert grown.ram_mib == pytest.approx(165.0)
    estimate = MemoryNeed(ram_mib=60, shared_mib=235, shared_key="m")
    resident = with_resident(None, 360.0, estimate=estimate)
    assert resident == MemoryNeed(
        ram_mib=125.0,
        shared_mib=235.0,
        shared_key="m",
        parts={"resident": 360.0},
        source="resident",
    )
    assert error_pct(estimate, resident) == pytest.approx(-18.1, abs=0.05)
    assert with_resident(None, None, estimate=estimate) is None

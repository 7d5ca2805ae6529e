"""Placement (CONTRACT §12) over random hosts: the host chosen always may run the spec
and has room for it, spread takes the most free RAM, pack the least, and a spec is
refused only when no host that is up may run it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llama_actors._kernel.admission import Verdict
from llama_actors._kernel.memory import MemoryNeed
from llama_actors._kernel.placement import HostView, matches, place

ZONES = st.sampled_from(["x", "y", "z"])


@st.composite
def hosts(draw: st.DrawFn) -> list[HostView]:
    views = []
    for i in range(draw(st.integers(min_value=0, max_value=5))):
        kind = draw(st.sampled_from(["fits", "evict", "wait", "never"]))
        free = draw(st.floats(min_value=0, max_value=10_000, allow_nan=False))
        evict = (
            tuple(f"i{i}-{k}" for k in range(draw(st.integers(0, 3)))) if kind == "evict" else ()
        )
        views.append(
            HostView(
                host_id=f"h{i}",
                labels={"zone": draw(ZONES)},
                gpus=draw(st.integers(min_value=0, max_value=2)),
                instances=draw(st.integers(min_value=0, max_value=4)),
                verdict=Verdict(kind, MemoryNeed(), {"ram": free}, {}, evict),
                up=draw(st.booleans()),
            )
        )
    return views


WANT = st.dictionaries(st.just("zone"), ZONES, max_size=1)


@given(hosts(), WANT, st.integers(0, 2), st.sampled_from(["spread", "pack"]))
def test_the_host_chosen_may_run_the_spec_and_is_up(
    views: list[HostView], labels: dict[str, str], gpus: int, policy: str
) -> None:
    placed = place(views, labels=labels, gpus=gpus, policy=policy)  # type: ignore[arg-type]
    candidates = [h for h in views if h.up and matches(h.labels, h.gpus, labels, gpus)]

    if not candidates:
        assert placed.kind == "never"
        assert placed.verdict is None
        assert placed.why
        return
    chosen = next(h for h in views if h.host_id == placed.host_id)
    assert chosen in candidates
    assert placed.verdict is chosen.verdict
    if any(h.verdict.kind == "fits" for h in candidates):
        assert placed.kind == "fits"
        assert chosen.verdict.kind == "fits"
    elif any(h.verdict.kind == "evict" for h in candidates):
        assert placed.kind == "evict"
    elif any(h.verdict.kind == "wait" for h in candidates):
        assert placed.kind == "wait"
    else:
        assert placed.kind == "never"


@given(hosts(), WANT)
def test_spread_takes_the_most_free_ram_and_pack_the_least(
    views: list[HostView], labels: dict[str, str]
) -> None:
    fitting = [
        h
        for h in views
        if h.up and matches(h.labels, h.gpus, labels, 0) and h.verdict.kind == "fits"
    ]
    spread = place(views, labels=labels, gpus=0, policy="spread")
    pack = place(views, labels=labels, gpus=0, policy="pack")

    if not fitting:
        assert spread.kind != "fits"
        assert pack.kind != "fits"
        return
    free = {h.host_id: h.verdict.free["ram"] for h in fitting}
    assert free[spread.host_id or ""] == max(free.values())
    assert free[pack.host_id or ""] == min(free.values())

"""Memory: switching between two models under a capacity that holds one, the switch asked
for during a long generation, and the estimate's error (CONTRACT §11).

Two model identities: two names (``bench-a``, ``bench-b``) for the same gemma file.

- ``switch``: llama.cpp's router with ``--models-max 1`` (already running, one model
  loaded) against a Runtime whose capacity holds one instance of the spec and not two
  (the shared pages, one estimate and half a measured private part, from a
  calibration start). One run asks for the
  model that is not loaded: for the router a streamed chat naming it (the router unloads
  the other and loads it); for the runtime ``resolve_endpoint`` of the other spec (the
  loaded one was released, so admission evicts it and starts the other), then the same
  streamed chat. The figure is request to first streamed token; arms alternate.
- ``during_generation``: the same switch asked for one second into a 400-token
  generation on the loaded model. The router's generation and the other model's answer
  are timed; the runtime's generation holds its lease, so the resolve of the other
  model waits (``wait_for_memory=True``) until the lease is released at the end of the
  generation: the generation must complete in full, and the eviction must come after it.
- ``estimate``: the estimate against the measured figure (what llama-server reported,
  raised to its resident memory) for several spec shapes, one start each.

On the fake server (``--quick``) the fake serves the same gemma file (its header gives
the estimate) and prints gemma's buffer lines; there is no router to compare with.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import _servers
from benchmarks._harness import Context, Row, Target, alternate, log, row, skipped
from llama_actors import Capacity, MemoryNeed, Runtime, boot_spec
from llama_actors.signals import instance_evicted
from llama_actors.testing.fake import FAKE_SERVER

NAME = "memory"
PAUSE = 0.5
LONG_TOKENS = 400
#: What llama-server reports for gemma with --ctx-size 512 --parallel 1, for the fake.
GEMMA_BUFFERS = (
    "CPU_Mapped model 235.16; CPU_REPACK model 12.66; CPU KV 7.5; CPU compute 19.28; CPU output 1"
)


def _spec(ctx: Context, alias: str, **fields: Any) -> Any:
    binary, model = (ctx.binary, ctx.model) if ctx.real else (None, _servers.real_paths()[1])
    mapping: dict[str, Any] = {
        "model": model,
        "alias": alias,
        "ctx_size": 512,
        "parallel": 1,
        "threads": 2,
        **fields,
    }
    if ctx.real:
        mapping["binary_path"] = binary
    else:
        mapping |= {
            "binary_path": sys.executable,
            "launcher_args": [FAKE_SERVER],
            "environment": {
                "FAKE_LLAMA_BUFFERS": GEMMA_BUFFERS,
                "FAKE_LLAMA_TOKEN_SECONDS": "0.01",
            },
        }
    return boot_spec(mapping)


def _first_token(client: httpx.Client, base_url: str, headers: dict[str, str], model: str) -> float:
    """Stream a short chat naming ``model``; the monotonic time of its first token."""
    return _servers.stream_chat(client, base_url, headers, tokens=8, model=model)[0]


def _calibrate(ctx: Context, folder: Path) -> tuple[MemoryNeed, MemoryNeed]:
    with Runtime(state_dir=folder / "calibrate") as runtime:
        ensured = runtime.ensure_instance(_spec(ctx, "bench-calibrate"), timeout=120)
        memory = runtime.snapshot(ensured.instance.instance_id).memory
    if memory.estimate is None or memory.measured is None:
        raise RuntimeError(f"no estimate or measured figure for gemma: {memory}")
    return memory.estimate, memory.measured


def _capacity_for_one(estimate: MemoryNeed, measured: MemoryNeed) -> Capacity:
    """Room for one instance's estimate (what admission checks before it starts) and half
    of another's measured private part: a second never fits beside a measured first."""
    shared = max(estimate.shared_mib, measured.shared_mib)
    return Capacity(ram_mib=shared + estimate.ram_mib + 0.5 * measured.ram_mib)


def _router(ctx: Context, folder: Path) -> _servers.Router:
    """llama.cpp's router offering both identities, started (none loaded yet), with the
    runtime's spec flags."""
    binary, model = ctx.real_paths()
    router = _servers.Router(
        binary, model, folder, "--ctx-size", "512", "--threads", "2", names=("bench-a", "bench-b")
    )
    router.start()
    return router


class _Evictions:
    """Counts ``instance_evicted`` and when each came (the receiver only records)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def __call__(self, sender: str, **payload: Any) -> None:
        self.times.append((sender, time.monotonic()))


def run(ctx: Context) -> list[Row]:
    folder = ctx.folder(NAME)
    kind = "real" if ctx.real else "fake"
    client = httpx.Client(trust_env=False, timeout=180)
    evictions = _Evictions()
    instance_evicted.connect(evictions)
    try:
        estimate, measured = _calibrate(ctx, folder)
        capacity = _capacity_for_one(estimate, measured)
        log(f"{NAME}: one instance {measured.describe()}; capacity {capacity.describe()}")
        rows = _switch(ctx, folder, kind, client, capacity, evictions)
        rows += _during_generation(ctx, folder, kind, client, capacity, evictions)
        rows += _estimate_rows(ctx, folder, kind)
    finally:
        instance_evicted.disconnect(evictions)
        client.close()
    return rows


def _switch(
    ctx: Context,
    folder: Path,
    kind: str,
    client: httpx.Client,
    capacity: Capacity,
    evictions: _Evictions,
) -> list[Row]:
    specs = [_spec(ctx, "bench-a"), _spec(ctx, "bench-b")]
    runtime = Runtime(state_dir=folder / "switch", capacity=capacity)
    turn = {"runtime": 0, "router": 0}
    arms: dict[str, Any] = {}

    def through_runtime() -> float:
        turn["runtime"] ^= 1
        spec = specs[turn["runtime"]]
        started = time.monotonic()
        resolution = runtime.resolve_endpoint(spec, "bench-switch", timeout=120)
        endpoint = resolution.endpoint
        first = _first_token(client, endpoint.base_url, dict(endpoint.headers), spec.alias)
        runtime.release(resolution.lease)
        return (first - started) * 1000

    arms["runtime"] = through_runtime
    router: _servers.Router | None = None
    if ctx.real:
        router = _router(ctx, folder / "router")
        _first_token(client, router.base_url, {}, "bench-a")  # one model loaded
        live_router = router

        def through_router() -> float:
            turn["router"] ^= 1
            name = ("bench-a", "bench-b")[turn["router"]]
            started = time.monotonic()
            first = _first_token(client, live_router.base_url, {}, name)
            return (first - started) * 1000

        arms["router"] = through_router
    log(f"{NAME}: switch, {' / '.join(arms)} on the {kind} server")
    before = len(evictions.times)
    try:
        # One resolve first, untimed: the runtime holds one model, as the router does.
        runtime.release(runtime.resolve_endpoint(specs[0], "bench-switch", timeout=120).lease)
        out = alternate(arms, ctx.reps(10, 1), warmup=0 if ctx.quick else 1, pause=PAUSE)
        switches = len(evictions.times) - before
        expected = sum(len(v) for v in out["runtime"].values()) + (0 if ctx.quick else 1)
        if switches < expected:
            raise RuntimeError(
                f"the runtime evicted {switches} times for {expected} switches: the capacity "
                f"{capacity.describe()} holds both models"
            )
    finally:
        runtime.close()
        if router is not None:
            router.stop()
    metric = "switch to the other model: request → first token"
    rows = [
        row(NAME, f"runtime: {metric}, evicting the idle one ({kind})", "ms", out["runtime"][""])
    ]
    if "router" in out:
        rows[0] = row(
            NAME,
            f"runtime: {metric}, evicting the idle one ({kind})",
            "ms",
            out["runtime"][""],
            baseline=("router --models-max 1", out["router"][""]),
            target=Target("ratio", "<=", 1.0, "≤ 1.0 x router"),
        )
        rows.append(row(NAME, f"router --models-max 1: {metric}", "ms", out["router"][""]))
    else:
        rows.append(
            skipped(NAME, f"router --models-max 1: {metric}", "the router needs the real server")
        )
    return rows


def _long_generation(
    client: httpx.Client, base_url: str, headers: dict[str, str], model: str, out: dict[str, Any]
) -> None:
    try:
        times = _servers.stream_chat(client, base_url, headers, tokens=LONG_TOKENS, model=model)
        out["tokens"], out["end"] = len(times), times[-1]
    except Exception as exc:  # the row says what became of the generation
        out["error"], out["end"] = repr(exc), time.monotonic()


def _during_generation(
    ctx: Context,
    folder: Path,
    kind: str,
    client: httpx.Client,
    capacity: Capacity,
    evictions: _Evictions,
) -> list[Row]:
    specs = [_spec(ctx, "bench-a"), _spec(ctx, "bench-b")]
    runtime = Runtime(state_dir=folder / "during", capacity=capacity)
    arms: dict[str, Any] = {}
    gen_client = httpx.Client(trust_env=False, timeout=180)

    def through_runtime() -> dict[str, float]:
        held = runtime.resolve_endpoint(specs[0], "bench-long", timeout=120)
        endpoint = held.endpoint
        state: dict[str, Any] = {}

        def generate() -> None:
            _long_generation(
                gen_client, endpoint.base_url, dict(endpoint.headers), "bench-a", state
            )
            runtime.release(held.lease)

        thread = threading.Thread(target=generate)
        thread.start()
        time.sleep(1.0)  # the switch comes one second into the generation
        asked = time.monotonic()
        mark = len(evictions.times)
        other = runtime.resolve_endpoint(specs[1], "bench-other", timeout=180)
        first = _first_token(
            client, other.endpoint.base_url, dict(other.endpoint.headers), "bench-b"
        )
        thread.join(180)
        runtime.release(other.lease)
        evicted_at = [t for iid, t in evictions.times[mark:] if iid == held.instance.instance_id]
        if "error" in state or not evicted_at or evicted_at[0] < state["end"]:
            raise RuntimeError(f"the leased instance was evicted or broke: {state}, {evicted_at}")
        return {
            "tokens": state["tokens"],
            "answer": (first - asked) * 1000,
            "gen_end": (state["end"] - asked) * 1000,
        }

    arms["runtime"] = through_runtime
    router: _servers.Router | None = None
    if ctx.real:
        router = _router(ctx, folder / "router-long")
        live_router = router

        def through_router() -> dict[str, float]:
            _first_token(client, live_router.base_url, {}, "bench-a")  # a is the loaded one
            state: dict[str, Any] = {}
            args = (gen_client, live_router.base_url, {}, "bench-a", state)
            thread = threading.Thread(target=_long_generation, args=args)
            thread.start()
            time.sleep(1.0)
            asked = time.monotonic()
            first = _first_token(client, live_router.base_url, {}, "bench-b")
            thread.join(180)
            return {
                "tokens": float(state.get("tokens", 0)),
                "answer": (first - asked) * 1000,
                "gen_end": (state["end"] - asked) * 1000,
            }

        arms["router"] = through_router
    log(f"{NAME}: switch during a {LONG_TOKENS}-token generation, {' / '.join(arms)}")
    try:
        out = alternate(arms, ctx.reps(3, 1), warmup=0, pause=PAUSE)
    finally:
        runtime.close()
        gen_client.close()
        if router is not None:
            router.stop()
    rows = []
    for arm, label in (("runtime", "runtime"), ("router", "router --models-max 1")):
        if arm not in out:
            rows.append(skipped(NAME, f"{label}: during a generation", "needs the real server"))
            continue
        figures = out[arm]
        rows += [
            row(
                NAME,
                f"{label}: tokens of the {LONG_TOKENS}-token generation that was running ({kind})",
                "tokens",
                figures["tokens"],
                target=Target("p50", ">=", LONG_TOKENS, f"all {LONG_TOKENS}"),
            ),
            row(
                NAME,
                f"{label}: switch asked 1 s into it → the other model's first token ({kind})",
                "ms",
                figures["answer"],
            ),
            row(
                NAME,
                f"{label}: switch asked → the running generation's last token ({kind})",
                "ms",
                figures["gen_end"],
            ),
        ]
    return rows


#: Spec shapes whose estimate is checked against what the server reports.
SHAPES: tuple[dict[str, Any], ...] = (
    {"ctx_size": 512, "parallel": 1},
    {"ctx_size": 4096, "parallel": 1},
    {"ctx_size": 16384, "parallel": 1},
    {"ctx_size": 4096, "parallel": 4},
    {"ctx_size": 16384, "parallel": 1, "flash_attn": "off"},
    {"ctx_size": None, "parallel": None},
)


def _estimate_rows(ctx: Context, folder: Path, kind: str) -> list[Row]:
    if not ctx.real:
        return [skipped(NAME, "estimate error against the server's figures", "real server only")]
    rows = []
    with Runtime(state_dir=folder / "estimate") as runtime:
        for index, shape in enumerate(SHAPES):
            spec = _spec(ctx, f"bench-shape-{index}", **shape)
            ensured = runtime.ensure_instance(spec, timeout=120)
            memory = runtime.snapshot(ensured.instance.instance_id).memory
            runtime.stop_instance(ensured.instance.instance_id, drain_timeout=0)
            est, got = memory.estimate, memory.measured
            if est is None or got is None or memory.error_pct is None:
                raise RuntimeError(f"no figures for {shape}: {memory}")
            described = (
                ", ".join(f"{k}={v}" for k, v in shape.items() if v is not None) or "defaults"
            )
            parts = "; ".join(
                f"{part} {est.parts.get(part, 0):.2f}/{got.parts.get(part, 0):.2f}"
                for part in ("weights", "kv", "compute", "output")
            )
            log(f"{NAME}: {described}: estimate {est.describe()}, measured {got.describe()}")
            rows.append(
                row(
                    NAME,
                    f"estimate error, gemma {described} ({kind})",
                    "%",
                    [memory.error_pct],
                    note=(
                        f"estimate {est.total_ram_mib:.1f} vs measured {got.total_ram_mib:.1f} "
                        f"MiB (resident {memory.rss_mib:.1f}); parts estimate/reported: {parts}"
                    ),
                )
            )
    return rows

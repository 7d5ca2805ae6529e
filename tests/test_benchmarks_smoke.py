"""The benchmarks run: a short smoke pass of ``python -m benchmarks --quick`` writes the
JSON and the Markdown table with every benchmark in them and leaves no process behind.
No timing is asserted here; the figures come from real runs (benchmarks/README.md).
``hosts`` starts a Ray cluster (about 1 GB): it has a pass of its own, marked ``ray``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from benchmarks import BENCHMARKS

ROOT = Path(__file__).resolve().parent.parent
#: Every benchmark but ``hosts``, which starts a Ray cluster and is run on its own.
WITHOUT_RAY = tuple(name for name in BENCHMARKS if name != "hosts")


def run_benchmarks(
    tmp_path: Path, *args: str, timeout: float, names: tuple[str, ...] = WITHOUT_RAY
) -> dict[str, object]:
    out = tmp_path / "results"
    only = [arg for name in names for arg in ("--only", name)]
    work = tmp_path / "work"
    work.mkdir()
    # The benchmarks' scratch folders go under TMPDIR, so a server left behind would
    # name this test's folder on its command line.
    env = {**os.environ, "TMPDIR": str(work)}
    # Ray keeps its sockets under its temp folder ($TMPDIR/ray by default), and a socket
    # path longer than 107 bytes fails: a short folder of its own.
    with tempfile.TemporaryDirectory(prefix="ray-", ignore_cleanup_errors=True) as ray_tmp:
        env["RAY_TMPDIR"] = ray_tmp
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), *only, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-4000:]
    document: dict[str, object] = json.loads((out / "latest.json").read_text())
    table = (out / "latest.md").read_text()

    assert set(document["benchmarks"]) == set(names)  # type: ignore[arg-type]
    statuses = {n: s["status"] for n, s in document["benchmarks"].items()}  # type: ignore[attr-defined]
    assert statuses == dict.fromkeys(names, "ok"), done.stderr[-4000:]
    results = document["results"]
    assert {r["benchmark"] for r in results} == set(names)  # type: ignore[attr-defined]
    for key in ("date", "cores", "memory_gb", "cpu_model", "llama_server", "model"):
        assert document["meta"][key], key  # type: ignore[index]
    header = "| benchmark | metric | value [95 % CI] | spread | baseline | ratio [95 % CI] |"
    assert header + " target | verdict |" in table
    for result in results:  # type: ignore[attr-defined]
        for key in ("value", "interval", "ratio", "ratio_interval", "rounds", "verdict"):
            assert key in result, (result["metric"], key)
        if result["target"] is not None and result["samples"]:
            assert result["verdict"] in ("met", "missed", "inconclusive"), result["metric"]
    for name in names:
        assert f"| {name} |" in table
    assert table in done.stdout  # the table is printed too

    left = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(str(folder) in " ".join(p.info["cmdline"] or []) for folder in (work, ray_tmp))
    ]
    assert left == [], f"processes outlived the benchmarks: {left}"
    return document


def check_the_single_host_rows(document: dict[str, object]) -> None:
    """The rows of the benchmarks on one machine that the guides and README quote."""
    results = document["results"]
    metrics = {r["metric"] for r in results}  # type: ignore[attr-defined]
    assert any("very first run, cold probe cache" in m for m in metrics)
    assert any("pre-validated BootSpec" in m for m in metrics)
    assert any("plain mapping" in m for m in metrics)
    assert any("health_changed(cause=inference)" in m for m in metrics)  # wedge_detection
    assert any("detected at the worst phase" in m for m in metrics)
    assert any("switch to the other model" in m for m in metrics)  # memory
    assert any("400-token generation" in m for m in metrics)
    assert any("inference probes every 1 s" in m for m in metrics)  # probe_cost
    assert any("inference probes completed during the measured generation" in m for m in metrics)
    assert any("load readings every 1 s" in m for m in metrics)  # scale
    assert any("no load readings (load_interval_ms=None)" in m for m in metrics)
    by_metric = {r["metric"]: r for r in results}  # type: ignore[attr-defined]
    for metric, result in by_metric.items():
        if "health_changed(cause=inference)" in metric or "detected at the worst phase" in metric:
            assert result["statistic"] == "p90", metric  # an upper bound: a high quantile
        if "load readings" in metric and "runtime CPU" in metric:
            assert result["samples"], metric  # both arms measured


@pytest.mark.timeout(130)
def test_the_quick_pass_on_the_fake_server_writes_every_benchmark(tmp_path: Path) -> None:
    document = run_benchmarks(tmp_path, timeout=120)
    check_the_single_host_rows(document)
    assert "fake" in document["meta"]["mode"]  # type: ignore[index]


@pytest.mark.real_server
@pytest.mark.timeout(300)
def test_the_quick_pass_on_the_real_server_writes_every_benchmark(tmp_path: Path) -> None:
    document = run_benchmarks(tmp_path, "--real", timeout=290)
    check_the_single_host_rows(document)
    assert "real" in document["meta"]["mode"]  # type: ignore[index]
    skipped = [r for r in document["results"] if str(r["note"]).startswith("skipped")]  # type: ignore[attr-defined]
    assert skipped == []  # the router rows are measured on the real server


@pytest.mark.ray
@pytest.mark.timeout(130)
def test_the_quick_pass_of_hosts_measures_a_ray_cluster_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    document = run_benchmarks(tmp_path, timeout=120, names=("hosts",))
    by_metric = {r["metric"]: r for r in document["results"]}  # type: ignore[attr-defined]
    measured = [m for m, r in by_metric.items() if r["samples"]]
    assert any("Ray host" in m and "fresh instance" in m for m in measured), measured
    assert any("its leases end" in m for m in measured), measured
    assert any("Ray's verdict" in m for m in measured), measured
    assert any(m.startswith("head CPU") for m in measured), measured
    lost = next(r for m, r in by_metric.items() if "its leases end" in m)
    assert lost["target"] == "≤ 3 s"
    assert lost["verdict"] in ("met", "missed", "inconclusive")

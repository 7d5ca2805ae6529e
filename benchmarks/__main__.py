"""``python -m benchmarks``: run every benchmark (or ``--only`` some), write
``latest.json`` and ``latest.md`` into ``--out`` (``benchmarks/results`` by default)
and print the table. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import BENCHMARKS, _servers
from benchmarks._harness import Context, Row, log, machine_info, markdown, server_version

RESULTS = Path(__file__).parent / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke pass: one repetition, small sizes, the fake server only (unless --real)",
    )
    parser.add_argument(
        "--real",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="use the real llama-server and gemma model (default: yes, except with --quick)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--repeat", type=int, help="repetitions per arm (overrides defaults)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})"
    )
    args = parser.parse_args(argv)
    if args.real is None:
        args.real = not args.quick
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Always in the usual order: cold_start's first run must be the process's first
    # resolve of its spec (a rendered plan is kept per identity and not probed again).
    names = [name for name in BENCHMARKS if name in (args.only or BENCHMARKS)]
    started = time.monotonic()
    meta: dict[str, Any] = machine_info()
    binary = model = None
    if args.real:
        binary, model = _servers.real_paths()
    meta["llama_server"] = server_version(binary) if binary else "fake llama-server only"
    meta["model"] = Path(model).name if model else "fake model"
    meta["mode"] = (
        f"{'quick' if args.quick else 'full'}, {'real' if args.real else 'fake'} server"
        + (f", --repeat {args.repeat}" if args.repeat else "")
    )
    meta["machine"] = (
        f"{meta['cores']} cores, {meta['memory_gb']} GB, {meta['cpu_model']}, {meta['platform']}"
    )
    rows: list[Row] = []
    status: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="llama-actors-bench-") as work:
        for name in names:
            ctx = Context(
                quick=args.quick,
                real=args.real,
                repeat=args.repeat,
                work=Path(work) / name,
                binary=binary,
                model=model,
            )
            log(f"{name}: starting")
            began = time.monotonic()
            try:
                module = importlib.import_module(f"benchmarks.{name}")
                produced = module.run(ctx)
                rows.extend(produced)
                status[name] = {"status": "ok", "rows": len(produced)}
            except Exception as exc:
                traceback.print_exc()
                status[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
                rows.append(Row(name, "error", "", None, note=f"error: {type(exc).__name__}"))
            finally:
                _servers.kill_all()  # whatever a failed benchmark left running
            status[name]["seconds"] = round(time.monotonic() - began, 1)
            log(f"{name}: {status[name]['status']} in {status[name]['seconds']}s")
    meta["load_average"] = (
        f"{meta.pop('load_average_start')} at start, "
        f"{[round(x, 2) for x in os.getloadavg()]} at end"
    )
    meta["duration_s"] = round(time.monotonic() - started, 1)
    write(args.out, meta, rows, status)
    return 0 if all(s["status"] == "ok" for s in status.values()) else 1


def write(out: Path, meta: dict[str, Any], rows: list[Row], status: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "meta": meta,
        "benchmarks": status,
        "results": [r.to_json() for r in rows],
    }
    (out / "latest.json").write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    table = markdown(meta, rows)
    (out / "latest.md").write_text(table)
    print(table)
    log(f"wrote {out / 'latest.json'} and {out / 'latest.md'}")


if __name__ == "__main__":
    sys.exit(main())

"""The ``llama-actors`` command.

Exit codes: 0 all good; 1 a valid spec that cannot run here (binary missing or too old,
model file missing); 2 invalid input (a bad file, field or option). Errors are one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

import msgspec

from llama_actors._backends.registry import resolve_backend
from llama_actors._base.secret import MASK, mask_mapping
from llama_actors._cli.config import Config, load_config, validate_config_file
from llama_actors._cli.demo import run_demo
from llama_actors._cli.up import describe_status, read_status, run_up
from llama_actors._exceptions import (
    BinaryError,
    BootSpecError,
    LlamaActorsError,
    ModelFileError,
    UsageError,
)
from llama_actors._kernel.backend import BackendSpec
from llama_actors._llama.binary import locate_binary
from llama_actors._llama.boot_spec import BootSpec, EndpointUrls
from llama_actors._llama.render import render_command
from llama_actors._process.ledger import Ledger
from llama_actors._process.plan import LaunchPlan, check_model_file

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STATE_DIR_HELP = (
    "the state folder (default: $LLAMA_ACTORS_STATE_DIR, else "
    "$XDG_STATE_HOME/llama_actors, else ~/.local/state/llama_actors)"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-actors",
        description="Run llama-server as supervised actors; inspect and check boot specs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    render = sub.add_parser("render", help="print the command line a backend would run")
    render.add_argument("file", help="TOML file with [backends.NAME] tables")
    render.add_argument("--backend", help="only this backend (default: all)")
    render.add_argument("--binary", help="render for this llama-server instead of the spec's")

    check = sub.add_parser("check", help="validate every backend and check it against its binary")
    check.add_argument("file", help="TOML file with [backends.NAME] tables")
    check.add_argument("--binary", help="check against this llama-server instead of the spec's")

    reap = sub.add_parser(
        "reap", help="stop llama-servers that a dead owner left running (from the ledger)"
    )
    reap.add_argument("--state-dir", help=STATE_DIR_HELP)
    reap.add_argument("--dry-run", action="store_true", help="only list them")

    demo = sub.add_parser("demo", help="the demo: the gemma model on the real llama-server")
    demo.add_argument("--model", help="a GGUF file to use instead of the packaged gemma model")
    demo.add_argument("--binary", help="a llama-server to use instead of the installed one")
    demo.add_argument("--state-dir", help=STATE_DIR_HELP)
    demo.add_argument("--prompt", help="what to ask the model")

    up = sub.add_parser(
        "up", help="run every backend of a TOML file in the foreground until Ctrl-C or SIGTERM"
    )
    up.add_argument("file", help="TOML file with [backends.NAME] tables")
    up.add_argument(
        "--backend", action="append", help="only this backend (repeat for more; default: all)"
    )
    up.add_argument("--state-dir", help=STATE_DIR_HELP)
    up.add_argument(
        "--plain",
        action="store_true",
        help="one log line per transition even on a terminal (default there: a live table)",
    )
    up.add_argument(
        "--abort-on-failure",
        action="store_true",
        help="stop everything as soon as one backend fails for good (default: keep the others)",
    )
    up.add_argument(
        "--refresh", type=float, default=0.5, metavar="SECONDS", help="table refresh interval"
    )

    status = sub.add_parser("status", help="show the backends of a running `llama-actors up`")
    status.add_argument("--state-dir", help=STATE_DIR_HELP)
    status.add_argument("--json", action="store_true", help="print the status files as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout
    try:
        if args.command == "render":
            return _render(load_config(args.file), args.backend, args.binary, out)
        if args.command == "check":
            return _check(args.file, args.binary, out)
        if args.command == "reap":
            return _reap(args.state_dir, args.dry_run, out)
        if args.command == "up":
            return _up(args, out)
        if args.command == "status":
            return _status(args.state_dir, args.json, out)
        kwargs = {"prompt": args.prompt} if args.prompt else {}
        return run_demo(
            out, model=args.model, binary=args.binary, state_dir=args.state_dir, **kwargs
        )
    except (BootSpecError, UsageError) as exc:
        print(f"llama-actors: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LlamaActorsError as exc:
        print(f"llama-actors: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _binary_for(spec: BootSpec, override: str | None) -> str:
    return locate_binary(override if override is not None else spec.binary_path)


def _print_plan(name: str, spec: BootSpec, plan: LaunchPlan, out: TextIO) -> None:
    port = spec.port
    if port == "auto":
        how = {
            "bind_zero": "llama-server binds a free port (--port 0) and logs it",
            "reserve": "reserved by llama_actors at spawn",
        }[plan.port_mode]
        port_text = f"auto ({how})"
        url_port = "<port>"
    else:
        port_text = url_port = str(port)
    rows = [
        ("backend", name),
        ("binary", plan.binary_label),
        ("argv", plan.command_line()),
        ("environment", " ".join(f"{k}={v}" for k, v in mask_mapping(plan.env).items()) or "-"),
        ("port", port_text),
    ]
    _print_rows(rows, spec, EndpointUrls.build(spec.host, url_port, spec.api_prefix), out)


def _print_other(name: str, spec: BackendSpec, plan: LaunchPlan | None, out: TextIO) -> None:
    """A spec of another backend than llama.cpp: what it launches, or that it launches
    nothing, and where it is served."""
    rows = [
        ("backend", f"{name} ({spec.backend})"),
        ("argv", plan.command_line() if plan is not None else "nothing: the server runs elsewhere"),
    ]
    _print_rows(rows, spec, spec.urls(plan.port if plan is not None else None), out)


def _print_rows(
    rows: list[tuple[str, str]], spec: BackendSpec, urls: EndpointUrls, out: TextIO
) -> None:
    """``rows``, then where the spec is served and what identifies it."""
    rows += [
        ("root_url", urls.root_url),
        ("base_url", urls.base_url),
        ("health_url", urls.health_url),
        ("headers", f"Authorization: Bearer {MASK}" if spec.headers else "-"),
        ("instance_key", spec.instance_key),
    ]
    for label, value in rows:
        print(f"{label + ':':<14}{value}", file=out)


def _render(config: Config, only: str | None, binary: str | None, out: TextIO) -> int:
    names = [only] if only is not None else list(config.backends)
    for i, name in enumerate(names):
        spec = config.backend(name)
        if i:
            print(file=out)
        try:
            if not isinstance(spec, BootSpec):
                _print_other(name, spec, resolve_backend(spec).launch(spec), out)
                continue
            plan = render_command(spec, _binary_for(spec, binary))
        except LlamaActorsError as exc:
            raise LlamaActorsError(f"{config.source}: backends.{name}: {exc}") from None
        _print_plan(name, spec, plan, out)
    return EXIT_OK


def _check(path: str, binary: str | None, out: TextIO) -> int:
    """Report every invalid backend (exit 2), then check the valid ones here (exit 1)."""
    specs, errors = validate_config_file(path)
    for error in errors:
        print(f"llama-actors: {error}", file=sys.stderr)
    status = EXIT_USAGE if errors else EXIT_OK
    for name, spec in specs.items():
        if not isinstance(spec, BootSpec):
            print(
                f"ok   {name}: {spec.backend} at {spec.urls().root_url} (not contacted)", file=out
            )
            continue
        try:
            plan = render_command(spec, _binary_for(spec, binary))
            check_model_file(spec.model)
        except (BinaryError, ModelFileError) as exc:
            status = max(status, EXIT_FAILED)
            print(f"FAIL {name}: {exc}", file=out)
            continue
        print(f"ok   {name}: {len(plan.argv)} args for {plan.binary_label}", file=out)
    return status


def _reap(state_dir: str | None, dry_run: bool, out: TextIO) -> int:
    ledger = Ledger(state_dir)
    leftovers = ledger.leftovers()
    if not leftovers:
        print(f"no servers left behind in {ledger.path}", file=out)
        return EXIT_OK
    if dry_run:
        for entry in leftovers:
            state = "running" if entry.server_alive() else "gone"
            print(f"left behind: pid {entry.pid} port {entry.port} ({state})", file=out)
        return EXIT_OK
    reaped = {entry.pid for entry in ledger.reap_leftovers()}
    for entry in leftovers:
        what = "stopped" if entry.pid in reaped else "already gone, entry removed"
        print(f"pid {entry.pid} port {entry.port}: {what}", file=out)
    return EXIT_OK


def _up(args: argparse.Namespace, out: TextIO) -> int:
    if args.refresh <= 0:
        raise UsageError(f"--refresh must be above 0 seconds (got {args.refresh:g})")
    config = load_config(args.file)
    return run_up(
        config,
        names=args.backend,
        state_dir=args.state_dir,
        out=out,
        live=False if args.plain else None,
        refresh_s=args.refresh,
        abort_on_failure=args.abort_on_failure,
    )


def _status(state_dir: str | None, as_json: bool, out: TextIO) -> int:
    statuses = read_status(state_dir)
    if as_json:
        payload = [{**msgspec.to_builtins(s), "running": alive} for s, alive in statuses]
        out.write(json.dumps(payload, indent=2) + "\n")
        return EXIT_OK if any(alive for _, alive in statuses) else EXIT_FAILED
    return describe_status(statuses, out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

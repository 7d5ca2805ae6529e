"""``python -m chaos``: one seeded chaos run; prints the summary, exits 1 if anything
was lost or an invariant broke."""

from __future__ import annotations

import argparse
import logging
import random
import sys

from chaos.engine import FAULTS, ChaosConfig, run_chaos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos",
        description="Inject faults into a Runtime of fake llama-servers and check invariants.",
    )
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: random)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of chaos")
    parser.add_argument("--instances", type=int, default=8, help="instance slots")
    parser.add_argument(
        "--lease-tolerance", type=float, default=0.75, help="seconds a lease may end late"
    )
    parser.add_argument(
        "--snapshot-bound", type=float, default=0.5, help="slowest snapshot answer allowed (s)"
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated fault kinds (default: all of {','.join(FAULTS)})",
    )
    parser.add_argument(
        "--stop-drain", type=float, default=0.8, help="longest drain a stop asks for (s)"
    )
    parser.add_argument("--verbose", action="store_true", help="print each fault as injected")
    parser.add_argument("--log", default="ERROR", help="llama_actors log level (default ERROR)")
    parser.add_argument("--log-transitions", action="store_true", help="also log every transition")
    args = parser.parse_args(argv)
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    if unknown := [f for f in faults if f not in FAULTS]:
        parser.error(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    logging.basicConfig(level=args.log.upper(), format="%(asctime)s %(name)s %(message)s")
    if not args.log_transitions:  # one line per transition: thousands in a long run
        logging.getLogger("llama_actors.transitions").setLevel(logging.CRITICAL)
    print(
        f"chaos: seed {seed}, {args.duration:g}s, {args.instances} slots "
        f"(reproduce with --seed {seed})",
        flush=True,
    )
    summary = run_chaos(
        ChaosConfig(
            seed=seed,
            duration_s=args.duration,
            instances=args.instances,
            lease_tolerance_s=args.lease_tolerance,
            snapshot_bound_s=args.snapshot_bound,
            verbose=args.verbose,
            faults=faults,
            stop_drain_s=args.stop_drain,
        )
    )
    print(summary.render(), flush=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())

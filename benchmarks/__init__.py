"""Benchmarks for llama_actors: ``python -m benchmarks`` (see benchmarks/README.md)."""

#: Every benchmark module, in the order they run.
BENCHMARKS = (
    "cold_start",
    "publish_lag",
    "failure_detection",
    "wedge_detection",
    "stop",
    "warm_resolve",
    "scale",
    "direct_vs_proxied",
    "probe_cost",
    "memory",
    "hosts",
)

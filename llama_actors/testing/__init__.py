"""Test helpers: hypothesis strategies, help-text samples, the fake llama-server, the
runtime's contract and a pytest plugin.

``llama_actors.testing.contract`` runs the runtime's contract (leases, signals,
snapshots, crashes, stops) against any setup; ``llama_actors.testing.pytest_plugin``
fails any test that leaves a child process running; enable it with
``-p llama_actors.testing.pytest_plugin``.
"""

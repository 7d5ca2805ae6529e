"""Test helpers: hypothesis strategies, help-text samples and a pytest plugin.

``llama_actors.testing.pytest_plugin`` fails any test that leaves a child process
running; enable it with ``-p llama_actors.testing.pytest_plugin``.
"""

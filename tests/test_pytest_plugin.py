"""The suite's own guard: a test that leaves a process running fails."""

from __future__ import annotations

import psutil
import pytest


def test_a_test_that_leaves_a_process_running_fails_and_the_process_is_killed(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import subprocess, pathlib

        def test_leaks():
            proc = subprocess.Popen(["sleep", "60"])
            pathlib.Path(__file__).with_name("pid").write_text(str(proc.pid))

        def test_cleans_up():
            subprocess.run(["true"], check=True)
        """
    )
    result = pytester.runpytest_subprocess("-p", "llama_actors.testing.pytest_plugin")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*the test left processes running (now killed)*sleep 60*"])
    pid = int((pytester.path / "pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_test_that_leaves_a_runtime_open_fails_and_the_runtime_is_closed(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        from llama_actors import Runtime

        def test_forgets_to_close(tmp_path):
            Runtime(state_dir=tmp_path)

        def test_closes(tmp_path):
            with Runtime(state_dir=tmp_path):
                pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "llama_actors.testing.pytest_plugin")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*the test left a Runtime open (now closed)*Supervisor-*"])

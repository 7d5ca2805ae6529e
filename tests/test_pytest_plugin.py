"""The suite's own guard: a test that leaves a process running fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._helpers import WAIT, wait_gone


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
    assert wait_gone([pid], timeout=WAIT) == []  # a zombie counts: its reaper may lag


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


PLUGIN = ("-p", "llama_actors.testing.pytest_plugin")
LOG_FROM_A_THREAD = """
    import logging, threading

    import pytest

    def swallow_in_a_thread(message):
        def actor():
            try:
                raise ZeroDivisionError("boom in an actor")
            except ZeroDivisionError:
                logging.getLogger("llama_actors.x").exception(message)

        thread = threading.Thread(target=actor)
        thread.start()
        thread.join(10)
"""


def test_a_test_during_which_the_library_logs_an_error_with_a_traceback_on_a_thread_fails(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        LOG_FROM_A_THREAD
        + """
    def test_swallows():
        swallow_in_a_thread("an actor swallowed it")

    def test_logs_no_traceback_or_not_on_the_library_logger():
        logging.getLogger("llama_actors.x").error("an error without a traceback")
        try:
            raise ValueError("not ours")
        except ValueError:
            logging.getLogger("another_library").exception("its own business")
    """
    )
    result = pytester.runpytest_subprocess(*PLUGIN)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_swallows*",
            "*the library logged 1 error(s) with a traceback during the test*",
            "*llama_actors.x: an actor swallowed it*",
            "*Traceback (most recent call last):*",
            "*ZeroDivisionError: boom in an actor*",
        ]
    )


def test_the_logs_errors_marker_allows_the_error_it_names_and_no_other(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        LOG_FROM_A_THREAD
        + """
    @pytest.mark.logs_errors("swallowed on purpose")
    def test_expects_it():
        swallow_in_a_thread("swallowed on purpose")

    @pytest.mark.logs_errors("ZeroDivisionError: boom")
    def test_expects_it_by_its_exception():
        swallow_in_a_thread("whatever the message")

    @pytest.mark.logs_errors("swallowed on purpose")
    def test_expects_another():
        swallow_in_a_thread("an unrelated bug")

    @pytest.mark.logs_errors
    def test_names_nothing():
        pass
    """
    )
    result = pytester.runpytest_subprocess(*PLUGIN)
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_expects_another*", "*llama_actors.x: an unrelated bug*"]
    )
    result.stdout.fnmatch_lines(
        ["*ERROR at setup of test_names_nothing*", "*logs_errors needs at least one pattern*"]
    )


def test_a_process_that_escaped_to_init_is_still_found_by_the_run_s_mark_and_killed(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import os, subprocess

        def test_leaks_a_daemon():
            # The shell exits at once: its sleep is re-parented, no descendant of pytest.
            subprocess.run(
                ["sh", "-c", "sleep 61 >/dev/null 2>&1 & echo $! > pid"], check=True
            )
            assert os.environ["LLAMA_ACTORS_TEST_SESSION"]
        """
    )
    result = pytester.runpytest_subprocess(*PLUGIN)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*the test left processes running (now killed)*sleep 61*"])
    pid = int((pytester.path / "pid").read_text())
    assert wait_gone([pid], timeout=WAIT) == []


def test_a_run_that_leaves_a_marked_process_behind_fails_and_the_process_is_killed(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(
        """
        import subprocess

        import pytest

        @pytest.fixture(scope="session", autouse=True)
        def forgotten_server():
            # Started before any test's own check and never stopped, and re-parented:
            # only the end-of-run check can find it, by the run's mark.
            subprocess.run(
                ["sh", "-c", "sleep 62 >/dev/null 2>&1 & echo $! > pid"], check=True
            )
            yield
        """
    )
    pytester.makepyfile("def test_fine():\n    pass\n")
    result = pytester.runpytest_subprocess(*PLUGIN)
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*llama_actors: processes left behind by the test run (now killed)*sleep 62*"]
    )
    pid = int((pytester.path / "pid").read_text())
    assert wait_gone([pid], timeout=WAIT) == []


def test_a_run_gets_state_folders_of_its_own_and_a_test_using_the_default_one_fails(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users, users_xdg = tmp_path / "users-state", tmp_path / "users-xdg"
    monkeypatch.setenv("LLAMA_ACTORS_STATE_DIR", str(users))
    monkeypatch.setenv("XDG_STATE_HOME", str(users_xdg))
    pytester.makepyfile(
        f"""
        import os
        from pathlib import Path

        def test_the_state_folders_are_the_run_s_own():
            assert os.environ["LLAMA_ACTORS_STATE_DIR"] != {str(users)!r}
            assert os.environ["XDG_STATE_HOME"] != {str(users_xdg)!r}

        def test_uses_the_default_state_folder(monkeypatch):
            # What a Runtime without LLAMA_ACTORS_STATE_DIR does: the XDG default.
            monkeypatch.delenv("LLAMA_ACTORS_STATE_DIR")
            default = Path(os.environ["XDG_STATE_HOME"]) / "llama_actors"
            (default / "servers").mkdir(parents=True)
            Path("default").write_text(str(default))
        """
    )
    result = pytester.runpytest_subprocess(*PLUGIN)
    result.assert_outcomes(passed=2, errors=1)
    default = (pytester.path / "default").read_text()
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_uses_the_default_state_folder*",
            f"*the test used the default state folder (changed: {default}*",
        ]
    )
    assert not users.exists()
    assert not users_xdg.exists()
    assert not Path(default).exists()  # the run's own folders are gone with it

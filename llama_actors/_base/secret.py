"""Secrets that never show up in a repr, a log line, an error or argv."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["MASK", "Secret", "looks_secret", "mask_argv", "mask_mapping"]

MASK = "********"

_SECRET_NAME = re.compile(r"(?i)(key|token|secret|passw|credential|auth)")


class Secret:
    """A string whose repr and str are masked; ``reveal()`` gives the value.

    Equality and hashing use the value, so specs holding equal keys compare equal.
    msgspec refuses to encode it, so a secret cannot leak through serialisation either.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))


def looks_secret(name: str) -> bool:
    """True for names such as ``HF_TOKEN``, ``--api-key`` or ``db_password``."""
    return bool(_SECRET_NAME.search(name))


def mask_mapping(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` with the values of secret-looking names masked."""
    return {k: (MASK if looks_secret(k) else v) for k, v in env.items()}


def mask_argv(argv: Iterable[str]) -> list[str]:
    """A copy of ``argv`` with the value after a secret-looking flag masked.

    Handles both ``--hf-token VALUE`` and ``--hf-token=VALUE``.
    """
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        if arg.startswith("-") and looks_secret(arg.split("=", 1)[0]):
            if "=" in arg:
                out.append(arg.split("=", 1)[0] + "=" + MASK)
                continue
            # --api-key-file takes a path, not a secret: the path is safe to show.
            mask_next = not arg.endswith("-file")
        out.append(arg)
    return out


def key_to_publish(api_key: Secret | None, file_keys: Sequence[Secret]) -> Secret | None:
    """The key callers send: ``api_key`` when set, else the first key of a key file."""
    if api_key is not None:
        return api_key
    return file_keys[0] if file_keys else None


def bearer_headers(key: Secret | None) -> dict[str, str]:
    """The headers that carry ``key`` (none without a key)."""
    return {"Authorization": f"Bearer {key.reveal()}"} if key is not None else {}

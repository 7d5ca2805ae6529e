"""The package's public face."""

from __future__ import annotations

import inspect

import llama_actors


def test_everything_in_all_is_exported() -> None:
    for name in llama_actors.__all__:
        assert hasattr(llama_actors, name), name


def test_every_public_exception_derives_from_the_one_base() -> None:
    errors = [
        obj
        for name in llama_actors.__all__
        if inspect.isclass(obj := getattr(llama_actors, name)) and issubclass(obj, BaseException)
    ]
    assert len(errors) >= 9
    assert all(issubclass(e, llama_actors.LlamaActorsError) for e in errors)

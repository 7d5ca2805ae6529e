"""The runtime's blinker signals (see :mod:`llama_actors._runtime.signals` for each payload)."""

from llama_actors._runtime import signals as _signals
from llama_actors._runtime.signals import *  # noqa: F403 - this module is the public name of _signals

__all__ = _signals.__all__

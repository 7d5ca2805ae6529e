"""Seeded fault injection for llama_actors: ``python -m chaos --seed N --duration S``.

See :mod:`chaos.engine` for the faults and :mod:`chaos.invariants` for what is checked.
"""

from chaos.engine import FAULTS, POLICY, ChaosConfig, Summary, run_chaos
from chaos.invariants import InvariantRecorder

__all__ = ["FAULTS", "POLICY", "ChaosConfig", "InvariantRecorder", "Summary", "run_chaos"]

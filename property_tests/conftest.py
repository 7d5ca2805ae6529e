"""Hypothesis profiles: `ci` (more examples, no deadline on a shared machine) and `dev`.

The `ci` profile is loaded when the CI environment variable is set; HYPOTHESIS_PROFILE
picks one explicitly.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=400,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)
